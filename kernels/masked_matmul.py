"""Masked structured-pruning matmul in its compact form (docs/method.md §8), forward and backward.

A mask sample is shared by the whole batch, so the activations stay dense and contiguous at
the kept width and the masks live on the weight, which the kernels read through index
vectors of its kept rows and columns and scale by the masks on the way in:

    C[m, c] = (sum_r A[m, r] * W[ch_r(r), ch_c(c)] * r_scale[r] + bias[ch_c(c)]) * c_scale[c]

the forward (A = x [M, K_kept], r = input, c = output channels) and the input gradient
(A = dy [M, N_kept], r = output, c = input channels, W read the other way round). ch_r / ch_c
are the index vectors (identity when absent); the reduction's scale enters the weight tile in
the prologue, the output's after the dot (the same product, one multiply per output). The
output is [M, C] dense, or scattered into the full width at columns ch_c(c), with the
pruned columns zeroed by extra programs of the same launch. The weight gradient

    G[n, k] = sum_t dy[t, n] x[t, k],   dW[ch_n(n), ch_k(k)] += G * out_scale[n] * in_scale[k]

reduces the mask gradients from G in its epilogue: d in_scale[k] = sum_n G W out_scale,
d out_scale[n] = sum_k G W in_scale; an extra column of programs sums db[n] = sum_t dy.

Conventions: index vectors int32, scales float32 [kept count], both at the kept positions;
fp16/bf16/fp32 operands, fp32 accumulation. In-tile offsets are int32 on a 64-bit base
pointer (fewer registers than 2-D int64 pointers); the launchers check that they fit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRETING
from .common import size_class


def _configs(names: tuple[str, ...], shapes: list[tuple[int, ...]]) -> list[triton.Config]:
    return [
        triton.Config(dict(zip(names, shape[:3], strict=True)), num_warps=shape[3], num_stages=s)
        for *shape, s in shapes
    ]


# Under the interpreter one fixed, small config (no benchmarking there; tiny test shapes
# still get several blocks per dimension). On CUDA the autotuner picks among the configs of
# the launch's form: all of them compile for sm_90 without register spills in bf16/fp16
# (bench/sm90_report.py). A gathered weight tile is loaded element by element, so that form
# gets smaller tiles and fewer stages; fp32 operands (TF32) get half the reduction block.
_MATMUL = ("BLOCK_M", "BLOCK_C", "BLOCK_R")
_WGRAD = ("BLOCK_N", "BLOCK_K", "BLOCK_T")
if INTERPRETING:
    DENSE_MATMUL_CONFIGS = GATHERED_MATMUL_CONFIGS = _configs(_MATMUL, [(32, 16, 16, 4, 1)])
    DENSE_WGRAD_CONFIGS = GATHERED_WGRAD_CONFIGS = _configs(_WGRAD, [(16, 16, 16, 4, 1)])
else:
    DENSE_MATMUL_CONFIGS = _configs(
        _MATMUL,
        [
            (128, 256, 64, 8, 3),
            (256, 128, 64, 8, 3),
            (128, 128, 64, 8, 3),
            (128, 128, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (128, 64, 64, 4, 4),
        ],
    )
    GATHERED_MATMUL_CONFIGS = _configs(
        _MATMUL,
        [
            (128, 128, 32, 8, 3),
            (128, 128, 64, 8, 2),
            (64, 128, 32, 4, 3),
            (128, 64, 32, 4, 3),
        ],
    )
    DENSE_WGRAD_CONFIGS = _configs(
        _WGRAD,
        [
            (128, 128, 64, 8, 3),
            (128, 128, 32, 8, 4),
            (64, 128, 64, 4, 4),
            (128, 64, 64, 4, 4),
        ],
    )
    GATHERED_WGRAD_CONFIGS = _configs(
        _WGRAD,
        [
            (128, 64, 64, 8, 3),
            (64, 128, 64, 8, 3),
            (128, 64, 32, 8, 4),
            (64, 128, 32, 8, 4),
            (64, 64, 64, 4, 4),
        ],
    )


def _for_operands(config: triton.Config, element_size: int) -> triton.Config:
    """``config`` for operands of ``element_size`` bytes: fp32 tiles keep the bytes (and the
    shared memory) of the fp16/bf16 ones, with half the reduction block."""
    if element_size <= 2:
        return config
    blocks = dict(config.kwargs)
    name = "BLOCK_R" if "BLOCK_R" in blocks else "BLOCK_T"
    blocks[name] = max(16, blocks[name] * 2 // element_size)
    return triton.Config(blocks, num_warps=config.num_warps, num_stages=config.num_stages)


def matmul_configs(gathered: bool, element_size: int) -> list[triton.Config]:
    """The configurations the matmul's autotuner may pick for this form and operand size."""
    table = GATHERED_MATMUL_CONFIGS if gathered else DENSE_MATMUL_CONFIGS
    return [_for_operands(c, element_size) for c in table]


