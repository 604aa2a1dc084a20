"""The teachers' targets of a distillation step, from wherever they come: one interface.

Per batch the loss gets, for K = 1, ``(I_t, T_t, b[, c])`` and for an ensemble lists of them
(the fused losses average the teachers' targets after softmax / after sigmoid): L2-normalised
features, the multiplicative scale b = exp(logit_scale) (or the run's fixed scale) and, for
the sigmoid family, the bias c of the teacher's probabilities s(b x.y + c).

Three sources implement :class:`TeacherTargets`: the frozen teachers run online
(:class:`OnlineTargets`), rows of the per-sample embedding cache (:class:`CachedTargets`),
and the embeddings a reinforced batch carries (``reinforced_targets.StoredTargets``).
``factory.build_targets`` picks one; the training loop never asks which.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import nn

from tinyclip_fast.teachers.embedding_cache import TeacherEmbeddingCache
from tinyclip_fast.teachers.loading import own_logit_bias, teacher_embeddings

Batch = dict[str, torch.Tensor]


class TeacherLossArgs:
    """The teachers' arguments of the loss for a batch: ``(I_t, T_t, b[, c])``, each a list
    for an ensemble (K >= 2) and a single value for one teacher."""

    def __init__(
        self,
        scales: Sequence[torch.Tensor],
        biases: Sequence[float] | None,
        device: torch.device,
    ) -> None:
        self.scales = list(scales)
        self.biases = None
        if biases is not None:
            self.biases = [torch.tensor(float(b), device=device) for b in biases]

    def __len__(self) -> int:
        return len(self.scales)

    def pack(
        self, images: Sequence[torch.Tensor], texts: Sequence[torch.Tensor]
    ) -> tuple[object, ...]:
        """The loss's teacher arguments from every teacher's features (in teacher order)."""
        if len(images) != len(self) or len(texts) != len(self):
            raise ValueError(f"expected features of {len(self)} teachers, got {len(images)}")
        parts = [list(images), list(texts), self.scales]
        if self.biases is not None:
            parts.append(self.biases)
        if len(self) == 1:
            return tuple(part[0] for part in parts)
        return tuple(parts)


class TeacherTargets(ABC):
    """What the loss needs of the teachers for a batch on the device: ``targets(batch)``.

    ``logit_scales[k]``: teacher k's own log-space logit scale; ``logit_biases[k]``: its own
    logit bias (None for a softmax CLIP). ``factory.build_targets`` sets ``loss_args`` from
    them and the run's loss settings.
    """

    def __init__(
        self, logit_scales: Sequence[float | torch.Tensor], logit_biases: Sequence[float | None]
    ) -> None:
        self.logit_scales = list(logit_scales)
        self.logit_biases = list(logit_biases)
        self.loss_args: TeacherLossArgs | None = None

    @abstractmethod
    def features(self, batch: Batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every teacher's L2-normalised rows of ``batch``: ([I_t per teacher], [T_t ...])."""

    def __call__(self, batch: Batch) -> tuple[object, ...]:
        """The loss's teacher arguments ``(I_t, T_t, b[, c])`` of ``batch``."""
        return self.loss_args.pack(*self.features(batch))


class OnlineTargets(TeacherTargets):
    """The frozen teachers run forward on every batch, in micro-batches, under autocast."""

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        micro_batch: int,
        autocast: Callable[[], contextlib.AbstractContextManager],
    ) -> None:
        super().__init__(
            [t.logit_scale.detach().float() for t in teachers],
            [own_logit_bias(t) for t in teachers],
        )
        self.teachers, self.micro_batch, self.autocast = list(teachers), micro_batch, autocast

    def features(self, batch: Batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        features = [
            teacher_embeddings(t, batch["image"], batch["text"], self.micro_batch, self.autocast)
            for t in self.teachers
        ]
        return [f[0] for f in features], [f[1] for f in features]


class CachedTargets(TeacherTargets):
    """Rows of the per-sample embedding cache, looked up by the batch's ``index``."""

    def __init__(self, cache: TeacherEmbeddingCache) -> None:
        super().__init__(cache.logit_scales, cache.logit_biases)
        self.cache = cache

    def features(self, batch: Batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.cache.lookup_all(batch["index"])
