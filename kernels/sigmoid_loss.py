"""Triton kernels of the sigmoid (SigLIP) loss family; raw tensors in and out.

Student logits A = a X Y^T + c and the logits B_k = b_k Xt_k Yt_k^T + c_k of K <= 4 teachers
are only ever formed one [BLOCK_M, BLOCK_N] tile at a time. No term normalises over a row or
a column, so one pass over the tiles gives both the loss and dL/dA, which is elementwise: the
kernel sums the loss of its tiles and, with GRAD, writes G = w_c g_c + w_d g_d for a chunk of
rows (<= 512 MB); two cuBLAS GEMMs per chunk then give G Y and G^T X at the full tensor-core
rate. The gradient is produced in the forward: a training step then costs (1 + K) tile GEMMs
plus 2 gradient GEMMs, where recomputing the tiles in the backward would cost 2 (1 + K) + 2,
i.e. write-in-forward saves (1 + K) / (4 + 2K) of the matmul work (a third for one teacher)
for O((m + N) d) memory, which the gradients need anyway.

Per element, with e = exp(-|A|), s(-|A|) = e / (1 + e) and log(1 + e) (the softplus form,
exact for any |A|) and p = mean_k s(B_k), q = mean_k s(-B_k) (each from its small side):
  contrastive  -log s(zA) = relu(-zA) + log(1 + e),   g_c = s(A) - [z = +1]
  bce          p relu(-A) + q relu(A) + log(1 + e),     g_d = s(A) - p
  kl           bce + p log p + q log q (the teacher's binary entropy removed; same g_d)
  mobileclip   -log s(tA) with t = p - q = 2p - 1,       g_d = -t s(-tA)
G is stored without the 1/n of the mean and without the scale a, which the caller applies in
fp32: |G| <= |w_c| + |w_d| keeps fp16's resolution where G / n would sink into subnormals.
"""

import torch
import triton
import triton.language as tl

from . import INTERPRETING, common
from .common import (
    autotuned,
    block_args,
    dot_flags,
    dot_tile,
    grad_chunk_rows,
    one_dtype,
    size_class,
    xlogx,
)
from .common import strides as flat_strides
from .limits import MAX_TEACHERS

KINDS = {"bce": 1, "kl": 2, "mobileclip": 3}

# Rows per launch without gradient: bounds the per-program partial sums (1 MB).
_LOSS_CHUNK_ROWS = 1 << 16
_PARTIALS = 4  # loss_c, loss_d, sum G, sum G * X Y^T


@triton.jit
def _softplus_parts(z):
    """(s(-|z|), log(1 + exp(-|z|))) of a tile, through exp2/log2: both exact for any |z|."""
    e = tl.exp2(-tl.abs(z) * 1.4426950408889634)
    return e / (1.0 + e), tl.log2(1.0 + e) * 0.6931471805599453


