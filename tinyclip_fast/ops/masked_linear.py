"""Masked linear layer for structured pruning: y = ((x * in_mask) @ W^T + b) * out_mask.

The mask-learning phase of automatic weight inheritance (docs/method.md §3b) runs the
full-size model with hard-concrete masks on its channels. Instead of multiplying full-size
activations by the masks (TinyCLIP's way), the masks enter the matmul itself and the
channels whose mask is exactly 0 are skipped, so the work scales with the kept fraction:

- CUDA (and the Triton interpreter), fp16/bf16 (fp32 with TF32 allowed): the kept input
  channels of x (and of dy in the backward) are gathered once into dense activations; the
  kernels in ``tinyclip_fast.kernels.masked_matmul`` read the weight through index vectors,
  scaled by the masks, and write the results into the full width (pruned channels zero);
- CPU, and exact fp32 on CUDA: the same algebra in PyTorch on the compacted weight.

MaskedCLIP does not call this op: its masks are shared by the whole batch, so it folds them
into the weights once per forward (``pruning/compact.py``) and runs cuBLAS on those.

Gradients. With x_k, W_k, dy_k the kept channels and G = dy_k^T x_k (the unmasked
weight-gradient product, [kept out, kept in]), every gradient comes from G or a matmul:
    dx_k = dy_k (W_k * out_mask * in_mask)            dW_k = G * out_mask[:, None] * in_mask
    db_k = out_mask * sum_t dy_k                       d in_mask_i = sum_o G_oi W_oi out_mask_o
    d out_mask_o = sum_i G_oi W_oi in_mask_i + b_o * sum_t dy_k,o
so the mask gradients cost a reduction over a weight-sized tile, never over [tokens, C].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tinyclip_fast.ops.backend import use_triton


class ChannelSelection(NamedTuple):
    """The channels of one side of the matmul (input or output) as the kernels see them.

    kept: int64 indices of channels whose mask is non-zero; None when every channel is kept.
    pruned: int64 indices of channels whose mask is exactly zero; None when there are none.
    scale: float32 [C] mask value of every channel (groups expanded); None when unmasked.
    """

    kept: torch.Tensor | None
    pruned: torch.Tensor | None
    scale: torch.Tensor | None


UNMASKED = ChannelSelection(None, None, None)  # a side without a mask

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    in_mask: torch.Tensor | None,
    out_mask: torch.Tensor | None,
) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"masked_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"masked_linear: x must be floating point, got {_describe(x)}")
    if x.dim() == 0:
        raise ValueError(f"masked_linear: x must be [..., in_features], got {_describe(x)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"masked_linear: weight must be [out_features, in_features={x.shape[-1]}], "
            f"got weight {_describe(weight)} for x {_describe(x)}"
        )
    tensors = [("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    for name, t in tensors:
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(
                f"masked_linear: {name} must match x ({_describe(x)}), got {_describe(t)}"
            )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"masked_linear: bias must be [out_features={weight.shape[0]}], got {_describe(bias)}"
        )
    for name, mask, size in (
        ("in_mask", in_mask, weight.shape[1]),
        ("out_mask", out_mask, weight.shape[0]),
    ):
        if mask is None:
            continue
        if not isinstance(mask, torch.Tensor):
            raise TypeError(
                f"masked_linear: {name} must be a torch.Tensor, got {type(mask).__name__}"
            )
        if mask.dtype not in _FLOAT_DTYPES or mask.device != x.device:
            raise TypeError(
                f"masked_linear: {name} must be floating point on {x.device}, got {_describe(mask)}"
            )
        if mask.dim() != 1 or mask.numel() == 0 or size % mask.numel() != 0:
            raise ValueError(
                f"masked_linear: {name} must be 1-D with a length dividing {size} "
                f"(one entry per channel or per group of channels), got {_describe(mask)}"
            )


def channel_indices(
    flags: list[torch.Tensor | None], device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """(kept, pruned) int64 index vectors of host-side boolean channel flags, on ``device``;
    None where the flags are None or all true. All vectors travel in one copy, so reading
    many masks costs one transfer, not one per vector."""
    pieces = []
    partial = [f is not None and not bool(f.all()) for f in flags]
    for f, part in zip(flags, partial, strict=True):
        if part:
            pieces += [f.nonzero().flatten(), (~f).nonzero().flatten()]
    if not pieces:
        return [None] * len(flags)
    packed = torch.cat(pieces)
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    else:
        packed = packed.to(device)
    parts = iter(packed.split([piece.numel() for piece in pieces]))
    return [(next(parts), next(parts)) if part else None for part in partial]


def channel_selection(
    mask: torch.Tensor, size: int, indices: tuple[torch.Tensor, torch.Tensor] | None
) -> ChannelSelection:
    """The ChannelSelection of ``mask`` over ``size`` channels (groups expanded), given the
    (kept, pruned) channel indices from :func:`channel_indices`."""
    scale = mask.detach().float().repeat_interleave(size // mask.numel())
    return ChannelSelection(*(indices or (None, None)), scale)


def _select_channels(
    in_mask: torch.Tensor | None, in_size: int, out_mask: torch.Tensor | None, out_size: int
) -> tuple[ChannelSelection, ChannelSelection]:
    """Kept/pruned channel lists of both masks, checking their values, with one host sync.

    Which channels are non-zero decides the launch sizes, so the host must see the masks
    once; the value check (all in [0, 1]; NaN fails it) rides along in the same transfer.
    """
    masks = [
        (name, m, size)
        for name, m, size in (("in_mask", in_mask, in_size), ("out_mask", out_mask, out_size))
        if m is not None
    ]
    flags = []
    for _, m, _ in masks:
        flags += [m != 0, ((m >= 0) & (m <= 1)).all().view(1)]
    host = torch.cat(flags).cpu() if flags else None

    channel_flags, offset = [], 0
    for name, m, size in masks:
        nonzero, valid = host[offset : offset + m.numel()], bool(host[offset + m.numel()])
        offset += m.numel() + 1
        if not valid:
            bad = m[~((m >= 0) & (m <= 1))][:4].tolist()
            raise ValueError(
                f"masked_linear: {name} values must be finite and in [0, 1], got {bad} "
                f"({_describe(m)})"
            )
        channel_flags.append(nonzero.repeat_interleave(size // m.numel()))
    device = masks[0][1].device if masks else None
    indices = channel_indices(channel_flags, device) if masks else []
    selections = {
        name: channel_selection(m, size, index)
        for (name, m, size), index in zip(masks, indices, strict=True)
    }
    return selections.get("in_mask", UNMASKED), selections.get("out_mask", UNMASKED)


def _kept_scale(sel: ChannelSelection) -> torch.Tensor | None:
    if sel.scale is None or sel.kept is None:
        return sel.scale
    return sel.scale.index_select(0, sel.kept)


def _compact_weight(weight: torch.Tensor, sel_in: ChannelSelection, sel_out: ChannelSelection):
    w = weight if sel_out.kept is None else weight.index_select(0, sel_out.kept)
    return w if sel_in.kept is None else w.index_select(1, sel_in.kept)


def _scatter_kept(
    values: torch.Tensor, index: torch.Tensor | None, size: int, dim: int
) -> torch.Tensor:
    """Place the kept-channel ``values`` into a zero tensor of ``size`` along ``dim``."""
    if index is None:
        return values
    shape = list(values.shape)
    shape[dim] = size
    return values.new_zeros(shape).index_copy_(dim, index, values)


def _effective_weight(w_k: torch.Tensor, in_s: torch.Tensor | None, out_s: torch.Tensor | None):
    """W_k * out_mask[:, None] * in_mask[None, :] in the weight's dtype."""
    if in_s is not None:
        w_k = w_k * in_s.to(w_k.dtype)
    if out_s is not None:
        w_k = w_k * out_s.to(w_k.dtype)[:, None]
    return w_k


