"""Fused sigmoid (SigLIP) losses without [m, N] logits: contrastive, distillation, ensembles.

Student logits A = a X Y^T + c, teacher logits B_k = b_k Xt_k Yt_k^T + c_k for K = 1..4
teachers (each with its own feature dim), p = mean_k s(B_k) with s the logistic sigmoid:
  contrastive (SigLIP)  L_c = -(1/m) sum_ij log s(z_ij A_ij), z = +1 at (i, i + offset) else -1
  "bce"                 L_d = -(1/m) sum_ij [p log s(A) + (1 - p) log s(-A)]
  "kl"                  L_d = bce - (1/m) sum_ij H(p_ij), H the binary entropy
  "mobileclip"          L_d = -(1/m) sum_ij log s((2p - 1) A)
with dL/dA = -(1/m) z s(-zA), (s(A) - p) / m (bce and kl), -(1/m) t s(-tA) with t = 2p - 1.
"mobileclip" is the form of MobileCLIP's DistillSigLipLoss (apple/ml-mobileclip,
training/open_clip_v2.patch, class DistillSigLipLoss in src/open_clip/loss.py: teacher
"labels" 2 mean_k s(B_k) - 1 in place of SigLIP's +-1, the ensemble averaged after the
sigmoid, as its ``average_after_sigmoid``).

Nothing normalises over rows or columns, so one pass over the tiles gives the loss and the
gradient together: the forward also produces dX, dY and the scale and bias gradients of
w_c L_c + w_d L_d, and the backward only scales them by grad_output (one pass per term instead when
the two outputs receive different gradient tensors). Extra memory is O((m + N) d) plus one
bounded chunk of rows. Two implementations share one registered operator
(``tinyclip_fast::sigmoid_forward``, with its fake and autograd registrations): the Triton
kernels (``tinyclip_fast.kernels.sigmoid_loss``) and a chunked PyTorch path for CPU tensors
(``tinyclip_fast.ops.sigmoid_torch``). Under autocast the kernels take fp32 features in
autocast's half dtype; nothing reads a device value on the host (see docs/losses.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce

import torch

from tinyclip_fast.kernels.limits import MAX_TEACHERS
from tinyclip_fast.ops.arguments import (
    as_list,
    check_features,
    check_on_device,
    scalar_argument,
)
from tinyclip_fast.ops.backend import OP_NAMESPACE, kernel_dtype, to_kernel_dtype, use_triton
from tinyclip_fast.ops.sigmoid_torch import Teacher, torch_tiles

KINDS = ("bce", "kl", "mobileclip")

Scalar = float | torch.Tensor


# ----------------------------------------------------------------------------- validation


def _check_scalar(name: str, value: object, device: torch.device, *, scale: bool) -> torch.Tensor:
    """A number or one-element floating tensor as a 0-d tensor on ``device``: finite, and a
    scale >= 0. A Python number is checked on the host, a tensor on its device without a
    host read (``check_on_device``)."""
    value = scalar_argument(name, value)
    if isinstance(value, torch.Tensor):
        detached = value.detach()
        ok = torch.isfinite(detached) & (detached >= 0) if scale else torch.isfinite(detached)
        domain = " and >= 0 (a multiplicative, exp'd scale)" if scale else ""
        check_on_device(ok, f"{name} must be finite{domain}")
        return value.reshape(()).to(device)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if scale and value < 0:
        raise ValueError(f"{name} must be >= 0 (a multiplicative, exp'd scale), got {value}")
    return torch.tensor(value, dtype=torch.float32, device=device)


def _check_teachers(
    names: tuple[str, str, str, str],
    row_features: object,
    col_features: object,
    scales: object,
    biases: object,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> list[Teacher]:
    """Teachers as [(rows_k, cols_k, scale_k, bias_k)], detached, on the student's device."""
    row_name, col_name, scale_name, bias_name = names
    if row_features is None or col_features is None or scales is None:
        raise ValueError(f"distillation needs {row_name}, {col_name} and {scale_name}")
    (row_list, _), (col_list, _) = as_list(row_features), as_list(col_features)
    count = len(row_list)
    if not 1 <= count <= MAX_TEACHERS:
        raise ValueError(f"{row_name} must hold 1 to {MAX_TEACHERS} teachers, got {count}")
    scale_list, _ = as_list(scales)
    bias_list = [0.0] * count if biases is None else as_list(biases)[0]
    for other_name, other in (
        (col_name, col_list),
        (scale_name, scale_list),
        (bias_name, bias_list),
    ):
        if len(other) != count:
            raise ValueError(
                f"{other_name} has {len(other)} entries but {row_name} has {count} teachers: "
                "give one per teacher"
            )
    teachers = []
    for k in range(count):
        tag = f"[{k}]" if isinstance(row_features, (list, tuple)) else ""
        t_rows = check_features(f"{row_name}{tag}", row_list[k])
        t_cols = check_features(f"{col_name}{tag}", col_list[k])
        for t_name, t, s_name, s in (
            (f"{row_name}{tag}", t_rows, "student rows", rows),
            (f"{col_name}{tag}", t_cols, "student columns", cols),
        ):
            if t.shape[0] != s.shape[0]:
                raise ValueError(
                    f"{t_name} {tuple(t.shape)} must have the batch size of the {s_name} "
                    f"{tuple(s.shape)}"
                )
            if t.device != rows.device:
                raise ValueError(
                    f"all features must be on one device: the student is on {rows.device}, "
                    f"{t_name} is on {t.device}"
                )
        if t_rows.shape[1] != t_cols.shape[1]:
            raise ValueError(
                f"teacher {k}: {row_name}{tag} {tuple(t_rows.shape)} and {col_name}{tag} "
                f"{tuple(t_cols.shape)} must have the same feature dimension"
            )
        scale = _check_scalar(f"{scale_name}{tag}", scale_list[k], rows.device, scale=True)
        bias = _check_scalar(f"{bias_name}{tag}", bias_list[k], rows.device, scale=False)
        teachers.append((t_rows.detach(), t_cols.detach(), scale.detach(), bias.detach()))
    return teachers