@triton.jit
def _teacher_probs(
    teacher_x, teacher_y, teacher_dims, teacher_strides, affine_ptr, index: tl.constexpr,
    block_row, col_start, row_end, n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """(s(B), s(-B)) of teacher ``index``'s tile, each computed from its small side; its
    strides are entries 4 index .. 4 index + 3 of ``teacher_strides``."""
    dots = dot_tile(
        teacher_x[index], teacher_y[index], block_row, col_start, row_end, n,
        teacher_dims[index], teacher_strides[4 * index], teacher_strides[4 * index + 1],
        teacher_strides[4 * index + 2], teacher_strides[4 * index + 3],
        BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, FP32_DOT, DOT_PRECISION,
    )  # fmt: skip
    logits = tl.load(affine_ptr + 2 * index) * dots + tl.load(affine_ptr + 2 * index + 1)
    e = tl.exp2(-tl.abs(logits) * 1.4426950408889634)
    small = e / (1.0 + e)
    big = 1.0 - small
    positive = logits >= 0
    return tl.where(positive, big, small), tl.where(positive, small, big)


@triton.jit
def _sigmoid_loss_kernel(
    x_ptr, y_ptr, affine_ptr,  # affine: [2] fp32 (a, c)
    teacher_x, teacher_y,  # K-tuples (at least one entry) of teacher row / column features
    teacher_affine_ptr,  # [K, 2] fp32 (b_k, c_k)
    grad_ptr,  # [chunk, n] contiguous, features' dtype: G of rows row_start + [0, chunk)
    partial_ptr,  # [programs, 4] fp32, summed over chunks: loss_c, loss_d, sum G, sum G XY^T
    n, n_class, d_s, teacher_dims, label_offset, row_start, chunk,  # n_class: autotune key
    stride_xm, stride_xd, stride_ym, stride_yd,
    teacher_strides,  # 4K-tuple: per teacher its rows' and columns' (row, dim) strides
    weight_c, weight_d,
    NUM_TEACHERS: tl.constexpr, CONTRASTIVE: tl.constexpr, KIND: tl.constexpr,
    GRAD: tl.constexpr, UPCAST: tl.constexpr, FP32_DOT: tl.constexpr,
    TEACHER_FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    block_row = row_start + pid_m * BLOCK_M
    row_end = row_start + chunk
    rows = block_row + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    scale = tl.load(affine_ptr)
    bias = tl.load(affine_ptr + 1)
    sum_c = 0.0
    sum_d = 0.0
    sum_g = 0.0
    sum_gd = 0.0
    column_programs = tl.num_programs(1)
    for step in range(0, tl.cdiv(tl.cdiv(n, BLOCK_N) - pid_n, column_programs)):
        col_start = (pid_n + step * column_programs) * BLOCK_N
        cols = col_start + tl.arange(0, BLOCK_N)
        ok = row_ok[:, None] & (cols < n)[None, :]
        # Teacher tiles first: only their mean probabilities stay live beside the student's.
        if KIND > 0:
            p = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            q = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for k in tl.static_range(NUM_TEACHERS):
                p_k, q_k = _teacher_probs(
                    teacher_x, teacher_y, teacher_dims, teacher_strides, teacher_affine_ptr, k,
                    block_row, col_start, row_end, n,
                    BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, TEACHER_FP32_DOT, DOT_PRECISION,
                )  # fmt: skip
                p += p_k
                q += q_k
            if NUM_TEACHERS > 1:
                p = p * (1.0 / NUM_TEACHERS)
                q = q * (1.0 / NUM_TEACHERS)
            if KIND == 2:
                # The teacher entropy needs no student tile: summed before the student's dot.
                sum_d += tl.sum(tl.sum(tl.where(ok, xlogx(p) + xlogx(q), 0.0), axis=1), axis=0)
        dots = dot_tile(
            x_ptr, y_ptr, block_row, col_start, row_end, n, d_s,
            stride_xm, stride_xd, stride_ym, stride_yd,
            BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, FP32_DOT, DOT_PRECISION,
        )  # fmt: skip
        logits = scale * dots + bias
        small, soft = _softplus_parts(logits)  # s(-|A|), log(1 + exp(-|A|))
        positive = logits >= 0
        relu_pos = tl.where(positive, logits, 0.0)
        relu_neg = relu_pos - logits
        grad = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if CONTRASTIVE:
            label = cols[None, :] == (rows + label_offset)[:, None]
            loss = tl.where(label, relu_neg, relu_pos) + soft
            sum_c += tl.sum(tl.sum(tl.where(ok, loss, 0.0), axis=1), axis=0)
            # s(A) - [positive pair], each branch from the small side of the sigmoid.
            grad = tl.where(
                label,
                tl.where(positive, -small, small - 1.0),
                tl.where(positive, 1.0 - small, small),
            ) * weight_c  # fmt: skip
        if KIND > 0:
            if KIND == 3:
                target = p - q
                u = target * logits
                small_u, soft_u = _softplus_parts(u)
                loss_d = tl.where(u >= 0, 0.0, -u) + soft_u
                grad_d = -target * tl.where(u >= 0, small_u, 1.0 - small_u)
            else:
                loss_d = p * relu_neg + q * relu_pos + soft
                grad_d = tl.where(positive, q - small, small - p)
            sum_d += tl.sum(tl.sum(tl.where(ok, loss_d, 0.0), axis=1), axis=0)
            grad += grad_d * weight_d
        if GRAD:
            grad = tl.where(ok, grad, 0.0)
            sum_g += tl.sum(tl.sum(grad, axis=1), axis=0)
            sum_gd += tl.sum(tl.sum(grad * dots, axis=1), axis=0)
            # 64-bit block origin, 32-bit in-tile offsets.
            tile_ptr = grad_ptr + (pid_m * BLOCK_M).to(tl.int64) * n + col_start
            tl.store(
                tile_ptr + tl.arange(0, BLOCK_M)[:, None] * n + tl.arange(0, BLOCK_N)[None, :],
                grad.to(grad_ptr.dtype.element_ty),
                mask=ok,
            )
    # Each program owns its slot: chunks launched one after another add up without atomics.
    slot = partial_ptr + (pid_m * column_programs + pid_n) * 4
    tl.store(slot, tl.load(slot) + sum_c)
    tl.store(slot + 1, tl.load(slot + 1) + sum_d)
    tl.store(slot + 2, tl.load(slot + 2) + sum_g)
    tl.store(slot + 3, tl.load(slot + 3) + sum_gd)


# Candidates that compile without register spills on sm_90 with triton 3.6 and 3.8 (ptxas -v
# of the ahead-of-time compiles: bench/sm90_report.py --families sigmoid_loss). 8 warps: the
# [BLOCK, BLOCK_D] 64-bit pointer tiles of the operand loads alone take 64 registers per
# thread at 4 warps; teacher tiles keep p and q live beside the student's tile.
_CONTRASTIVE_SHAPES = ((64, 64, 64, 8, 3), (128, 64, 32, 8, 4), (64, 128, 32, 8, 4))
_DISTILL_SHAPES = ((64, 64, 32, 8, 4), (64, 64, 32, 8, 3), (64, 64, 64, 8, 2))
# fp32 operands (3xTF32 keeps hi and lo halves live) need smaller tiles: 64 x 64 x 64 spills
# alone on triton 3.6, and beside four teacher tiles everything wider than 64 x 32 x 16 does.
_CONTRASTIVE_FP32_SHAPES = ((64, 64, 32, 8, 3), (64, 32, 32, 8, 3), (64, 64, 16, 8, 4))
_DISTILL_FP32_SHAPES = ((64, 32, 16, 8, 4), (64, 32, 16, 8, 3))
_KEY = ["n_class", "d_s", "teacher_dims", "NUM_TEACHERS", "KIND", "GRAD"]

if INTERPRETING:
    _contrastive_kernel = _distill_kernel = _sigmoid_loss_kernel
    _contrastive_fp32_kernel = _distill_fp32_kernel = _sigmoid_loss_kernel
else:
    _contrastive_kernel, _distill_kernel, _contrastive_fp32_kernel, _distill_fp32_kernel = (
        autotuned(_sigmoid_loss_kernel, shapes, _KEY, ["partial_ptr"])
        for shapes in (
            _CONTRASTIVE_SHAPES, _DISTILL_SHAPES, _CONTRASTIVE_FP32_SHAPES, _DISTILL_FP32_SHAPES
        )
    )  # fmt: skip


def _chunk_rows(m: int, n: int, element_size: int, grad: bool) -> int:
    """Rows per launch: a G chunk of at most ~512 MB with gradients, else a bounded count."""
    return grad_chunk_rows(m, n, element_size) if grad else min(m, _LOSS_CHUNK_ROWS)


def sigmoid_loss_tiles(
    rows: torch.Tensor,
    cols: torch.Tensor,
    affine: torch.Tensor,
    teachers: list[tuple[torch.Tensor, torch.Tensor]],
    teacher_affine: torch.Tensor | None,
    *,
    contrastive: bool,
    kind: str | None,
    weights: tuple[float, float],
    label_offset: int = 0,
    grad: bool,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Loss sums and, with ``grad``, the raw gradient products of the sigmoid losses.

    affine = (a, c), teacher_affine[k] = (b_k, c_k); ``kind`` is None (no distillation) or a
    key of KINDS. Returns ``sums`` (fp64 [4]: sum_ij l^c_ij, sum_ij l^d_ij, sum_ij G_ij,
    sum_ij G_ij (X Y^T)_ij) and ``(G Y, G^T X)`` with G = w_c g_c + w_d g_d, so that
    S = w_c sum l^c + w_d sum l^d has dS/dX = a G Y, dS/dY = a G^T X, dS/da = sums[3],
    dS/dc = sums[2].
    """
    if len(teachers) > MAX_TEACHERS:
        raise ValueError(f"at most {MAX_TEACHERS} teachers, got {len(teachers)}")
    m, n = rows.shape[0], cols.shape[0]
    device = rows.device
    rows, cols = one_dtype([rows, cols])
    flat = one_dtype([t for pair in teachers for t in pair])
    num_teachers = len(teachers) if kind is not None else 0
    # Without distillation the teacher tuples hold the student once, never read.
    pairs = flat[: 2 * num_teachers] or [rows, cols]
    teacher_dims = tuple(t.shape[1] for t in pairs[::2])
    student_flags = dot_flags(rows.dtype)
    teacher_fp32 = dot_flags(pairs[0].dtype)["FP32_DOT"]
    affine = affine.reshape(2).to(device=device, dtype=torch.float32)
    teacher_affine = (
        teacher_affine.reshape(-1, 2).to(device=device, dtype=torch.float32).contiguous()
        if num_teachers
        else affine
    )
    chunk = _chunk_rows(m, n, rows.element_size(), grad)
    column_programs = common.COLUMN_PROGRAMS
    partials = torch.zeros(
        triton.cdiv(chunk, common.SMALLEST_BLOCK) * column_programs, _PARTIALS,
        dtype=torch.float32, device=device,
    )  # fmt: skip
    g_chunk = torch.empty(chunk, n, dtype=rows.dtype, device=device) if grad else partials
    dx = torch.empty(m, rows.shape[1], dtype=rows.dtype, device=device) if grad else None
    dy = part = None
    if grad and chunk < m:
        # Several chunks sum into fp32; their products land in one reused buffer.
        dy = torch.zeros(n, cols.shape[1], dtype=torch.float32, device=device)
        part = torch.empty(n, cols.shape[1], dtype=rows.dtype, device=device)
    fp32 = student_flags["FP32_DOT"] or (num_teachers > 0 and teacher_fp32)
    kernel = {
        (False, False): _contrastive_kernel, (False, True): _contrastive_fp32_kernel,
        (True, False): _distill_kernel, (True, True): _distill_fp32_kernel,
    }[(num_teachers > 0, fp32)]  # fmt: skip
    for start in range(0, m, chunk):
        size = min(chunk, m - start)
        grid = lambda meta, size=size: (
            triton.cdiv(size, meta["BLOCK_M"]),
            min(triton.cdiv(n, meta["BLOCK_N"]), column_programs),
        )
        kernel[grid](
            rows, cols, affine, tuple(pairs[0::2]), tuple(pairs[1::2]), teacher_affine, g_chunk,
            partials, n, size_class(n), rows.shape[1], teacher_dims, label_offset, start, size,
            *flat_strides([rows, cols]), flat_strides(pairs), float(weights[0]),
            float(weights[1]), NUM_TEACHERS=max(num_teachers, 1), CONTRASTIVE=contrastive,
            KIND=KINDS[kind] if num_teachers else 0, GRAD=grad,
            TEACHER_FP32_DOT=teacher_fp32, **student_flags, **block_args(),
        )  # fmt: skip
        if not grad:
            continue
        g = g_chunk[:size]
        torch.matmul(g, cols, out=dx[start : start + size])
        if dy is None:
            dy = g.T @ rows
        else:
            torch.matmul(g.T, rows[start : start + size], out=part)
            dy += part
    sums = partials.sum(dim=0, dtype=torch.float64)
    return sums, ((dx, dy) if grad else None)