def _torch_forward(x2d, weight, bias, sel_in: ChannelSelection, sel_out: ChannelSelection):
    out_s = _kept_scale(sel_out)
    w_eff = _effective_weight(_compact_weight(weight, sel_in, sel_out), _kept_scale(sel_in), out_s)
    x_k = x2d if sel_in.kept is None else x2d.index_select(1, sel_in.kept)
    b_k = None
    if bias is not None:
        b_k = bias if sel_out.kept is None else bias.index_select(0, sel_out.kept)
        b_k = b_k if out_s is None else b_k * out_s.to(b_k.dtype)
    return _scatter_kept(F.linear(x_k, w_eff, b_k), sel_out.kept, weight.shape[0], 1)


def _torch_backward(
    dy2d, x2d, weight, sel_in, sel_out, need_dx, need_dw, need_db, need_d_in, need_d_out
):
    """(dx, dw, db_raw, d_in, d_out), each or None: dx and dw full-size, the rest per channel."""
    n_out, k_in = weight.shape
    in_s, out_s = _kept_scale(sel_in), _kept_scale(sel_out)
    w_k = _compact_weight(weight, sel_in, sel_out)
    dy_k = dy2d if sel_out.kept is None else dy2d.index_select(1, sel_out.kept)
    dx = dw = db = d_in = d_out = None
    if need_dx:
        dx = _scatter_kept(dy_k @ _effective_weight(w_k, in_s, out_s), sel_in.kept, k_in, 1)
    if need_db:
        db = _scatter_kept(dy_k.float().sum(0), sel_out.kept, n_out, 0)
    if need_dw or need_d_in or need_d_out:
        x_k = x2d if sel_in.kept is None else x2d.index_select(1, sel_in.kept)
        g = (dy_k.T @ x_k).float()
        if need_dw:
            dw_k = _effective_weight(g, in_s, out_s).to(weight.dtype)
            dw = _scatter_kept(_scatter_kept(dw_k, sel_in.kept, k_in, 1), sel_out.kept, n_out, 0)
        gw = g * w_k.float()
        if need_d_in:
            d_in_k = (gw * out_s[:, None]).sum(0) if out_s is not None else gw.sum(0)
            d_in = _scatter_kept(d_in_k, sel_in.kept, k_in, 0)
        if need_d_out:
            d_out_k = (gw * in_s).sum(1) if in_s is not None else gw.sum(1)
            d_out = _scatter_kept(d_out_k, sel_out.kept, n_out, 0)
    return dx, dw, db, d_in, d_out


