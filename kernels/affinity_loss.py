"""Triton kernels of the affinity (distillation + contrastive) loss; raw tensors in and out.

Student logits A = a X Y^T [m, N] and the logits B_k = b_k Xt_k Yt_k^T of K <= MAX_TEACHERS
teachers (each with its own feature dim) are only ever formed one [BLOCK_M, BLOCK_N] tile at
a time, flash-attention style: the forward kernel computes each student tile once and
streams the K teacher tiles beside it, keeping an online softmax per row and teacher (exp2,
log2(e) folded into the scale, fp32 accumulation). Its grid is row blocks x column splits
(``common.column_splits``: a local-loss shape with few row blocks still fills the SMs); each
split writes partial row statistics that ``kernels.row_stats_combine`` merges. The soft
cross-entropy against the averaged target mean_k softmax(B_k) decomposes per teacher:
lse(A_i) - mean_k sum_j softmax(B_k)_ij A_ij. The backward kernel recomputes the tiles from
the statistics and writes dL/dA (Q - mean_k P_k mixes) for a chunk of rows (<= 512 MB); two
cuBLAS GEMMs per chunk then give dX = a dA Y and dY += a dA^T X. That keeps every gradient
product on the tensor cores at full rate without [BLOCK, d] register accumulators or d-wide
atomics (d is often 512 or more).

The teachers reach a kernel as tuples of K pointers, dims and strides, walked by
``tl.static_range(NUM_TEACHERS)``: NUM_TEACHERS is a constexpr, so each K compiles to
straight-line code (one teacher is the single-teacher kernel, no per-teacher loop or extra
work) and each teacher's running statistics are registers of their own.

Column statistics of the square problem come out of the same pass over the tiles: each
tile's column sums are taken relative to the tile's own column max and added with fp64
atomics relative to a fixed per-column shift c_j = |a| ||Y_j|| max_i ||X_i|| >= max_i A_ij
(Cauchy-Schwarz; one shift per teacher likewise), so nothing overflows and fp64 leaves ~700
natural-log units of headroom before underflow. Columns that still underflow (for the
student or any teacher) are recomputed exactly by a second pass (the row kernel on the
transposed problem, those columns only).

The KL form of an ensemble needs the entropy of the mixture mean_k P_k, which does not
decompose per teacher: ``kernels.mixture_entropy`` computes it exactly by one more pass over
the teacher tiles once their log-sum-exps are known (one teacher needs no such pass).

Feature dtypes: bf16/fp16 dots on the tensor cores, fp32 ones as 3xTF32; every statistic
and accumulation is fp32. Float64 features are cast to fp32 here: the kernels compute in
fp32 (the PyTorch path computes float64 in float64).
"""

import torch
import triton
import triton.language as tl

from . import INTERPRETING, common
from .common import (
    LN2,
    LOG2E,
    autotuned,
    block_args,
    dot_flags,
    dot_tile,
    grad_chunk_rows,
    one_dtype,
    size_class,
    strides,
)
from .limits import MAX_TEACHERS
from .row_stats_combine import combine_row_stats, partial_fields

# A column sum (fp64, relative to its shift) below this is treated as underflowed and
# recomputed exactly; 1e-280 leaves room for ~1e20 tile contributions in fp64's normal range.
_UNDERFLOW = 1e-280


