"""The loss a run minimises: (1 - w) L_dist + w L_clip of the softmax or the sigmoid family.

softmax: TinyCLIP's affinity mimicking (``AffinityMimickingLoss``), L_clip the CLIP loss.
sigmoid: L_dist the per-pair binary cross-entropy of the student's s(a x.y + c) against the
teachers' mean probability mean_k s(b_k x_k.y_k + c_k) (``DistillSigLipLoss``), L_clip
SigLIP's loss; the student's logit bias c is learned. w = ``loss.contrastive_weight`` means
the same in both. Under torch.distributed both run every rank's rows against the gathered
columns (gather with grad), reading rank and world size at call time.
"""

from __future__ import annotations

import torch
from torch import nn

from tinyclip_fast.distributed import distributed_world
from tinyclip_fast.losses import AffinityMimickingLoss, DistillSigLipLoss
from tinyclip_fast.train.config import LossConfig

# loss.kind -> DistillSigLipLoss kind: soft_ce's sigmoid analogue is the binary cross-entropy.
SIGMOID_KINDS = {"soft_ce": "bce", "kl": "kl", "mobileclip": "mobileclip"}


class SigmoidDistillObjective(nn.Module):
    """(1 - w) L_d + w L_c of the sigmoid family:
    ``forward(I_s, T_s, a, c, I_t, T_t, b, c_t) -> loss``, teachers single or lists."""

    def __init__(self, contrastive_weight: float = 0.0, kind: str = "soft_ce") -> None:
        super().__init__()
        if kind not in SIGMOID_KINDS:
            raise ValueError(f"kind must be one of {tuple(SIGMOID_KINDS)}, got {kind!r}")
        self.contrastive_weight = float(contrastive_weight)
        self.loss = DistillSigLipLoss(
            distill_loss_weights=(self.contrastive_weight, 1.0 - self.contrastive_weight),
            kind=SIGMOID_KINDS[kind],
        )

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
        teacher_image_features: torch.Tensor | list[torch.Tensor],
        teacher_text_features: torch.Tensor | list[torch.Tensor],
        teacher_logit_scale: torch.Tensor | list[torch.Tensor],
        teacher_logit_bias: torch.Tensor | list[torch.Tensor],
    ) -> torch.Tensor:
        # Read at call time: the loss may be built before the process group is initialised.
        self.loss.rank, self.loss.world_size = distributed_world()
        contrastive, distill = self.loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            teacher_image_features,
            teacher_text_features,
            teacher_logit_scale,
            teacher_logit_bias,
        )
        return contrastive + distill


def build_objective(loss: LossConfig) -> nn.Module:
    """The run's loss module (the sigmoid one also takes the student's logit bias)."""
    if loss.family == "sigmoid":
        return SigmoidDistillObjective(loss.contrastive_weight, loss.kind)
    return AffinityMimickingLoss(contrastive_weight=loss.contrastive_weight, kind=loss.kind)