def weight_grad_configs(gathered: bool, element_size: int) -> list[triton.Config]:
    """The configurations the weight gradient's autotuner may pick for this form."""
    table = GATHERED_WGRAD_CONFIGS if gathered else DENSE_WGRAD_CONFIGS
    return [_for_operands(c, element_size) for c in table]


def _prune_matmul(configs, named_args, **kwargs):
    gathered = kwargs["GATHER_R"] or kwargs["GATHER_C"]
    return matmul_configs(gathered, named_args["a_ptr"].element_size())


def _prune_weight_grad(configs, named_args, **kwargs):
    gathered = kwargs["GATHER_OUT"] or kwargs["GATHER_IN"]
    return weight_grad_configs(gathered, named_args["dy_ptr"].element_size())


def _all(*tables: list[triton.Config]) -> list[triton.Config]:
    """Every configuration once (the interpreter's tables are one and the same)."""
    return list({id(c): c for table in tables for c in table}.values())


# The autotuner keys on power-of-two size classes: the kept counts change at every mask
# update, and tuning per exact count would re-benchmark at every training step.
_MATMUL_KEY = [
    "m_class",
    "r_class",
    "c_class",
    "GATHER_R",
    "GATHER_C",
    "DOT_FP32",
    "INPUT_PRECISION",
]
_WGRAD_KEY = [
    "m_class",
    "n_class",
    "k_class",
    "GATHER_OUT",
    "GATHER_IN",
    "DOT_FP32",
    "INPUT_PRECISION",
]
# Weight-gradient split over tokens: enough programs to fill the card a few times over,
# but every split keeps at least this many tokens to amortise its atomic epilogue.
_MIN_TOKENS_PER_SPLIT = 2048
_WAVES = 4


