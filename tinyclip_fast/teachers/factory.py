"""The one place that decides where a run's teacher targets come from (teachers/targets.py)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from tinyclip_fast.data.reinforced import ReinforcedStream
from tinyclip_fast.teachers.embedding_cache import TeacherEmbeddingCache
from tinyclip_fast.teachers.loading import TeacherSpec, teacher_biases
from tinyclip_fast.teachers.reinforced_targets import StoredTargets
from tinyclip_fast.teachers.targets import (
    CachedTargets,
    OnlineTargets,
    TeacherLossArgs,
    TeacherTargets,
)


def build_targets(
    teachers: Sequence[nn.Module],
    dataset: Dataset,
    *,
    cache_path: str | Path | None,
    teacher_configs: Sequence[TeacherSpec],
    fixed_scale: torch.Tensor | None,
    sigmoid: bool,
    micro_batch: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
    device: torch.device,
    say: Callable[[str], None],
) -> TeacherTargets:
    """The targets of a run: the embedding cache at ``cache_path`` when given, else the
    stored embeddings of reinforced data, else the ``teachers`` online.

    The loss's scales are ``fixed_scale`` when given, else exp of the teachers' own; with
    ``sigmoid`` the biases are the configured ones or the teachers' own (teacher_biases).
    """
    if cache_path is not None:
        targets = CachedTargets(_load_cache(cache_path, teachers, dataset, device, say))
    elif isinstance(dataset, ReinforcedStream):
        targets = StoredTargets(dataset, teachers[0], device, say)
    else:
        targets = OnlineTargets(teachers, micro_batch, autocast)
    if fixed_scale is not None:
        scales = [fixed_scale] * len(targets.logit_scales)
    else:
        scales = [torch.as_tensor(s, device=device).exp() for s in targets.logit_scales]
    biases = None
    if sigmoid:
        biases = teacher_biases(teacher_configs, targets.logit_biases, say)
    targets.loss_args = TeacherLossArgs(scales, biases, device)
    return targets


def _load_cache(
    path: str | Path,
    teachers: Sequence[nn.Module],
    dataset: Dataset,
    device: torch.device,
    say: Callable[[str], None],
) -> TeacherEmbeddingCache:
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            "--teacher-cache needs map-style data (csv, demo, in-memory tensors): a "
            "webdataset stream has no dataset-wide sample index to look rows up by"
        )
    # Refuses a cache built on other samples (or in another order) or by another teacher.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = TeacherEmbeddingCache.load(
            path, teacher=list(teachers), dataset=dataset, device=device
        )
    for warning in caught:
        say(f"warning: {warning.message}")
    return cache
