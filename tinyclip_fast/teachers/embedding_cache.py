"""Teacher embeddings computed once and stored, so distillation steps never run the teacher.

As in MobileCLIP's dataset reinforcement: one pass of the frozen teacher (or of each teacher
of an ensemble, K <= 4) over a map-style dataset writes the L2-normalised features
I_t [N, d_k], T_t [N, d_k], the logit scale and bias of every teacher to a safetensors file;
training looks rows up by the samples' ``index``. Valid only without random augmentation
(the cached features are those of the un-augmented samples).

A cache is tied to the exact teachers, in order, and data it was built on: next to every
teacher's fingerprint it stores a 64-bit hash of every sample's identity in index order
(``datasets.sample_key``: the CSV path and caption, the content of in-memory tensors), and
``load(..., dataset=)`` refuses a dataset whose samples differ anywhere, the same rows in
another order included, naming the first one that differs.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset, IterableDataset
from tqdm.auto import tqdm

from tinyclip_fast.atomic_io import atomic_write
from tinyclip_fast.data.datasets import check_sample_fingerprints, sample_fingerprints
from tinyclip_fast.data.loader import collate
from tinyclip_fast.kernels.limits import MAX_TEACHERS
from tinyclip_fast.teachers.loading import own_logit_bias, own_logit_scale

FORMAT_VERSION = "3"  # 3: K teachers, their biases; 2 (one teacher, no bias) still reads
READABLE_VERSIONS = ("2", FORMAT_VERSION)


def teacher_fingerprint(teacher: nn.Module) -> str:
    """Hash of the teacher's parameter names, shapes, dtypes and weight checksums."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if tensor.is_floating_point() and tensor.numel():
            flat = tensor.detach().double()
            # Rounded sums: the same weights give the same digits on any device/thread count.
            digest.update(f"{float(flat.sum()):.6e}:{float(flat.square().sum()):.6e}".encode())
    return digest.hexdigest()[:16]


