"""What the loss kernel families share: the tile dot, p ln p, the dot flavour of a dtype,
the autotune candidates, one dtype for all operands and the size of a gradient chunk.

Tunables that tests shrink (``GRAD_CHUNK_BYTES``, ``COLUMN_PROGRAMS``, ``SPLIT_COLUMNS``) are
read through this module at call time, so patching them here reaches every family.
"""

import torch
import triton
import triton.language as tl

from . import INTERPRETING

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Budget of the [chunk, N] gradient block a backward materialises before its two GEMMs.
GRAD_CHUNK_BYTES = 1 << 29
# Column programs per row block in the kernels that loop over column tiles; each loops over
# its share of the tiles, so its partial sums stay O(m) however large N is.
COLUMN_PROGRAMS = 64
# Programs a row-statistics launch aims for when its row blocks alone are too few: four waves
# of the H100's and H200's 132 SMs at one block per SM (the statistics kernels' 200-250
# registers per thread leave room for one 8-warp block; bench/cost_model.py prices it).
FILL_PROGRAMS = 4 * 132
# Fewest columns per column split of a row-statistics launch: one tile of the widest BLOCK_N,
# so that every split has a tile to sweep.
SPLIT_COLUMNS = 128
# The interpreter runs one fixed configuration; CUDA autotunes over candidates whose
# smallest row block is 64.
INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 32}
SMALLEST_BLOCK = INTERPRETER_BLOCKS["BLOCK_M"] if INTERPRETING else 64


@triton.jit
def dot_tile(
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
def xlogx(p):
    """p ln p with 0 ln 0 = 0."""
    return tl.where(p > 0, p * tl.log2(p) * 0.6931471805599453, 0.0)


def autotuned(kernel, shapes: tuple, key: list[str], reset: list[str]):
    """CUDA autotuning over (BLOCK_M, BLOCK_N, BLOCK_D, warps, stages) candidates."""
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bm, bn, bd, w, s in shapes
    ]
    return triton.autotune(configs, key=key, reset_to_zero=reset)(kernel)


def dot_flags(dtype: torch.dtype) -> dict:
    """The constexprs of ``dot_tile`` for operands of ``dtype``: under the interpreter
    tl.dot is numpy fp32 (operands upcast); on CUDA fp32 takes 3xTF32, which keeps fp32
    accuracy, and bf16/fp16 the plain tensor-core dot."""
    return {
        "UPCAST": INTERPRETING,
        "FP32_DOT": INTERPRETING or dtype == torch.float32,
        "DOT_PRECISION": "ieee" if INTERPRETING else "tf32x3",
    }


def block_args() -> dict:
    """The fixed blocks of an interpreted launch (CUDA launches autotune them)."""
    return dict(INTERPRETER_BLOCKS) if INTERPRETING else {}


def one_dtype(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Operands of one tl.dot flavour: their shared fp32/half dtype, else fp32 (float64 too:
    the kernels compute in fp32)."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) <= 1 and torch.float64 not in dtypes:
        return list(tensors)
    return [t.float() for t in tensors]


def size_class(n: int) -> int:
    """The power of two >= n the autotuners key on: a last, shorter batch of an epoch (or
    any size within the class) reuses the tuned configuration instead of re-tuning."""
    return triton.next_power_of_2(max(n, 1))


def grad_chunk_rows(m: int, n: int, element_size: int) -> int:
    """Rows of an [rows, n] gradient block materialised at once: at most GRAD_CHUNK_BYTES
    (whole blocks of rows), and all m rows for small problems."""
    rows = GRAD_CHUNK_BYTES // (n * element_size) // SMALLEST_BLOCK * SMALLEST_BLOCK
    return min(m, max(SMALLEST_BLOCK, rows))


def column_splits(m: int, n: int) -> int:
    """Column splits of a row-statistics launch over m rows and n columns: enough that the
    row blocks times the splits reach FILL_PROGRAMS, at most COLUMN_PROGRAMS, and at least
    SPLIT_COLUMNS columns each. A function of (m, n) alone, whatever blocks autotuning picks."""
    wanted = triton.cdiv(FILL_PROGRAMS, triton.cdiv(m, SMALLEST_BLOCK))
    return max(1, min(wanted, triton.cdiv(n, SPLIT_COLUMNS), COLUMN_PROGRAMS))


def strides(tensors: list[torch.Tensor]) -> tuple[int, ...]:
    """The strides of 2-D tensors, flattened: (rows, dim) of each in turn."""
    return tuple(s for tensor in tensors for s in tensor.stride())
