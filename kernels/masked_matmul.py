"""Masked structured-pruning matmul: y = ((x * in_mask) @ W^T + b) * out_mask, and its backward.

Channels whose mask is exactly zero are skipped: the launchers take index vectors of the
kept channels (any pattern, not block-aligned) and the kernels gather operands and scatter
results through them, so the work scales with the kept fraction. Masks are applied to the
weight tile in the prologue and to the accumulator in the epilogue; no masked copy of x, dy
or W is made. Pruned output columns are written as zeros by extra programs of the same launch.

Index/scale conventions (all launchers): ``*_kept`` int64 indices of kept channels or None
(every channel kept, the kernels then load contiguously); ``*_pruned`` int64 indices of the
zero channels or None; ``*_scale`` float32 [C] per-channel mask value (groups expanded) or
None (no mask). fp16/bf16/fp32 operands, fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRETING

# Under the interpreter one fixed, small config (no benchmarking there; tiny test shapes
# still get several blocks per dimension). On CUDA the autotuner picks.
if INTERPRETING:
    _MATMUL_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16})]
    _WGRAD_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_T": 16})]
else:
    _MATMUL_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 256, 64, 8, 3),
            (256, 128, 64, 8, 3),
            (128, 128, 64, 4, 4),
            (128, 128, 64, 8, 3),
            (128, 128, 32, 4, 4),
            (64, 128, 64, 4, 4),
            (128, 64, 64, 4, 4),
        ]
    ]
    _WGRAD_CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_T": bt}, num_warps=w, num_stages=s)
        for bn, bk, bt, w, s in [
            (128, 128, 64, 8, 3),
            (128, 128, 32, 4, 4),
            (128, 256, 32, 8, 3),
            (256, 128, 32, 8, 3),
            (64, 128, 64, 4, 4),
            (128, 64, 64, 4, 4),
        ]
    ]

# The autotuner keys on power-of-two size classes: the kept counts change at every mask
# update, and tuning per exact count would re-benchmark at every training step.
_KEY = ["m_class", "n_class", "k_class", "DOT_FP32", "INPUT_PRECISION"]
# Weight-gradient split over tokens: enough programs to fill the card a few times over,
# but every split keeps at least this many tokens to amortise its atomic epilogue.
_MIN_TOKENS_PER_SPLIT = 2048
_WAVES = 4


@triton.autotune(configs=_MATMUL_CONFIGS, key=_KEY)
@triton.jit
def _gathered_matmul_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr,
    k_kept_ptr, k_scale_ptr, n_kept_ptr, n_pruned_ptr, n_scale_ptr,
    M, K_kept, N_kept, N_pruned,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    m_class, n_class, k_class,
    HAS_BIAS: tl.constexpr, HAS_K_SCALE: tl.constexpr, HAS_N_SCALE: tl.constexpr,
    DENSE_K: tl.constexpr, DENSE_N: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C[m, n'] = (sum_k A[m, k'] * k_scale[k'] * B[k', n'] + bias[n']) * n_scale[n'].

    k' = k_kept[k], n' = n_kept[n] (channel indices); A [M, *], C [M, *] row-major,
    B addressed as b_ptr + k' * stride_bk + n' * stride_bn (the weight, either way round).
    Program (pid_n, pid_m): pid_n below the kept blocks computes a tile; above, it writes
    zeros into the pruned columns n_pruned of its rows. fp32 accumulate.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    kept_blocks = tl.cdiv(N_kept, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows_a = offs_m.to(tl.int64) * stride_am
    rows_c = offs_m.to(tl.int64) * stride_cm
    if pid_n < kept_blocks:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_kept
        if DENSE_N:
            cols_n = offs_n.to(tl.int64)
        else:
            cols_n = tl.load(n_kept_ptr + offs_n, mask=mask_n, other=0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K_kept, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K_kept
            if DENSE_K:
                cols_k = offs_k.to(tl.int64)
            else:
                cols_k = tl.load(k_kept_ptr + offs_k, mask=mask_k, other=0)
            a = tl.load(
                a_ptr + rows_a[:, None] + cols_k[None, :] * stride_ak,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            b = tl.load(
                b_ptr + cols_k[:, None] * stride_bk + cols_n[None, :] * stride_bn,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            if HAS_K_SCALE:
                # The mask of the reduction dimension scales the (small) weight tile.
                k_scale = tl.load(k_scale_ptr + cols_k, mask=mask_k, other=0.0)
                b = b.to(tl.float32) * k_scale[:, None]
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            else:
                b = b.to(a.dtype)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_N_SCALE:
            acc *= tl.load(n_scale_ptr + cols_n, mask=mask_n, other=0.0)[None, :]
        tl.store(
            c_ptr + rows_c[:, None] + cols_n[None, :] * stride_cn,
            acc.to(c_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_n[None, :],
        )
    else:
        offs_z = (pid_n - kept_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_z = offs_z < N_pruned
        cols_z = tl.load(n_pruned_ptr + offs_z, mask=mask_z, other=0)
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=c_ptr.dtype.element_ty)
        tl.store(
            c_ptr + rows_c[:, None] + cols_z[None, :] * stride_cn,
            zeros,
            mask=mask_m[:, None] & mask_z[None, :],
        )


@triton.autotune(
    configs=_WGRAD_CONFIGS, key=_KEY, reset_to_zero=["dw_ptr", "d_in_ptr", "d_out_ptr", "db_ptr"]
)
@triton.jit
def _masked_weight_grad_kernel(
    dy_ptr, x_ptr, w_ptr, dw_ptr, d_in_ptr, d_out_ptr, db_ptr,
    in_kept_ptr, in_scale_ptr, out_kept_ptr, out_scale_ptr,
    M, K, K_kept, N_kept, tokens_per_split,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk,
    m_class, n_class, k_class,
    HAS_IN_SCALE: tl.constexpr, HAS_OUT_SCALE: tl.constexpr,
    DENSE_IN: tl.constexpr, DENSE_OUT: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    NEED_D_IN: tl.constexpr, NEED_D_OUT: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """G = dy[:, out_kept]^T x[:, in_kept] over one token split, and everything derived from it.

    Program (pid_k, pid_n, split) accumulates a [BLOCK_N, BLOCK_K] tile of G in fp32, then
    atomically adds into fp32 buffers (pruned rows/columns are never touched, stay zero):
      dw[o', i']   += G * out_scale[o'] * in_scale[i']                       (dw [N, K])
      d_in[i']     += sum_o G * W[o', i'] * out_scale[o']     (in_mask gradient per channel)
      d_out[o']    += sum_i G * W[o', i'] * in_scale[i']     (out_mask gradient, bias term aside)
      db[o']       += sum_t dy[t, o']                         (by the pid_k == 0 programs)
    """
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_kept
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K_kept
    if DENSE_OUT:
        rows_n = offs_n.to(tl.int64)
    else:
        rows_n = tl.load(out_kept_ptr + offs_n, mask=mask_n, other=0)
    if DENSE_IN:
        cols_k = offs_k.to(tl.int64)
    else:
        cols_k = tl.load(in_kept_ptr + offs_k, mask=mask_k, other=0)

    t_start = pid_s * tokens_per_split
    t_end = tl.minimum(M, t_start + tokens_per_split)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask_t = offs_t < t_end
        dy = tl.load(
            dy_ptr + offs_t[:, None] * stride_dym + rows_n[None, :] * stride_dyn,
            mask=mask_t[:, None] & mask_n[None, :],
            other=0.0,
        )
        x = tl.load(
            x_ptr + offs_t[:, None] * stride_xm + cols_k[None, :] * stride_xk,
            mask=mask_t[:, None] & mask_k[None, :],
            other=0.0,
        )
        if NEED_DB:
            if pid_k == 0:
                db_acc += tl.sum(dy.to(tl.float32), axis=0)
        if DOT_FP32:
            dy = dy.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=INPUT_PRECISION)

    mask_nk = mask_n[:, None] & mask_k[None, :]
    # An absent mask scales by one: a few multiplies per tile, once per program.
    out_scale = tl.full((BLOCK_N,), 1.0, tl.float32)
    in_scale = tl.full((BLOCK_K,), 1.0, tl.float32)
    if HAS_OUT_SCALE:
        out_scale = tl.load(out_scale_ptr + rows_n, mask=mask_n, other=0.0)
    if HAS_IN_SCALE:
        in_scale = tl.load(in_scale_ptr + cols_k, mask=mask_k, other=0.0)
    gw_out = acc * out_scale[:, None]
    if NEED_DW:
        tl.atomic_add(
            dw_ptr + rows_n[:, None] * K + cols_k[None, :],
            gw_out * in_scale[None, :],
            mask=mask_nk,
            sem="relaxed",
        )
    if NEED_D_IN or NEED_D_OUT:
        w = tl.load(
            w_ptr + rows_n[:, None] * stride_wn + cols_k[None, :] * stride_wk,
            mask=mask_nk,
            other=0.0,
        ).to(tl.float32)
        if NEED_D_IN:
            tl.atomic_add(d_in_ptr + cols_k, tl.sum(gw_out * w, axis=0), mask=mask_k, sem="relaxed")
        if NEED_D_OUT:
            d_out = tl.sum(acc * in_scale[None, :] * w, axis=1)
            tl.atomic_add(d_out_ptr + rows_n, d_out, mask=mask_n, sem="relaxed")
    if NEED_DB:
        if pid_k == 0:
            tl.atomic_add(db_ptr + rows_n, db_acc, mask=mask_n, sem="relaxed")


def _size_class(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def _dot_settings(dtype: torch.dtype) -> dict:
    """tl.dot flags: fp32 upcast under the interpreter; fp32 exact unless torch allows TF32."""
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {
        "DOT_FP32": INTERPRETING,
        "INPUT_PRECISION": "ieee" if dtype == torch.float32 and not tf32 else "tf32",
    }


def _placeholders(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64, float32) stand-ins for absent index/scale vectors: typed for compilation,
    never dereferenced (the matching flag is off or the index list is empty)."""
    return (
        torch.empty(1, device=device, dtype=torch.int64),
        torch.empty(1, device=device, dtype=torch.float32),
    )


