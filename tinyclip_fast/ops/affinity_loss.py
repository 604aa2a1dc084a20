"""Fused affinity-mimicking (distillation) and contrastive loss without [m, N] logits.

Student logits A = a X Y^T, teacher logits B_k = b_k Xt_k Yt_k^T for an ensemble of K = 1..4
teachers (each with its own feature dim and scale), targets averaged after the softmax
(MobileCLIP's ``average_after_softmax``): along a direction P = mean_k softmax(B_k), Q =
softmax(A). The soft cross-entropy of a row is ``lse(A_i) - sum_j P_ij A_ij``, which
decomposes per teacher as ``lse(A_i) - mean_k sum_j softmax(B_k)_ij A_ij``; KL(P || Q)
subtracts the teacher entropy ``-sum_j P_ij ln P_ij``; InfoNCE is ``lse(A_i) - A_i,label``.
All of them have dL/dA = Q - P (or Q - onehot), so the forward pass keeps per-row (and, for
the square problem, per-column) statistics only and the backward pass recomputes tiles from
them: extra memory is O((m + N) d) plus one bounded chunk of rows, never O(m N).

KL is exact for ensembles too: the entropy of a mixture does not decompose per teacher, so
for K >= 2 one more pass over the teacher tiles, once their log-sum-exps are known, sums
P ln P (soft-CE, the default, needs no such pass; one teacher's entropy is
lse(B_i) - sum_j P_ij B_ij, gathered in the first pass). The gradient is the same either way.

Two implementations share the registered operators of this module
(``tinyclip_fast::affinity_forward`` / ``affinity_backward``, with fake and autograd
registrations, so that torch.compile captures them in one graph): the Triton kernels
(``tinyclip_fast.kernels.affinity_loss``, fp32 math; under autocast fp32 features are cast
once to its half dtype) and a chunked PyTorch path for CPU tensors
(``tinyclip_fast.ops.affinity_torch``); the argument checks live in
``tinyclip_fast.ops.affinity_checks``. Nothing reads a device value on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tinyclip_fast.ops.affinity_checks import (
    KINDS,
    Teacher,
    check_contrastive_weight,
    check_scale,
    validate,
)
from tinyclip_fast.ops.affinity_torch import (
    AffinityStats,
    compute_dtype,
    torch_backward,
    torch_forward,
)
from tinyclip_fast.ops.backend import OP_NAMESPACE, kernel_dtype, to_kernel_dtype, use_triton

__all__ = [
    "KINDS",
    "AffinityStats",
    "TeacherFeatures",
    "TeacherScale",
    "affinity_loss_rows",
    "affinity_loss_square",
    "affinity_mimicking_loss",
    "check_contrastive_weight",
]

Scale = float | torch.Tensor

# ----------------------------------------------------------------------------- autograd


def _forward_stats(rows, cols, scale, teachers, square, offset, kind):
    if not use_triton(rows):
        return torch_forward(rows, cols, scale, teachers, square, offset, kind)
    from tinyclip_fast.kernels.affinity_loss import affinity_stats_forward
    from tinyclip_fast.kernels.mixture_entropy import mixture_entropy

    pairs = [(t_rows, t_cols) for t_rows, t_cols, _ in teachers]
    scales = torch.stack([b.float() for _, _, b in teachers]) if teachers else None
    row, col = affinity_stats_forward(
        rows, cols, scale, pairs, scales, column_stats=square, label_offset=offset
    )
    stats = [_kernel_stats(*row, kind), _kernel_stats(*col, kind) if col is not None else None]
    if kind == "kl" and len(teachers) > 1:
        col_lse_b = stats[1].lse_b if square else None
        row_plogp, col_plogp = mixture_entropy(pairs, scales, stats[0].lse_b, col_lse_b)
        stats[0].plogp = row_plogp.float()
        if square:
            stats[1].plogp = col_plogp.float()
    return stats[0], stats[1]


def _kernel_stats(lse_a, target_a, lse_b, p_dot_a, p_dot_b, kind: str) -> AffinityStats:
    """The kernels' per-teacher statistics as AffinityStats (p_dot_a averaged over them)."""
    stats = AffinityStats(lse_a, target_a)
    if lse_b is not None:
        stats.lse_b, stats.p_dot_a = lse_b, p_dot_a.mean(dim=0)
        if kind == "kl" and p_dot_b is not None:
            stats.plogp = p_dot_b - lse_b[0]
    return stats