@triton.jit
def _teacher_tile(
    teacher_x, teacher_y, teacher_dims, teacher_strides, k: tl.constexpr,
    row_start, col_start, m, n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Teacher k's unscaled [BLOCK_M, BLOCK_N] tile Xt_k Yt_k^T; its strides are entries
    4k .. 4k + 3 of ``teacher_strides`` (rows, dim of Xt_k, then of Yt_k)."""
    return dot_tile(
        teacher_x[k], teacher_y[k], row_start, col_start, m, n, teacher_dims[k],
        teacher_strides[4 * k], teacher_strides[4 * k + 1],
        teacher_strides[4 * k + 2], teacher_strides[4 * k + 3],
        BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, FP32_DOT, DOT_PRECISION,
    )  # fmt: skip


@triton.jit
def _teacher_stats_step(
    logits_b, logits_a, row_start, start, m, n, state, col_shift_ptr, col_acc_ptr,
    INDEX: tl.constexpr, DOT_B: tl.constexpr, COLUMNS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Teacher INDEX's tile beside the student's: its online row softmax statistics
    ``state`` = (max, sum, sum P A, and with DOT_B sum P B) and, with COLUMNS, its column
    sums (shift row 1 + INDEX, accumulator rows 1 + 2 INDEX .. 3 + 2 INDEX)."""
    max_b, sum_b, w_a, w_b = state
    row_ok = row_start + tl.arange(0, BLOCK_M) < m
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < n
    row_b = tl.where(col_ok[None, :], logits_b, float("-inf"))
    new_max_b = tl.maximum(max_b, tl.max(row_b, axis=1))
    rescale = tl.exp2(max_b - new_max_b)
    weights = tl.exp2(row_b - new_max_b[:, None])
    sum_b = sum_b * rescale + tl.sum(weights, axis=1)
    w_a = w_a * rescale + tl.sum(weights * logits_a, axis=1)
    if DOT_B:
        w_b = w_b * rescale + tl.sum(weights * logits_b, axis=1)
    if COLUMNS:
        col_b = tl.where(row_ok[:, None], logits_b, float("-inf"))
        tile_max_b = tl.max(col_b, axis=0)
        col_weights = tl.exp2(col_b - tile_max_b[None, :])
        shift_b = tl.load(col_shift_ptr + (1 + INDEX) * n + cols, mask=col_ok, other=0.0)
        factor_b = tl.exp2((tile_max_b - shift_b).to(tl.float64))
        acc_ptr = col_acc_ptr + (1 + 2 * INDEX) * n + cols
        tl.atomic_add(
            acc_ptr,
            tl.sum(col_weights, axis=0).to(tl.float64) * factor_b,
            mask=col_ok,
            sem="relaxed",
        )
        tl.atomic_add(
            acc_ptr + n,
            tl.sum(col_weights * logits_a, axis=0).to(tl.float64) * factor_b,
            mask=col_ok,
            sem="relaxed",
        )
        if DOT_B:
            tl.atomic_add(
                acc_ptr + 2 * n,
                tl.sum(col_weights * logits_b, axis=0).to(tl.float64) * factor_b,
                mask=col_ok,
                sem="relaxed",
            )
    return new_max_b, sum_b, w_a, w_b


@triton.jit
def _affinity_stats_kernel(
    x_ptr, y_ptr, scale_ptr,
    teacher_x, teacher_y,  # K-tuples (at least one entry) of teacher row / column features
    teacher_scale_ptr,  # [K] fp32
    # [splits, 3 + 4K, m] fp32, log2 units, each column split's partial row statistics:
    # max_a, sum 2^(A - max_a), target_a, then per teacher max_b, sum 2^(B - max_b),
    # sum 2^(B - max_b) A and (K = 1) sum 2^(B - max_b) B
    partial_ptr,
    col_shift_ptr,  # [1 + K, N] fp32: per-column upper bounds of A and each B_k, log2 units
    # [1 + 2K (+ 1 if K = 1), N] fp64: sum 2^(A-c), then per teacher sum 2^(B-c'),
    # sum 2^(B-c') A2, and for one teacher sum 2^(B-c') B2
    col_acc_ptr,
    row_active_ptr,  # [m] int8, ACTIVE_ROWS only: 1 for the rows whose statistics are needed
    m, n, m_class, n_class, d_s, teacher_dims, label_offset,  # *_class: autotune keys only
    stride_xm, stride_xd, stride_ym, stride_yd,
    teacher_strides,  # 4K-tuple: per teacher its rows' and columns' (row, dim) strides
    NUM_TEACHERS: tl.constexpr, COLUMNS: tl.constexpr, ACTIVE_ROWS: tl.constexpr,
    UPCAST: tl.constexpr, FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # A 2-D grid: row block x column split. Split s sweeps the tiles s, s + splits, ...;
    # the combine kernel merges the splits' partial row statistics.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    row_start = pid * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < m
    num_tiles = tl.cdiv(tl.cdiv(n, BLOCK_N) - split, splits)
    no_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    idle = 0.0
    if ACTIVE_ROWS:
        # A row block with no needed row skips every tile (its outputs are left undefined,
        # finite: partials max 0, sum 1): the launch keeps its shape whichever rows are needed.
        active = tl.max(tl.load(row_active_ptr + rows, mask=row_ok, other=0), axis=0)
        num_tiles *= active.to(tl.int32)
        idle = (1 - active).to(tl.float32)
        no_max = tl.where(active > 0, no_max, 0.0)
    label = rows + label_offset
    log2e = 1.4426950408889634
    a2 = tl.load(scale_ptr).to(tl.float32) * log2e
    max_a = no_max
    sum_a = tl.zeros((BLOCK_M,), tl.float32) + idle
    target_a = tl.zeros((BLOCK_M,), tl.float32)
    # Per teacher: log2-unit scale; per row running max, sum, sum 2^B A, (K = 1) sum 2^B B.
    scales = ()
    states = ()
    for k in tl.static_range(NUM_TEACHERS):
        scales = scales + (tl.load(teacher_scale_ptr + k).to(tl.float32) * log2e,)
        zeros = tl.zeros((BLOCK_M,), tl.float32)
        states = states + ((no_max, zeros + idle, zeros, zeros),)
    for step in range(0, num_tiles):
        # Row blocks start on different column tiles of their split so that their column
        # atomics rarely collide; the online softmax does not depend on the order.
        start = (split + ((step + pid) % num_tiles) * splits) * BLOCK_N
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        # Logits in log2 units: exp2 of them is exp of the natural logits. The student tile
        # is computed once and stays live while the teachers' tiles stream past it.
        logits_a = a2 * dot_tile(
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
            tl.atomic_add(
                col_acc_ptr + cols, tile_sum_a.to(tl.float64) * factor_a, mask=col_ok, sem="relaxed"
            )
        stepped = ()
        for k in tl.static_range(NUM_TEACHERS):
            logits_b = scales[k] * _teacher_tile(
                teacher_x, teacher_y, teacher_dims, teacher_strides, k, row_start, start, m, n,
                BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, FP32_DOT, DOT_PRECISION,
            )  # fmt: skip
            stepped = stepped + (
                _teacher_stats_step(
                    logits_b, logits_a, row_start, start, m, n, states[k], col_shift_ptr,
                    col_acc_ptr, k, NUM_TEACHERS == 1, COLUMNS, BLOCK_M, BLOCK_N,
                ),
            )  # fmt: skip
        states = stepped
    out = partial_ptr + split * (3 + 4 * NUM_TEACHERS) * m + rows
    tl.store(out, max_a, mask=row_ok)
    tl.store(out + m, sum_a, mask=row_ok)
    tl.store(out + 2 * m, target_a, mask=row_ok)
    for k in tl.static_range(NUM_TEACHERS):
        max_b, sum_b, w_a, w_b = states[k]
        tl.store(out + (3 + 4 * k) * m, max_b, mask=row_ok)
        tl.store(out + (4 + 4 * k) * m, sum_b, mask=row_ok)
        tl.store(out + (5 + 4 * k) * m, w_a, mask=row_ok)
        if NUM_TEACHERS == 1:
            tl.store(out + 6 * m, w_b, mask=row_ok)


@triton.jit
def teacher_softmax_tiles(
    teacher_x, teacher_y, teacher_dims, teacher_strides, teacher_scale_ptr,
    row_lse_ptr, col_lse_ptr, block_row, col_start, row_end, m, n,
    INDEX: tl.constexpr, COLUMNS: tl.constexpr,
    UPCAST: tl.constexpr, FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Teacher INDEX's row softmax tile P_k and, with COLUMNS, its column softmax tile P'_k
    (else P_k again), from the log-sum-exps in row / column 1 + INDEX of the lse buffers."""
    log2e = 1.4426950408889634
    rows = block_row + tl.arange(0, BLOCK_M)
    cols = col_start + tl.arange(0, BLOCK_N)
    logits_b = _teacher_tile(
        teacher_x, teacher_y, teacher_dims, teacher_strides, INDEX,
        block_row, col_start, row_end, n,
        BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, FP32_DOT, DOT_PRECISION,
    ) * (tl.load(teacher_scale_ptr + INDEX).to(tl.float32) * log2e)  # fmt: skip
    lse_b = tl.load(row_lse_ptr + (1 + INDEX) * m + rows, mask=rows < row_end, other=0.0)
    probs = tl.exp2(logits_b - lse_b[:, None] * log2e)
    col_probs = probs
    if COLUMNS:
        col_lse_b = tl.load(col_lse_ptr + (1 + INDEX) * n + cols, mask=cols < n, other=0.0)
        col_probs = tl.exp2(logits_b - col_lse_b[None, :] * log2e)
    return probs, col_probs


@triton.jit
def _affinity_grad_logits_kernel(
    x_ptr, y_ptr, scale_ptr,
    teacher_x, teacher_y,  # K-tuples (at least one entry) of teacher row / column features
    teacher_scale_ptr,  # [K] fp32
    row_lse_ptr,  # [1 + K, m] fp32: lse of A and of each B_k per row
    col_lse_ptr,  # [1 + K, N] fp32: lse of A and of each B_k per column (COLUMNS only)
    coeff_ptr,  # [5] fp32: row Q, row P (mean of the P_k), column Q, column P, one-hot
    grad_ptr,  # [chunk, N] contiguous, features' dtype: G of rows row_start + [0, chunk)
    dscale_ptr,  # [programs] fp32: per-program sum(G * X Y^T)
    m, n, m_class, n_class, d_s, teacher_dims, label_offset, row_start, chunk,
    stride_xm, stride_xd, stride_ym, stride_yd,
    teacher_strides,  # 4K-tuple: per teacher its rows' and columns' (row, dim) strides
    NUM_TEACHERS: tl.constexpr, COLUMNS: tl.constexpr,
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
    dots = dot_tile(
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
    # The teachers' coefficients take the 1 / K of their mean.
    if NUM_TEACHERS > 0:
        coeff_p = tl.load(coeff_ptr + 1) * (1.0 / NUM_TEACHERS)
        coeff_col_p = tl.load(coeff_ptr + 3) * (1.0 / NUM_TEACHERS)
    for k in tl.static_range(NUM_TEACHERS):
        probs, col_probs = teacher_softmax_tiles(
            teacher_x, teacher_y, teacher_dims, teacher_strides, teacher_scale_ptr,
            row_lse_ptr, col_lse_ptr, block_row, col_start, row_end, m, n,
            k, COLUMNS, UPCAST, FP32_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        grad -= coeff_p * probs
        if COLUMNS:
            grad -= coeff_col_p * col_probs
    label = rows + label_offset
    grad -= tl.where(cols[None, :] == label[:, None], tl.load(coeff_ptr + 4), 0.0)
    ok = row_ok[:, None] & col_ok[None, :]
    grad = tl.where(ok, grad, 0.0)
    tl.store(dscale_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(grad * dots, 1), 0))
    # Stored without the scale a (applied after the GEMMs, in fp32).
    tile_ptr = grad_ptr + (pid_m * BLOCK_M).to(tl.int64) * n + col_start
    tl.store(
        tile_ptr + tl.arange(0, BLOCK_M)[:, None] * n + tl.arange(0, BLOCK_N)[None, :],
        grad.to(grad_ptr.dtype.element_ty),
        mask=ok,
    )


# Candidates that compile without register spills on sm_90 with Triton 3.6 and 3.8 (the
# static report bench/sm90_report.py, teacher and column terms on; tests/kernels holds it
# to that for bf16/fp16/fp32), per dtype class and teacher count class: "one" is K <= 1,
# "two" K = 2, "four" K = 3..4 (compiled per K, tuned per class). The forward keeps many
# [BLOCK_M, BLOCK_N] tiles alive, hence 8 warps. fp32 features take 3xTF32 dots (each
# operand split in a high and a low part, three MMAs per product), which need about twice
# the registers of a bf16 tile: larger fp32 tiles spill 28-760 B, so fp32 gets smaller
# BLOCK_D / BLOCK_N candidates of its own. Each teacher streamed beside the student adds its
# running statistics and (backward) its softmax tile: the larger tiles spill from K = 2
# (64x128 stats, 128x64 fp32 grad: 8-84 B) or K = 4 (every 64x128 / 128x64 tile, 16-1000 B;
# fp32 stats even at 64x64, hence 64x32). fp32 64x128x16 stats spill 4 B at K = 1 on
# Triton 3.6: not among the one-teacher candidates. The column-split statistics kernel at
# K = 4 in bf16/fp16 spills 16 B with 3 stages on Triton 3.6 (255 registers): 2 stages.
_STATS_SHAPES = {
    ("half", "one"): ((64, 64, 64, 8, 3), (64, 64, 32, 8, 3), (64, 128, 32, 8, 3)),
    ("fp32", "one"): ((64, 64, 32, 8, 3), (64, 64, 16, 8, 3)),
    ("half", "two"): ((64, 64, 64, 8, 3), (64, 64, 32, 8, 3)),
    ("fp32", "two"): ((64, 64, 32, 8, 3), (64, 64, 16, 8, 3)),
    ("half", "four"): ((64, 64, 32, 8, 2), (64, 64, 16, 8, 2)),
    ("fp32", "four"): ((64, 32, 16, 8, 3),),
}
_GRAD_SHAPES = {
    ("half", "one"): (
        (64, 64, 64, 8, 3), (64, 128, 64, 8, 3), (128, 64, 32, 8, 3), (64, 64, 32, 8, 3),
    ),
    ("fp32", "one"): ((128, 64, 32, 8, 3), (64, 64, 32, 8, 3), (128, 64, 32, 8, 4)),
    ("half", "two"): (
        (64, 64, 64, 8, 3), (64, 128, 64, 8, 3), (128, 64, 32, 8, 3), (64, 64, 32, 8, 3),
    ),
    ("fp32", "two"): ((64, 64, 32, 8, 3), (64, 64, 32, 8, 4), (64, 64, 16, 8, 3)),
    ("half", "four"): ((64, 64, 64, 8, 3), (64, 64, 32, 8, 3)),
    ("fp32", "four"): ((64, 64, 16, 8, 3), (64, 32, 32, 8, 3)),
}  # fmt: skip
# Power-of-two classes of m and n (size_class), not their exact values: a last, shorter
# batch or the underflow pass over a few columns does not re-tune mid-training.
TUNE_KEY = ["m_class", "n_class", "teacher_dims"]


def _shape_class(features: torch.Tensor) -> str:
    return "fp32" if features.dtype == torch.float32 else "half"


def _teacher_class(num_teachers: int) -> str:
    return "one" if num_teachers <= 1 else ("two" if num_teachers == 2 else "four")


if INTERPRETING:
    _STATS_KERNELS = dict.fromkeys(_STATS_SHAPES, _affinity_stats_kernel)
    _GRAD_KERNELS = dict.fromkeys(_GRAD_SHAPES, _affinity_grad_logits_kernel)
else:
    _STATS_KERNELS = {
        kind: autotuned(_affinity_stats_kernel, shapes, ["d_s", *TUNE_KEY], ["col_acc_ptr"])
        for kind, shapes in _STATS_SHAPES.items()
    }
    _GRAD_KERNELS = {
        kind: autotuned(_affinity_grad_logits_kernel, shapes, ["d_s", *TUNE_KEY], ["dscale_ptr"])
        for kind, shapes in _GRAD_SHAPES.items()
    }


def _scalar(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return scale.detach().reshape(1).to(device=like.device, dtype=torch.float32)


def device_scales(scales: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """[K] fp32 scales on the features' device; a [1] placeholder without teachers."""
    if scales is None:
        return torch.ones(1, dtype=torch.float32, device=like.device)
    return scales.detach().reshape(-1).to(device=like.device, dtype=torch.float32).contiguous()


class TeacherOperands:
    """The student pair and up to MAX_TEACHERS teacher pairs as one dot flavour, with the
    kernels' teacher tuples (pointers, dims, strides); without teachers the tuples hold the
    student once, never read."""

    def __init__(self, rows, cols, teachers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if len(teachers) > MAX_TEACHERS:
            raise ValueError(f"at most {MAX_TEACHERS} teachers, got {len(teachers)}")
        flat = one_dtype([rows, cols, *(t for pair in teachers for t in pair)])
        self.rows, self.cols = flat[:2]
        self.teachers = [(flat[2 + 2 * k], flat[3 + 2 * k]) for k in range(len(teachers))]
        self.num_teachers = len(teachers)
        pairs = self.teachers or [(self.rows, self.cols)]
        self.teacher_x = tuple(pair[0] for pair in pairs)
        self.teacher_y = tuple(pair[1] for pair in pairs)
        self.teacher_dims = tuple(pair[0].shape[1] for pair in pairs)
        self.teacher_strides = strides([t for pair in pairs for t in pair])
        self.kernel_class = (_shape_class(self.rows), _teacher_class(len(teachers)))

    def flags(self) -> dict:
        """The launch's constexprs besides COLUMNS: teacher count, dot flavour, blocks."""
        return {"NUM_TEACHERS": self.num_teachers, **dot_flags(self.rows.dtype), **block_args()}


def _column_shifts(rows, cols, scale, teachers, teacher_scales) -> torch.Tensor:
    """[1 + K, N] log2-unit upper bounds |a| ||Y_j|| max_i ||X_i|| of each column's logits."""
    norms = lambda t: torch.linalg.vector_norm(t, dim=1, dtype=torch.float32)
    shifts = torch.empty(1 + len(teachers), cols.shape[0], dtype=torch.float32, device=cols.device)
    shifts[0] = norms(cols) * norms(rows).max() * scale.abs() * LOG2E
    for k, (teacher_rows, teacher_cols) in enumerate(teachers):
        bound = norms(teacher_cols) * norms(teacher_rows).max() * teacher_scales[k].abs()
        shifts[1 + k] = bound * LOG2E
    return shifts


def affinity_stats_forward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    teachers: list[tuple[torch.Tensor, torch.Tensor]],
    teacher_scales: torch.Tensor | None,
    *,
    column_stats: bool,
    label_offset: int = 0,
    active_rows: torch.Tensor | None = None,
) -> tuple[tuple, tuple | None]:
    """Per-row (and, if ``column_stats``, per-column) softmax statistics, fp32.

    ``teachers`` = [(teacher_rows_k, teacher_cols_k)] for K = 0..MAX_TEACHERS,
    ``teacher_scales`` their [K] scales. Returns ``(lse_a, target_a, lse_b, p_dot_a,
    p_dot_b)`` for the rows and, for the square problem, the same for the columns (target =
    the diagonal): lse = log-sum-exp, lse_b and p_dot_a [K, r] per teacher with p_dot_a_k =
    sum_j softmax(B_k)_ij A_ij, and p_dot_b = sum_j softmax(B)_ij B_ij [r] for one teacher
    (None otherwise, and teacher entries None without teachers). With ``active_rows`` (bool
    [m]) only those rows' statistics are defined: row blocks without one skip their tiles.
    """
    m, n = rows.shape[0], cols.shape[0]
    ops = TeacherOperands(rows, cols, teachers)
    k = ops.num_teachers
    a, b = _scalar(scale, rows), device_scales(teacher_scales, rows)
    row_out = torch.empty(2 + 2 * k + (k == 1), m, dtype=torch.float32, device=rows.device)
    splits = common.column_splits(m, n)
    partials = torch.empty(splits, partial_fields(k), m, dtype=torch.float32, device=rows.device)
    if column_stats:
        shifts = _column_shifts(ops.rows, ops.cols, a, ops.teachers, b)
        col_acc = torch.zeros(1 + 2 * k + (k == 1), n, dtype=torch.float64, device=rows.device)
    else:
        shifts = col_acc = row_out  # never read: COLUMNS is off
    active = row_out if active_rows is None else active_rows.to(torch.int8)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), splits)
    _STATS_KERNELS[ops.kernel_class][grid](
        ops.rows, ops.cols, a, ops.teacher_x, ops.teacher_y, b, partials, shifts, col_acc,
        active, m, n, size_class(m), size_class(n), ops.rows.shape[1], ops.teacher_dims,
        label_offset,
        *strides([ops.rows, ops.cols]), ops.teacher_strides,
        COLUMNS=column_stats, ACTIVE_ROWS=active_rows is not None, **ops.flags(),
    )  # fmt: skip
    combine_row_stats(partials, row_out)
    row = _unpack(row_out, k)
    if not column_stats:
        return row, None
    log_sum = lambda shift, acc: ((shift.double() + torch.log2(acc)) * LN2).float()
    col = [log_sum(shifts[0], col_acc[0]), row[1], None, None, None]
    underflow = col_acc[0] < _UNDERFLOW
    if k > 0:
        sums = col_acc[1 : 1 + 2 * k : 2]
        col[2] = log_sum(shifts[1:], sums)
        col[3] = (col_acc[2 : 2 + 2 * k : 2] / sums * LN2).float()
        if k == 1:
            col[4] = (col_acc[3] / col_acc[1] * LN2).float()
        underflow |= (sums < _UNDERFLOW).any(dim=0)
    _exact_column_stats(col, underflow, ops.rows, ops.cols, a, ops.teachers, b)
    return row, tuple(col)


def _unpack(row_out: torch.Tensor, num_teachers: int) -> tuple:
    """(lse_a, target_a, lse_b [K, m], p_dot_a [K, m], p_dot_b) views of the row output."""
    k = num_teachers
    lse_a, target_a = row_out[0], row_out[1]
    if k == 0:
        return lse_a, target_a, None, None, None
    p_dot_b = row_out[4] if k == 1 else None
    return lse_a, target_a, row_out[2 : 2 + k], row_out[2 + k : 2 + 2 * k], p_dot_b


def _exact_column_stats(col, underflow, rows, cols, a, teachers, b) -> None:
    """Replace the statistics of the columns flagged in ``underflow`` (bool [N]) by the row
    kernel's on the transposed problem. Shape-static: the launch covers every column and
    its row blocks without a flagged column skip their tiles, so nothing is read on the host
    and nearly nothing runs when no column underflows."""
    transposed = [(teacher_cols, teacher_rows) for teacher_rows, teacher_cols in teachers]
    exact, _ = affinity_stats_forward(
        cols, rows, a, transposed, b if teachers else None, column_stats=False,
        active_rows=underflow,
    )  # fmt: skip
    for index in (0, 2, 3, 4):
        if col[index] is not None:
            col[index] = torch.where(underflow, exact[index], col[index])


def affinity_grad_backward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    teachers: list[tuple[torch.Tensor, torch.Tensor]],
    teacher_scales: torch.Tensor | None,
    row_lse_a: torch.Tensor,
    row_lse_b: torch.Tensor | None,
    col_lse_a: torch.Tensor | None,
    col_lse_b: torch.Tensor | None,
    coeffs: torch.Tensor,
    *,
    label_offset: int = 0,
    coeff_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/drows, dL/dcols, dL/dscale) for dA = s G, G the coefficient mix of Q, P, Q', P'.

    coeffs = (cq, cp, cq', cp', c1): G = cq Q - cp P + cq' Q' - cp' P' - c1 onehot with Q
    the row softmax of A, P = mean_k softmax_row(B_k) the teachers' mean, Q', P' the column
    ones; s = ``coeff_scale``; row_lse_b / col_lse_b are [K, m] / [K, N]. drows = a dA cols,
    dcols = a dA^T rows, dscale = sum(dA * rows cols^T). G is stored in the features' dtype
    without a and s (a / (2n) would sink fp16 entries into subnormals at large n), and a s
    is applied in fp32 to the GEMMs' products.
    """
    m, n = rows.shape[0], cols.shape[0]
    ops = TeacherOperands(rows, cols, teachers)
    k = ops.num_teachers
    columns = col_lse_a is not None
    rows, cols = ops.rows, ops.cols
    a, b = _scalar(scale, rows), device_scales(teacher_scales, rows)
    device = rows.device
    row_lse = torch.cat([row_lse_a[None], row_lse_b]) if k else row_lse_a[None]
    row_lse = row_lse.float().contiguous()
    col_lse = row_lse
    if columns:
        col_lse = torch.cat([col_lse_a[None], col_lse_b]) if k else col_lse_a[None]
        col_lse = col_lse.float().contiguous()
    coeffs = coeffs.float().contiguous()
    # dA in the features' dtype (fp32 features keep fp32): the two products below run in
    # cuBLAS at the full tensor-core rate, accumulating in fp32, as in flash attention.
    chunk = grad_chunk_rows(m, n, rows.element_size())
    grad = torch.empty(chunk, n, dtype=rows.dtype, device=device)
    smallest = common.SMALLEST_BLOCK
    programs = triton.cdiv(chunk, smallest) * triton.cdiv(n, smallest)
    dscale = torch.zeros(triton.cdiv(m, chunk), programs, dtype=torch.float32, device=device)
    dx = torch.empty(m, rows.shape[1], dtype=rows.dtype, device=device)
    dy = None
    for index, start in enumerate(range(0, m, chunk)):
        size = min(chunk, m - start)
        grid = lambda meta, size=size: (
            triton.cdiv(size, meta["BLOCK_M"]),
            triton.cdiv(n, meta["BLOCK_N"]),
        )
        _GRAD_KERNELS[ops.kernel_class][grid](
            rows, cols, a, ops.teacher_x, ops.teacher_y, b, row_lse, col_lse, coeffs, grad,
            dscale[index], m, n, size_class(m), size_class(n), rows.shape[1], ops.teacher_dims,
            label_offset, start, size,
            *strides([rows, cols]), ops.teacher_strides, COLUMNS=columns, **ops.flags(),
        )  # fmt: skip
        torch.matmul(grad[:size], cols, out=dx[start : start + size])
        part = grad[:size].T @ rows[start : start + size]
        if dy is None:
            # Several chunks sum into an fp32 buffer; a single one is the result as is.
            dy = part if size == m else part.float()
        else:
            dy.add_(part)
    factor = a[0] * coeff_scale  # fp32, on the device: the multiplies below run in fp32
    return dx.mul_(factor), dy.mul_(factor), dscale.sum() * coeff_scale
