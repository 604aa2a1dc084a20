"""Reinforced data: stored teacher embeddings for K augmentations of every image and for
every caption, read back so that a distillation step never runs the teacher.

Cache file (one per source shard, safetensors; written by train/reinforced_cache.py)::

    image_emb        [N, K, D]  fp16/bf16/fp32  teacher image embeddings of each augmentation
    text_emb         [C, D]                     one row per caption, samples back to back
    caption_offsets  [N + 1]    int64           sample i's captions: rows offsets[i]:offsets[i+1]
    num_real         [N]        int64           of which the first num_real[i] are real
    records          [bytes]    uint8           UTF-8 JSON {"keys": [N], "params": [N][K]}

D is the sum of the teachers' widths: an ensemble is stored concatenated per sample, each
teacher's part L2-normalised on its own. The header (safetensors metadata
``tinyclip_reinforced``, JSON) names the format version, the shard and its fingerprint, N, K,
the dtype, the build seed, the teachers (name, dim, weight fingerprint, log logit scale,
logit bias) and the augmentation recipe (``preprocess`` and ``augmentation`` parts, see
data/augment.py); ``params[i][k]`` replays augmentation k of sample i exactly.

Training (:class:`ReinforcedDataset`, and data/datacompdr.py for Apple's shards): per sample,
ONE stored augmentation and ONE caption, chosen by hashing (seed, epoch, sample id), so the
stream depends on nothing else and a resumed run sees the same samples. Sample fields::

    image              float32 [3, H, W]   the chosen augmentation, replayed
    text               int64 [ctx]         the chosen caption, tokenized for the student
    index              int                 position in this worker's stream
    aug_index          int                 which of the K augmentations
    caption_index      int                 which caption (real ones first)
    teacher_image_emb  [D] stored dtype    teacher embedding of that augmentation
    teacher_text_emb   [D] stored dtype    teacher embedding of that caption

:func:`teacher_targets` turns a batch's two embedding fields into per-teacher loss inputs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import IterableDataset

from tinyclip_fast.atomic_io import atomic_write
from tinyclip_fast.data.augment import AugmentRecipe, Params
from tinyclip_fast.data.datasets import (
    WDS_IMAGE_EXTENSIONS,
    Tokenizer,
    _tokenize_one,
    csv_separator,
    split_shards,
)
from tinyclip_fast.data.decode import CropDecoder
from tinyclip_fast.data.options import given_options
from tinyclip_fast.data.sources import Record, ShardedSource, open_source, source_kind

FORMAT = "tinyclip_fast.reinforced"
FORMAT_VERSION = 1
HEADER_KEY = "tinyclip_reinforced"
CACHE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CAPTION_MODES = ("all", "real", "synthetic")
TEACHER_IMAGE = "teacher_image_emb"
TEACHER_TEXT = "teacher_text_emb"
TENSOR_NAMES = ("image_emb", "text_emb", "caption_offsets", "num_real", "records")


@dataclass(frozen=True)
class TeacherInfo:
    """One teacher of a (possibly ensemble) cache: its width ``dim`` in the concatenated
    embedding, the fingerprint of its weights (None when unknown, e.g. DataCompDR), its
    log-space ``logit_scale`` (affinity scale exp(logit_scale)) and SigLIP ``logit_bias``."""

    name: str
    dim: int
    fingerprint: str | None
    logit_scale: float
    logit_bias: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TeacherTargets(NamedTuple):
    """One teacher's loss inputs for a batch: unit rows I_t, T_t [n, d] float32, the
    multiplicative scale exp(logit_scale) and the logit bias (None without one), 0-d."""

    image: torch.Tensor
    text: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None


def teacher_targets(
    batch: dict[str, torch.Tensor],
    teachers: Sequence[TeacherInfo],
    device: str | torch.device | None = None,
) -> list[TeacherTargets]:
    """Per teacher, (I_t, T_t, scale, bias) from a reinforced batch: the engine's replacement
    for a teacher forward (the engine's ``StoredTeacher``).

    The stored embeddings are split by the teachers' dims, cast to float32 on ``device`` and
    re-normalised (they were unit vectors before rounding to the cache dtype), so
    I_t T_t^T is a cosine matrix as it is online. ``teachers``: the dataset's ``teachers``.
    """
    image, text = batch[TEACHER_IMAGE], batch[TEACHER_TEXT]
    width = sum(t.dim for t in teachers)
    if image.dim() != 2 or image.shape != text.shape or image.shape[1] != width:
        raise ValueError(
            f"batch {TEACHER_IMAGE} {tuple(image.shape)} and {TEACHER_TEXT} "
            f"{tuple(text.shape)} must both be [n, {width}] (teacher dims "
            f"{[t.dim for t in teachers]})"
        )
    device = device if device is not None else image.device
    image = image.to(device, torch.float32, non_blocking=True)
    text = text.to(device, torch.float32, non_blocking=True)
    targets, start = [], 0
    for teacher in teachers:
        part = slice(start, start + teacher.dim)
        start += teacher.dim
        bias = teacher.logit_bias
        targets.append(
            TeacherTargets(
                torch.nn.functional.normalize(image[:, part], dim=-1),
                torch.nn.functional.normalize(text[:, part], dim=-1),
                # torch.full fills on the device: no host-to-device copy, no sync per step.
                torch.full((), math.exp(teacher.logit_scale), device=device),
                None if bias is None else torch.full((), float(bias), device=device),
            )
        )
    return targets


# ---- the cache file ------------------------------------------------------------------


@dataclass
class ShardCache:
    """One cache file in memory (see the module docstring for the fields)."""

    path: Path
    header: dict[str, Any]
    image_emb: torch.Tensor
    text_emb: torch.Tensor
    caption_offsets: torch.Tensor
    num_real: torch.Tensor
    keys: list[str]
    params: list[list[Params]]

    def __len__(self) -> int:
        return len(self.keys)


def write_shard_cache(
    path: str | Path,
    header: dict[str, Any],
    *,
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    caption_offsets: torch.Tensor,
    num_real: torch.Tensor,
    keys: Sequence[str],
    params: Sequence[Sequence[Params]],
) -> Path:
    """Write one shard's cache atomically (a crash leaves no partial file at ``path``)."""
    records = json.dumps({"keys": list(keys), "params": [list(p) for p in params]})
    tensors = {
        "image_emb": image_emb.contiguous().cpu(),
        "text_emb": text_emb.contiguous().cpu(),
        "caption_offsets": caption_offsets.to(torch.int64).contiguous().cpu(),
        "num_real": num_real.to(torch.int64).contiguous().cpu(),
        "records": torch.frombuffer(bytearray(records.encode("utf-8")), dtype=torch.uint8),
    }
    header = {**header, "format": FORMAT, "format_version": FORMAT_VERSION}
    _check_consistent(Path(path), header, tensors, len(keys), [len(p) for p in params])
    metadata = {HEADER_KEY: json.dumps(header)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_header(path: str | Path) -> dict[str, Any]:
    """The header of a cache file, without reading its tensors; a missing file, a truncated
    or foreign one and another format version are errors naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"reinforced cache {path} does not exist; build it first (train/reinforced_cache.py)"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {})[HEADER_KEY])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise ValueError(
            f"reinforced cache {path} is truncated, corrupt or not a reinforced cache ({err!r}): "
            "if it is a damaged cache, move it away and build that shard again; if it is "
            "another program's file, give the cache its own --set reinforced.cache_dir=DIR"
        ) from err
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"reinforced cache {path} has format {header.get('format')!r} version "
            f"{header.get('format_version')!r}, this library reads {FORMAT!r} version "
            f"{FORMAT_VERSION}: rebuild it"
        )
    return header


def load_shard_cache(path: str | Path) -> ShardCache:
    """Read a whole cache file, checking its tensors against its header."""
    path = Path(path)
    header = read_header(path)
    try:
        tensors = load_file(str(path))
        records = json.loads(bytes(tensors["records"].numpy()).decode("utf-8"))
        keys, params = records["keys"], records["params"]
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise ValueError(
            f"reinforced cache {path} is truncated or corrupt ({err!r}); delete it and rebuild "
            "that shard"
        ) from err
    _check_consistent(path, header, tensors, len(keys), [len(p) for p in params])
    return ShardCache(
        path,
        header,
        tensors["image_emb"],
        tensors["text_emb"],
        tensors["caption_offsets"],
        tensors["num_real"],
        keys,
        params,
    )


def _check_consistent(
    path: Path,
    header: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    num_keys: int,
    params_per_sample: list[int],
) -> None:
    n, k = header["num_samples"], header["num_augmentations"]
    width = sum(t["dim"] for t in header["teachers"])
    image, text, offsets = tensors["image_emb"], tensors["text_emb"], tensors["caption_offsets"]
    problems = []
    if set(tensors) != set(TENSOR_NAMES):
        problems.append(f"tensors {sorted(tensors)}, expected {sorted(TENSOR_NAMES)}")
    elif tuple(image.shape) != (n, k, width) or text.dim() != 2 or text.shape[1] != width:
        problems.append(f"image_emb {tuple(image.shape)}, text_emb {tuple(text.shape)}")
    elif offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != text.shape[0]:
        problems.append(f"caption_offsets {tuple(offsets.shape)} do not cover the text rows")
    elif bool((offsets[1:] <= offsets[:-1]).any()):
        problems.append("a sample has no caption")
    elif tensors["num_real"].shape != (n,):
        problems.append(f"num_real {tuple(tensors['num_real'].shape)}")
    elif num_keys != n or any(count != k for count in params_per_sample):
        problems.append(f"{num_keys} keys / augmentation param lists for {n} samples x {k}")
    elif image.dtype != CACHE_DTYPES[header["dtype"]]:
        problems.append(f"dtype {image.dtype} but header says {header['dtype']}")
    if problems:
        raise ValueError(
            f"reinforced cache {path} is inconsistent with its header (N={n}, K={k}, "
            f"D={width}): {problems[0]}; delete it and rebuild that shard"
        )


def header_mismatches(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What differs between a cache header and the ``expected`` entries (only the keys given
    are compared; teachers by name and fingerprint, the recipe key by key), worded for an
    error message."""
    problems = []
    for key, want in expected.items():
        have = found.get(key)
        if key == "teachers":
            have_ids, want_ids = _teacher_ids(have or []), _teacher_ids(want)
            if have_ids != want_ids:
                problems.append(f"another teacher: {have_ids} != {want_ids}")
        elif key in ("preprocess", "augmentation"):
            what = "preprocess" if key == "preprocess" else "augmentation recipe"
            diffs = [
                f"{name} {have.get(name)!r} != {want.get(name)!r}"
                for name in sorted(set(have or {}) | set(want))
                if (have or {}).get(name) != want.get(name)
            ]
            if diffs:
                problems.append(f"another {what}: " + ", ".join(diffs))
        elif have != want:
            problems.append(f"another {key.replace('_', ' ')}: {have!r} != {want!r}")
    return problems


def _teacher_ids(teachers: Sequence[dict[str, Any]]) -> list[str]:
    # Weights identify a teacher; the name only when no fingerprint is known (DataCompDR).
    return [f"fingerprint {t['fingerprint']}" if t["fingerprint"] else t["name"] for t in teachers]


def expected_header(
    recipe: AugmentRecipe | None = None, teachers: Sequence[TeacherInfo] | None = None
) -> dict[str, Any]:
    """Header entries a cache must match for this recipe and these teachers."""
    expected: dict[str, Any] = {}
    if teachers is not None:
        expected["teachers"] = [t.to_dict() for t in teachers]
    if recipe is not None:
        expected["preprocess"] = recipe.preprocess_dict()
        expected["augmentation"] = recipe.augmentation_dict()
    return expected


def refuse_mismatch(path: Path, found: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise ValueError naming everything that differs (nothing if nothing does)."""
    problems = header_mismatches(found, expected)
    if problems:
        raise ValueError(
            f"reinforced cache {path} was built with " + "; with ".join(problems) + ": use the "
            "settings it was built with, or build a cache for these settings in another "
            "--set reinforced.cache_dir=DIR (that file stays valid for its own)"
        )


def check_shard_unchanged(shard: Any, path: Path, header: dict[str, Any]) -> None:
    """Refuse a cache whose shard changed (rewritten, truncated, replaced) since the build."""
    now = shard.fingerprint()
    if header.get("source_fingerprint") != now:
        raise ValueError(
            f"shard {shard} changed since its cache {path} was built, or that cache belongs to "
            f"another input of the same name (fingerprint {header.get('source_fingerprint')!r} "
            f"then, {now!r} now): restore the shard, or build its cache in another "
            "--set reinforced.cache_dir=DIR"
        )


# ---- choosing and yielding samples ------------------------------------------------------


def choose(seed: int, epoch: int, uid: str, what: str, count: int) -> int:
    """A pure function of its arguments, uniform on [0, count): which augmentation or
    caption sample ``uid`` uses in ``epoch`` (blake2b of the arguments, mod count)."""
    if count <= 0:
        raise ValueError(f"cannot choose among {count} {what}s of sample {uid!r}")
    digest = hashlib.blake2b(f"{seed}\x1f{epoch}\x1f{uid}\x1f{what}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") % count


class ReinforcedItem(NamedTuple):
    """What a shard reader hands the stream for one sample (captions real first)."""

    uid: str
    image: Record  # decoded when the sample is made, by PIL or the split pipeline
    captions: Sequence[str]
    num_real: int
    params: Sequence[Params]  # one per stored augmentation
    image_emb: torch.Tensor  # [K, D]
    text_emb: torch.Tensor  # [len(captions), D]


class ReinforcedStream(IterableDataset):
    """Shared by the reinforced readers: shards split by (seed, epoch, rank, worker) as
    webdataset shards are, one stored augmentation and caption per sample by :func:`choose`.

    ``teachers`` (TeacherInfo list) and ``recipe`` describe the stored embeddings;
    ``caption_mode``: pick among all captions, only the real or only the synthetic ones.
    ``decoder`` (None: PIL and ``recipe.apply``): a :class:`CropDecoder` of ``recipe`` replays
    the stored crops from the encoded images, the rest left to data/device_augment.py.
    """

    decoder: CropDecoder | None = None

    def __init__(
        self,
        shards: Sequence[Any],
        *,
        tokenizer: Tokenizer,
        recipe: AugmentRecipe,
        teachers: Sequence[TeacherInfo],
        caption_mode: str = "all",
        shuffle: bool = True,
        num_samples: int | None = None,
    ) -> None:
        if caption_mode not in CAPTION_MODES:
            raise ValueError(f"caption_mode must be one of {CAPTION_MODES}, got {caption_mode!r}")
        self.shards, self.tokenizer, self.recipe = list(shards), tokenizer, recipe
        self.teachers = list(teachers)
        self.caption_mode, self.shuffle, self.num_samples = caption_mode, shuffle, num_samples
        self.seed, self.epoch, self.rank, self.world_size = 0, 0, 0, 1

    def set_stream(self, *, seed: int, epoch: int, rank: int, world_size: int) -> None:
        """Pick the shards and choices of the next ``iter()`` (called by ``make_loader``)."""
        if len(self.shards) < world_size:
            raise ValueError(f"{len(self.shards)} shards cannot be split over {world_size} ranks")
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size

    def _items(self, shard: Any) -> Iterator[ReinforcedItem]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shards = split_shards(
            self.shards,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            shuffle=self.shuffle,
        )
        position = 0
        for shard in shards:
            for item in self._items(shard):
                yield self._sample(item, position)
                position += 1

    def _sample(self, item: ReinforcedItem, position: int) -> dict[str, Any]:
        lo, hi = {
            "all": (0, len(item.captions)),
            "real": (0, item.num_real),
            "synthetic": (item.num_real, len(item.captions)),
        }[self.caption_mode]
        aug = choose(self.seed, self.epoch, item.uid, "augmentation", len(item.params))
        caption = lo + choose(
            self.seed, self.epoch, item.uid, f"{self.caption_mode} caption", hi - lo
        )
        return {
            **self._image_fields(item.image, item.params[aug]),
            "text": _tokenize_one(self.tokenizer, item.captions[caption]),
            "index": position,
            "aug_index": aug,
            "caption_index": caption,
            # Copies: a row view would ship the whole shard's tensor to a loader worker's peer.
            TEACHER_IMAGE: item.image_emb[aug].clone(),
            TEACHER_TEXT: item.text_emb[caption].clone(),
        }

    def _image_fields(self, record: Record, params: Params) -> dict[str, Any]:
        if self.decoder is None:
            return {"image": self.recipe.apply(record.load_image(), params)}
        try:
            return self.decoder(record.encoded(), params)
        except (OSError, ValueError, SyntaxError) as err:  # as sources.decode_image words it
            raise ValueError(f"cannot decode the image of {record.where}: {err}") from err

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("length unknown: pass num_samples (data_cfg['num_samples'])")
        return self.num_samples


class ReinforcedDataset(ReinforcedStream):
    """Train from a cache built by train/reinforced_cache.py over ``source``.

    Every shard's cache file must exist and agree with the first one (teachers, recipe,
    dtype); with ``recipe`` and/or ``teachers`` given, the caches must have been built with
    exactly those (refused with the differences named otherwise). A shard whose samples no
    longer match its cache (changed, truncated) is an error naming both paths.

    """

    def __init__(
        self,
        source: ShardedSource,
        *,
        tokenizer: Tokenizer,
        recipe: AugmentRecipe | None = None,
        teachers: Sequence[TeacherInfo] | None = None,
        caption_mode: str = "all",
        shuffle: bool = True,
    ) -> None:
        paths = [source.cache_path(shard) for shard in source.shards]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(paths)} reinforced cache files are missing, e.g. "
                f"{missing[:3]}: build them first"
            )
        headers = [read_header(p) for p in paths]
        first = headers[0]
        refuse_mismatch(paths[0], first, expected_header(recipe, teachers))
        same = {k: first[k] for k in ("teachers", "preprocess", "augmentation", "dtype")}
        for path, header in zip(paths[1:], headers[1:], strict=True):
            refuse_mismatch(path, header, same)
        self.source = source
        super().__init__(
            source.shards,
            tokenizer=tokenizer,
            recipe=AugmentRecipe.from_dict({**first["preprocess"], **first["augmentation"]}),
            teachers=[TeacherInfo(**t) for t in first["teachers"]],
            caption_mode=caption_mode,
            shuffle=shuffle,
            num_samples=sum(h["num_samples"] for h in headers),
        )

    def _items(self, shard: Any) -> Iterator[ReinforcedItem]:
        path = self.source.cache_path(shard)
        cache = load_shard_cache(path)
        check_shard_unchanged(shard, path, cache.header)
        count = 0
        for position, record in enumerate(shard.records()):
            if position >= len(cache) or record.key != cache.keys[position]:
                expected = cache.keys[position] if position < len(cache) else "the end"
                raise ValueError(
                    f"shard {shard} and its cache {path} disagree at sample {position}: "
                    f"{record.key!r} in the shard, {expected!r} in the cache; rebuild the cache"
                )
            start, stop = (int(v) for v in cache.caption_offsets[position : position + 2])
            num_real = int(cache.num_real[position])
            if len(record.captions) != stop - start or record.num_real != num_real:
                raise ValueError(
                    f"sample {record.key!r} of {shard} has {len(record.captions)} captions "
                    f"({record.num_real} real), its cache {path} {stop - start} ({num_real} "
                    "real); rebuild the cache"
                )
            count += 1
            yield ReinforcedItem(
                f"{shard.name}/{record.key}",
                record,  # decoded in _image_fields, by PIL or the split pipeline's decoder
                record.captions,
                num_real,
                cache.params[position],
                cache.image_emb[position],
                cache.text_emb[start:stop],
            )
        if count != len(cache):
            raise ValueError(
                f"shard {shard} ended after {count} samples, its cache {path} holds "
                f"{len(cache)}: the shard is truncated or changed"
            )


# The options of each source kind's factory (data/sources.py); "source" and "shuffle" are
# read by the reinforced kinds themselves.
_SOURCE_OPTIONS = {
    "csv": ("img_key", "caption_key", "separator", "synthetic_keys", "shard_size"),
    "folder": ("shard_size",),
    "webdataset": ("caption_key",),
}


def source_from_cfg(data_cfg: dict[str, Any]) -> ShardedSource:
    """The source a reinforced cache is built over and read with, from ``data_cfg``.

    Keys: ``path`` (shards, CSV or folder; a folder holding ``.tar`` files and no images is
    those shards, sorted), ``source`` (webdataset/csv/folder, inferred from ``path`` when
    absent), ``cache_dir``, and the options of the source's kind (data/options.py; the CSV
    separator defaults from the extension: ``.csv`` comma, else tab). Building and training
    read the same keys, so both see the same shards.
    """
    path = data_cfg.get("path")
    if path is None:
        raise ValueError(f"data kind {data_cfg.get('kind')!r} needs a path: --data KIND:PATH")
    options = given_options(data_cfg)
    kind = data_cfg.get("source")
    if kind is None and isinstance(path, (str, Path)) and Path(path).is_dir():
        tars = sorted(Path(path).glob("*.tar"))
        images = (p for p in Path(path).rglob("*") if p.suffix[1:].lower() in WDS_IMAGE_EXTENSIONS)
        if tars and next(images, None) is None:
            kind, path = "webdataset", [str(t) for t in tars]
    resolved = source_kind(kind, path)
    factory = {key: options[key] for key in _SOURCE_OPTIONS[resolved] if key in options}
    unused = sorted(set(options) - set(factory) - {"source", "shuffle"})
    if unused:
        raise ValueError(
            f"data options {unused} do nothing for a {resolved} source; its options: "
            f"{', '.join(_SOURCE_OPTIONS[resolved])}"
        )
    if "shard_size" in factory:
        factory["shard_size"] = int(factory["shard_size"])
    if resolved == "csv":
        factory["separator"] = csv_separator(path, factory.get("separator"))
    return open_source(resolved, path, cache_dir=data_cfg.get("cache_dir"), **factory)


def build_reinforced_dataset(
    data_cfg: dict[str, Any], preprocess: Any, tokenizer: Tokenizer | None
) -> ReinforcedDataset:
    """``data_cfg["kind"] = "reinforced"`` for ``datasets.register_dataset``.

    Keys: those of :func:`source_from_cfg`, ``caption_mode``, ``shuffle``. A torchvision
    ``preprocess`` (the teacher's training transform) must be the cache's recipe; None takes
    the cache's.
    """
    if tokenizer is None:
        raise ValueError("data kind 'reinforced' needs a tokenizer")
    source = source_from_cfg(data_cfg)
    recipe = None if preprocess is None else AugmentRecipe.from_transform(preprocess)
    return ReinforcedDataset(
        source,
        tokenizer=tokenizer,
        recipe=recipe,
        caption_mode=data_cfg.get("caption_mode", "all"),
        **{key: value for key, value in given_options(data_cfg).items() if key == "shuffle"},
    )