def _kernel_forward(x2d, weight, bias, sel_in: ChannelSelection, sel_out: ChannelSelection):
    """(y, x_k): the kernels' forward on the gathered kept inputs x_k (kept for the backward)."""
    from tinyclip_fast.kernels.masked_matmul import masked_matmul_forward

    x_k = x2d if sel_in.kept is None else x2d.index_select(1, sel_in.kept)
    x_k = x_k.contiguous()
    y = masked_matmul_forward(
        x_k, weight, bias, sel_in.kept, _kept_scale(sel_in), sel_out.kept, _kept_scale(sel_out),
        sel_out.pruned,
    )  # fmt: skip
    return y, x_k


def _kernel_backward(
    dy2d, x_k, weight, sel_in, sel_out, need_dx, need_dw, need_db, need_d_in, need_d_out
):
    """Same results as ``_torch_backward``, from the kernels on the gathered kept dy and x."""
    from tinyclip_fast.kernels.masked_matmul import (
        masked_matmul_input_grad,
        masked_matmul_weight_grad,
    )

    n_out, k_in = weight.shape
    in_s, out_s = _kept_scale(sel_in), _kept_scale(sel_out)
    dy_k = dy2d if sel_out.kept is None else dy2d.index_select(1, sel_out.kept).contiguous()
    dx = None
    if need_dx:
        dx = masked_matmul_input_grad(
            dy_k, weight, sel_out.kept, out_s, sel_in.kept, in_s, sel_in.pruned
        )
    dw, db, d_in, d_out = masked_matmul_weight_grad(
        dy_k, x_k, weight, sel_out.kept, out_s, sel_in.kept, in_s,
        need_dw, need_db, need_d_in, need_d_out,
    )  # fmt: skip
    db = None if db is None else _scatter_kept(db, sel_out.kept, n_out, 0)
    d_in = None if d_in is None else _scatter_kept(d_in, sel_in.kept, k_in, 0)
    d_out = None if d_out is None else _scatter_kept(d_out, sel_out.kept, n_out, 0)
    return dx, dw, db, d_in, d_out


