"""Drop-in replacements for open_clip's ClipLoss and DistillClipLoss, and TinyCLIP's loss.

Same constructor arguments, forward signatures, return values and numbers as
``open_clip.loss``, computed by the fused affinity kernels: the [n, N] logit matrices are
never materialised. Scales are multiplicative (``model.logit_scale.exp()``), as in open_clip.
"""

from __future__ import annotations

import torch
from torch import nn

from tinyclip_fast.distributed import (
    distributed_world,
    gather_features,
    gather_rows,
    gather_teacher_features,
)
from tinyclip_fast.ops.affinity_loss import (
    TeacherFeatures,
    TeacherScale,
    affinity_loss_rows,
    affinity_loss_square,
    check_contrastive_weight,
)
from tinyclip_fast.ops.sigmoid_loss import KINDS as SIGMOID_KINDS
from tinyclip_fast.ops.sigmoid_loss import sigmoid_loss_rows


def _check_logit_bias(logit_bias: torch.Tensor | float | None) -> None:
    # A scalar shift of every logit leaves every softmax unchanged, so it drops out of
    # these losses; a non-scalar bias would not, and is not what open_clip passes here.
    if logit_bias is None:
        return
    if isinstance(logit_bias, torch.Tensor) and logit_bias.numel() != 1:
        raise ValueError(
            f"logit_bias must be a scalar, got a tensor of shape {tuple(logit_bias.shape)}"
        )


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: (CE(A, labels) + CE(A^T, labels)) / 2 with A = s * I T^T."""

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
    ) -> None:
        super().__init__()
        if use_horovod:
            raise NotImplementedError(
                "use_horovod=True is not supported; run under torch.distributed (torchrun)"
            )
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # labels are implicit in the kernels: nothing to cache
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod

    def _losses(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        teacher: tuple[TeacherFeatures, TeacherFeatures, TeacherScale] | None,
        *,
        compute_contrastive: bool,
        kind: str = "soft_ce",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(distill, contrastive) under this module's multi-device mode; teacher lists are
        an ensemble, each teacher gathered like a single one."""
        compute_distill = teacher is not None
        teacher_image, teacher_text, teacher_scale = teacher if teacher else (None, None, None)
        flags = dict(
            kind=kind, compute_distill=compute_distill, compute_contrastive=compute_contrastive
        )
        if self.world_size == 1:
            return affinity_loss_square(
                image_features,
                text_features,
                logit_scale,
                teacher_image,
                teacher_text,
                teacher_scale,
                **flags,
            )
        all_image, all_text = gather_features(
            image_features,
            text_features,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            rank=self.rank,
            world_size=self.world_size,
        )
        all_teacher_image = all_teacher_text = None
        if compute_distill:
            all_teacher_image, all_teacher_text = gather_teacher_features(
                teacher_image, teacher_text, self.world_size
            )
        if not self.local_loss:
            return affinity_loss_square(
                all_image,
                all_text,
                logit_scale,
                all_teacher_image,
                all_teacher_text,
                teacher_scale,
                **flags,
            )
        # Local loss: this rank's rows against all global columns, each direction on its own.
        label_offset = image_features.shape[0] * self.rank
        image_to_text = affinity_loss_rows(
            image_features,
            all_text,
            logit_scale,
            teacher_image,
            all_teacher_text,
            teacher_scale,
            label_offset=label_offset,
            **flags,
        )
        text_to_image = affinity_loss_rows(
            text_features,
            all_image,
            logit_scale,
            teacher_text,
            all_teacher_image,
            teacher_scale,
            label_offset=label_offset,
            **flags,
        )
        distill = (image_to_text[0] + text_to_image[0]) / 2
        contrastive = (image_to_text[1] + text_to_image[1]) / 2
        return distill, contrastive

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        _check_logit_bias(logit_bias)
        _, contrastive = self._losses(
            image_features, text_features, logit_scale, None, compute_contrastive=True
        )
        return {"contrastive_loss": contrastive} if output_dict else contrastive


class DistillClipLoss(ClipLoss):
    """open_clip's distillation loss: returns (contrastive, distill), distill being the
    symmetric soft cross-entropy between teacher and student affinities. Lists of teacher
    features and scales distil from an ensemble (K <= 4, targets averaged after softmax)."""

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        dist_image_features: TeacherFeatures,
        dist_text_features: TeacherFeatures,
        dist_logit_scale: TeacherScale,
        output_dict: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]:
        distill, contrastive = self._losses(
            image_features,
            text_features,
            logit_scale,
            (dist_image_features, dist_text_features, dist_logit_scale),
            compute_contrastive=True,
        )
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill


