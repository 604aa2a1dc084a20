"""Triton kernel of the mixture entropy an ensemble's KL needs; raw tensors in and out.

sum_ij Pbar_ij ln Pbar_ij with Pbar = mean_k softmax(B_k) does not decompose per teacher, so
once the affinity forward (``kernels.affinity_loss``) knows each teacher's log-sum-exps, one
more pass recomputes the K teacher tiles and sums the entropy of their mean, row softmaxes
and (square problem) column softmaxes together. Each program loops over its share of the
column tiles and writes its own partial sums: no atomics, O(m) partials however large N is.
"""

import torch
import triton
import triton.language as tl

from . import INTERPRETING, common
from .affinity_loss import TUNE_KEY, TeacherOperands, device_scales, teacher_softmax_tiles
from .common import autotuned, size_class, xlogx


@triton.jit
def _mixture_entropy_kernel(
    teacher_x, teacher_y,  # K-tuples (K >= 2) of teacher row / column features
    teacher_scale_ptr,  # [K] fp32
    row_lse_ptr,  # [1 + K, m] fp32: row 0 unused, then lse of each B_k per row
    col_lse_ptr,  # [1 + K, N] fp32: the same per column (COLUMNS only)
    partial_ptr,  # [programs, 2] fp32: per-program sum P ln P of the rows and of the columns
    m, n, m_class, n_class, teacher_dims,  # *_class: autotune keys only
    teacher_strides,  # 4K-tuple: per teacher its rows' and columns' (row, dim) strides
    NUM_TEACHERS: tl.constexpr, COLUMNS: tl.constexpr,
    UPCAST: tl.constexpr, FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    block_row = pid_m * BLOCK_M
    row_ok = block_row + tl.arange(0, BLOCK_M) < m
    row_sum = 0.0
    col_sum = 0.0
    column_programs = tl.num_programs(1)
    for step in range(0, tl.cdiv(tl.cdiv(n, BLOCK_N) - pid_n, column_programs)):
        col_start = (pid_n + step * column_programs) * BLOCK_N
        ok = row_ok[:, None] & (col_start + tl.arange(0, BLOCK_N) < n)[None, :]
        mix = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        col_mix = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k in tl.static_range(NUM_TEACHERS):
            probs, col_probs = teacher_softmax_tiles(
                teacher_x, teacher_y, teacher_dims, teacher_strides, teacher_scale_ptr,
                row_lse_ptr, col_lse_ptr, block_row, col_start, m, m, n,
                k, COLUMNS, UPCAST, FP32_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D,
            )  # fmt: skip
            mix += probs
            col_mix += col_probs
        mix = mix * (1.0 / NUM_TEACHERS)
        row_sum += tl.sum(tl.sum(tl.where(ok, xlogx(mix), 0.0), axis=1), axis=0)
        if COLUMNS:
            col_mix = col_mix * (1.0 / NUM_TEACHERS)
            col_sum += tl.sum(tl.sum(tl.where(ok, xlogx(col_mix), 0.0), axis=1), axis=0)
    slot = partial_ptr + (pid_m * column_programs + pid_n) * 2
    tl.store(slot, row_sum)
    tl.store(slot + 1, col_sum)


# The entropy pass of an ensemble's KL (K >= 2 only); fp32 64x64x32 spills 16 B at K = 4
# on Triton 3.6.
_ENTROPY_SHAPES = {
    ("half", "two"): ((64, 64, 64, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 8, 3)),
    ("fp32", "two"): ((64, 64, 32, 8, 3), (64, 64, 16, 8, 3)),
    ("half", "four"): ((64, 64, 64, 8, 3), (64, 64, 32, 8, 3)),
    ("fp32", "four"): ((64, 64, 16, 8, 3),),
}

if INTERPRETING:
    _ENTROPY_KERNELS = dict.fromkeys(_ENTROPY_SHAPES, _mixture_entropy_kernel)
else:
    _ENTROPY_KERNELS = {
        kind: autotuned(_mixture_entropy_kernel, shapes, TUNE_KEY, ["partial_ptr"])
        for kind, shapes in _ENTROPY_SHAPES.items()
    }


def mixture_entropy(
    teachers: list[tuple[torch.Tensor, torch.Tensor]],
    teacher_scales: torch.Tensor,
    row_lse_b: torch.Tensor,
    col_lse_b: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sum_ij Pbar_ij ln Pbar_ij with Pbar = mean_k softmax_row(B_k) (fp64 0-d), and with
    ``col_lse_b`` the same for the column softmaxes: an exact pass over the teacher tiles
    given their [K, m] row (and [K, N] column) log-sum-exps. K >= 2 (one teacher's entropy
    is lse_b - p_dot_b per row)."""
    teacher_rows, teacher_cols = teachers[0]
    m, n = teacher_rows.shape[0], teacher_cols.shape[0]
    device = teacher_rows.device
    ops = TeacherOperands(teacher_rows, teacher_cols, teachers)
    b = device_scales(teacher_scales, teacher_rows)
    columns = col_lse_b is not None
    # Row 0 of the lse buffers is the student's in the other kernels; unused here.
    row_lse = torch.cat([row_lse_b[:1], row_lse_b]).float().contiguous()
    col_lse = torch.cat([col_lse_b[:1], col_lse_b]).float().contiguous() if columns else row_lse
    column_programs = common.COLUMN_PROGRAMS
    programs = triton.cdiv(m, common.SMALLEST_BLOCK) * column_programs
    partials = torch.zeros(programs, 2, dtype=torch.float32, device=device)
    grid = lambda meta: (
        triton.cdiv(m, meta["BLOCK_M"]),
        min(triton.cdiv(n, meta["BLOCK_N"]), column_programs),
    )
    _ENTROPY_KERNELS[ops.kernel_class][grid](
        ops.teacher_x, ops.teacher_y, b, row_lse, col_lse, partials, m, n, size_class(m),
        size_class(n), ops.teacher_dims,
        ops.teacher_strides, COLUMNS=columns, **ops.flags(),
    )  # fmt: skip
    sums = partials.sum(dim=0, dtype=torch.float64)
    return sums[0], (sums[1] if columns else None)
