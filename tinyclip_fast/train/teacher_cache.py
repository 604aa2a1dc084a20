"""Teacher embeddings computed once and stored, so distillation steps never run the teacher.

As in MobileCLIP's dataset reinforcement: one pass of the frozen teacher over a map-style
dataset writes the L2-normalised features I_t [N, d], T_t [N, d] and its logit scale to a
safetensors file; training looks rows up by the samples' ``index``. Valid only without
random augmentation (the cached features are those of the un-augmented samples).

A cache is tied to the exact data it was built on: next to the teacher's fingerprint it
stores a 64-bit hash of every sample's identity in index order (``datasets.sample_key``: the
CSV path and caption, the content of in-memory tensors), and ``load(..., dataset=)`` refuses
a dataset whose samples differ anywhere, the same rows in another order included, naming the
first one that differs.
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

from tinyclip_fast.atomic_io import atomic_write
from tinyclip_fast.data.datasets import check_sample_fingerprints, sample_fingerprints
from tinyclip_fast.data.loader import collate

FORMAT_VERSION = "2"


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


class TeacherEmbeddingCache:
    """Cached teacher features: ``lookup(indices) -> (image_emb, text_emb)``, each [n, d].

    ``logit_scale`` is the teacher's ``logit_scale`` parameter (log space, as in open_clip):
    the teacher's affinity scale is ``exp(logit_scale)``. ``sample_fingerprints`` int64 [N]
    identifies the samples the rows belong to (None: not known).
    """

    def __init__(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        logit_scale: float,
        metadata: dict[str, str] | None = None,
        sample_fingerprints: torch.Tensor | None = None,
    ) -> None:
        if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
            raise ValueError(
                f"image_emb and text_emb must both be [N, d], got {tuple(image_emb.shape)} and "
                f"{tuple(text_emb.shape)}"
            )
        if sample_fingerprints is not None and tuple(sample_fingerprints.shape) != (
            image_emb.shape[0],
        ):
            raise ValueError(
                f"sample_fingerprints must have shape ({image_emb.shape[0]},), got "
                f"{tuple(sample_fingerprints.shape)}"
            )
        self.image_emb, self.text_emb = image_emb, text_emb
        self._logit_scale = float(logit_scale)
        self.metadata = dict(metadata or {})
        self.sample_fingerprints = sample_fingerprints

    @property
    def logit_scale(self) -> float:
        """The teacher's log-space logit scale (affinity scale b = exp of it)."""
        return self._logit_scale

    def __len__(self) -> int:
        return self.image_emb.shape[0]

    @property
    def dim(self) -> int:
        """Embedding width d."""
        return self.image_emb.shape[1]

    def to(self, device: str | torch.device) -> TeacherEmbeddingCache:
        """A copy whose lookups return tensors on ``device``."""
        return TeacherEmbeddingCache(
            self.image_emb.to(device),
            self.text_emb.to(device),
            self._logit_scale,
            self.metadata,
            self.sample_fingerprints,
        )

    def lookup(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``indices`` of the image and text embeddings, each [n, d]."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.dim() != 1:
            raise ValueError(f"indices must be 1-D, got shape {tuple(indices.shape)}")
        if indices.numel() and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(
                f"indices must lie in [0, {len(self)}), got [{int(indices.min())}, "
                f"{int(indices.max())}]: the cache was built for a different dataset"
            )
        indices = indices.to(self.image_emb.device)
        return self.image_emb[indices], self.text_emb[indices]

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        teacher: nn.Module,
        dataset: Dataset,
        path: str | Path,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
    ) -> TeacherEmbeddingCache:
        """Run ``teacher`` once over ``dataset`` (in index order) and write the cache to ``path``.

        The file is written to a temporary name and renamed, so a crash never leaves a
        half-written cache behind. The samples' fingerprints go with it (when the dataset
        names its samples, see the module docstring).
        """
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise TypeError(
                "TeacherEmbeddingCache needs a map-style dataset (len + integer indexing); "
                f"got {type(dataset).__name__}"
            )
        size = len(dataset)
        if size == 0:
            raise ValueError("cannot cache teacher embeddings of an empty dataset")
        was_training = teacher.training
        teacher.eval()
        image_parts, text_parts = [], []
        try:
            for start in range(0, size, batch_size):
                indices = torch.arange(start, min(start + batch_size, size))
                batch = (
                    dataset.get_batch(indices)
                    if hasattr(dataset, "get_batch")
                    else collate([dataset[i] for i in indices.tolist()])
                )
                image_parts.append(
                    teacher.encode_image(batch["image"].to(device), normalize=True).float().cpu()
                )
                text_parts.append(
                    teacher.encode_text(batch["text"].to(device), normalize=True).float().cpu()
                )
        finally:
            teacher.train(was_training)
        metadata = {
            "format_version": FORMAT_VERSION,
            "num_samples": str(size),
            "dim": str(image_parts[0].shape[1]),
            "teacher_fingerprint": teacher_fingerprint(teacher),
            "dataset": type(dataset).__name__,
        }
        cache = cls(
            torch.cat(image_parts),
            torch.cat(text_parts),
            float(teacher.logit_scale.detach().float().reshape(-1)[0]),
            metadata,
            sample_fingerprints(dataset),
        )
        cache.save(path)
        return cache

    def save(self, path: str | Path) -> None:
        """Write atomically (temporary file in the same folder, then rename)."""
        tensors = {
            "image_emb": self.image_emb.contiguous().cpu(),
            "text_emb": self.text_emb.contiguous().cpu(),
            "logit_scale": torch.tensor([self._logit_scale], dtype=torch.float64),
        }
        if self.sample_fingerprints is not None:
            tensors["sample_fingerprints"] = self.sample_fingerprints.contiguous().cpu()
        contents = {**self.metadata, "format_version": FORMAT_VERSION}
        metadata = {"tinyclip_cache": json.dumps(contents)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        num_samples: int | None = None,
        teacher: nn.Module | None = None,
        dataset: Dataset | None = None,
        device: str | torch.device = "cpu",
    ) -> TeacherEmbeddingCache:
        """Read a cache; refuse one built for other data or another teacher.

        ``dataset``: the data it will serve; its size and every sample's identity must match
        (ValueError naming the first sample that differs). ``num_samples`` checks the size
        only; ``teacher`` the teacher's fingerprint. A dataset or cache without sample
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
            image_emb, text_emb = tensors["image_emb"], tensors["text_emb"]
            logit_scale = float(tensors["logit_scale"][0])
            fingerprints = tensors.get("sample_fingerprints")
        except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as err:
            raise ValueError(
                f"teacher cache {path} is corrupt or not a tinyclip_fast cache ({err!r}); "
                "delete it and rebuild"
            ) from err
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"teacher cache {path} has format {metadata.get('format_version')!r}, "
                f"expected {FORMAT_VERSION!r}; rebuild it"
            )
        if image_emb.shape != text_emb.shape or str(image_emb.shape[0]) != metadata.get(
            "num_samples"
        ):
            raise ValueError(
                f"teacher cache {path} is inconsistent: image {tuple(image_emb.shape)}, text "
                f"{tuple(text_emb.shape)}, header num_samples {metadata.get('num_samples')}"
            )
        if dataset is not None and num_samples is None and hasattr(dataset, "__len__"):
            num_samples = len(dataset)
        if num_samples is not None and image_emb.shape[0] != num_samples:
            raise ValueError(
                f"teacher cache {path} holds {image_emb.shape[0]} samples but the dataset has "
                f"{num_samples}: rebuild it for this dataset"
            )
        if teacher is not None and metadata.get("teacher_fingerprint") != teacher_fingerprint(
            teacher
        ):
            raise ValueError(
                f"teacher cache {path} was built by a different teacher (fingerprint "
                f"{metadata.get('teacher_fingerprint')} != {teacher_fingerprint(teacher)}): "
                "rebuild it"
            )
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
        return cls(image_emb, text_emb, logit_scale, metadata, fingerprints)