# ----------------------------------------------------------------------------- autograd


def _tiles(rows, cols, scale, bias, teachers, contrastive, kind, weights, label_offset, grad):
    # The dtypes are chosen here (fp32 math, products in the features' dtype): autocast
    # must not recast the GEMMs of either path.
    with torch.autocast(rows.device.type, enabled=False):
        return _run_tiles(
            rows, cols, scale, bias, teachers, contrastive, kind, weights, label_offset, grad
        )


def _run_tiles(rows, cols, scale, bias, teachers, contrastive, kind, weights, label_offset, grad):
    if use_triton(rows):
        from tinyclip_fast.kernels.sigmoid_loss import sigmoid_loss_tiles

        affine = torch.stack([scale.detach().float(), bias.detach().float()])
        teacher_affine = (
            torch.stack([torch.stack([b.float(), cb.float()]) for _, _, b, cb in teachers])
            if kind is not None
            else None
        )
        return sigmoid_loss_tiles(
            rows, cols, affine, [(t[0], t[1]) for t in teachers], teacher_affine,
            contrastive=contrastive, kind=kind, weights=weights, label_offset=label_offset,
            grad=grad,
        )  # fmt: skip
    return torch_tiles(
        rows, cols, scale, bias, teachers, contrastive, kind, weights, label_offset, grad
    )


def _out_dtype(rows: torch.Tensor, cols: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (rows.dtype, cols.dtype) else torch.float32


# Registered operators (torch.library): torch.compile keeps the op as one node (its fake
# implementation gives the output shapes) and a CUDA graph captures it, which a Python
# autograd Function calling Triton would not allow.
@torch.library.custom_op(f"{OP_NAMESPACE}::sigmoid_forward", mutates_args=())
def _sigmoid_forward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    teacher_tensors: list[torch.Tensor],
    kind: str | None,
    weights: list[float],
    label_offset: int,
    grad: bool,
    half: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w_c L_c, w_d L_d, G Y, G^T X, sums) with G the gradient of w_c L_c + w_d L_d with
    respect to the logits (the products empty without ``grad``) and sums the fp64 [4] of
    ``sigmoid_loss_tiles``. The teachers come flattened as (rows, cols, scale, bias);
    ``half`` is the kernels' operand dtype for fp32 features under autocast (cast once)."""
    dtype = _out_dtype(rows, cols)
    rows, cols = to_kernel_dtype(rows, half), to_kernel_dtype(cols, half)
    flat = [to_kernel_dtype(t, half) for t in teacher_tensors]
    teachers = [tuple(flat[i : i + 4]) for i in range(0, len(flat), 4)]
    sums, products = _tiles(
        rows, cols, scale, bias, teachers, weights[0] != 0, kind, tuple(weights), label_offset,
        grad,
    )  # fmt: skip
    m = rows.shape[0]
    loss_c = (sums[0] * (weights[0] / m)).to(dtype)
    loss_d = (sums[1] * (weights[1] / m)).to(dtype)
    dx, dy = products if grad else (rows.new_empty(0), cols.new_empty(0))
    return loss_c, loss_d, dx.to(dtype), dy.to(dtype), sums