@triton.autotune(
    configs=_all(DENSE_MATMUL_CONFIGS, GATHERED_MATMUL_CONFIGS),
    key=_MATMUL_KEY,
    prune_configs_by={"early_config_prune": _prune_matmul},
)
@triton.jit
def _masked_matmul_kernel(
    a_ptr, w_ptr, bias_ptr, c_ptr,
    r_idx_ptr, r_scale_ptr, c_idx_ptr, c_scale_ptr, c_pruned_ptr,
    M, R, C, C_pruned,
    stride_am, stride_wr, stride_wc, stride_cm,
    m_class, r_class, c_class,
    HAS_BIAS: tl.constexpr, HAS_R_SCALE: tl.constexpr, HAS_C_SCALE: tl.constexpr,
    GATHER_R: tl.constexpr, GATHER_C: tl.constexpr, SCATTER_C: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """C = (A @ (W[ch_r, ch_c] * r_scale[:, None]) + bias[ch_c]) * c_scale; A [M, R] and C
    row-major with unit column stride; W element (r, c) at w_ptr + ch_r * stride_wr + ch_c *
    stride_wc. Program (pid_c, pid_m): a [BLOCK_M, BLOCK_C] tile of C, or (pid_c past the
    kept blocks, SCATTER_C) zeros into the pruned columns c_pruned of its rows."""
    pid_c = tl.program_id(0)
    pid_m = tl.program_id(1)
    row0 = pid_m.to(tl.int64) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M - pid_m * BLOCK_M
    c_base = c_ptr + row0 * stride_cm
    kept_blocks = tl.cdiv(C, BLOCK_C)
    if pid_c < kept_blocks:
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        if GATHER_C:
            ch_c = tl.load(c_idx_ptr + offs_c, mask=mask_c, other=0)
        else:
            ch_c = offs_c
        w_cols = ch_c * stride_wc
        offs_r = tl.arange(0, BLOCK_R)
        a_ptrs = a_ptr + row0 * stride_am + (offs_m[:, None] * stride_am + offs_r[None, :])
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            mask_r = offs_r < R - r0
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            if GATHER_R:
                ch_r = tl.load(r_idx_ptr + r0 + offs_r, mask=mask_r, other=0)
            else:
                ch_r = r0 + offs_r
            w = tl.load(
                w_ptr + (ch_r[:, None] * stride_wr + w_cols[None, :]),
                mask=mask_r[:, None] & mask_c[None, :],
                other=0.0,
            )
            if HAS_R_SCALE:
                # The reduction's mask scales the weight tile on its way to the dot.
                scale = tl.load(r_scale_ptr + r0 + offs_r, mask=mask_r, other=0.0)
                w = (w.to(tl.float32) * scale[:, None]).to(w.dtype)
            if DOT_FP32:
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w.to(a.dtype), acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_R
        if HAS_BIAS:
            acc += tl.load(bias_ptr + ch_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        if HAS_C_SCALE:
            acc *= tl.load(c_scale_ptr + offs_c, mask=mask_c, other=0.0)[None, :]
        out_cols = ch_c if SCATTER_C else offs_c
        tl.store(
            c_base + (offs_m[:, None] * stride_cm + out_cols[None, :]),
            acc.to(c_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_c[None, :],
        )
    else:
        offs_z = (pid_c - kept_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_z = offs_z < C_pruned
        cols = tl.load(c_pruned_ptr + offs_z, mask=mask_z, other=0)
        tl.store(
            c_base + (offs_m[:, None] * stride_cm + cols[None, :]),
            tl.zeros((BLOCK_M, BLOCK_C), dtype=c_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_z[None, :],
        )


@triton.autotune(
    configs=_all(DENSE_WGRAD_CONFIGS, GATHERED_WGRAD_CONFIGS),
    key=_WGRAD_KEY,
    prune_configs_by={"early_config_prune": _prune_weight_grad},
    reset_to_zero=["dw_ptr", "d_in_ptr", "d_out_ptr", "db_ptr"],
)
@triton.jit
def _masked_weight_grad_kernel(
    dy_ptr, x_ptr, w_ptr, dw_ptr, d_in_ptr, d_out_ptr, db_ptr,
    out_idx_ptr, out_scale_ptr, in_idx_ptr, in_scale_ptr,
    M, N, K, tokens_per_split,
    stride_dym, stride_xm, stride_wn, stride_wk, stride_dwn,
    m_class, n_class, k_class,
    HAS_OUT_SCALE: tl.constexpr, HAS_IN_SCALE: tl.constexpr,
    GATHER_OUT: tl.constexpr, GATHER_IN: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_D_IN: tl.constexpr, NEED_D_OUT: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """G = dy^T x over one token split (dy [M, N], x [M, K] dense), then atomically into fp32
    buffers: dw[ch_n, ch_k] += G * out_scale * in_scale (dw full-size, pruned entries never
    touched), d_in[k] += sum_n G W out_scale, d_out[n] += sum_k G W in_scale (bias term
    aside); the programs past K's blocks: db[n] += sum_t dy. Program (pid_k, pid_n, split)."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    t_start = pid_s * tokens_per_split
    t_count = tl.minimum(M - t_start, tokens_per_split)
    offs_t = tl.arange(0, BLOCK_T)
    row0 = t_start.to(tl.int64)
    dy_ptrs = dy_ptr + row0 * stride_dym + (offs_t[:, None] * stride_dym + offs_n[None, :])
    if pid_k < tl.cdiv(K, BLOCK_K):
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x_ptrs = x_ptr + row0 * stride_xm + (offs_t[:, None] * stride_xm + offs_k[None, :])
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for t0 in range(0, t_count, BLOCK_T):
            mask_t = offs_t < t_count - t0
            dy = tl.load(dy_ptrs, mask=mask_t[:, None] & mask_n[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=mask_t[:, None] & mask_k[None, :], other=0.0)
            if DOT_FP32:
                dy, x = dy.to(tl.float32), x.to(tl.float32)
                acc = tl.dot(tl.trans(dy), x, acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.trans(dy), x, acc, input_precision=INPUT_PRECISION)
            dy_ptrs += BLOCK_T * stride_dym
            x_ptrs += BLOCK_T * stride_xm

        if GATHER_OUT:
            ch_n = tl.load(out_idx_ptr + offs_n, mask=mask_n, other=0)
        else:
            ch_n = offs_n
        if GATHER_IN:
            ch_k = tl.load(in_idx_ptr + offs_k, mask=mask_k, other=0)
        else:
            ch_k = offs_k
        mask_nk = mask_n[:, None] & mask_k[None, :]
        if HAS_OUT_SCALE:
            out_scale = tl.load(out_scale_ptr + offs_n, mask=mask_n, other=0.0)
        else:
            out_scale = tl.full((BLOCK_N,), 1.0, tl.float32)
        if HAS_IN_SCALE:
            in_scale = tl.load(in_scale_ptr + offs_k, mask=mask_k, other=0.0)
        else:
            in_scale = tl.full((BLOCK_K,), 1.0, tl.float32)
        # The mask gradients first: the weight tile is dead before the scatter of dw begins.
        if NEED_D_IN or NEED_D_OUT:
            w = tl.load(
                w_ptr + (ch_n[:, None] * stride_wn + ch_k[None, :] * stride_wk),
                mask=mask_nk,
                other=0.0,
            )
            gw = acc * w.to(tl.float32)
            if NEED_D_IN:
                d_in = tl.sum(gw * out_scale[:, None], axis=0)
                tl.atomic_add(d_in_ptr + offs_k, d_in, mask=mask_k, sem="relaxed")
            if NEED_D_OUT:
                d_out = tl.sum(gw * in_scale[None, :], axis=1)
                tl.atomic_add(d_out_ptr + offs_n, d_out, mask=mask_n, sem="relaxed")
        if NEED_DW:
            tl.atomic_add(
                dw_ptr + (ch_n[:, None] * stride_dwn + ch_k[None, :]),
                acc * out_scale[:, None] * in_scale[None, :],
                mask=mask_nk,
                sem="relaxed",
            )
    else:
        # One extra column of programs sums dy for db: the matmul programs keep dy in shared
        # memory only (summing it there too would cost registers in their main loop).
        db = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for t0 in range(0, t_count, BLOCK_T):
            mask_t = offs_t < t_count - t0
            dy = tl.load(dy_ptrs, mask=mask_t[:, None] & mask_n[None, :], other=0.0)
            db += tl.sum(dy.to(tl.float32), axis=0)
            dy_ptrs += BLOCK_T * stride_dym
        tl.atomic_add(db_ptr + offs_n, db, mask=mask_n, sem="relaxed")


# ---------------------------------------------------------------------------- launchers

_INT32_MAX = 2**31 - 1


def _dot_settings(dtype: torch.dtype) -> dict:
    """tl.dot flags: fp32 upcast under the interpreter; fp32 exact unless torch allows TF32."""
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {
        "DOT_FP32": INTERPRETING,
        "INPUT_PRECISION": "ieee" if dtype == torch.float32 and not tf32 else "tf32",
    }


def _index(t: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """An index vector as the kernels read it (int32), or a typed, never-read stand-in."""
    if t is None:
        return torch.empty(1, device=device, dtype=torch.int32)
    return t.to(torch.int32)


def _scale(t: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if t is None:
        return torch.empty(1, device=device, dtype=torch.float32)
    return t.to(torch.float32).contiguous()


def _check_offsets(name: str, *extents: int) -> None:
    if sum(extents) > _INT32_MAX:
        raise ValueError(f"masked_matmul: {name} is too large for int32 in-tile offsets")


def _matmul(a, weight, w_strides, bias, r_idx, r_scale, c_idx, c_scale, c_pruned, r_full, c_full):
    """The shared launch of forward and input gradient (module docstring)."""
    m, r = a.shape
    c = c_full if c_idx is None else c_idx.numel()
    if a.stride(1) != 1 or r != (r_full if r_idx is None else r_idx.numel()):
        raise ValueError(
            f"masked_matmul: activations {tuple(a.shape)} must be dense [tokens, kept] with "
            f"unit column stride for {r_full if r_idx is None else r_idx.numel()} kept channels"
        )
    scatter = c_pruned is not None
    width = c_full if scatter else c
    out = torch.empty((m, width), device=a.device, dtype=a.dtype)
    if m == 0 or width == 0:
        return out
    _check_offsets("the weight", weight.numel())
    _check_offsets("a row block", 256 * max(a.stride(0), width))
    n_zero = c_pruned.numel() if scatter else 0

    def grid(meta):
        blocks = triton.cdiv(c, meta["BLOCK_C"]) + triton.cdiv(n_zero, meta["BLOCK_C"])
        return (blocks, triton.cdiv(m, meta["BLOCK_M"]))

    device = a.device
    _masked_matmul_kernel[grid](
        a, weight, bias if bias is not None else out, out,
        _index(r_idx, device), _scale(r_scale, device), _index(c_idx, device),
        _scale(c_scale, device), _index(c_pruned, device),
        m, r, c, n_zero,
        a.stride(0), w_strides[0], w_strides[1], out.stride(0),
        size_class(m), size_class(r), size_class(c),
        HAS_BIAS=bias is not None, HAS_R_SCALE=r_scale is not None,
        HAS_C_SCALE=c_scale is not None, GATHER_R=r_idx is not None,
        GATHER_C=c_idx is not None, SCATTER_C=scatter, **_dot_settings(a.dtype),
    )  # fmt: skip
    return out


def masked_matmul_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    in_idx: torch.Tensor | None,
    in_scale: torch.Tensor | None,
    out_idx: torch.Tensor | None,
    out_scale: torch.Tensor | None,
    out_pruned: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = (x @ (weight[out_idx][:, in_idx] * in_scale)^T + bias[out_idx]) * out_scale.

    x [M, len(in_idx)] dense (the kept input channels), weight [N, K], bias [N]; index
    vectors of kept channels (None: all), scales at the kept positions (None: no mask).
    y [M, len(out_idx)], or with ``out_pruned`` (the other output channels) [M, N] with the
    kept columns at out_idx and zeros at out_pruned.
    """
    return _matmul(
        x, weight, (weight.stride(1), weight.stride(0)), bias,
        in_idx, in_scale, out_idx, out_scale, out_pruned, weight.shape[1], weight.shape[0],
    )  # fmt: skip


def masked_matmul_input_grad(
    dy: torch.Tensor,
    weight: torch.Tensor,
    out_idx: torch.Tensor | None,
    out_scale: torch.Tensor | None,
    in_idx: torch.Tensor | None,
    in_scale: torch.Tensor | None,
    in_pruned: torch.Tensor | None = None,
) -> torch.Tensor:
    """dx = ((dy * out_scale) @ weight[out_idx][:, in_idx]) * in_scale, dy [M, len(out_idx)];
    dx [M, len(in_idx)], or with ``in_pruned`` [M, K] with zeros at in_pruned."""
    return _matmul(
        dy, weight, (weight.stride(0), weight.stride(1)), None,
        out_idx, out_scale, in_idx, in_scale, in_pruned, weight.shape[0], weight.shape[1],
    )  # fmt: skip


def _weight_grad_splits(m: int, tiles: int, device: torch.device) -> int:
    if INTERPRETING or device.type != "cuda":
        return 1
    programs = _WAVES * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(programs, max(tiles, 1)), m // _MIN_TOKENS_PER_SPLIT))


def masked_matmul_weight_grad(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    out_idx: torch.Tensor | None,
    out_scale: torch.Tensor | None,
    in_idx: torch.Tensor | None,
    in_scale: torch.Tensor | None,
    need_dw: bool,
    need_db: bool,
    need_d_in: bool,
    need_d_out: bool,
    splits: int | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """(dw, db, d_in, d_out) of y = masked_matmul_forward(x, weight, b, in_idx, ...).

    dy [M, len(out_idx)], x [M, len(in_idx)] dense. dw [N, K] = the weight's gradient, zero
    where cut (weight's dtype); db [len(out_idx)] = sum_t dy; d_in [len(in_idx)] and d_out
    [len(out_idx)] the scales' gradients without the bias term (fp32); each None unless
    asked for. The reduction over tokens runs in ``splits`` parts (auto by default).
    """
    m = x.shape[0]
    n_out, k_in = weight.shape
    n = n_out if out_idx is None else out_idx.numel()
    k = k_in if in_idx is None else in_idx.numel()
    if dy.shape != (m, n) or x.shape != (m, k) or dy.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(
            f"masked_matmul: dy {tuple(dy.shape)} and x {tuple(x.shape)} must be dense "
            f"[tokens, kept] with unit column stride for kept counts ({n}, {k})"
        )
    fp32 = {"device": x.device, "dtype": torch.float32}
    dw32 = torch.zeros((n_out, k_in), **fp32) if need_dw else None
    db = torch.zeros(n, **fp32) if need_db else None
    d_in = torch.zeros(k, **fp32) if need_d_in else None
    d_out = torch.zeros(n, **fp32) if need_d_out else None
    if m > 0 and n > 0 and (need_dw or need_db or need_d_in or need_d_out):
        _check_offsets("the weight", weight.numel())
        _check_offsets("a token block", 256 * max(dy.stride(0), x.stride(0)))
        splits = splits or _weight_grad_splits(
            m, triton.cdiv(n, 128) * triton.cdiv(k, 128), x.device
        )
        tokens_per_split = triton.cdiv(m, splits)
        device = x.device

        # The matmul programs cover K; with need_db one more column of programs sums dy.
        k_matmul = k if need_dw or need_d_in or need_d_out else 0

        def grid(meta):
            k_blocks = triton.cdiv(k_matmul, meta["BLOCK_K"])
            return (k_blocks + int(need_db), triton.cdiv(n, meta["BLOCK_N"]), splits)

        def buffer(t):
            return t if t is not None else _scale(None, device)

        _masked_weight_grad_kernel[grid](
            dy, x, weight, buffer(dw32), buffer(d_in), buffer(d_out), buffer(db),
            _index(out_idx, device), _scale(out_scale, device),
            _index(in_idx, device), _scale(in_scale, device),
            m, n, k_matmul, tokens_per_split,
            dy.stride(0), x.stride(0), weight.stride(0), weight.stride(1), k_in,
            size_class(m), size_class(n), size_class(k),
            HAS_OUT_SCALE=out_scale is not None, HAS_IN_SCALE=in_scale is not None,
            GATHER_OUT=out_idx is not None, GATHER_IN=in_idx is not None,
            NEED_DW=need_dw, NEED_D_IN=need_d_in, NEED_D_OUT=need_d_out,
            **_dot_settings(x.dtype),
        )  # fmt: skip
    dw = dw32 if dw32 is None or weight.dtype == torch.float32 else dw32.to(weight.dtype)
    return dw, db, d_in, d_out
