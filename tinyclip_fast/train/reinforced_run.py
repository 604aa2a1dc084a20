"""Distilling from reinforced data: the data kinds, the stored teacher, the cache build.

- :func:`register_reinforced_kinds` makes ``--data reinforced:PATH`` (a cache built by
  train/reinforced_cache.py over webdataset shards, a CSV or an image folder) and
  ``--data datacompdr:'shards/{00000..01000}.tar'`` (Apple's DataCompDR shards) data kinds,
  both read with the teacher's training transform (the recipe the stored augmentations
  replay).
- :class:`StoredTeacher` turns a reinforced batch's embedding fields into the step's
  (I_t, T_t, b): no teacher forward. The teacher module is still loaded, for weight
  inheritance (the student starts from its weights) and for the check that the cache was
  built by it; it never runs.
- :func:`build_cache_for_run` is ``tinyclip-distill --build-teacher-cache`` over
  webdataset/csv/folder data: every torchrun rank builds its own shards.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from tinyclip_fast.data.augment import AugmentRecipe
from tinyclip_fast.data.datacompdr import build_datacompdr_dataset
from tinyclip_fast.data.datasets import register_dataset
from tinyclip_fast.data.reinforced import (
    TEACHER_IMAGE,
    ReinforcedDataset,
    ReinforcedStream,
    build_reinforced_dataset,
    expected_header,
    refuse_mismatch,
    source_from_cfg,
    teacher_targets,
)
from tinyclip_fast.train.config import MAX_TEACHERS, DistillConfig
from tinyclip_fast.train.reinforced_cache import (
    BuildReport,
    CacheTeacher,
    build_reinforced_cache,
    teacher_info,
)
from tinyclip_fast.train.runtime import init_distributed, resolve_device, resolve_precision
from tinyclip_fast.train.teachers import build_teachers

REINFORCED_KINDS = ("reinforced", "datacompdr")
# What --build-teacher-cache reads: a source kind, or the kind that trains from its cache.
BUILD_KINDS = ("webdataset", "csv", "folder", "reinforced")


def register_reinforced_kinds() -> None:
    """Register the data kinds "reinforced" and "datacompdr" (data.datasets.build_dataset)."""
    register_dataset("reinforced", build_reinforced_dataset)
    register_dataset("datacompdr", build_datacompdr_dataset)


def is_reinforced_batch(batch: dict[str, torch.Tensor]) -> bool:
    """Whether ``batch`` carries stored teacher embeddings (a reinforced dataset's)."""
    return TEACHER_IMAGE in batch


class StoredTeacher:
    """The teachers of a reinforced dataset: their (I_t, T_t) read from the batch.

    An ensemble cache (or DataCompDR's two ViT-L/14s) serves the loss as an ensemble of all
    its teachers (at most four). A cache of ours (``ReinforcedDataset``) must have been built
    by ``teacher`` (its first teacher): refused naming both otherwise. DataCompDR's teachers
    are not the run's; its ``teacher`` only gives the student its weights.
    """

    def __init__(
        self,
        dataset: ReinforcedStream,
        teacher: nn.Module,
        device: torch.device,
        announce: Callable[[str], None],
    ) -> None:
        self.teachers, self.device = dataset.teachers, device
        if isinstance(dataset, ReinforcedDataset):
            source = dataset.source
            path = source.cache_path(source.shards[0])
            run_teacher = teacher_info(CacheTeacher(teacher, tokenizer=None), dim=0)
            refuse_mismatch(
                path,
                {"teachers": [t.to_dict() for t in self.teachers[:1]]},
                expected_header(teachers=[run_teacher]),
            )
        if len(self.teachers) > MAX_TEACHERS:
            raise ValueError(
                f"the data holds {len(self.teachers)} teachers' embeddings; the fused losses "
                f"take at most {MAX_TEACHERS}"
            )
        self.logit_scales = [t.logit_scale for t in self.teachers]
        self.biases = [t.logit_bias for t in self.teachers]
        if len(self.teachers) > 1:
            names = ", ".join(t.name for t in self.teachers)
            announce(
                f"the data holds {len(self.teachers)} teachers' embeddings ({names}): this run "
                "distils from their ensemble"
            )
        announce(
            "teacher targets from stored embeddings: no teacher forward in any step"
            + (
                " (DataCompDR's teachers; --teacher gives the student its weights)"
                if not isinstance(dataset, ReinforcedDataset)
                else ""
            )
        )

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[list, list]:
        """Every stored teacher's unit rows (fp32): ([I_t per teacher], [T_t per teacher])."""
        targets = teacher_targets(batch, self.teachers, self.device)
        return [t.image for t in targets], [t.text for t in targets]


def build_cache_for_run(config: DistillConfig) -> tuple[BuildReport, int, int]:
    """Build the reinforced cache of ``config.data`` with the run's teachers (one, or an
    ensemble stored side by side; the first's training transform recorded as the
    augmentation recipe): K = config.reinforced.augmentations per image, stored in
    config.reinforced.dtype, beside the data or in config.reinforced.cache_dir, the teachers
    under config.precision on config.device.

    Under torchrun every rank builds shards[rank::world_size] (and waits for the others);
    shards whose cache exists and matches are skipped, so an interrupted build continues.
    Returns (this rank's report, rank, world size).
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
        # An ensemble (--teacher repeated) is stored concatenated per sample, in its order.
        configs = config.teacher_configs()
        teachers, tokenizer, train_preprocess, _ = build_teachers(configs)
        cache_teachers = [
            CacheTeacher(
                teacher.to(device), tokenizer, os.path.basename(c.model).removesuffix(".json")
            )
            for teacher, c in zip(teachers, configs, strict=True)
        ]
        report = build_reinforced_cache(
            source,
            cache_teachers,
            AugmentRecipe.from_transform(train_preprocess),
            num_augmentations=config.reinforced.augmentations,
            dtype=config.reinforced.dtype,
            seed=config.seed,
            batch_size=config.micro_batch_size or 256,
            device=device,
            precision=resolve_precision(config.precision, device),
            rank=rank,
            world_size=world_size,
            progress=config.progress,
        )
        return report, rank, world_size
    finally:
        if created_group:
            dist.destroy_process_group()
