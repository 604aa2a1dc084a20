"""Distilling from reinforced data: the data kinds and the targets a reinforced batch carries.

- :func:`register_reinforced_kinds` makes ``--data reinforced:PATH`` (a cache built by
  teachers/reinforced_build.py over webdataset shards, a CSV or an image folder) and
  ``--data datacompdr:'shards/{00000..01000}.tar'`` (Apple's DataCompDR shards) data kinds,
  both read with the teacher's training transform (the recipe the stored augmentations
  replay).
- :class:`StoredTargets` turns a reinforced batch's embedding fields into the step's
  (I_t, T_t, b): no teacher forward. The teacher module is still loaded, for weight
  inheritance (the student starts from its weights) and for the check that the cache was
  built by it; it never runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tinyclip_fast.data.datacompdr import build_datacompdr_dataset
from tinyclip_fast.data.datasets import register_dataset
from tinyclip_fast.data.reinforced import (
    ReinforcedDataset,
    ReinforcedStream,
    build_reinforced_dataset,
    expected_header,
    refuse_mismatch,
    teacher_targets,
)
from tinyclip_fast.kernels.limits import MAX_TEACHERS
from tinyclip_fast.teachers.reinforced_build import CacheTeacher, teacher_info
from tinyclip_fast.teachers.targets import TeacherTargets


def register_reinforced_kinds() -> None:
    """Register the data kinds "reinforced" and "datacompdr" (data.datasets.build_dataset)."""
    register_dataset("reinforced", build_reinforced_dataset)
    register_dataset("datacompdr", build_datacompdr_dataset)


class StoredTargets(TeacherTargets):
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
        super().__init__(
            [t.logit_scale for t in self.teachers], [t.logit_bias for t in self.teachers]
        )
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

    def features(self, batch: dict[str, torch.Tensor]) -> tuple[list, list]:
        """Every stored teacher's unit rows (fp32): ([I_t per teacher], [T_t per teacher])."""
        targets = teacher_targets(batch, self.teachers, self.device)
        return [t.image for t in targets], [t.text for t in targets]