def _count(kept: torch.Tensor | None, pruned: torch.Tensor | None, size: int) -> tuple[int, int]:
    if kept is None:
        return size, 0
    return kept.numel(), pruned.numel()


def _gathered_matmul(a, b, b_strides, bias, n_size, k_kept, k_scale, n_kept, n_pruned, n_scale):
    """The shared launch of forward and input-gradient: C [M, n_size] in a's dtype."""
    m = a.shape[0]
    k_count = a.shape[1] if k_kept is None else k_kept.numel()
    n_count, n_zero = _count(n_kept, n_pruned, n_size)
    c = torch.empty((m, n_size), device=a.device, dtype=a.dtype)
    if m == 0:
        return c

    def grid(meta):
        blocks = triton.cdiv(n_count, meta["BLOCK_N"]) + triton.cdiv(n_zero, meta["BLOCK_N"])
        return (blocks, triton.cdiv(m, meta["BLOCK_M"]))

    index, scale = _placeholders(a.device)
    _gathered_matmul_kernel[grid](
        a, b, bias if bias is not None else c, c,
        k_kept if k_kept is not None else index,
        k_scale if k_scale is not None else scale,
        n_kept if n_kept is not None else index,
        n_pruned if n_pruned is not None else index,
        n_scale if n_scale is not None else scale,
        m, k_count, n_count, n_zero,
        a.stride(0), a.stride(1), b_strides[0], b_strides[1], c.stride(0), c.stride(1),
        _size_class(m), _size_class(n_count), _size_class(k_count),
        HAS_BIAS=bias is not None, HAS_K_SCALE=k_scale is not None,
        HAS_N_SCALE=n_scale is not None, DENSE_K=k_kept is None, DENSE_N=n_kept is None,
        **_dot_settings(a.dtype),
    )  # fmt: skip
    return c


