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
w_c L_c + w_d L_d, and the backward only scales them by grad_output (recomputing instead
when the two outputs receive gradients in another ratio). Extra memory is O((m + N) d) plus
one bounded chunk of rows. Two implementations share the autograd Function: the Triton
kernels (``tinyclip_fast.kernels.sigmoid_loss``) and a chunked PyTorch path for CPU tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce

import torch
from torch.autograd.function import once_differentiable

from tinyclip_fast.kernels.limits import MAX_TEACHERS
from tinyclip_fast.ops.arguments import (
    as_list,
    check_features,
    check_on_device,
    scalar_argument,
)
from tinyclip_fast.ops.backend import kernel_dtype, to_kernel_dtype, use_triton
from tinyclip_fast.ops.chunking import chunk_rows

KINDS = ("bce", "kl", "mobileclip")

Scalar = float | torch.Tensor
Teacher = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


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


# ----------------------------------------------------------------------------- PyTorch path


def _torch_tiles(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    teachers: list[Teacher],
    contrastive: bool,
    kind: str | None,
    weights: tuple[float, float],
    label_offset: int,
    grad: bool,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The kernels' contract (``sigmoid_loss_tiles``) over [chunk, N] row blocks.

    fp32 math for fp32/bf16/fp16 inputs, float64 for float64. The workspace (two to four
    [chunk, N] buffers) is allocated once and every elementwise step writes into it.
    """
    every = [rows, cols, *(t for teacher in teachers for t in teacher[:2])]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in every) else torch.float32
    device = rows.device
    m, n = rows.shape[0], cols.shape[0]
    cols_c = cols.to(dtype)
    # The scales go on the [N, d] column operands, as 0-d tensors: never read on the host.
    cols_a = cols_c * scale.detach().to(dtype)
    c = bias.detach().to(dtype)
    prepared = [
        (t_rows, t_cols.to(dtype) * b.to(dtype), cb.to(dtype)) for t_rows, t_cols, b, cb in teachers
    ]
    distill = kind is not None
    w_c, w_d = weights
    step = min(m, chunk_rows(n))
    buffers = 2 + distill + (kind == "mobileclip")
    workspace = torch.empty(buffers, step, n, dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    dx = torch.empty(m, rows.shape[1], dtype=dtype, device=device) if grad else None
    dy = torch.empty(n, cols.shape[1], dtype=dtype, device=device) if grad else None
    for start in range(0, m, step):
        stop = min(start + step, m)
        size = stop - start
        logits, work, *rest = (buffer[:size] for buffer in workspace)
        x = rows[start:stop].to(dtype)
        torch.addmm(c, x, cols_a.T, out=logits)
        # sum_j softplus(A_ij) is the loss of every negative pair and of a bce target 0.
        softplus_sum = torch.logaddexp(logits, zero, out=work).sum()
        local = torch.arange(size, device=device)
        label = local + start + label_offset
        if contrastive:
            # A positive pair's -log s(A) = softplus(A) - A.
            sums[0] += softplus_sum - logits[local, label].sum()
        if distill:
            probs = rest[0]
            for k, (t_rows, t_cols, cb) in enumerate(prepared):
                target = probs if k == 0 else work
                torch.addmm(cb, t_rows[start:stop].to(dtype), t_cols.T, out=target)
                torch.sigmoid(target, out=target)
                if k > 0:
                    probs += work
            if len(prepared) > 1:
                probs /= len(prepared)
            if kind == "mobileclip":
                target = probs.mul_(2).sub_(1)  # t = 2p - 1
                minus_u = torch.mul(target, logits, out=work).neg_()
                sums[1] += torch.logaddexp(minus_u, zero, out=rest[1]).sum()
                grad_d = torch.sigmoid(minus_u, out=work).mul_(target).neg_()  # -t s(-tA)
            else:
                # softplus(A) - p A, then the teacher entropy for "kl".
                sums[1] += softplus_sum - torch.dot(probs.reshape(-1), logits.reshape(-1))
                if kind == "kl":
                    sums[1] += torch.special.xlogy(probs, probs, out=work).sum()
                    complement = torch.neg(probs, out=work).add_(1)
                    sums[1] += torch.special.xlogy(complement, complement, out=work).sum()
        if not grad:
            continue
        # G = w_c (s(A) - onehot) + w_d g_d, built in the logits buffer.
        g = logits
        if kind == "mobileclip":
            if contrastive:
                torch.sigmoid(logits, out=g).mul_(w_c).add_(grad_d, alpha=w_d)
            else:
                g = grad_d.mul_(w_d)
        else:
            torch.sigmoid(logits, out=g).mul_(w_c + (w_d if distill else 0.0))
            if distill:
                g.sub_(probs, alpha=w_d)
        if contrastive:
            g[local, label] -= w_c
        torch.matmul(g, cols_c, out=dx[start:stop])
        if start == 0:
            torch.matmul(g.T, x, out=dy)
        else:
            dy.addmm_(g.T, x)
        sums[2] += g.sum()
        sums[3] += torch.dot(dx[start:stop].reshape(-1), x.reshape(-1))
    return sums, ((dx, dy) if grad else None)


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
    return _torch_tiles(
        rows, cols, scale, bias, teachers, contrastive, kind, weights, label_offset, grad
    )


def _scaled_products(products, grad_output, scale, m):
    """(dx, dy, d scale, d bias) of one gradient pass times grad_output / m: a, 1/m and
    grad_output in one in-place pass per feature gradient, all on the device."""
    (dx, dy), sum_g, sum_gd = products
    factor = grad_output.to(sum_g.dtype) / m
    feature_factor = factor * scale.detach().to(sum_g.dtype)
    return dx.mul_(feature_factor), dy.mul_(feature_factor), sum_gd * factor, sum_g * factor


class _SigmoidLoss(torch.autograd.Function):
    """(w_c L_c, w_d L_d) with the gradient of their sum written in the forward."""

    @staticmethod
    def forward(
        ctx,
        rows: torch.Tensor,
        cols: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
        teachers: list[Teacher],
        kind: str | None,
        weights: tuple[float, float],
        label_offset: int,
        grad: bool,
        out_dtype: torch.dtype,
        half: torch.dtype | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Under autocast the kernels take fp32 features in its half dtype, cast once here;
        # the gradients go back in the dtypes the features came in.
        ctx.input_dtypes = rows.dtype, cols.dtype
        rows, cols = to_kernel_dtype(rows, half), to_kernel_dtype(cols, half)
        teachers = [
            (to_kernel_dtype(t_rows, half), to_kernel_dtype(t_cols, half), *affine)
            for t_rows, t_cols, *affine in teachers
        ]
        contrastive = weights[0] != 0
        sums, products = _tiles(
            rows, cols, scale, bias, teachers, contrastive, kind, weights, label_offset, grad
        )
        m = rows.shape[0]
        loss_c = (sums[0] * (weights[0] / m)).to(out_dtype)
        loss_d = (sums[1] * (weights[1] / m)).to(out_dtype)
        ctx.save_for_backward(rows, cols, scale, bias)
        ctx.teachers = teachers
        ctx.config = (contrastive, kind, weights, label_offset)
        ctx.products = (products, sums[2], sums[3]) if grad else None
        return loss_c, loss_d

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_c: torch.Tensor, grad_d: torch.Tensor):
        rows, cols, scale, bias = ctx.saved_tensors
        contrastive, kind, weights, label_offset = ctx.config
        distill = kind is not None
        # Scaled in place below, so consumed: a second backward (retain_graph) recomputes.
        products, ctx.products = ctx.products, None
        # ``(c + d).backward()`` hands both outputs one tensor, and the forward's gradient
        # (that of w_c L_c + w_d L_d) serves; any other mix takes one pass per term, scaled
        # on the device (comparing the two gradients' values would be a host read).
        if products is not None and not (contrastive and distill and grad_c is not grad_d):
            passes = [(products, grad_c if contrastive else grad_d)]
        else:
            passes = [
                (_term_products(rows, cols, scale, bias, ctx.teachers, term, kind, weights,
                                label_offset), grad_output)
                for term, grad_output in (("contrastive", grad_c), ("distill", grad_d))
                if (contrastive if term == "contrastive" else distill)
            ]  # fmt: skip
        m = rows.shape[0]
        scaled = [_scaled_products(p, g, scale, m) for p, g in passes]
        dx, dy, d_scale, d_bias = (reduce(torch.add, parts) for parts in zip(*scaled, strict=True))
        needs = ctx.needs_input_grad
        rows_dtype, cols_dtype = ctx.input_dtypes
        return (
            dx.to(rows_dtype) if needs[0] else None,
            dy.to(cols_dtype) if needs[1] else None,
            d_scale.to(scale.dtype) if needs[2] else None,
            d_bias.to(bias.dtype) if needs[3] else None,
            *([None] * 7),
        )


def _term_products(rows, cols, scale, bias, teachers, term, kind, weights, label_offset):
    """The gradient products of one term alone (``term`` "contrastive" or "distill")."""
    if term == "contrastive":
        sums, products = _tiles(
            rows, cols, scale, bias, [], True, None, (weights[0], 0.0), label_offset, True
        )
    else:
        sums, products = _tiles(
            rows, cols, scale, bias, teachers, False, kind, (0.0, weights[1]), label_offset, True
        )
    return products, sums[2], sums[3]


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_c L_c, w_d L_d)`` of the [m, N] problem rows x columns, each a 0-d tensor.

    L_c is SigLIP's loss with positives at (i, i + label_offset) (a rank's block of the
    global batch), L_d the sigmoid distillation of ``kind`` against the teachers (lists of
    K = 1..4 feature tensors, scales and biases, or single ones); see the module docstring.
    A term with weight 0 (or, for L_d, without teachers) is not computed and is 0. Results
    are fp32 (float64 for float64 student features); gradients reach the student features,
    scale and bias, never the teachers. ``logit_scale`` is multiplicative (already exp'd).
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
    out_dtype = torch.float64 if torch.float64 in (rows.dtype, cols.dtype) else torch.float32
    weights = (float(contrastive_weight), float(distill_weight) if distill else 0.0)
    return _SigmoidLoss.apply(
        rows, cols, scale, bias, teachers, kind if distill else None, weights, label_offset,
        grad, out_dtype, kernel_dtype(rows),
    )  # fmt: skip


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