@_sigmoid_forward.register_fake
def _(rows, cols, scale, bias, teacher_tensors, kind, weights, label_offset, grad, half):
    dtype = _out_dtype(rows, cols)
    products = (rows.shape, cols.shape) if grad else ((0,), (0,))
    return (
        rows.new_empty((), dtype=dtype), rows.new_empty((), dtype=dtype),
        rows.new_empty(products[0], dtype=dtype), cols.new_empty(products[1], dtype=dtype),
        rows.new_empty(4, dtype=torch.float64),
    )  # fmt: skip


def _scaled_products(products, grad_output, scale, m):
    """(dx, dy, d scale, d bias) of one gradient pass times grad_output / m, on the device."""
    dx, dy, sums = products
    factor = grad_output.to(sums.dtype) / m
    feature_factor = factor * scale.detach().to(sums.dtype)
    return dx * feature_factor, dy * feature_factor, sums[3] * factor, sums[2] * factor


def _setup_backward(ctx, inputs, output) -> None:
    rows, cols, scale, bias, teacher_tensors, kind, weights, label_offset, grad, half = inputs
    ctx.save_for_backward(rows, cols, scale, bias, *teacher_tensors, *output[2:])
    ctx.config = (kind, weights, label_offset, grad, half)


def _backward(ctx, grad_c: torch.Tensor, grad_d: torch.Tensor, *_):
    rows, cols, scale, bias, *rest = ctx.saved_tensors
    teacher_tensors, products = rest[:-3], rest[-3:]
    kind, weights, label_offset, grad, half = ctx.config
    contrastive, distill = weights[0] != 0, kind is not None
    # ``(c + d).backward()`` hands both outputs one tensor, and the forward's gradient (that
    # of w_c L_c + w_d L_d) serves; any other mix takes one pass per term, scaled on the
    # device (comparing the two gradients' values would be a host read).
    if grad and not (contrastive and distill and grad_c is not grad_d):
        passes = [(products, grad_c if contrastive else grad_d)]
    else:
        terms = [((weights[0], 0.0), None, [], grad_c)] if contrastive else []
        if distill:
            terms.append(((0.0, weights[1]), kind, teacher_tensors, grad_d))
        passes = [
            (_sigmoid_forward(rows, cols, scale, bias, teachers, term_kind, list(term_weights),
                              label_offset, True, half)[2:], grad_output)
            for term_weights, term_kind, teachers, grad_output in terms
        ]  # fmt: skip
    scaled = [_scaled_products(p, g, scale, rows.shape[0]) for p, g in passes]
    dx, dy, d_scale, d_bias = (reduce(torch.add, parts) for parts in zip(*scaled, strict=True))
    return (
        dx.to(rows.dtype), dy.to(cols.dtype), d_scale.to(scale.dtype), d_bias.to(bias.dtype),
        [None] * len(teacher_tensors), *([None] * 5),
    )  # fmt: skip


_sigmoid_forward.register_autograd(_backward, setup_context=_setup_backward)


# ----------------------------------------------------------------------------- public API


