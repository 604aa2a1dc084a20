"""Build the reinforced cache: the frozen teacher(s) run once over K recorded augmentations
of every image and over every caption, one cache file per source shard.

MobileCLIP's dataset reinforcement, for our distillation: training then reads the stored
embeddings (data/reinforced.py) and replays one stored augmentation per sample, so a step
never runs the teacher and still augments. An ensemble's embeddings are concatenated per
sample (each teacher's part L2-normalised). Augmentation k of sample ``key`` of shard
``name`` is drawn from a generator seeded by hash(seed, name, key, k), so a shard rebuilds
identically. Format: see data/reinforced.py.

Resumable shard by shard: a shard whose cache file exists and matches (teachers, recipe,
K, dtype, seed, shard fingerprint) is skipped, one that differs is refused (never
overwritten), and every file is written atomically, so an interrupted build continues where
it stopped. Each torchrun rank builds every world_size-th shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from tinyclip_fast.data.augment import AugmentRecipe
from tinyclip_fast.data.reinforced import (
    CACHE_DTYPES,
    TeacherInfo,
    check_shard_unchanged,
    expected_header,
    read_header,
    refuse_mismatch,
    write_shard_cache,
)
from tinyclip_fast.data.sources import Shard, ShardedSource
from tinyclip_fast.teachers.embedding_cache import teacher_fingerprint
from tinyclip_fast.teachers.loading import (
    AUTOCAST_DTYPES,
    own_logit_bias,
    own_logit_scale,
    precision_autocast,
)


@dataclass
class CacheTeacher:
    """One teacher of the cache: an open_clip-style model (``encode_image``,
    ``encode_text``, ``logit_scale`` [, ``logit_bias``]) and its own tokenizer."""

    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str = "teacher"


@dataclass
class BuildReport:
    """What :func:`build_reinforced_shards` did on this rank."""

    built: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        """Source images per second over the shards built (each gives K augmentations)."""
        return self.images / self.seconds if self.seconds > 0 else 0.0


def teacher_info(teacher: CacheTeacher, dim: int) -> TeacherInfo:
    """How a cache header describes ``teacher`` (width ``dim`` of its embeddings)."""
    return TeacherInfo(
        name=teacher.name,
        dim=int(dim),
        fingerprint=teacher_fingerprint(teacher.model),
        logit_scale=own_logit_scale(teacher.model),
        logit_bias=own_logit_bias(teacher.model),
    )


def build_reinforced_shards(
    source: ShardedSource,
    teachers: Sequence[CacheTeacher],
    recipe: AugmentRecipe,
    *,
    num_augmentations: int = 5,
    dtype: str = "fp16",
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> BuildReport:
    """Write the cache file of every shard of ``source`` this rank owns (``shards[rank::
    world_size]``; rank and world size from torch.distributed when not given).

    ``num_augmentations`` K per image, stored in ``dtype`` (fp16, bf16 or fp32); the
    teachers run under ``precision`` autocast on ``device`` in batches of ``batch_size``
    images (and captions). A tqdm bar (rank 0) shows images/s. Returns what was built and
    skipped on this rank.
    """
    _check_arguments(teachers, num_augmentations, dtype, batch_size, precision)
    if rank is None or world_size is None:
        distributed = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if distributed else 0
        world_size = dist.get_world_size() if distributed else 1
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    device = torch.device(device)
    for teacher in teachers:
        _check_image_size(teacher, recipe)
    infos = [teacher_info(t, 0) for t in teachers]  # fingerprints once; dims from the forward
    # Compared before building on: what an existing cache file must have been built with.
    spec = {
        **expected_header(recipe),
        "teachers": [info.to_dict() for info in infos],
        "num_augmentations": num_augmentations,
        "dtype": dtype,
        "seed": seed,
    }
    mine = source.shards[rank::world_size]
    report = BuildReport()
    todo = []
    for shard in mine:
        path = source.cache_path(shard)
        if path.exists():
            header = read_header(path)
            refuse_mismatch(path, header, spec)
            check_shard_unchanged(shard, path, header)
            report.skipped.append(path)
        else:
            todo.append(shard)
    known = [shard.num_samples for shard in todo]
    bar = tqdm(
        total=None if None in known else sum(known),
        unit="img",
        desc=f"reinforced cache, rank {rank}/{world_size}",
        dynamic_ncols=True,
        disable=not progress or rank != 0,  # one bar per job: rank 0's shards
    )
    bar.set_postfix(shards=f"0/{len(todo)}")  # the total where the image count is unknown
    modes = [t.model.training for t in teachers]
    for teacher in teachers:
        teacher.model.eval()
    try:
        for shard in todo:
            start = time.perf_counter()
            encoder = _ShardEncoder(
                teachers,
                infos,
                recipe,
                num_augmentations,
                dtype,
                seed,
                batch_size,
                device,
                precision,
            )
            path = source.cache_path(shard)
            _remove_stale_temporaries(path)
            encoder.encode(shard, bar)
            encoder.write(path, shard)
            report.built.append(path)
            report.images += len(encoder.keys)
            report.seconds += time.perf_counter() - start
            bar.set_postfix(shards=f"{len(report.built)}/{len(todo)}")
    finally:
        bar.close()
        for teacher, mode in zip(teachers, modes, strict=True):
            teacher.model.train(mode)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank's shards exist before anyone trains from them
    return report


def _check_arguments(
    teachers: Sequence[CacheTeacher],
    num_augmentations: int,
    dtype: str,
    batch_size: int,
    precision: str,
) -> None:
    if not teachers:
        raise ValueError("need at least one teacher")
    if dtype not in CACHE_DTYPES or precision not in AUTOCAST_DTYPES:
        raise ValueError(
            f"dtype must be one of {sorted(CACHE_DTYPES)} and precision one of "
            f"{sorted(AUTOCAST_DTYPES)}, got {dtype!r}, {precision!r}"
        )
    if num_augmentations <= 0 or batch_size <= 0:
        raise ValueError(
            f"need num_augmentations > 0 and batch_size > 0, got {num_augmentations}, {batch_size}"
        )


class _ShardEncoder:
    """Augments, encodes and collects one shard; :meth:`write` stores it."""

    def __init__(
        self,
        teachers: Sequence[CacheTeacher],
        infos: Sequence[TeacherInfo],
        recipe: AugmentRecipe,
        num_augmentations: int,
        dtype: str,
        seed: int,
        batch_size: int,
        device: torch.device,
        precision: str,
    ) -> None:
        self.teachers, self.infos, self.recipe, self.k = teachers, infos, recipe, num_augmentations
        self.dtype, self.seed, self.batch_size, self.device = dtype, seed, batch_size, device
        self.precision = precision
        self.keys: list[str] = []
        self.params: list[list[dict]] = []
        self.offsets, self.num_real = [0], []
        self.pending_images: list[torch.Tensor] = []
        self.pending_captions: list[str] = []
        self.image_rows: list[torch.Tensor] = []
        self.text_rows: list[torch.Tensor] = []
        self.dims: list[int] | None = None

    def encode(self, shard: Shard, bar: tqdm) -> None:
        for record in shard.records():
            image = record.load_image()
            sample_params = []
            for k in range(self.k):
                generator = torch.Generator().manual_seed(
                    augmentation_seed(self.seed, shard.name, record.key, k)
                )
                tensor, params = self.recipe(image, generator)
                self.pending_images.append(tensor)
                sample_params.append(params)
            self.keys.append(record.key)
            self.params.append(sample_params)
            self.pending_captions.extend(record.captions)
            self.offsets.append(self.offsets[-1] + len(record.captions))
            self.num_real.append(record.num_real)
            if len(self.pending_images) >= self.batch_size:
                self._flush_images()
            if len(self.pending_captions) >= self.batch_size:
                self._flush_captions()
            bar.update(1)
        if not self.keys:
            raise ValueError(f"shard {shard} has no samples")
        self._flush_images()
        self._flush_captions()

    @torch.no_grad()
    def _flush_images(self) -> None:
        if not self.pending_images:
            return
        images = torch.stack(self.pending_images).to(self.device)
        self.pending_images = []
        with self._autocast():
            parts = [t.model.encode_image(images, normalize=True) for t in self.teachers]
        self._keep(parts, self.image_rows)

    @torch.no_grad()
    def _flush_captions(self) -> None:
        if not self.pending_captions:
            return
        captions, self.pending_captions = self.pending_captions, []
        with self._autocast():
            parts = [
                t.model.encode_text(t.tokenizer(captions).to(self.device), normalize=True)
                for t in self.teachers
            ]
        self._keep(parts, self.text_rows)

    def _keep(self, parts: list[torch.Tensor], rows: list[torch.Tensor]) -> None:
        dims = [p.shape[-1] for p in parts]
        if self.dims is None:
            self.dims = dims
        elif dims != self.dims:
            raise ValueError(f"teacher embedding widths changed from {self.dims} to {dims}")
        # Each teacher's part is unit-norm in fp32, then rounded once to the cache dtype.
        rows.append(torch.cat([p.float() for p in parts], dim=1).to(CACHE_DTYPES[self.dtype]).cpu())

    def _autocast(self) -> contextlib.AbstractContextManager:
        return precision_autocast(self.device, self.precision)

    def write(self, path: Path, shard: Shard) -> None:
        n = len(self.keys)
        image_emb = torch.cat(self.image_rows).view(n, self.k, -1)
        header = {
            **expected_header(self.recipe),
            "shard": shard.name,
            "source_fingerprint": shard.fingerprint(),
            "num_samples": n,
            "num_augmentations": self.k,
            "dtype": self.dtype,
            "seed": self.seed,
            "teachers": [
                replace(info, dim=dim).to_dict()
                for info, dim in zip(self.infos, self.dims, strict=True)
            ],
        }
        write_shard_cache(
            path,
            header,
            image_emb=image_emb,
            text_emb=torch.cat(self.text_rows),
            caption_offsets=torch.tensor(self.offsets),
            num_real=torch.tensor(self.num_real),
            keys=self.keys,
            params=self.params,
        )


def augmentation_seed(seed: int, shard_name: str, key: str, k: int) -> int:
    """The generator seed of augmentation ``k`` of sample ``key`` in shard ``shard_name``."""
    digest = hashlib.blake2b(f"{seed}\x1f{shard_name}\x1f{key}\x1f{k}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1  # manual_seed wants < 2**63


def _check_image_size(teacher: CacheTeacher, recipe: AugmentRecipe) -> None:
    size = getattr(getattr(teacher.model, "visual", None), "image_size", None)
    if size is None:
        return
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if size != recipe.size:
        raise ValueError(
            f"teacher {teacher.name!r} takes {size[0]}x{size[1]} images but the augmentation "
            f"recipe makes {recipe.size[0]}x{recipe.size[1]}: use the teacher's training "
            "transform (AugmentRecipe.from_transform / for_model)"
        )


def _remove_stale_temporaries(path: Path) -> None:
    # A build killed mid-write leaves atomic_write's temporary file; only this rank writes
    # this shard, so any such file is a leftover.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
