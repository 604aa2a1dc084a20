"""Fused affinity-mimicking (distillation) and contrastive loss without [m, N] logits.

Student logits A = a X Y^T, teacher logits B = b Xt Yt^T. With P = softmax(B), Q = softmax(A)
along a direction, the soft cross-entropy of a row is ``lse(A_i) - sum_j P_ij A_ij``, KL subtracts
the teacher entropy ``lse(B_i) - sum_j P_ij B_ij``, and InfoNCE is ``lse(A_i) - A_i,label``.
All of them have dL/dA = Q - P (or Q - onehot), so the forward pass keeps per-row (and, for
the square problem, per-column) statistics only and the backward pass recomputes tiles from
them: extra memory is O((m + N) d) plus one bounded chunk of rows, never O(m N).

Two implementations share one autograd Function: the Triton kernels
(``tinyclip_fast.kernels.affinity_loss``, fp32 math) and a chunked PyTorch path for CPU
tensors (fp32 math, float64 for float64 features) whose [chunk, N] blocks are allocated once
per call and reused by every chunk, so its peak memory is set by the chunk size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tinyclip_fast.ops.backend import use_triton

KINDS = ("soft_ce", "kl")

# Elements of one [chunk, N] fp32 block in the PyTorch path: 8 MB keeps the peak small
# while the chunk matmuls stay large enough to run at full speed.
_CHUNK_ELEMENTS = 1 << 21
_MIN_CHUNK_ROWS = 32
_MAX_CHUNK_ROWS = 2048


@dataclass
class AffinityStats:
    """Per-row (or per-column) statistics of one softmax direction, [k] each.

    fp32, except on the PyTorch path for float64 features, which computes in float64.

    lse_a / lse_b: log-sum-exp of the student / teacher logits; p_dot_a / p_dot_b:
    sum_j P_ij A_ij and sum_j P_ij B_ij with P the teacher softmax; target_a: the logit of
    the contrastive label. Teacher fields are None when no teacher is involved.
    """

    lse_a: torch.Tensor
    target_a: torch.Tensor
    lse_b: torch.Tensor | None = None
    p_dot_a: torch.Tensor | None = None
    p_dot_b: torch.Tensor | None = None


# ----------------------------------------------------------------------------- validation


def _check_features(name: str, tensor: object) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D [batch, dim], got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(tensor.shape)}")
    return tensor


def _check_scale(name: str, scale: object, device: torch.device) -> torch.Tensor:
    """A finite positive Python number or one-element floating tensor, as a 0-d tensor on
    device. A scale is multiplicative (``exp(logit_scale)``): 0, a negative or a non-finite
    value is a mistake (often the log-space parameter passed as is); checking a tensor's value
    reads it on the host once per call."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(scale).__name__}")
    if isinstance(scale, torch.Tensor):
        if not scale.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {scale.dtype}")
        if scale.numel() != 1 or scale.dim() > 1:
            raise ValueError(
                f"{name} must be a scalar (0-d tensor), got shape {tuple(scale.shape)}"
            )
        value = float(scale.detach().reshape(()))
    else:
        value = float(scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{name} must be a finite multiplicative scale > 0 (exp of the log-space "
            f"logit_scale), got {value}"
        )
    if not isinstance(scale, torch.Tensor):
        # float64 keeps the scale exact for float64 features; the other paths cast it down.
        return torch.tensor(value, dtype=torch.float64, device=device)
    return scale.reshape(()).to(device)


def _validate(
    student: list[tuple[str, object]],
    teacher: list[tuple[str, object]],
    square: bool,
    kind: str,
    compute_distill: bool,
) -> tuple[torch.Tensor, ...]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    (row_name, rows), (col_name, cols) = student[:2]
    rows, cols = _check_features(row_name, rows), _check_features(col_name, cols)
    named = [(row_name, rows), (col_name, cols)]
    if rows.shape[1] != cols.shape[1]:
        raise ValueError(
            f"{row_name} {tuple(rows.shape)} and {col_name} {tuple(cols.shape)} must have the "
            "same feature dimension"
        )
    if square and rows.shape[0] != cols.shape[0]:
        raise ValueError(
            f"{row_name} {tuple(rows.shape)} and {col_name} {tuple(cols.shape)} must have the "
            "same batch size"
        )
    teacher_rows = teacher_cols = None
    if compute_distill:
        (trow_name, teacher_rows), (tcol_name, teacher_cols), (tscale_name, tscale) = teacher
        if teacher_rows is None or teacher_cols is None or tscale is None:
            raise ValueError(
                f"compute_distill=True needs {trow_name}, {tcol_name} and {tscale_name}"
            )
        teacher_rows = _check_features(trow_name, teacher_rows)
        teacher_cols = _check_features(tcol_name, teacher_cols)
        named += [(trow_name, teacher_rows), (tcol_name, teacher_cols)]
        if teacher_rows.shape[1] != teacher_cols.shape[1]:
            raise ValueError(
                f"{trow_name} {tuple(teacher_rows.shape)} and {tcol_name} "
                f"{tuple(teacher_cols.shape)} must have the same feature dimension"
            )
        for (s_name, s), (t_name, t) in (
            ((row_name, rows), (trow_name, teacher_rows)),
            ((col_name, cols), (tcol_name, teacher_cols)),
        ):
            if s.shape[0] != t.shape[0]:
                raise ValueError(
                    f"{s_name} {tuple(s.shape)} and {t_name} {tuple(t.shape)} must have the "
                    "same batch size"
                )
    device = rows.device
    for name, tensor in named:
        if tensor.device != device:
            raise ValueError(
                f"all features must be on one device: {row_name} is on {device}, "
                f"{name} is on {tensor.device}"
            )
    return rows, cols, teacher_rows, teacher_cols


# ----------------------------------------------------------------------------- PyTorch path


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32 math for fp32/bf16/fp16 inputs; float64 inputs keep float64."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _chunk_rows(num_cols: int) -> int:
    rows = _CHUNK_ELEMENTS // max(num_cols, 1)
    return max(_MIN_CHUNK_ROWS, min(_MAX_CHUNK_ROWS, rows))


class _Workspace:
    """The buffers of one call, allocated once and reused by every row chunk.

    ``blocks`` [chunk, N] tiles in one allocation (so that the C allocator hands the same
    memory back call after call instead of fragmenting it), and per feature tensor a
    [chunk, d] buffer for its rows in the compute dtype, scaled or not. Every chunk
    writes into these with ``out=`` and in-place ops: the peak is set by the chunk size.
    """

    def __init__(self, chunk: int, num_cols: int, blocks: int, dtype, device) -> None:
        self.dtype, self.device, self.chunk = dtype, device, chunk
        self._blocks = torch.empty(blocks, chunk, num_cols, dtype=dtype, device=device)
        self._rows: dict[str, torch.Tensor] = {}

    def block(self, index: int, size: int) -> torch.Tensor:
        return self._blocks[index, :size]

    def rows(self, name: str, features: torch.Tensor, start: int, stop: int, scale=None):
        """features[start:stop] in the compute dtype, times ``scale`` if given."""
        view = features[start:stop]
        if scale is None and view.dtype == self.dtype:
            return view
        if name not in self._rows:
            self._rows[name] = torch.empty(
                self.chunk, features.shape[1], dtype=self.dtype, device=self.device
            )
        buffer = self._rows[name][: stop - start]
        if view.dtype != self.dtype:
            view = buffer.copy_(view)
        return view if scale is None else torch.mul(view, scale, out=buffer)

    def logits(self, index: int, name: str, rows, start, stop, scale, cols) -> torch.Tensor:
        """Block ``index`` := (rows[start:stop] * scale) @ cols^T; the scale goes on the
        [chunk, d] operand, not on the [chunk, N] product."""
        out = self.block(index, stop - start)
        return torch.matmul(self.rows(name, rows, start, stop, scale), cols.T, out=out)


def _exp_rows(logits: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """out := exp(logits - rowmax); returns (rowmax, rowsum of out). NaN propagates."""
    row_max = torch.amax(logits, dim=1)
    torch.sub(logits, row_max[:, None], out=out).exp_()
    return row_max, out.sum(dim=1)


def _row_dot(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """sum_j first_ij second_ij for each row i, as batched GEMVs (no [chunk, N] temporary)."""
    return torch.bmm(first.unsqueeze(1), second.unsqueeze(2)).reshape(-1)


def _labels_in_chunk(start: int, stop: int, label_offset: int, device: torch.device):
    """(row index within chunk, column index) of each contrastive label in rows start:stop."""
    local = torch.arange(stop - start, device=device)
    return local, local + start + label_offset


class _OnlineColumnSoftmax:
    """Running column log-sum-exp (and teacher-weighted sums) over row chunks.

    Each column keeps its running max; when a chunk raises it, the sums are rescaled by
    exp(old - new), as in flash attention. The first chunk initialises the max so that no
    exp(-inf - -inf) ever occurs; NaN propagates through torch.maximum.
    """

    def __init__(self) -> None:
        self.max_a = self.sum_a = None
        self.max_b = self.sum_b = self.w_a = self.w_b = None

    @staticmethod
    def _raise_max(old_max, chunk_max, sums):
        if old_max is None:
            return chunk_max, [torch.zeros_like(chunk_max) for _ in sums]
        new_max = torch.maximum(old_max, chunk_max)
        rescale = torch.exp(old_max - new_max)
        return new_max, [v.mul_(rescale) for v in sums]

    def update(self, logits_a, logits_b, scratch) -> None:
        """Add one chunk's columns; overwrites all three [chunk, N] blocks."""
        self.max_a, (self.sum_a,) = self._raise_max(self.max_a, logits_a.amax(dim=0), [self.sum_a])
        self.sum_a += torch.sub(logits_a, self.max_a, out=scratch).exp_().sum(dim=0)
        if logits_b is None:
            return
        self.max_b, (self.sum_b, self.w_a, self.w_b) = self._raise_max(
            self.max_b, logits_b.amax(dim=0), [self.sum_b, self.w_a, self.w_b]
        )
        weights = torch.sub(logits_b, self.max_b, out=scratch).exp_()
        self.sum_b += weights.sum(dim=0)
        self.w_b += logits_b.mul_(weights).sum(dim=0)
        self.w_a += logits_a.mul_(weights).sum(dim=0)

    def finish(self, target_a: torch.Tensor) -> AffinityStats:
        stats = AffinityStats(lse_a=self.max_a + torch.log(self.sum_a), target_a=target_a)
        if self.max_b is not None:
            stats.lse_b = self.max_b + torch.log(self.sum_b)
            stats.p_dot_a = self.w_a / self.sum_b
            stats.p_dot_b = self.w_b / self.sum_b
        return stats


def _torch_forward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    teacher_rows: torch.Tensor | None,
    teacher_cols: torch.Tensor | None,
    teacher_scale: torch.Tensor | None,
    square: bool,
    label_offset: int,
) -> tuple[AffinityStats, AffinityStats | None]:
    """Row statistics (and column statistics when square) over row chunks of [chunk, N].

    Per chunk: A (and B) into their blocks, exp(A - rowmax) into the scratch block for the
    row log-sum-exp, exp(B - rowmax) for the teacher-weighted sums, then the column update
    reuses all three. Nothing of size [chunk, N] is allocated inside the loop.
    """
    dtype = _compute_dtype(rows, cols, teacher_rows, teacher_cols)
    teacher = teacher_rows is not None
    num_rows, device = rows.shape[0], rows.device
    cols_c = cols.to(dtype)
    a = scale.to(dtype)
    if teacher:
        teacher_cols_c, b = teacher_cols.to(dtype), teacher_scale.to(dtype)
    step = _chunk_rows(cols.shape[0])
    work = _Workspace(min(step, num_rows), cols.shape[0], 3 if teacher else 2, dtype, device)
    fields = ("lse_a", "target_a") + (("lse_b", "p_dot_a", "p_dot_b") if teacher else ())
    row_stats = AffinityStats(
        **{name: torch.empty(num_rows, dtype=dtype, device=device) for name in fields}
    )
    columns = _OnlineColumnSoftmax() if square else None
    for start in range(0, num_rows, step):
        stop = min(start + step, num_rows)
        scratch = work.block(2 if teacher else 1, stop - start)
        logits_a = work.logits(0, "rows", rows, start, stop, a, cols_c)
        row_max, row_sum = _exp_rows(logits_a, scratch)
        torch.add(row_max, row_sum.log_(), out=row_stats.lse_a[start:stop])
        local, label = _labels_in_chunk(start, stop, label_offset, device)
        row_stats.target_a[start:stop] = logits_a[local, label]
        logits_b = None
        if teacher:
            logits_b = work.logits(1, "teacher_rows", teacher_rows, start, stop, b, teacher_cols_c)
            row_max, row_sum = _exp_rows(logits_b, scratch)
            torch.div(_row_dot(scratch, logits_a), row_sum, out=row_stats.p_dot_a[start:stop])
            torch.div(_row_dot(scratch, logits_b), row_sum, out=row_stats.p_dot_b[start:stop])
            torch.add(row_max, row_sum.log_(), out=row_stats.lse_b[start:stop])
        if columns is not None:
            columns.update(logits_a, logits_b, scratch)
    col_stats = columns.finish(row_stats.target_a) if square else None
    return row_stats, col_stats


def _torch_backward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    teacher_rows: torch.Tensor | None,
    teacher_cols: torch.Tensor | None,
    teacher_scale: torch.Tensor | None,
    row_stats: AffinityStats,
    col_stats: AffinityStats | None,
    coeffs: torch.Tensor,
    label_offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/drows, dL/dcols, dL/dscale) in the compute dtype, recomputing [chunk, N] tiles.

    dA = Q cq - P cp + Q' cq' - P' cp' - onehot c1 with coeffs = (cq, cp, cq', cp', c1);
    drows = a dA cols, dcols = a dA^T rows, dscale = sum(dA * rows cols^T)
    = sum_i rows_i . (dA cols)_i, which needs no [chunk, N] product. The row softmaxes are
    renormalised from a fresh row max, the column ones taken from the saved log-sum-exps.
    Blocks: the logits, dA, and (with a teacher) the teacher's row softmax.
    """
    dtype = _compute_dtype(rows, cols, teacher_rows, teacher_cols)
    teacher = teacher_rows is not None
    device = rows.device
    cols_c = cols.to(dtype)
    if teacher:
        teacher_cols_c, b = teacher_cols.to(dtype), teacher_scale.to(dtype)
    # Python floats let every scaled add below be one fused pass (alpha=...).
    row_q, row_p, col_q, col_p, onehot = coeffs.double().tolist()
    a = scale.to(dtype)
    grad_rows = torch.empty(rows.shape, dtype=dtype, device=device)
    grad_cols = torch.zeros(cols.shape, dtype=dtype, device=device)
    grad_scale = torch.zeros((), dtype=dtype, device=device)
    step = _chunk_rows(cols.shape[0])
    work = _Workspace(min(step, rows.shape[0]), cols.shape[0], 3 if teacher else 2, dtype, device)
    for start in range(0, rows.shape[0], step):
        stop = min(start + step, rows.shape[0])
        grad = work.block(1, stop - start)
        logits = work.logits(0, "scaled_rows", rows, start, stop, a, cols_c)
        _, row_sum = _exp_rows(logits, grad)
        grad.mul_(row_sum.reciprocal_().mul_(row_q)[:, None])
        if col_stats is not None:
            grad.add_(logits.sub_(col_stats.lse_a[None, :]).exp_(), alpha=col_q)
        if teacher:
            logits = work.logits(0, "teacher_rows", teacher_rows, start, stop, b, teacher_cols_c)
            probs = work.block(2, stop - start)
            _, row_sum = _exp_rows(logits, probs)
            grad.sub_(probs.mul_(row_sum.reciprocal_().mul_(row_p)[:, None]))
            if col_stats is not None:
                grad.add_(logits.sub_(col_stats.lse_b[None, :]).exp_(), alpha=-col_p)
        local, label = _labels_in_chunk(start, stop, label_offset, device)
        grad[local, label] -= onehot
        rows_chunk = work.rows("rows", rows, start, stop)
        torch.matmul(grad, cols_c, out=grad_rows[start:stop])
        grad_cols.addmm_(grad.T, rows_chunk)
        grad_scale += torch.dot(grad_rows[start:stop].flatten(), rows_chunk.flatten())
    # The scale a is folded in once at the end rather than into every chunk product.
    return grad_rows.mul_(a), grad_cols.mul_(a), grad_scale


# ----------------------------------------------------------------------------- autograd


def _forward_stats(rows, cols, scale, teacher_rows, teacher_cols, teacher_scale, square, offset):
    if use_triton(rows):
        from tinyclip_fast.kernels.affinity_loss import affinity_stats_forward

        row, col = affinity_stats_forward(
            rows, cols, scale, teacher_rows, teacher_cols, teacher_scale,
            column_stats=square, label_offset=offset,
        )  # fmt: skip
        return AffinityStats(*row), (AffinityStats(*col) if col is not None else None)
    return _torch_forward(
        rows, cols, scale, teacher_rows, teacher_cols, teacher_scale, square, offset
    )


def _backward_grads(saved, row_stats, col_stats, coeffs, offset):
    rows, cols, scale, teacher_rows, teacher_cols, teacher_scale = saved
    if use_triton(rows):
        from tinyclip_fast.kernels.affinity_loss import affinity_grad_backward

        return affinity_grad_backward(
            rows, cols, scale, teacher_rows, teacher_cols, teacher_scale,
            row_stats.lse_a, row_stats.lse_b,
            col_stats.lse_a if col_stats is not None else None,
            col_stats.lse_b if col_stats is not None else None,
            coeffs, label_offset=offset,
        )  # fmt: skip
    return _torch_backward(
        rows, cols, scale, teacher_rows, teacher_cols, teacher_scale,
        row_stats, col_stats, coeffs, offset,
    )  # fmt: skip


def _direction_losses(stats: AffinityStats, kind: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-row distillation loss (None without teacher) and per-row InfoNCE loss."""
    infonce = stats.lse_a - stats.target_a
    if stats.lse_b is None:
        return None, infonce
    distill = stats.lse_a - stats.p_dot_a
    if kind == "kl":
        distill = distill - (stats.lse_b - stats.p_dot_b)
    return distill, infonce


class _AffinityLoss(torch.autograd.Function):
    """(distill, contrastive) of the square or rectangular problem; see the module docstring."""

    @staticmethod
    def forward(
        ctx,
        rows: torch.Tensor,
        cols: torch.Tensor,
        scale: torch.Tensor,
        teacher_rows: torch.Tensor | None,
        teacher_cols: torch.Tensor | None,
        teacher_scale: torch.Tensor | None,
        kind: str,
        compute_distill: bool,
        compute_contrastive: bool,
        square: bool,
        label_offset: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        row_stats, col_stats = _forward_stats(
            rows, cols, scale, teacher_rows, teacher_cols, teacher_scale, square, label_offset
        )
        # A float64 loss for float64 features (computed in float64 on the PyTorch path and
        # in fp32 by the kernels); fp32 for every other dtype.
        dtype = _compute_dtype(rows, cols, teacher_rows, teacher_cols)
        zero = torch.zeros((), dtype=dtype, device=rows.device)
        distill, contrastive = zero, zero.clone()
        row_distill, row_infonce = _direction_losses(row_stats, kind)
        if square:
            col_distill, col_infonce = _direction_losses(col_stats, kind)
            if compute_distill:
                distill = (row_distill.mean() + col_distill.mean()) / 2
            if compute_contrastive:
                contrastive = (row_infonce.mean() + col_infonce.mean()) / 2
        else:
            if compute_distill:
                distill = row_distill.mean()
            if compute_contrastive:
                contrastive = row_infonce.mean()
        ctx.save_for_backward(rows, cols, scale, teacher_rows, teacher_cols, teacher_scale)
        ctx.stats = (row_stats, col_stats)
        ctx.config = (compute_distill, compute_contrastive, square, label_offset)
        return distill.to(dtype), contrastive.to(dtype)

    @staticmethod
    def backward(ctx, grad_distill: torch.Tensor, grad_contrastive: torch.Tensor):
        rows, cols, scale, *_ = saved = ctx.saved_tensors
        row_stats, col_stats = ctx.stats
        compute_distill, compute_contrastive, square, label_offset = ctx.config
        # dL/dA per direction is g_d (Q - P) + g_c (Q - onehot), divided by the rows averaged
        # over; the square loss averages two directions, hence 2n.
        dtype = _compute_dtype(*saved[:2], *saved[3:5])
        g_d = grad_distill.to(dtype) if compute_distill else grad_distill.new_zeros((), dtype=dtype)
        g_c = grad_contrastive.to(dtype) if compute_contrastive else g_d.new_zeros(())
        num = rows.shape[0] * (2 if square else 1)
        row_q, row_p = (g_d + g_c) / num, g_d / num
        col_q, col_p = (row_q, row_p) if square else (row_q * 0, row_p * 0)
        onehot = g_c * (2 if square else 1) / num
        coeffs = torch.stack([row_q, row_p, col_q, col_p, onehot])
        with torch.autocast(rows.device.type, enabled=False):  # as in the forward
            grad_rows, grad_cols, grad_scale = _backward_grads(
                saved, row_stats, col_stats, coeffs, label_offset
            )
        return (
            grad_rows.to(rows.dtype) if ctx.needs_input_grad[0] else None,
            grad_cols.to(cols.dtype) if ctx.needs_input_grad[1] else None,
            grad_scale.to(scale.dtype) if ctx.needs_input_grad[2] else None,
            *([None] * 8),
        )


def _affinity_loss(
    named_student, named_teacher, scale, teacher_scale, kind, compute_distill,
    compute_contrastive, square, label_offset,
):  # fmt: skip
    rows, cols, teacher_rows, teacher_cols = _validate(
        named_student, named_teacher, square, kind, compute_distill
    )
    scale_name, tscale_name = named_student[2][0], named_teacher[2][0]
    scale = _check_scale(scale_name, scale, rows.device)
    if compute_distill:
        # The teacher never receives gradients, even when its tensors require them.
        teacher_rows, teacher_cols = teacher_rows.detach(), teacher_cols.detach()
        teacher_scale = _check_scale(tscale_name, teacher_scale, rows.device).detach()
    else:
        teacher_rows = teacher_cols = teacher_scale = None
    if compute_contrastive and not 0 <= label_offset <= cols.shape[0] - rows.shape[0]:
        raise ValueError(
            f"label_offset={label_offset} puts labels of {rows.shape[0]} rows outside the "
            f"{cols.shape[0]} columns of {named_student[1][0]} {tuple(cols.shape)}"
        )
    # The losses are fp32 sums over N columns: under autocast the matmuls would run (and the
    # values round) in bf16/fp16. Inputs keep their dtype; the math runs in fp32 regardless.
    with torch.autocast(rows.device.type, enabled=False):
        return _AffinityLoss.apply(
            rows, cols, scale, teacher_rows, teacher_cols, teacher_scale,
            kind, compute_distill, compute_contrastive, square, label_offset,
        )  # fmt: skip


# ----------------------------------------------------------------------------- public API


def affinity_loss_square(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    teacher_image_features: torch.Tensor | None = None,
    teacher_text_features: torch.Tensor | None = None,
    teacher_logit_scale: float | torch.Tensor | None = None,
    *,
    kind: str = "soft_ce",
    compute_distill: bool = True,
    compute_contrastive: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One device, n rows = n columns: ``(distill, contrastive)``, 0-d fp32 tensors.

    distill = (mean_i rowloss(A, B) + mean_j colloss(A, B)) / 2 with rowloss the soft
    cross-entropy -sum_j softmax(B)_ij log softmax(A)_ij (or KL(teacher || student));
    contrastive = (CE(A, diag) + CE(A^T, diag)) / 2. Terms not requested are 0-d zeros.
    ``logit_scale`` is the multiplicative scale a (already exponentiated), as in open_clip.
    Float64 features give float64 losses: computed in float64 on the PyTorch (CPU) path, in
    fp32 by the Triton kernels.
    """
    return _affinity_loss(
        [("image_features", image_features), ("text_features", text_features),
         ("logit_scale", logit_scale)],
        [("teacher_image_features", teacher_image_features),
         ("teacher_text_features", teacher_text_features),
         ("teacher_logit_scale", teacher_logit_scale)],
        logit_scale, teacher_logit_scale, kind, compute_distill, compute_contrastive,
        square=True, label_offset=0,
    )  # fmt: skip


def affinity_loss_rows(
    row_features: torch.Tensor,
    col_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    teacher_row_features: torch.Tensor | None = None,
    teacher_col_features: torch.Tensor | None = None,
    teacher_logit_scale: float | torch.Tensor | None = None,
    *,
    kind: str = "soft_ce",
    compute_distill: bool = True,
    compute_contrastive: bool = False,
    label_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectangular [m, N] problem, softmax along the N columns only (open_clip local loss).

    Returns ``(mean_i distill_i, mean_i infonce_i)`` where infonce_i = lse(A_i) -
    A_{i, label_offset + i}. Gradients reach row_features, col_features and logit_scale.
    """
    return _affinity_loss(
        [("row_features", row_features), ("col_features", col_features),
         ("logit_scale", logit_scale)],
        [("teacher_row_features", teacher_row_features),
         ("teacher_col_features", teacher_col_features),
         ("teacher_logit_scale", teacher_logit_scale)],
        logit_scale, teacher_logit_scale, kind, compute_distill, compute_contrastive,
        square=False, label_offset=label_offset,
    )  # fmt: skip


def affinity_mimicking_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    teacher_image_features: torch.Tensor,
    teacher_text_features: torch.Tensor,
    teacher_logit_scale: float | torch.Tensor,
    *,
    contrastive_weight: float = 0.0,
    kind: str = "soft_ce",
) -> torch.Tensor:
    """TinyCLIP's loss on one device: (1 - w) L_dist + w L_clip as a 0-d tensor (fp32, or
    float64 for float64 features), with w = ``contrastive_weight`` in [0, 1] (the meaning
    ``AffinityMimickingLoss`` and the engine's ``loss.contrastive_weight`` give it too)."""
    check_contrastive_weight(contrastive_weight)
    distill, contrastive = affinity_loss_square(
        image_features, text_features, logit_scale,
        teacher_image_features, teacher_text_features, teacher_logit_scale,
        kind=kind, compute_distill=True, compute_contrastive=contrastive_weight != 0,
    )  # fmt: skip
    if contrastive_weight == 0:
        return distill
    return (1 - contrastive_weight) * distill + contrastive_weight * contrastive


def check_contrastive_weight(weight: object) -> float:
    """``weight`` as a float in [0, 1]; TypeError/ValueError otherwise."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"contrastive_weight must be a float in [0, 1], got {weight!r}")
    if not 0.0 <= weight <= 1.0:  # NaN fails this too
        raise ValueError(f"contrastive_weight must lie in [0, 1], got {weight}")
    return float(weight)
