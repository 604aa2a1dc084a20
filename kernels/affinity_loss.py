"""Triton kernels of the affinity (distillation + contrastive) loss; raw tensors in and out.

Student logits A = a X Y^T [m, N] and teacher logits B = b Xt Yt^T are only ever formed one
[BLOCK_M, BLOCK_N] tile at a time, flash-attention style: the forward kernel keeps an online
softmax per row (exp2, log2(e) folded into the scale, fp32 accumulation) and writes per-row
statistics. The backward kernel recomputes the tiles from them and writes dL/dA for a chunk
of rows (<= 512 MB); two cuBLAS GEMMs per chunk then give dX = a dA Y and dY += a dA^T X.
That keeps every gradient product on the tensor cores at full rate without [BLOCK, d]
register accumulators or d-wide atomics (d is often 512 or more).

Column statistics of the square problem come out of the same pass over the tiles: each
tile's column sums are taken relative to the tile's own column max and added with fp64
atomics relative to a fixed per-column shift c_j = |a| ||Y_j|| max_i ||X_i|| >= max_i A_ij
(Cauchy-Schwarz), so nothing overflows and fp64 leaves ~700 natural-log units of headroom
before underflow. Columns that still underflow are recomputed exactly by a second pass
(the row kernel on the transposed problem, those columns only).

Feature dtypes: bf16/fp16 dots on the tensor cores, fp32 ones as 3xTF32; every statistic
and accumulation is fp32. Float64 features are cast to fp32 here: the kernels compute in
fp32 (the PyTorch path computes float64 in float64).
"""

import torch
import triton
import triton.language as tl

from . import INTERPRETING

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# A column sum (fp64, relative to its shift) below this is treated as underflowed and
# recomputed exactly; 1e-280 leaves room for ~1e20 tile contributions in fp64's normal range.
_UNDERFLOW = 1e-280

# Budget of the dA chunk the backward pass materialises before its two GEMMs.
_GRAD_CHUNK_BYTES = 1 << 29

_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 32}