def _backward_grads(rows, cols, scale, teachers, row_stats, col_stats, coeffs, factor, offset):
    """Gradients for dA = factor * (the coefficient mix): the kernels keep the mix at its
    own magnitude and apply ``factor`` (1 / the rows averaged over) after the GEMMs."""
    if not use_triton(rows):
        coeffs = coeffs * factor
        return torch_backward(rows, cols, scale, teachers, row_stats, col_stats, coeffs, offset)
    from tinyclip_fast.kernels.affinity_loss import affinity_grad_backward

    return affinity_grad_backward(
        rows, cols, scale, [(t_rows, t_cols) for t_rows, t_cols, _ in teachers],
        torch.stack([b.float() for _, _, b in teachers]) if teachers else None,
        row_stats.lse_a, row_stats.lse_b,
        col_stats.lse_a if col_stats is not None else None,
        col_stats.lse_b if col_stats is not None else None,
        coeffs, label_offset=offset, coeff_scale=factor,
    )  # fmt: skip


def _direction_losses(stats: AffinityStats, kind: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Mean distillation loss over the direction's rows (None without teachers) and the
    per-row InfoNCE loss. KL adds sum_j P_ij ln P_ij: per row for one teacher, the
    direction's total for an ensemble."""
    infonce = stats.lse_a - stats.target_a
    if stats.lse_b is None:
        return None, infonce
    distill = stats.lse_a - stats.p_dot_a
    if kind == "kl" and stats.plogp.dim() == 1:
        distill = distill + stats.plogp
    distill = distill.mean()
    if kind == "kl" and stats.plogp.dim() == 0:
        distill = distill + stats.plogp / stats.lse_a.shape[0]
    return distill, infonce


def _flatten(teachers: list[Teacher]) -> list[torch.Tensor]:
    return [t for teacher in teachers for t in teacher]


def _unflatten(flat, half: torch.dtype | None) -> list[Teacher]:
    flat = [to_kernel_dtype(t, half) for t in flat]
    return [tuple(flat[i : i + 3]) for i in range(0, len(flat), 3)]


def _features_dtype(rows, cols, teacher_tensors) -> torch.dtype:
    """The dtype of the losses: float64 for float64 features, fp32 for every other dtype."""
    return compute_dtype(rows, cols, *teacher_tensors[0::3], *teacher_tensors[1::3])


def _saved_stats(lse_a: torch.Tensor, lse_b: torch.Tensor) -> AffinityStats | None:
    """The forward's log-sum-exps as the backward reads them (target_a is never read)."""
    if not lse_a.numel():
        return None
    return AffinityStats(lse_a=lse_a, target_a=lse_a, lse_b=lse_b if lse_b.numel() else None)


# The two halves of the loss are registered operators (torch.library): torch.compile keeps
# each as one node (its fake implementation gives the output shapes) and a CUDA graph
# captures them, which a Python autograd Function calling Triton would not allow.
@torch.library.custom_op(f"{OP_NAMESPACE}::affinity_forward", mutates_args=())
def _affinity_forward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    teacher_tensors: list[torch.Tensor],
    kind: str,
    compute_distill: bool,
    compute_contrastive: bool,
    square: bool,
    label_offset: int,
    half: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(distill, contrastive) and the statistics the backward reads: the row and column
    log-sum-exps of the student [r] and of each teacher [K, r] (empty where absent). The
    teachers come flattened as (rows, cols, scale) triples; ``half`` is the kernels'
    operand dtype for fp32 features under autocast (cast once here)."""
    dtype = _features_dtype(rows, cols, teacher_tensors)
    teachers = _unflatten(teacher_tensors, half)
    rows, cols = to_kernel_dtype(rows, half), to_kernel_dtype(cols, half)
    row_stats, col_stats = _forward_stats(rows, cols, scale, teachers, square, label_offset, kind)
    zero = torch.zeros((), dtype=dtype, device=rows.device)
    distill, contrastive = zero, zero.clone()
    row_distill, row_infonce = _direction_losses(row_stats, kind)
    if square:
        col_distill, col_infonce = _direction_losses(col_stats, kind)
        if compute_distill:
            distill = (row_distill + col_distill) / 2
        if compute_contrastive:
            contrastive = (row_infonce.mean() + col_infonce.mean()) / 2
    else:
        if compute_distill:
            distill = row_distill
        if compute_contrastive:
            contrastive = row_infonce.mean()
    empty = row_stats.lse_a.new_empty(0)
    saved = [
        row_stats.lse_a, row_stats.lse_b,
        col_stats.lse_a if square else None, col_stats.lse_b if square else None,
    ]  # fmt: skip
    # Fresh tensors: an operator's outputs alias neither its inputs nor each other.
    return (
        distill.to(dtype),
        contrastive.to(dtype),
        *((empty if t is None else t).clone() for t in saved),
    )


@_affinity_forward.register_fake
def _(rows, cols, scale, teacher_tensors, kind, compute_distill, compute_contrastive, square,
      label_offset, half):  # fmt: skip
    dtype = _features_dtype(rows, cols, teacher_tensors)
    # The kernels keep their statistics in fp32; the PyTorch path in the compute dtype.
    stats = torch.float32 if use_triton(rows) else dtype
    k = len(teacher_tensors) // 3
    loss = lambda: rows.new_empty((), dtype=dtype)
    lse = lambda r, teachers: rows.new_empty((k, r) if teachers else (r,), dtype=stats)
    empty = lambda: rows.new_empty(0, dtype=stats)
    m, n = rows.shape[0], cols.shape[0]
    return (
        loss(), loss(), lse(m, False), lse(m, True) if k else empty(),
        lse(n, False) if square else empty(), lse(n, True) if square and k else empty(),
    )  # fmt: skip


@torch.library.custom_op(f"{OP_NAMESPACE}::affinity_backward", mutates_args=())
def _affinity_backward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    teacher_tensors: list[torch.Tensor],
    row_lse: list[torch.Tensor],
    col_lse: list[torch.Tensor],
    coeffs: torch.Tensor,
    factor: float,
    label_offset: int,
    half: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d rows, d cols, d scale) in the dtypes of rows, cols and scale, for dA = factor *
    (the coefficient mix); ``row_lse`` / ``col_lse`` are the forward's (student, teachers)
    log-sum-exps, the column ones empty for the rectangular problem."""
    teachers = _unflatten(teacher_tensors, half)
    rows_c, cols_c = to_kernel_dtype(rows, half), to_kernel_dtype(cols, half)
    row_stats, col_stats = _saved_stats(*row_lse), _saved_stats(*col_lse)
    with torch.autocast(rows.device.type, enabled=False):  # as in the forward
        grad_rows, grad_cols, grad_scale = _backward_grads(
            rows_c, cols_c, scale, teachers, row_stats, col_stats, coeffs, factor, label_offset
        )
    return grad_rows.to(rows.dtype), grad_cols.to(cols.dtype), grad_scale.to(scale.dtype)


@_affinity_backward.register_fake
def _(rows, cols, scale, teacher_tensors, row_lse, col_lse, coeffs, factor, label_offset, half):
    return torch.empty_like(rows), torch.empty_like(cols), torch.empty_like(scale)


def _setup_backward(ctx, inputs, output) -> None:
    rows, cols, scale, teacher_tensors, _, compute_distill, compute_contrastive, square = inputs[:8]
    ctx.save_for_backward(rows, cols, scale, *teacher_tensors, *output[2:])
    ctx.config = (compute_distill, compute_contrastive, square, inputs[8], inputs[9])


def _backward(ctx, grad_distill: torch.Tensor, grad_contrastive: torch.Tensor, *_):
    rows, cols, scale, *teacher_tensors = ctx.saved_tensors
    teacher_tensors, (row_lse_a, row_lse_b, col_lse_a, col_lse_b) = (
        teacher_tensors[:-4], teacher_tensors[-4:]
    )  # fmt: skip
    compute_distill, compute_contrastive, square, label_offset, half = ctx.config
    # dL/dA per direction is g_d (Q - P) + g_c (Q - onehot), divided by the rows averaged
    # over; the square loss averages two directions, hence 2n. The coefficients stay on
    # the device.
    dtype = _features_dtype(rows, cols, teacher_tensors)
    g_d = grad_distill.to(dtype) if compute_distill else grad_distill.new_zeros((), dtype=dtype)
    g_c = grad_contrastive.to(dtype) if compute_contrastive else g_d.new_zeros(())
    num = rows.shape[0] * (2 if square else 1)
    row_q, row_p = g_d + g_c, g_d
    col_q, col_p = (row_q, row_p) if square else (row_q * 0, row_p * 0)
    onehot = g_c * (2 if square else 1)
    coeffs = torch.stack([row_q, row_p, col_q, col_p, onehot])
    grad_rows, grad_cols, grad_scale = _affinity_backward(
        rows, cols, scale, teacher_tensors, [row_lse_a, row_lse_b], [col_lse_a, col_lse_b],
        coeffs, 1 / num, label_offset, half,
    )  # fmt: skip
    return grad_rows, grad_cols, grad_scale, [None] * len(teacher_tensors), *([None] * 6)


_affinity_forward.register_autograd(_backward, setup_context=_setup_backward)


def _affinity_loss(
    named_student, named_teacher, scale, kind, compute_distill, compute_contrastive, square,
    label_offset, requested_dtype,
):  # fmt: skip
    rows, cols, teachers = validate(named_student, named_teacher, square, kind, compute_distill)
    scale = check_scale(named_student[2][0], scale, rows.device)
    if compute_contrastive and not 0 <= label_offset <= cols.shape[0] - rows.shape[0]:
        raise ValueError(
            f"label_offset={label_offset} puts labels of {rows.shape[0]} rows outside the "
            f"{cols.shape[0]} columns of {named_student[1][0]} {tuple(cols.shape)}"
        )
    # The losses are fp32 sums over N columns: autocast must not recast the ops inside
    # (the values would round in bf16/fp16). It picks the kernels' operand dtype instead.
    half = kernel_dtype(rows, requested_dtype)
    with torch.autocast(rows.device.type, enabled=False):
        distill, contrastive, *_ = _affinity_forward(
            rows, cols, scale, _flatten(teachers), kind, compute_distill, compute_contrastive,
            square, label_offset, half,
        )  # fmt: skip
    return distill, contrastive


# ----------------------------------------------------------------------------- public API

# One teacher's features and scale, or lists of K <= 4 teachers' (an ensemble).
TeacherFeatures = torch.Tensor | Sequence[torch.Tensor]
TeacherScale = Scale | Sequence[Scale]


def affinity_loss_square(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scale,
    teacher_image_features: TeacherFeatures | None = None,
    teacher_text_features: TeacherFeatures | None = None,
    teacher_logit_scale: TeacherScale | None = None,
    *,
    kind: str = "soft_ce",
    compute_distill: bool = True,
    compute_contrastive: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One device, n rows = n columns: ``(distill, contrastive)``, 0-d fp32 tensors.

    distill = (mean_i rowloss(A, B) + mean_j colloss(A, B)) / 2 with rowloss the soft
    cross-entropy -sum_j P_ij log softmax(A)_ij (or KL(P || softmax(A))), P = softmax(B) of
    one teacher or, for teacher lists (an ensemble of K <= 4, each its own feature dim and
    scale), mean_k softmax(B_k); contrastive = (CE(A, diag) + CE(A^T, diag)) / 2. Terms not
    requested are 0-d zeros. ``logit_scale`` is the multiplicative scale a (already
    exponentiated), as in open_clip. Float64 features give float64 losses: computed in
    float64 on the PyTorch (CPU) path, in fp32 by the Triton kernels.
    ``compute_dtype`` (bf16, fp16 or fp32) is the kernels' operand dtype for fp32 features,
    cast once inside the op; None takes autocast's under autocast (docs/losses.md).
    """
    return _affinity_loss(
        [("image_features", image_features), ("text_features", text_features),
         ("logit_scale", logit_scale)],
        [("teacher_image_features", teacher_image_features),
         ("teacher_text_features", teacher_text_features),
         ("teacher_logit_scale", teacher_logit_scale)],
        logit_scale, kind, compute_distill, compute_contrastive, square=True, label_offset=0,
        requested_dtype=compute_dtype,
    )  # fmt: skip


def affinity_loss_rows(
    row_features: torch.Tensor,
    col_features: torch.Tensor,
    logit_scale: Scale,
    teacher_row_features: TeacherFeatures | None = None,
    teacher_col_features: TeacherFeatures | None = None,
    teacher_logit_scale: TeacherScale | None = None,
    *,
    kind: str = "soft_ce",
    compute_distill: bool = True,
    compute_contrastive: bool = False,
    label_offset: int = 0,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectangular [m, N] problem, softmax along the N columns only (open_clip local loss).

    Returns ``(mean_i distill_i, mean_i infonce_i)`` where infonce_i = lse(A_i) -
    A_{i, label_offset + i}; teachers as in ``affinity_loss_square`` (lists: an ensemble).
    Gradients reach row_features, col_features and logit_scale; ``compute_dtype`` as there.
    """
    return _affinity_loss(
        [("row_features", row_features), ("col_features", col_features),
         ("logit_scale", logit_scale)],
        [("teacher_row_features", teacher_row_features),
         ("teacher_col_features", teacher_col_features),
         ("teacher_logit_scale", teacher_logit_scale)],
        logit_scale, kind, compute_distill, compute_contrastive, square=False,
        label_offset=label_offset, requested_dtype=compute_dtype,
    )  # fmt: skip


def affinity_mimicking_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scale,
    teacher_image_features: TeacherFeatures,
    teacher_text_features: TeacherFeatures,
    teacher_logit_scale: TeacherScale,
    *,
    contrastive_weight: float = 0.0,
    kind: str = "soft_ce",
) -> torch.Tensor:
    """TinyCLIP's loss on one device: (1 - w) L_dist + w L_clip as a 0-d tensor (fp32, or
    float64 for float64 features), with w = ``contrastive_weight`` in [0, 1] (the meaning
    ``AffinityMimickingLoss`` and the engine's ``loss.contrastive_weight`` give it too).
    Teacher lists distil from an ensemble (targets averaged after the softmax)."""
    check_contrastive_weight(contrastive_weight)
    distill, contrastive = affinity_loss_square(
        image_features, text_features, logit_scale,
        teacher_image_features, teacher_text_features, teacher_logit_scale,
        kind=kind, compute_distill=True, compute_contrastive=contrastive_weight != 0,
    )  # fmt: skip
    if contrastive_weight == 0:
        return distill
    return (1 - contrastive_weight) * distill + contrastive_weight * contrastive