def _as_list(value: object) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class TeacherEmbeddingCache:
    """Cached features of K teachers: ``lookup_all(indices) -> (images, texts)``, lists of
    [n, d_k]; for one teacher ``lookup(indices) -> (image_emb, text_emb)``.

    ``logit_scales[k]`` is teacher k's ``logit_scale`` parameter (log space, as in open_clip:
    its affinity scale is the exp of it), ``logit_biases[k]`` its ``logit_bias`` (None for a
    softmax CLIP). ``sample_fingerprints`` int64 [N] identifies the samples the rows belong to
    (None: not known). Tensors and numbers may be given for one teacher, lists for K.
    """

    def __init__(
        self,
        image_emb: torch.Tensor | Sequence[torch.Tensor],
        text_emb: torch.Tensor | Sequence[torch.Tensor],
        logit_scale: float | Sequence[float],
        metadata: dict[str, str] | None = None,
        sample_fingerprints: torch.Tensor | None = None,
        logit_bias: float | None | Sequence[float | None] = None,
    ) -> None:
        images, texts, scales = _as_list(image_emb), _as_list(text_emb), _as_list(logit_scale)
        biases = [None] * len(images) if logit_bias is None else _as_list(logit_bias)
        if not 1 <= len(images) <= MAX_TEACHERS:
            raise ValueError(f"a cache holds 1 to {MAX_TEACHERS} teachers, got {len(images)}")
        if not len(images) == len(texts) == len(scales) == len(biases):
            raise ValueError(
                f"one entry per teacher: {len(images)} image, {len(texts)} text embeddings, "
                f"{len(scales)} scales, {len(biases)} biases"
            )
        for k, (image, text) in enumerate(zip(images, texts, strict=True)):
            if image.dim() != 2 or image.shape != text.shape or image.shape[0] != len(images[0]):
                raise ValueError(
                    f"teacher {k}: image_emb and text_emb must both be [N, d] with the N of "
                    f"teacher 0, got {tuple(image.shape)} and {tuple(text.shape)}"
                )
        if sample_fingerprints is not None and tuple(sample_fingerprints.shape) != (
            images[0].shape[0],
        ):
            raise ValueError(
                f"sample_fingerprints must have shape ({images[0].shape[0]},), got "
                f"{tuple(sample_fingerprints.shape)}"
            )
        self.image_embs, self.text_embs = images, texts
        self.logit_scales = [float(v) for v in scales]
        self.logit_biases = [None if v is None else float(v) for v in biases]
        self.metadata = dict(metadata or {})
        self.sample_fingerprints = sample_fingerprints

    @property
    def teachers(self) -> int:
        """Number of teachers K."""
        return len(self.image_embs)

    def _single(self, what: str) -> int:
        if self.teachers != 1:
            raise ValueError(
                f"{what}: this cache holds {self.teachers} teachers; use the lists "
                "(image_embs, text_embs, logit_scales, lookup_all)"
            )
        return 0

    @property
    def image_emb(self) -> torch.Tensor:
        """The image embeddings [N, d] of a one-teacher cache."""
        return self.image_embs[self._single("image_emb")]

    @property
    def text_emb(self) -> torch.Tensor:
        """The text embeddings [N, d] of a one-teacher cache."""
        return self.text_embs[self._single("text_emb")]

    @property
    def logit_scale(self) -> float:
        """The log-space logit scale of a one-teacher cache (affinity scale b = exp of it)."""
        return self.logit_scales[self._single("logit_scale")]

    def __len__(self) -> int:
        return self.image_embs[0].shape[0]

    @property
    def dims(self) -> list[int]:
        """Embedding width d_k of every teacher."""
        return [image.shape[1] for image in self.image_embs]

    @property
    def dim(self) -> int:
        """Embedding width d of a one-teacher cache."""
        return self.dims[self._single("dim")]

    def to(self, device: str | torch.device) -> TeacherEmbeddingCache:
        """A copy whose lookups return tensors on ``device``."""
        return TeacherEmbeddingCache(
            [image.to(device) for image in self.image_embs],
            [text.to(device) for text in self.text_embs],
            self.logit_scales,
            self.metadata,
            self.sample_fingerprints,
            self.logit_biases,
        )

    def lookup_all(
        self, indices: torch.Tensor | Sequence[int]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Rows ``indices`` of every teacher's image and text embeddings, lists of [n, d_k]."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.dim() != 1:
            raise ValueError(f"indices must be 1-D, got shape {tuple(indices.shape)}")
        if indices.numel() and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(
                f"indices must lie in [0, {len(self)}), got [{int(indices.min())}, "
                f"{int(indices.max())}]: the cache was built for a different dataset"
            )
        indices = indices.to(self.image_embs[0].device)
        return [e[indices] for e in self.image_embs], [e[indices] for e in self.text_embs]

    def lookup(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``indices`` of a one-teacher cache's image and text embeddings, each [n, d]."""
        self._single("lookup")
        images, texts = self.lookup_all(indices)
        return images[0], texts[0]

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        teacher: nn.Module | Sequence[nn.Module],
        dataset: Dataset,
        path: str | Path,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        progress: bool = False,
    ) -> TeacherEmbeddingCache:
        """Run ``teacher`` (or every teacher of a list) once over ``dataset`` (in index
        order) and write the cache to ``path``; ``progress``: a tqdm bar of the samples with
        images/s.

        The file is written to a temporary name and renamed, so a crash never leaves a
        half-written cache behind. The samples' fingerprints go with it (when the dataset
        names its samples, see the module docstring).
        """
        teachers = _as_list(teacher)
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise TypeError(
                "TeacherEmbeddingCache needs a map-style dataset (len + integer indexing); "
                f"got {type(dataset).__name__}"
            )
        size = len(dataset)
        if size == 0:
            raise ValueError("cannot cache teacher embeddings of an empty dataset")
        modes = [model.training for model in teachers]
        for model in teachers:
            model.eval()
        image_parts = [[] for _ in teachers]
        text_parts = [[] for _ in teachers]
        bar = tqdm(
            total=size,
            unit="img",
            desc="teacher embedding cache",
            dynamic_ncols=True,
            disable=not progress,
        )
        try:
            for start in range(0, size, batch_size):
                indices = torch.arange(start, min(start + batch_size, size))
                batch = (
                    dataset.get_batch(indices)
                    if hasattr(dataset, "get_batch")
                    else collate([dataset[i] for i in indices.tolist()])
                )
                images, texts = batch["image"].to(device), batch["text"].to(device)
                for k, model in enumerate(teachers):
                    image_parts[k].append(model.encode_image(images, normalize=True).float().cpu())
                    text_parts[k].append(model.encode_text(texts, normalize=True).float().cpu())
                bar.update(len(indices))
        finally:
            bar.close()
            for model, mode in zip(teachers, modes, strict=True):
                model.train(mode)
        metadata = {
            "num_samples": str(size),
            "teacher_fingerprints": json.dumps([teacher_fingerprint(m) for m in teachers]),
            "dataset": type(dataset).__name__,
        }
        cache = cls(
            [torch.cat(parts) for parts in image_parts],
            [torch.cat(parts) for parts in text_parts],
            [own_logit_scale(m) for m in teachers],
            metadata,
            sample_fingerprints(dataset),
            [own_logit_bias(m) for m in teachers],
        )
        cache.save(path)
        return cache

    def save(self, path: str | Path) -> None:
        """Write atomically (temporary file in the same folder, then rename)."""
        tensors = {"logit_scale": torch.tensor(self.logit_scales, dtype=torch.float64)}
        for k, (image, text) in enumerate(zip(self.image_embs, self.text_embs, strict=True)):
            suffix = f".{k}" if k else ""  # teacher 0 under the one-teacher names
            tensors[f"image_emb{suffix}"] = image.contiguous().cpu()
            tensors[f"text_emb{suffix}"] = text.contiguous().cpu()
        if self.sample_fingerprints is not None:
            tensors["sample_fingerprints"] = self.sample_fingerprints.contiguous().cpu()
        contents = {
            **self.metadata,
            "format_version": FORMAT_VERSION,
            "teachers": str(self.teachers),
            "logit_biases": json.dumps(self.logit_biases),
        }
        metadata = {"tinyclip_cache": json.dumps(contents)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        num_samples: int | None = None,
        teacher: nn.Module | Sequence[nn.Module] | None = None,
        dataset: Dataset | None = None,
        device: str | torch.device = "cpu",
    ) -> TeacherEmbeddingCache:
        """Read a cache; refuse one built for other data or other teachers.

        ``dataset``: the data it will serve; its size and every sample's identity must match
        (ValueError naming the first sample that differs). ``num_samples`` checks the size
        only; ``teacher`` (one model or the list of an ensemble) the teachers' fingerprints,
        their number and order. A dataset or cache without sample
        identities cannot be checked: a warning says so.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"teacher cache {path} does not exist; build it with TeacherEmbeddingCache.build"
            )
        try:
            tensors = load_file(str(path), device=str(device))
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
            metadata = json.loads(header["tinyclip_cache"])
            if metadata.get("format_version") not in READABLE_VERSIONS:
                raise _FormatError(repr(metadata.get("format_version")))
            count = int(metadata.get("teachers", "1"))
            suffixes = ["", *(f".{k}" for k in range(1, count))]
            image_embs = [tensors[f"image_emb{x}"] for x in suffixes]
            text_embs = [tensors[f"text_emb{x}"] for x in suffixes]
            logit_scales = [float(v) for v in tensors["logit_scale"][:count]]
            logit_biases = json.loads(metadata.get("logit_biases", "null")) or [None] * count
            known = json.loads(
                metadata.get("teacher_fingerprints")
                or json.dumps([metadata.get("teacher_fingerprint")])
            )
            fingerprints = tensors.get("sample_fingerprints")
        except _FormatError as err:
            raise ValueError(
                f"teacher cache {path} has format {err}, expected one of {READABLE_VERSIONS}; "
                "rebuild it"
            ) from None
        except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as err:
            raise ValueError(
                f"teacher cache {path} is corrupt or not a tinyclip_fast cache ({err!r}); "
                "delete it and rebuild"
            ) from err
        pairs = list(zip(image_embs, text_embs, strict=True))
        shapes = [(tuple(i.shape), tuple(t.shape)) for i, t in pairs]
        if any(
            i.shape != t.shape or str(i.shape[0]) != metadata.get("num_samples") for i, t in pairs
        ) or not (len(logit_scales) == len(logit_biases) == len(known) == count):
            raise ValueError(
                f"teacher cache {path} is inconsistent: {count} teachers, (image, text) shapes "
                f"{shapes}, header num_samples {metadata.get('num_samples')}, "
                f"{len(logit_scales)} scales, {len(known)} fingerprints"
            )
        image_emb = image_embs[0]
        if dataset is not None and num_samples is None and hasattr(dataset, "__len__"):
            num_samples = len(dataset)
        if num_samples is not None and image_emb.shape[0] != num_samples:
            raise ValueError(
                f"teacher cache {path} holds {image_emb.shape[0]} samples but the dataset has "
                f"{num_samples}: rebuild it for this dataset"
            )
        if teacher is not None:
            _check_teachers(path, known, [teacher_fingerprint(m) for m in _as_list(teacher)])
        if dataset is not None:
            checked = fingerprints is not None and (
                check_sample_fingerprints(fingerprints.cpu(), dataset, f"teacher cache {path}")
                is not None
            )
            if not checked:
                lacking = f"cache {path}" if fingerprints is None else type(dataset).__name__
                warnings.warn(
                    f"teacher cache {path}: cannot check that it was built on this data "
                    f"({lacking} has no sample identities); only its size matches",
                    stacklevel=2,
                )
        return cls(image_embs, text_embs, logit_scales, metadata, fingerprints, logit_biases)


class _FormatError(Exception):
    """A cache file of a format this version cannot read."""


def _check_teachers(path: Path, built: list[str], given: list[str]) -> None:
    """ValueError unless ``given`` fingerprints are those the cache was built with, in order."""
    if len(built) != len(given):
        raise ValueError(
            f"teacher cache {path} was built by {len(built)} teacher(s), this run has "
            f"{len(given)}: a different teacher list; rebuild it"
        )
    for k, (theirs, ours) in enumerate(zip(built, given, strict=True)):
        if theirs != ours:
            which = f"teacher {k} " if len(given) > 1 else ""
            raise ValueError(
                f"teacher cache {path} was built by a different teacher {which}(fingerprint "
                f"{theirs} != {ours}): a different teacher list or order; rebuild it"
            )