def masked_matmul_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    in_kept: torch.Tensor | None,
    in_pruned: torch.Tensor | None,
    in_scale: torch.Tensor | None,
    out_kept: torch.Tensor | None,
    out_pruned: torch.Tensor | None,
    out_scale: torch.Tensor | None,
) -> torch.Tensor:
    """y [M, N] = ((x * in_scale) @ weight^T + bias) * out_scale on kept channels, 0 on pruned.

    x [M, K], weight [N, K], bias [N] in one dtype. ``in_pruned`` is unused here (pruned
    inputs are simply not read) and taken for a uniform signature.
    """
    return _gathered_matmul(
        x, weight, (weight.stride(1), weight.stride(0)), bias, weight.shape[0],
        in_kept, in_scale, out_kept, out_pruned, out_scale,
    )  # fmt: skip


def _weight_grad_splits(m: int, tiles: int, device: torch.device) -> int:
    if INTERPRETING or device.type != "cuda":
        return 1
    programs = _WAVES * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(programs, max(tiles, 1)), m // _MIN_TOKENS_PER_SPLIT))


def masked_matmul_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    in_kept: torch.Tensor | None,
    in_pruned: torch.Tensor | None,
    in_scale: torch.Tensor | None,
    out_kept: torch.Tensor | None,
    out_pruned: torch.Tensor | None,
    out_scale: torch.Tensor | None,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    need_d_in: bool,
    need_d_out: bool,
    weight_grad_splits: int | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """(dx, dw, db_raw, d_in, d_out) of y = ((x * in_scale) W^T + b) * out_scale, each or None.

    dx [M, K] = ((dy * out_scale) W) * in_scale (x's dtype, zero on pruned inputs);
    dw [N, K] = (dy * out_scale)^T (x * in_scale) (weight's dtype, zero on pruned rows/columns);
    db_raw [N] = sum_t dy; d_in [K] = sum_t x * ((dy * out_scale) W); d_out [N] = sum_t dy *
    (x * in_scale) W^T without the bias term (fp32, zero on pruned channels). The weight-side
    results come from one kernel reducing over tokens in ``weight_grad_splits`` parts (auto).
    """
    n_out, k_in = weight.shape
    dx = dw = db = d_in = d_out = None
    if need_dx:
        dx = _gathered_matmul(
            dy, weight, (weight.stride(0), weight.stride(1)), None, k_in,
            out_kept, out_scale, in_kept, in_pruned, in_scale,
        )  # fmt: skip
    if not (need_dw or need_db or need_d_in or need_d_out):
        return dx, dw, db, d_in, d_out
    m = x.shape[0]
    k_count, _ = _count(in_kept, in_pruned, k_in)
    n_count, _ = _count(out_kept, out_pruned, n_out)
    fp32 = {"device": x.device, "dtype": torch.float32}
    dw32 = torch.zeros((n_out, k_in), **fp32) if need_dw else None
    db = torch.zeros(n_out, **fp32) if need_db else None
    d_in = torch.zeros(k_in, **fp32) if need_d_in else None
    d_out = torch.zeros(n_out, **fp32) if need_d_out else None
    if m > 0 and n_count > 0:
        splits = weight_grad_splits or _weight_grad_splits(
            m, triton.cdiv(n_count, 128) * triton.cdiv(k_count, 128), x.device
        )
        tokens_per_split = triton.cdiv(m, splits)
        index, scale = _placeholders(x.device)

        def grid(meta):
            # At least one pid_k column so the pid_k == 0 programs reduce db even if K_kept = 0.
            k_blocks = max(1, triton.cdiv(k_count, meta["BLOCK_K"]))
            return (k_blocks, triton.cdiv(n_count, meta["BLOCK_N"]), splits)

        def fp32_or(t):
            return t if t is not None else scale

        def index_or(t):
            return t if t is not None else index

        _masked_weight_grad_kernel[grid](
            dy, x, weight, fp32_or(dw32), fp32_or(d_in), fp32_or(d_out), fp32_or(db),
            index_or(in_kept), fp32_or(in_scale), index_or(out_kept), fp32_or(out_scale),
            m, k_in, k_count, n_count, tokens_per_split,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
            weight.stride(0), weight.stride(1),
            _size_class(m), _size_class(n_count), _size_class(k_count),
            HAS_IN_SCALE=in_scale is not None, HAS_OUT_SCALE=out_scale is not None,
            DENSE_IN=in_kept is None, DENSE_OUT=out_kept is None,
            NEED_DW=need_dw, NEED_DB=need_db, NEED_D_IN=need_d_in, NEED_D_OUT=need_d_out,
            **_dot_settings(x.dtype),
        )  # fmt: skip
    if dw32 is not None:
        dw = dw32 if weight.dtype == torch.float32 else dw32.to(weight.dtype)
    return dx, dw, db, d_in, d_out