def sigmoid_loss_rows(
    row_features: torch.Tensor,
    col_features: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Scalar | None = None,
    teacher_row_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
    teacher_col_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
    teacher_logit_scale: Scalar | Sequence[Scalar] | None = None,
    teacher_logit_bias: Scalar | Sequence[Scalar] | None = None,
    *,
    kind: str = "bce",
    contrastive_weight: float = 1.0,
    distill_weight: float = 1.0,
    label_offset: int = 0,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_c L_c, w_d L_d)`` of the [m, N] problem rows x columns, each a 0-d tensor.

    L_c is SigLIP's loss with positives at (i, i + label_offset) (a rank's block of the
    global batch), L_d the sigmoid distillation of ``kind`` against the teachers (lists of
    K = 1..4 feature tensors, scales and biases, or single ones); see the module docstring.
    A term with weight 0 (or, for L_d, without teachers) is not computed and is 0. Results
    are fp32 (float64 for float64 student features); gradients reach the student features,
    scale and bias, never the teachers. ``logit_scale`` is multiplicative (already exp'd).
    ``compute_dtype`` (bf16, fp16 or fp32) is the kernels' operand dtype for fp32 features,
    cast once inside the op; None takes autocast's under autocast (docs/losses.md).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    for name, weight in (
        ("contrastive_weight", contrastive_weight),
        ("distill_weight", distill_weight),
    ):
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
        ):
            raise ValueError(f"{name} must be a finite number, got {weight!r}")
    rows = check_features("row_features", row_features)
    cols = check_features("col_features", col_features)
    if rows.shape[1] != cols.shape[1]:
        raise ValueError(
            f"row_features {tuple(rows.shape)} and col_features {tuple(cols.shape)} must have "
            "the same feature dimension"
        )
    if rows.device != cols.device:
        raise ValueError(
            f"all features must be on one device: row_features is on {rows.device}, "
            f"col_features is on {cols.device}"
        )
    scale = _check_scalar("logit_scale", logit_scale, rows.device, scale=True)
    bias = _check_scalar(
        "logit_bias", 0.0 if logit_bias is None else logit_bias, rows.device, scale=False
    )
    distill = distill_weight != 0 and teacher_row_features is not None
    teachers = (
        _check_teachers(
            (
                "teacher_row_features",
                "teacher_col_features",
                "teacher_logit_scale",
                "teacher_logit_bias",
            ),
            teacher_row_features,
            teacher_col_features,
            teacher_logit_scale,
            teacher_logit_bias,
            rows,
            cols,
        )  # fmt: skip
        if distill
        else []
    )
    if contrastive_weight == 0 and not distill:
        raise ValueError(
            "no loss term to compute: give contrastive_weight != 0, or teacher features with "
            "distill_weight != 0"
        )
    if contrastive_weight != 0 and not 0 <= label_offset <= cols.shape[0] - rows.shape[0]:
        raise ValueError(
            f"label_offset={label_offset} puts the positives of {rows.shape[0]} rows outside "
            f"the {cols.shape[0]} columns of col_features {tuple(cols.shape)}"
        )
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (rows, cols, scale, bias))
    weights = [float(contrastive_weight), float(distill_weight) if distill else 0.0]
    flat = [t for teacher in teachers for t in teacher]
    loss_c, loss_d, *_ = _sigmoid_forward(
        rows, cols, scale, bias, flat, kind if distill else None, weights, label_offset, grad,
        kernel_dtype(rows, compute_dtype),
    )  # fmt: skip
    return loss_c, loss_d


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Scalar | None = None,
) -> torch.Tensor:
    """SigLIP on one device: -(1/n) sum_ij log s(z_ij (a x_i . y_j + c)), z = +1 on the
    diagonal and -1 elsewhere (open_clip's SigLipLoss, world_size 1), a 0-d tensor."""
    contrastive, _ = sigmoid_loss_rows(image_features, text_features, logit_scale, logit_bias)
    return contrastive


def sigmoid_distill_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Scalar | None,
    teacher_image_features: torch.Tensor | Sequence[torch.Tensor],
    teacher_text_features: torch.Tensor | Sequence[torch.Tensor],
    teacher_logit_scale: Scalar | Sequence[Scalar],
    teacher_logit_bias: Scalar | Sequence[Scalar] | None = None,
    *,
    contrastive_weight: float = 0.0,
    kind: str = "bce",
) -> torch.Tensor:
    """Sigmoid affinity distillation on one device: (1 - w) L_d + w L_c as a 0-d tensor.

    L_d per pair is the binary cross-entropy of s(A) against the teachers' mean probability
    (``kind`` "bce"; "kl" removes the teacher entropy; "mobileclip" is MobileCLIP's form),
    L_c the SigLIP loss; the teachers may be an ensemble (lists).
    """
    if not 0.0 <= contrastive_weight <= 1.0:
        raise ValueError(f"contrastive_weight must lie in [0, 1], got {contrastive_weight}")
    contrastive, distill = sigmoid_loss_rows(
        image_features, text_features, logit_scale, logit_bias,
        teacher_image_features, teacher_text_features, teacher_logit_scale, teacher_logit_bias,
        kind=kind, contrastive_weight=contrastive_weight, distill_weight=1.0 - contrastive_weight,
    )  # fmt: skip
    return contrastive + distill
