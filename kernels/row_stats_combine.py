"""Triton kernel merging the partial row statistics of a column-split launch; raw tensors.

The affinity statistics kernel runs on a 2-D grid (row blocks x column splits) so that
local-loss shapes with few row blocks still fill the machine; each split leaves its rows'
running maxima and sums (log2 units) over its share of the columns, and this small kernel
merges them by log-sum-exp: the maxima first, then each split's sums rescaled to them.
"""

import torch
import triton
import triton.language as tl

BLOCK = 256  # rows per program (4 warps, 2 rows per thread)


def partial_fields(num_teachers: int) -> int:
    """Rows of a split's partials: max_a, sum_a, target_a, then per teacher max_b, sum_b,
    sum P A and (K = 1) sum P B."""
    return 3 + 4 * num_teachers


@triton.jit
def _combine_row_stats_kernel(
    partial_ptr,  # [splits, 3 + 4K, m] fp32: the statistics kernel's partials
    # [2 + 2K (+ 1 if K = 1), m] fp32, natural log units: lse_a, target_a, lse_b of each
    # teacher, p_dot_a of each teacher, and for one teacher p_dot_b
    row_out_ptr,
    m, splits,
    NUM_TEACHERS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Log-sum-exp merge of the column splits' partial row statistics: the maxima first,
    then each split's sums rescaled to them (a split without tiles has max -inf, sum 0)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < m
    fields = 3 + 4 * NUM_TEACHERS
    max_a = tl.full((BLOCK,), float("-inf"), tl.float32)
    maxima = ()
    for _ in tl.static_range(NUM_TEACHERS):
        maxima = maxima + (max_a,)
    part = partial_ptr + rows
    for _ in range(0, splits):
        max_a = tl.maximum(max_a, tl.load(part, mask=row_ok, other=0.0))
        merged = ()
        for k in tl.static_range(NUM_TEACHERS):
            split_max = tl.load(part + (3 + 4 * k) * m, mask=row_ok, other=0.0)
            merged = merged + (tl.maximum(maxima[k], split_max),)
        maxima = merged
        part += fields * m
    # Rows whose splits all hold -inf keep it: their sums (0) then give lse -inf, as one pass.
    max_a = tl.where(max_a == float("-inf"), 0.0, max_a)
    sum_a = tl.zeros((BLOCK,), tl.float32)
    target_a = tl.zeros((BLOCK,), tl.float32)
    states = ()
    for k in tl.static_range(NUM_TEACHERS):
        zeros = tl.zeros((BLOCK,), tl.float32)
        states = states + (
            (tl.where(maxima[k] == float("-inf"), 0.0, maxima[k]), zeros, zeros, zeros),
        )
    part = partial_ptr + rows
    for _ in range(0, splits):
        rescale = tl.exp2(tl.load(part, mask=row_ok, other=0.0) - max_a)
        sum_a += tl.load(part + m, mask=row_ok, other=0.0) * rescale
        target_a += tl.load(part + 2 * m, mask=row_ok, other=0.0)
        merged = ()
        for k in tl.static_range(NUM_TEACHERS):
            max_b, sum_b, w_a, w_b = states[k]
            rescale = tl.exp2(tl.load(part + (3 + 4 * k) * m, mask=row_ok, other=0.0) - max_b)
            sum_b += tl.load(part + (4 + 4 * k) * m, mask=row_ok, other=0.0) * rescale
            w_a += tl.load(part + (5 + 4 * k) * m, mask=row_ok, other=0.0) * rescale
            if NUM_TEACHERS == 1:
                w_b += tl.load(part + 6 * m, mask=row_ok, other=0.0) * rescale
            merged = merged + ((max_b, sum_b, w_a, w_b),)
        states = merged
        part += fields * m
    ln2 = 0.6931471805599453
    tl.store(row_out_ptr + rows, (max_a + tl.log2(sum_a)) * ln2, mask=row_ok)
    tl.store(row_out_ptr + m + rows, target_a * ln2, mask=row_ok)
    # Teacher k: lse_b into row 2 + k, p_dot_a into row 2 + K + k; (K = 1) p_dot_b row 4.
    for k in tl.static_range(NUM_TEACHERS):
        max_b, sum_b, w_a, w_b = states[k]
        tl.store(row_out_ptr + (2 + k) * m + rows, (max_b + tl.log2(sum_b)) * ln2, mask=row_ok)
        tl.store(row_out_ptr + (2 + NUM_TEACHERS + k) * m + rows, w_a / sum_b * ln2, mask=row_ok)
        if NUM_TEACHERS == 1:
            tl.store(row_out_ptr + 4 * m + rows, w_b / sum_b * ln2, mask=row_ok)


def combine_row_stats(partials: torch.Tensor, row_out: torch.Tensor) -> None:
    """Merge ``partials`` [splits, 3 + 4K, m] into ``row_out`` [2 + 2K (+ 1 if K = 1), m]."""
    splits, fields, m = partials.shape
    _combine_row_stats_kernel[(triton.cdiv(m, BLOCK),)](
        partials, row_out, m, splits, NUM_TEACHERS=(fields - 3) // 4, BLOCK=BLOCK
    )