def _group_sum(channel_grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return channel_grad.view(mask.numel(), -1).sum(1).to(mask.dtype)


class _MaskedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, in_mask, out_mask, sel_in, sel_out, triton):
        if triton:
            y, saved_x = _kernel_forward(x2d, weight, bias, sel_in, sel_out)
        else:
            y, saved_x = _torch_forward(x2d, weight, bias, sel_in, sel_out), x2d
        ctx.save_for_backward(saved_x, weight, bias, in_mask, out_mask)
        ctx.selections, ctx.triton = (sel_in, sel_out), triton
        return y

    @staticmethod
    def backward(ctx, dy2d):
        saved_x, weight, bias, in_mask, out_mask = ctx.saved_tensors
        sel_in, sel_out = ctx.selections
        need_dx, need_dw, need_b, need_in, need_out = ctx.needs_input_grad[:5]
        # sum_t dy serves the bias gradient and the bias term of the out_mask gradient.
        need_db = bias is not None and (need_b or need_out)
        flags = (need_dx, need_dw, need_db, need_in, need_out)
        dy2d = dy2d.contiguous()
        backward = _kernel_backward if ctx.triton else _torch_backward
        dx, dw, db_raw, d_in, d_out = backward(dy2d, saved_x, weight, sel_in, sel_out, *flags)
        db = d_in_mask = d_out_mask = None
        if need_b:
            # Pruned outputs have scale 0, so their bias gradient comes out 0 as contracted.
            db = (db_raw if sel_out.scale is None else db_raw * sel_out.scale).to(bias.dtype)
        if need_in:
            d_in_mask = _group_sum(d_in, in_mask)
        if need_out:
            if bias is not None:
                # db_raw is 0 on pruned outputs, so their mask gradient stays 0 as contracted.
                d_out = d_out + bias.float() * db_raw
            d_out_mask = _group_sum(d_out, out_mask)
        return dx, dw, db, d_in_mask, d_out_mask, None, None, None


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    in_mask: torch.Tensor | None = None,
    out_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """((x * in_mask) @ weight.T + bias) * out_mask; x [..., in], weight [out, in], bias [out].

    A mask may be shorter than its dimension by an integer factor g: entry k covers channels
    k*g .. k*g+g-1 (e.g. a head mask over head_dim-wide groups). Masks hold values in [0, 1],
    in any floating dtype (their gradients come back in that dtype).
    Contract: an entry exactly 0 marks a pruned channel: it is skipped in every pass and its
    own gradient is defined as 0 (as through the clamp of a hard-concrete mask); all other
    gradients are exact. Under autocast x, weight and bias are cast like F.linear's inputs;
    the masks keep their dtype. Reading which entries are zero costs one host sync per call.
    """
    x, weight, bias = _autocast_inputs(x, weight, bias)
    _check_inputs(x, weight, bias, in_mask, out_mask)
    sel_in, sel_out = _select_channels(in_mask, weight.shape[1], out_mask, weight.shape[0])
    return _apply(x, weight, bias, in_mask, out_mask, sel_in, sel_out)


def _autocast_inputs(x, weight, bias):
    device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        for t in (x, weight, bias)
    )


def _kernel_dtype(x: torch.Tensor) -> bool:
    """fp16/bf16, and fp32 where TF32 is allowed: exact fp32 would run Triton's dot on the FMA
    units, far below cuBLAS, and float64 (references) has no kernel; both take PyTorch."""
    if x.dtype == torch.float32 and x.is_cuda:
        return torch.backends.cuda.matmul.allow_tf32
    return x.dtype != torch.float64


def _apply(x, weight, bias, in_mask, out_mask, sel_in, sel_out) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    triton = use_triton(x) and _kernel_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        y2d = _MaskedLinearFunction.apply(
            x2d, weight, bias, in_mask, out_mask, sel_in, sel_out, triton
        )
    return y2d.view(*x.shape[:-1], weight.shape[0])


class MaskedLinear(nn.Module):
    """An ``nn.Linear``'s weight and bias (the same Parameters) applied by ``masked_linear``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(
        self,
        x: torch.Tensor,
        in_mask: torch.Tensor | None = None,
        out_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return masked_linear(x, self.weight, self.bias, in_mask, out_mask)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