@triton.jit
def _dot_tile(
    x_ptr, y_ptr, row_start, col_start, m, n, dim,
    stride_xm, stride_xd, stride_ym, stride_yd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """[BLOCK_M, BLOCK_N] fp32 tile of X[rows] Y[cols]^T, looping over dim in BLOCK_D chunks.

    The block origin goes into a 64-bit base pointer and the in-tile offsets stay 32-bit:
    64-bit offset tiles would double the registers the address arithmetic needs.
    """
    local_m = tl.arange(0, BLOCK_M)
    local_n = tl.arange(0, BLOCK_N)
    row_ok = row_start + local_m < m
    col_ok = col_start + local_n < n
    x_base = x_ptr + row_start.to(tl.int64) * stride_xm
    y_base = y_ptr + col_start.to(tl.int64) * stride_ym
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        offs = start + tl.arange(0, BLOCK_D)
        d_ok = offs < dim
        x = tl.load(
            x_base + local_m[:, None] * stride_xm + offs[None, :] * stride_xd,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        y = tl.load(
            y_base + local_n[None, :] * stride_ym + offs[:, None] * stride_yd,
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        if FP32_DOT:
            acc = tl.dot(x, y, acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x, y, acc)
    return acc


@triton.jit
def _affinity_stats_kernel(
    x_ptr, y_ptr, xt_ptr, yt_ptr, scale_ptr, teacher_scale_ptr,
    row_out_ptr,  # [5, m] fp32: lse_a, target_a, lse_b, p_dot_a, p_dot_b (natural log units)
    col_shift_ptr,  # [2, N] fp32: per-column upper bounds of A and B, log2 units
    col_acc_ptr,  # [4, N] fp64: sum 2^(A-c), sum 2^(B-c'), sum 2^(B-c') A2, sum 2^(B-c') B2
    m, n, d_s, d_t, label_offset,
    stride_xm, stride_xd, stride_ym, stride_yd,
    stride_xtm, stride_xtd, stride_ytm, stride_ytd,
    TEACHER: tl.constexpr, COLUMNS: tl.constexpr,
    UPCAST: tl.constexpr, FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    row_start = pid * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < m
    label = rows + label_offset
    a2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    max_a = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    sum_a = tl.zeros((BLOCK_M,), tl.float32)
    target_a = tl.zeros((BLOCK_M,), tl.float32)
    if TEACHER:
        b2 = tl.load(teacher_scale_ptr).to(tl.float32) * 1.4426950408889634
        max_b = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        sum_b = tl.zeros((BLOCK_M,), tl.float32)
        w_a = tl.zeros((BLOCK_M,), tl.float32)
        w_b = tl.zeros((BLOCK_M,), tl.float32)
    num_tiles = tl.cdiv(n, BLOCK_N)
    for step in range(0, num_tiles):
        # Programs start on different column tiles so that their column atomics rarely
        # collide; the online softmax does not depend on the order.
        start = ((step + pid) % num_tiles) * BLOCK_N
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        # Logits in log2 units: exp2 of them is exp of the natural logits.
        logits_a = a2 * _dot_tile(
            x_ptr, y_ptr, row_start, start, m, n, d_s,
            stride_xm, stride_xd, stride_ym, stride_yd,
            BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, FP32_DOT, DOT_PRECISION,
        )  # fmt: skip
        target_a += tl.sum(tl.where(cols[None, :] == label[:, None], logits_a, 0.0), axis=1)
        row_a = tl.where(col_ok[None, :], logits_a, float("-inf"))
        # A NaN logit may be skipped by the max, but exp2(NaN - max) still poisons the sum.
        new_max_a = tl.maximum(max_a, tl.max(row_a, axis=1))
        sum_a = sum_a * tl.exp2(max_a - new_max_a) + tl.sum(
            tl.exp2(row_a - new_max_a[:, None]), axis=1
        )
        max_a = new_max_a
        if COLUMNS:
            col_a = tl.where(row_ok[:, None], logits_a, float("-inf"))
            tile_max_a = tl.max(col_a, axis=0)
            tile_sum_a = tl.sum(tl.exp2(col_a - tile_max_a[None, :]), axis=0)
            shift_a = tl.load(col_shift_ptr + cols, mask=col_ok, other=0.0)
            factor_a = tl.exp2((tile_max_a - shift_a).to(tl.float64))
            tl.atomic_add(col_acc_ptr + cols, tile_sum_a.to(tl.float64) * factor_a, mask=col_ok)
        if TEACHER:
            logits_b = b2 * _dot_tile(
                xt_ptr, yt_ptr, row_start, start, m, n, d_t,
                stride_xtm, stride_xtd, stride_ytm, stride_ytd,
                BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, FP32_DOT, DOT_PRECISION,
            )  # fmt: skip
            row_b = tl.where(col_ok[None, :], logits_b, float("-inf"))
            new_max_b = tl.maximum(max_b, tl.max(row_b, axis=1))
            rescale = tl.exp2(max_b - new_max_b)
            weights = tl.exp2(row_b - new_max_b[:, None])
            sum_b = sum_b * rescale + tl.sum(weights, axis=1)
            w_a = w_a * rescale + tl.sum(weights * logits_a, axis=1)
            w_b = w_b * rescale + tl.sum(weights * logits_b, axis=1)
            max_b = new_max_b
            if COLUMNS:
                col_b = tl.where(row_ok[:, None], logits_b, float("-inf"))
                tile_max_b = tl.max(col_b, axis=0)
                col_weights = tl.exp2(col_b - tile_max_b[None, :])
                shift_b = tl.load(col_shift_ptr + n + cols, mask=col_ok, other=0.0)
                factor_b = tl.exp2((tile_max_b - shift_b).to(tl.float64))
                tl.atomic_add(
                    col_acc_ptr + n + cols,
                    tl.sum(col_weights, axis=0).to(tl.float64) * factor_b,
                    mask=col_ok,
                )
                tl.atomic_add(
                    col_acc_ptr + 2 * n + cols,
                    tl.sum(col_weights * logits_a, axis=0).to(tl.float64) * factor_b,
                    mask=col_ok,
                )
                tl.atomic_add(
                    col_acc_ptr + 3 * n + cols,
                    tl.sum(col_weights * logits_b, axis=0).to(tl.float64) * factor_b,
                    mask=col_ok,
                )
    ln2 = 0.6931471805599453
    tl.store(row_out_ptr + rows, (max_a + tl.log2(sum_a)) * ln2, mask=row_ok)
    tl.store(row_out_ptr + m + rows, target_a * ln2, mask=row_ok)
    if TEACHER:
        tl.store(row_out_ptr + 2 * m + rows, (max_b + tl.log2(sum_b)) * ln2, mask=row_ok)
        tl.store(row_out_ptr + 3 * m + rows, w_a / sum_b * ln2, mask=row_ok)
        tl.store(row_out_ptr + 4 * m + rows, w_b / sum_b * ln2, mask=row_ok)


@triton.jit
def _affinity_grad_logits_kernel(
    x_ptr, y_ptr, xt_ptr, yt_ptr, scale_ptr, teacher_scale_ptr,
    row_lse_ptr,  # [2, m] fp32: lse of A and B per row
    col_lse_ptr,  # [2, N] fp32: lse of A and B per column (COLUMNS only)
    coeff_ptr,  # [5] fp32: row Q, row P, column Q, column P, one-hot coefficients
    grad_ptr,  # [chunk, N] contiguous, features' dtype: a dL/dA of rows row_start + [0, chunk)
    dscale_ptr,  # [programs] fp32: per-program sum(dA * X Y^T)
    m, n, d_s, d_t, label_offset, row_start, chunk,
    stride_xm, stride_xd, stride_ym, stride_yd,
    stride_xtm, stride_xtd, stride_ytm, stride_ytd,
    TEACHER: tl.constexpr, COLUMNS: tl.constexpr,
    UPCAST: tl.constexpr, FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    block_row = row_start + pid_m * BLOCK_M
    row_end = row_start + chunk
    rows = block_row + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    col_start = pid_n * BLOCK_N
    cols = col_start + tl.arange(0, BLOCK_N)
    col_ok = cols < n
    log2e = 1.4426950408889634
    dots = _dot_tile(
        x_ptr, y_ptr, block_row, col_start, row_end, n, d_s,
        stride_xm, stride_xd, stride_ym, stride_yd,
        BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, FP32_DOT, DOT_PRECISION,
    )  # fmt: skip
    scale = tl.load(scale_ptr).to(tl.float32)
    logits_a = dots * (scale * log2e)
    lse_a = tl.load(row_lse_ptr + rows, mask=row_ok, other=0.0) * log2e
    grad = tl.load(coeff_ptr) * tl.exp2(logits_a - lse_a[:, None])
    if COLUMNS:
        col_lse_a = tl.load(col_lse_ptr + cols, mask=col_ok, other=0.0) * log2e
        grad += tl.load(coeff_ptr + 2) * tl.exp2(logits_a - col_lse_a[None, :])
    if TEACHER:
        logits_b = _dot_tile(
            xt_ptr, yt_ptr, block_row, col_start, row_end, n, d_t,
            stride_xtm, stride_xtd, stride_ytm, stride_ytd,
            BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, FP32_DOT, DOT_PRECISION,
        ) * (tl.load(teacher_scale_ptr).to(tl.float32) * log2e)  # fmt: skip
        lse_b = tl.load(row_lse_ptr + m + rows, mask=row_ok, other=0.0) * log2e
        grad -= tl.load(coeff_ptr + 1) * tl.exp2(logits_b - lse_b[:, None])
        if COLUMNS:
            col_lse_b = tl.load(col_lse_ptr + n + cols, mask=col_ok, other=0.0) * log2e
            grad -= tl.load(coeff_ptr + 3) * tl.exp2(logits_b - col_lse_b[None, :])
    label = rows + label_offset
    grad -= tl.where(cols[None, :] == label[:, None], tl.load(coeff_ptr + 4), 0.0)
    ok = row_ok[:, None] & col_ok[None, :]
    grad = tl.where(ok, grad, 0.0)
    tl.store(dscale_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(grad * dots, 1), 0))
    # Stored times a, so that the GEMMs that follow give the feature gradients directly.
    tile_ptr = grad_ptr + (pid_m * BLOCK_M).to(tl.int64) * n + col_start
    tl.store(
        tile_ptr + tl.arange(0, BLOCK_M)[:, None] * n + tl.arange(0, BLOCK_N)[None, :],
        (grad * scale).to(grad_ptr.dtype.element_ty),
        mask=ok,
    )


def _autotuned(kernel, shapes: tuple, reset: list[str]):
    """CUDA autotuning over (BLOCK_M, BLOCK_N, BLOCK_D, warps, stages) candidates."""
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bm, bn, bd, w, s in shapes
    ]
    return triton.autotune(configs, key=["m", "n", "d_s", "d_t"], reset_to_zero=reset)(kernel)


# Candidates that compile without register spills on sm_90 with Triton 3.6 and 3.8 (the
# static report bench/sm90_report.py, teacher and column terms on; tests/kernels holds it
# to that for bf16/fp16). The forward keeps many [BLOCK_M, BLOCK_N] tiles alive, hence 8
# warps. fp32 features take 3xTF32 dots (each operand split in a high and a low part, three
# MMAs per product), which need about twice the registers of a bf16 tile: larger fp32 tiles
# spill 28-760 B, so fp32 gets smaller BLOCK_D / BLOCK_N candidates of its own.
_STATS_SHAPES = {
    "half": ((64, 64, 64, 8, 3), (64, 64, 32, 8, 3), (64, 128, 32, 8, 3)),
    "fp32": ((64, 64, 32, 8, 3), (64, 64, 16, 8, 3), (64, 128, 16, 8, 3)),
}
_GRAD_SHAPES = {
    "half": ((64, 64, 64, 8, 3), (64, 128, 64, 8, 3), (128, 64, 32, 8, 3), (64, 64, 32, 8, 3)),
    "fp32": ((128, 64, 32, 8, 3), (64, 64, 32, 8, 3), (128, 64, 32, 8, 4)),
}


def _shape_class(features: torch.Tensor) -> str:
    return "fp32" if features.dtype == torch.float32 else "half"


if INTERPRETING:
    _STATS_KERNELS = dict.fromkeys(_STATS_SHAPES, _affinity_stats_kernel)
    _GRAD_KERNELS = dict.fromkeys(_GRAD_SHAPES, _affinity_grad_logits_kernel)
    _SMALLEST_BLOCK = _INTERPRETER_BLOCKS["BLOCK_M"]
else:
    _STATS_KERNELS = {
        kind: _autotuned(_affinity_stats_kernel, shapes, ["col_acc_ptr"])
        for kind, shapes in _STATS_SHAPES.items()
    }
    _GRAD_KERNELS = {
        kind: _autotuned(_affinity_grad_logits_kernel, shapes, ["dscale_ptr"])
        for kind, shapes in _GRAD_SHAPES.items()
    }
    _SMALLEST_BLOCK = 64


def _block_args() -> dict:
    return dict(_INTERPRETER_BLOCKS) if INTERPRETING else {}


def _common_dtype(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """All features in one dtype (one tl.dot flavour): their shared fp32/half type, else fp32."""
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) == 1 and torch.float64 not in dtypes:
        return list(tensors)
    return [t.float() if t is not None else None for t in tensors]


def _dot_flags(features: torch.Tensor) -> dict:
    fp32 = features.dtype == torch.float32
    return {
        "UPCAST": INTERPRETING,
        "FP32_DOT": INTERPRETING or fp32,
        # Under the interpreter tl.dot is numpy fp32; on CUDA, 3xTF32 keeps fp32 accuracy.
        "DOT_PRECISION": "ieee" if INTERPRETING else "tf32x3",
    }


def _scalar(scale: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if scale is None:
        return torch.ones(1, dtype=torch.float32, device=like.device)
    return scale.detach().reshape(1).to(device=like.device, dtype=torch.float32)


def _strides(*tensors: torch.Tensor | None) -> list[int]:
    out: list[int] = []
    for tensor in tensors:
        out += list(tensor.stride()) if tensor is not None else [0, 0]
    return out


def _column_shifts(rows, cols, scale, teacher_rows, teacher_cols, teacher_scale):
    """[2, N] log2-unit upper bounds |a| ||Y_j|| max_i ||X_i|| of each column's logits."""
    norms = lambda t: torch.linalg.vector_norm(t, dim=1, dtype=torch.float32)
    shifts = torch.zeros(2, cols.shape[0], dtype=torch.float32, device=cols.device)
    shifts[0] = norms(cols) * norms(rows).max() * scale.abs() * LOG2E
    if teacher_rows is not None:
        shifts[1] = norms(teacher_cols) * norms(teacher_rows).max() * teacher_scale.abs() * LOG2E
    return shifts


def affinity_stats_forward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    teacher_rows: torch.Tensor | None,
    teacher_cols: torch.Tensor | None,
    teacher_scale: torch.Tensor | None,
    *,
    column_stats: bool,
    label_offset: int = 0,
) -> tuple[tuple, tuple | None]:
    """Per-row (and, if ``column_stats``, per-column) softmax statistics, fp32.

    Returns ``(lse_a, target_a, lse_b, p_dot_a, p_dot_b)`` for the rows and, for the square
    problem, the same for the columns (target = the diagonal); teacher entries are None
    without a teacher. lse = log-sum-exp, p_dot_a = sum_j softmax(B)_ij A_ij.
    """
    m, n = rows.shape[0], cols.shape[0]
    teacher = teacher_rows is not None
    rows, cols, teacher_rows, teacher_cols = _common_dtype(rows, cols, teacher_rows, teacher_cols)
    a, b = _scalar(scale, rows), _scalar(teacher_scale, rows)
    row_out = torch.empty(5, m, dtype=torch.float32, device=rows.device)
    if column_stats:
        shifts = _column_shifts(rows, cols, a, teacher_rows, teacher_cols, b)
        col_acc = torch.zeros(4, n, dtype=torch.float64, device=rows.device)
    else:
        shifts = col_acc = row_out  # never read: COLUMNS is off
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)
    _STATS_KERNELS[_shape_class(rows)][grid](
        rows, cols, teacher_rows if teacher else rows, teacher_cols if teacher else cols, a, b,
        row_out, shifts, col_acc,
        m, n, rows.shape[1], teacher_rows.shape[1] if teacher else 0, label_offset,
        *_strides(rows, cols, teacher_rows, teacher_cols),
        TEACHER=teacher, COLUMNS=column_stats, **_dot_flags(rows), **_block_args(),
    )  # fmt: skip
    row = _unpack(row_out, teacher)
    if not column_stats:
        return row, None
    lse_a = ((shifts[0].double() + torch.log2(col_acc[0])) * LN2).float()
    col = [lse_a, row[1], None, None, None]
    underflow = col_acc[0] < _UNDERFLOW
    if teacher:
        col[2] = ((shifts[1].double() + torch.log2(col_acc[1])) * LN2).float()
        col[3] = (col_acc[2] / col_acc[1] * LN2).float()
        col[4] = (col_acc[3] / col_acc[1] * LN2).float()
        underflow |= col_acc[1] < _UNDERFLOW
    bad = underflow.nonzero().squeeze(1)
    if bad.numel() > 0:
        _exact_column_stats(col, bad, rows, cols, a, teacher_rows, teacher_cols, b)
    return row, tuple(col)


def _unpack(row_out: torch.Tensor, teacher: bool) -> tuple:
    lse_a, target_a, lse_b, p_dot_a, p_dot_b = row_out.unbind()
    if not teacher:
        return lse_a, target_a, None, None, None
    return lse_a, target_a, lse_b, p_dot_a, p_dot_b


def _exact_column_stats(col, bad, rows, cols, a, teacher_rows, teacher_cols, b) -> None:
    """Overwrite the statistics of the columns ``bad`` by the row kernel on the transpose."""
    teacher = teacher_rows is not None
    exact, _ = affinity_stats_forward(
        cols[bad], rows, a, teacher_cols[bad] if teacher else None, teacher_rows,
        b if teacher else None, column_stats=False,
    )  # fmt: skip
    for index in (0, 2, 3, 4):
        if col[index] is not None:
            col[index][bad] = exact[index]


def affinity_grad_backward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    teacher_rows: torch.Tensor | None,
    teacher_cols: torch.Tensor | None,
    teacher_scale: torch.Tensor | None,
    row_lse_a: torch.Tensor,
    row_lse_b: torch.Tensor | None,
    col_lse_a: torch.Tensor | None,
    col_lse_b: torch.Tensor | None,
    coeffs: torch.Tensor,
    *,
    label_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/drows, dL/dcols, dL/dscale) for dA = the coefficient mix of Q, P, Q', P'.

    coeffs = (cq, cp, cq', cp', c1): dA = cq Q - cp P + cq' Q' - cp' P' - c1 onehot with Q, P
    the row softmaxes of A, B and Q', P' the column ones; drows = a dA cols, dcols = a dA^T
    rows, dscale = sum(dA * rows cols^T).
    """
    m, n = rows.shape[0], cols.shape[0]
    teacher = teacher_rows is not None
    columns = col_lse_a is not None
    rows, cols, teacher_rows, teacher_cols = _common_dtype(rows, cols, teacher_rows, teacher_cols)
    a, b = _scalar(scale, rows), _scalar(teacher_scale, rows)
    device = rows.device
    row_lse = torch.stack([row_lse_a, row_lse_b if teacher else row_lse_a]).float()
    col_lse = (
        torch.stack([col_lse_a, col_lse_b if teacher else col_lse_a]).float()
        if columns
        else row_lse
    )
    coeffs = coeffs.float().contiguous()
    # dA in the features' dtype (fp32 features keep fp32): the two products below run in
    # cuBLAS at the full tensor-core rate, accumulating in fp32, as in flash attention.
    chunk = _grad_chunk_rows(m, n, rows.element_size())
    grad = torch.empty(chunk, n, dtype=rows.dtype, device=device)
    programs = triton.cdiv(chunk, _SMALLEST_BLOCK) * triton.cdiv(n, _SMALLEST_BLOCK)
    dscale = torch.zeros(triton.cdiv(m, chunk), programs, dtype=torch.float32, device=device)
    dx = torch.empty(m, rows.shape[1], dtype=rows.dtype, device=device)
    dy = None
    for index, start in enumerate(range(0, m, chunk)):
        size = min(chunk, m - start)
        grid = lambda meta, size=size: (
            triton.cdiv(size, meta["BLOCK_M"]),
            triton.cdiv(n, meta["BLOCK_N"]),
        )
        _GRAD_KERNELS[_shape_class(rows)][grid](
            rows, cols, teacher_rows if teacher else rows, teacher_cols if teacher else cols,
            a, b, row_lse, col_lse, coeffs, grad, dscale[index],
            m, n, rows.shape[1], teacher_rows.shape[1] if teacher else 0, label_offset,
            start, size,
            *_strides(rows, cols, teacher_rows, teacher_cols),
            TEACHER=teacher, COLUMNS=columns, **_dot_flags(rows), **_block_args(),
        )  # fmt: skip
        torch.matmul(grad[:size], cols, out=dx[start : start + size])
        part = grad[:size].T @ rows[start : start + size]
        if dy is None:
            # Several chunks sum into an fp32 buffer; a single one is the result as is.
            dy = part if size == m else part.float()
        else:
            dy.add_(part)
    return dx, dy, dscale.sum()


def _grad_chunk_rows(m: int, n: int, element_size: int) -> int:
    """Rows of dA materialised at once: at most ~512 MB, and all of them for small problems."""
    rows = _GRAD_CHUNK_BYTES // (n * element_size) // _SMALLEST_BLOCK * _SMALLEST_BLOCK
    rows = max(_SMALLEST_BLOCK, rows)
    return min(m, rows)