class AffinityMimickingLoss(ClipLoss):
    """TinyCLIP's loss: (1 - w) * L_dist + w * L_clip; w = 0 is pure affinity mimicking.

    Under torch.distributed it runs in local-loss + gather-with-grad mode (the only mode
    that scales), reading rank and world size from the default process group. Lists of
    teacher features and scales distil from an ensemble (K <= 4, targets averaged after
    softmax).
    """

    def __init__(
        self,
        *,
        contrastive_weight: float = 0.0,
        kind: str = "soft_ce",
        local_loss: bool = True,
        gather_with_grad: bool = True,
    ) -> None:
        contrastive_weight = check_contrastive_weight(contrastive_weight)
        if kind not in ("soft_ce", "kl"):
            raise ValueError(f"kind must be 'soft_ce' or 'kl', got {kind!r}")
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad)
        self.contrastive_weight = contrastive_weight
        self.kind = kind

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        teacher_image_features: TeacherFeatures,
        teacher_text_features: TeacherFeatures,
        teacher_logit_scale: TeacherScale,
    ) -> torch.Tensor:
        # Read at call time: the loss may be built before the process group is initialised.
        self.rank, self.world_size = distributed_world()
        weight = self.contrastive_weight
        teacher = (
            (teacher_image_features, teacher_text_features, teacher_logit_scale)
            if weight < 1.0
            else None
        )
        distill, contrastive = self._losses(
            image_features,
            text_features,
            logit_scale,
            teacher,
            compute_contrastive=weight > 0.0,
            kind=self.kind,
        )
        return (1.0 - weight) * distill + weight * contrastive


# ----------------------------------------------------------------------------- sigmoid family

SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


class SigLipLoss(nn.Module):
    """open_clip's SigLipLoss: -(1/n) sum_ij log s(z_ij (a x_i . y_j + c)), z = +1 on the
    positive pairs and -1 elsewhere, by the fused sigmoid kernels (no [n, N] logits).

    Under torch.distributed every rank scores its n images against the texts of all ranks
    (gathered with gradient, its own block at offset rank * n): the loss and gradients that
    open_clip's neighbour exchanges give, for every ``dist_impl``, which is accepted and only
    checked (one gather serves them all).
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
    ) -> None:
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {SIGLIP_DIST_IMPLS}, got {dist_impl!r}")
        self.cache_labels = cache_labels  # labels are implicit in the kernels: nothing to cache
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl

    def _columns(self, text_features: torch.Tensor, with_grad: bool) -> torch.Tensor:
        return gather_rows(text_features, self.world_size, with_grad=with_grad)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        loss, _ = sigmoid_loss_rows(
            image_features,
            self._columns(text_features, with_grad=True),
            logit_scale,
            logit_bias,
            label_offset=image_features.shape[0] * self.rank,
        )
        return {"contrastive_loss": loss} if output_dict else loss


class DistillSigLipLoss(SigLipLoss):
    """Sigmoid distillation from one teacher or an ensemble, with SigLIP's contrastive term.

    Returns ``(w_c L_c, w_d L_d)`` (or a dict), ``distill_loss_weights = (w_c, w_d)`` as in
    MobileCLIP's DistillSigLipLoss. L_d per pair is the binary cross-entropy of s(A) against
    the teachers' mean probability ``kind="bce"``, ``"kl"`` without the teacher entropy, or
    MobileCLIP's ``"mobileclip"`` form -log s((2p - 1) A); see tinyclip_fast.ops.sigmoid_loss.
    Teachers are single tensors or lists (K = 1..4, each its own dim), their scales and
    biases numbers, tensors or lists of them, given to forward or, as defaults, here.
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        *,
        distill_loss_weights: tuple[float, float] = (1.0, 1.0),
        kind: str = "bce",
        dist_logit_scale: object = None,
        dist_logit_bias: object = None,
    ) -> None:
        super().__init__(cache_labels, rank, world_size, dist_impl)
        if len(distill_loss_weights) != 2:
            raise ValueError(
                "distill_loss_weights must be (contrastive, distill), got "
                f"{tuple(distill_loss_weights)}"
            )
        if kind not in SIGMOID_KINDS:
            raise ValueError(f"kind must be one of {SIGMOID_KINDS}, got {kind!r}")
        self.distill_loss_weights = tuple(float(w) for w in distill_loss_weights)
        self.kind = kind
        self.dist_logit_scale = dist_logit_scale
        self.dist_logit_bias = dist_logit_bias

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None,
        dist_image_features: torch.Tensor | list[torch.Tensor],
        dist_text_features: torch.Tensor | list[torch.Tensor],
        dist_logit_scale: object = None,
        dist_logit_bias: object = None,
        output_dict: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]:
        teacher_scale = self.dist_logit_scale if dist_logit_scale is None else dist_logit_scale
        teacher_bias = self.dist_logit_bias if dist_logit_bias is None else dist_logit_bias
        if isinstance(dist_text_features, (list, tuple)):
            teacher_cols = [self._columns(t, with_grad=False) for t in dist_text_features]
        else:
            teacher_cols = self._columns(dist_text_features, with_grad=False)
        contrastive, distill = sigmoid_loss_rows(
            image_features,
            self._columns(text_features, with_grad=True),
            logit_scale,
            logit_bias,
            dist_image_features,
            teacher_cols,
            teacher_scale,
            teacher_bias,
            kind=self.kind,
            contrastive_weight=self.distill_loss_weights[0],
            distill_weight=self.distill_loss_weights[1],
            label_offset=image_features.shape[0] * self.rank,
        )
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill
