"""The two teacher-cache builds of ``tinyclip-distill``, from a run's
configuration: each returns a report whose ``line`` the command line prints on rank 0.

- :func:`build_embedding_cache` (``--build-teacher-cache``): the per-sample embedding cache
  (teachers/embedding_cache.py) of map-style data, un-augmented.
- :func:`build_reinforced_cache` (``--build-reinforced-cache``): the reinforced cache
  (teachers/reinforced_build.py) over webdataset/csv/folder data; every torchrun rank builds
  its own shards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from tinyclip_fast.data.augment import AugmentRecipe
from tinyclip_fast.data.datasets import build_dataset
from tinyclip_fast.data.reinforced import source_from_cfg
from tinyclip_fast.teachers.embedding_cache import TeacherEmbeddingCache
from tinyclip_fast.teachers.loading import build_teachers, dataset_defaults
from tinyclip_fast.teachers.reinforced_build import (
    BuildReport,
    CacheTeacher,
    build_reinforced_shards,
)
from tinyclip_fast.train.config import DistillConfig
from tinyclip_fast.train.runtime import (
    init_distributed,
    resolve_device,
    resolve_precision,
    set_threads,
)

# What --build-teacher-cache reads: a source kind, or the kind that trains from its cache.
BUILD_KINDS = ("webdataset", "csv", "folder", "reinforced")
# Images per teacher forward of a cache build when micro_batch_size is null.
CACHE_BATCH = 256


@dataclass
class EmbeddingCacheReport:
    """What :func:`build_embedding_cache` wrote."""

    path: Path
    samples: int
    dims: list[int]
    teachers: int

    @property
    def line(self) -> str:
        dims = ", ".join(map(str, self.dims))
        return (
            f"wrote {self.samples} teacher embeddings (dim {dims}) of {self.teachers} teacher(s) "
            f"to {self.path}"
        )


@dataclass
class ReinforcedCacheReport:
    """What :func:`build_reinforced_cache` did on this rank (``shards``), of ``world_size``."""

    shards: BuildReport
    rank: int
    world_size: int
    where: str
    data_path: str | None

    @property
    def line(self) -> str:
        report = self.shards
        return (
            f"reinforced cache ({self.where}): rank 0 of {self.world_size} built "
            f"{len(report.built)} shard files ({report.images} images, "
            f"{report.images_per_s:.1f} images/s), {len(report.skipped)} were already built; "
            f"train with --data reinforced:{self.data_path}"
        )


def build_embedding_cache(config: DistillConfig) -> EmbeddingCacheReport:
    """Run the teachers of ``config`` once over ``config.data`` (their eval preprocessing:
    cached embeddings are those of un-augmented images) into ``config.teacher.cache``."""
    device = resolve_device(config.device)
    set_threads(config.threads)
    teachers, tokenizer, _, eval_preprocess = build_teachers(config.teacher_configs())
    data_cfg = {**dataset_defaults(teachers[0], config.seed), **config.data.as_dict()}
    dataset = build_dataset(data_cfg, preprocess=eval_preprocess, tokenizer=tokenizer)
    cache = TeacherEmbeddingCache.build(
        [teacher.to(device) for teacher in teachers],
        dataset,
        config.teacher.cache,
        batch_size=config.micro_batch_size or CACHE_BATCH,
        device=device,
        progress=config.progress,
    )
    return EmbeddingCacheReport(Path(config.teacher.cache), len(cache), cache.dims, cache.teachers)


def build_reinforced_cache(config: DistillConfig) -> ReinforcedCacheReport:
    """Build the reinforced cache of ``config.data`` with the run's teachers (one, or an
    ensemble stored side by side; the first's training transform recorded as the
    augmentation recipe): K = config.reinforced.augmentations per image, stored in
    config.reinforced.dtype, beside the data or in config.reinforced.cache_dir, the teachers
    under config.precision on config.device.

    Under torchrun every rank builds shards[rank::world_size] (and waits for the others);
    shards whose cache exists and matches are skipped, so an interrupted build continues.
    """
    if config.data.kind not in BUILD_KINDS:
        raise ValueError(
            "--build-teacher-cache without --teacher-cache builds a reinforced cache over "
            f"--data webdataset:SHARDS, csv:FILE or folder:DIR, got --data {config.data.kind}"
        )
    data_cfg = {**config.reinforced.data_options(), **config.data.as_dict()}
    if config.data.kind != "reinforced":
        data_cfg.setdefault("source", config.data.kind)
    source = source_from_cfg(data_cfg)  # before the teacher loads: a bad path fails fast
    rank, world_size, created_group = init_distributed(config.device)
    try:
        device = resolve_device(config.device)
        set_threads(config.threads)
        # An ensemble (--teacher repeated) is stored concatenated per sample, in its order.
        configs = config.teacher_configs()
        teachers, tokenizer, train_preprocess, _ = build_teachers(configs)
        cache_teachers = [
            CacheTeacher(
                teacher.to(device), tokenizer, os.path.basename(c.model).removesuffix(".json")
            )
            for teacher, c in zip(teachers, configs, strict=True)
        ]
        report = build_reinforced_shards(
            source,
            cache_teachers,
            AugmentRecipe.from_transform(train_preprocess),
            num_augmentations=config.reinforced.augmentations,
            dtype=config.reinforced.dtype,
            seed=config.seed,
            batch_size=config.micro_batch_size or CACHE_BATCH,
            device=device,
            precision=resolve_precision(config.precision, device),
            rank=rank,
            world_size=world_size,
            progress=config.progress,
        )
        where = config.reinforced.cache_dir or "beside the data"
        return ReinforcedCacheReport(report, rank, world_size, where, config.data.path)
    finally:
        if created_group:
            dist.destroy_process_group()
