"""masked_linear against a float64 reference: outputs and the gradients of all five inputs."""

import pytest
import torch
import torch.nn.functional as F
from support import KERNEL_DEVICE, rel_err

from tinyclip_fast.ops.backend import force_backend
from tinyclip_fast.ops.masked_linear import MaskedLinear, masked_linear

BACKENDS = [("torch", "cpu"), ("triton", KERNEL_DEVICE)]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def reference(x, weight, bias, in_mask, out_mask):
    """float64 autograd graph of the contract: masks expanded over their groups."""
    if in_mask is not None:
        x = x * in_mask.repeat_interleave(weight.shape[1] // in_mask.numel())
    y = F.linear(x, weight, bias)
    if out_mask is not None:
        y = y * out_mask.repeat_interleave(weight.shape[0] // out_mask.numel())
    return y


def random_mask(n, zero_fraction, generator=None):
    """Values in (0, 1] with a random, non-block-aligned set of exact zeros."""
    mask = torch.rand(n, generator=generator) * 0.9 + 0.1
    zeros = torch.randperm(n, generator=generator)[: round(zero_fraction * n)]
    mask[zeros] = 0.0
    return mask


def run_case(backend, device, x, weight, bias, in_mask, out_mask, dtype, grad_scale=3.0):
    """Compare forward and all gradients with the float64 reference; return nothing, assert."""
    inputs = [x, weight, bias, in_mask, out_mask]
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    ref = reference(*ref_leaves)
    dy = torch.randn_like(ref) * grad_scale
    ref.backward(dy)

    cast = [x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None]
    leaves = [
        t.detach().to(device).clone().requires_grad_() if t is not None else None for t in cast
    ]
    masks = [
        m.detach().to(device).clone().requires_grad_() if m is not None else None
        for m in (in_mask, out_mask)
    ]
    with force_backend(backend):
        out = masked_linear(*leaves, *masks)
    assert out.dtype == dtype and out.shape == ref.shape
    out.backward(dy.to(device=device, dtype=dtype))

    tol = TOL[dtype]
    assert rel_err(out, ref) < tol
    for name, ours, theirs in zip(
        ["x", "weight", "bias", "in_mask", "out_mask"], leaves + masks, ref_leaves, strict=True
    ):
        if ours is None:
            continue
        expected = theirs.grad
        if name.endswith("mask"):
            # Contract: an exactly-zero entry has gradient 0.
            expected = expected * (theirs.detach() != 0)
        assert ours.grad is not None, name
        assert ours.grad.dtype == ours.dtype, name
        if expected.abs().max() == 0:
            assert ours.grad.abs().max() == 0, name
        else:
            assert rel_err(ours.grad, expected) < tol, (name, rel_err(ours.grad, expected))
    # Pruned channels: exactly zero output, zero gradients.
    if out_mask is not None:
        pruned_out = out_mask.repeat_interleave(weight.shape[0] // out_mask.numel()) == 0
        assert (out.detach().cpu()[..., pruned_out] == 0).all()
        assert (leaves[1].grad.cpu()[pruned_out] == 0).all()
        if bias is not None:
            assert (leaves[2].grad.cpu()[pruned_out] == 0).all()
    if in_mask is not None:
        pruned_in = in_mask.repeat_interleave(weight.shape[1] // in_mask.numel()) == 0
        assert (leaves[0].grad.cpu()[..., pruned_in] == 0).all()
        assert (leaves[1].grad.cpu()[:, pruned_in] == 0).all()


def make(shape_x, n_out, bias=True):
    k = shape_x[-1]
    x = torch.randn(shape_x)
    weight = torch.randn(n_out, k) / k**0.5
    b = torch.randn(n_out) if bias else None
    return x, weight, b


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_odd_shapes_random_zeros_fp32(backend, device):
    x, weight, bias = make((2, 7, 37), 45)
    run_case(
        backend, device, x, weight, bias, random_mask(37, 0.4), random_mask(45, 0.3), torch.float32
    )


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, device, dtype):
    x, weight, bias = make((19, 40), 33)
    run_case(backend, device, x, weight, bias, random_mask(40, 0.5), random_mask(33, 0.25), dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_grouped_masks(backend, device):
    """Head mask over 16-wide groups on the input, 3-wide groups on the output."""
    x, weight, bias = make((3, 5, 64), 48)
    in_mask = torch.tensor([0.7, 0.0, 1.0, 0.35])
    out_mask = random_mask(16, 0.3)
    run_case(backend, device, x, weight, bias, in_mask, out_mask, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_one_mask_only_and_no_bias(backend, device):
    x, weight, _ = make((21, 24), 18, bias=False)
    run_case(backend, device, x, weight, None, None, random_mask(18, 0.5), torch.float32)
    run_case(backend, device, x, weight, None, random_mask(24, 0.5), None, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_all_zero_masks(backend, device):
    x, weight, bias = make((9, 20), 12)
    run_case(backend, device, x, weight, bias, torch.zeros(20), random_mask(12, 0.5), torch.float32)
    run_case(backend, device, x, weight, bias, random_mask(20, 0.5), torch.zeros(12), torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ones_and_none_masks_equal_linear(backend, device):
    x, weight, bias = make((2, 11, 30), 26)
    x, weight, bias = x.to(device), weight.to(device), bias.to(device)
    expected = F.linear(x, weight, bias)
    with force_backend(backend):
        ones = masked_linear(
            x, weight, bias, torch.ones(30, device=device), torch.ones(26, device=device)
        )
        none = masked_linear(x, weight, bias)
    assert rel_err(ones, expected) < 1e-6
    assert rel_err(none, expected) < 1e-6
    run_case(backend, device, x.cpu(), weight.cpu(), bias.cpu(), None, None, torch.float32)


def test_module_shares_parameters_and_backends_agree():
    linear = torch.nn.Linear(24, 20)
    layer = MaskedLinear(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(6, 24)
    in_mask, out_mask = random_mask(24, 0.5), random_mask(20, 0.5)
    outs = []
    for backend in ("torch", "triton"):
        with force_backend(backend):
            outs.append(layer(x, in_mask, out_mask))
    assert rel_err(outs[0], outs[1]) < 1e-5
    assert rel_err(outs[0], reference(x, linear.weight, linear.bias, in_mask, out_mask)) < 1e-5


def test_autocast_casts_like_linear():
    """bf16 activations meet fp32 weights under autocast, as in mixed-precision training."""
    x, weight, bias = make((5, 16), 8)
    masks = random_mask(16, 0.25), random_mask(8, 0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16), force_backend("torch"):
        out = masked_linear(x.bfloat16(), weight, bias, *masks)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference(x, weight, bias, *masks)) < 1e-2


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"in_mask": torch.ones(5)}, ValueError, "in_mask"),
        ({"out_mask": torch.ones(3, 2)}, ValueError, "out_mask"),
        ({"out_mask": torch.tensor([0.5, 1.5, 0.0, 1.0])}, ValueError, "out_mask"),
        ({"in_mask": torch.tensor([0.5, float("nan")] * 6)}, ValueError, "in_mask"),
        ({"in_mask": torch.tensor([-0.1] + [1.0] * 11)}, ValueError, "in_mask"),
        ({"in_mask": torch.ones(12, dtype=torch.int64)}, TypeError, "in_mask"),
        ({"weight": torch.randn(8, 11)}, ValueError, "weight"),
        ({"weight": torch.randn(8, 12, dtype=torch.float64)}, TypeError, "weight"),
        ({"bias": torch.randn(7)}, ValueError, "bias"),
        ({"x": torch.ones(4, 12, dtype=torch.int32)}, TypeError, "x"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {"x": torch.randn(4, 12), "weight": torch.randn(8, 12), "bias": torch.randn(8)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        masked_linear(**args)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_only_masks_need_grad_and_large_scale(backend, device):
    """Frozen weights (the gradient flags differ) and inputs far from unit scale."""
    x = (torch.randn(13, 40) * 300).to(device)
    weight = (torch.randn(24, 40) * 50).to(device)
    bias = torch.randn(24, device=device)
    masks = [random_mask(8, 0.25).to(device), random_mask(24, 0.5).to(device)]
    masks = [m.requires_grad_() for m in masks]
    with force_backend(backend):
        masked_linear(x, weight, bias, *masks).sum().backward()
    ref_masks = [m.detach().double().requires_grad_() for m in masks]
    reference(x.double(), weight.double(), bias.double(), *ref_masks).sum().backward()
    for ours, ref in zip(masks, ref_masks, strict=True):
        assert rel_err(ours.grad, ref.grad * (ref.detach() != 0)) < 1e-5


# ---- the kernels of the compact form, each against its float64 formula ----------------------


def _kept(n, keep, generator):
    """Sorted kept channels (a random, non-aligned fraction ``keep``) and the others."""
    order = torch.randperm(n, generator=generator)
    count = round(keep * n)
    return order[:count].sort().values, order[count:].sort().values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["dense", "gather_in", "gather_both"])
def test_compact_kernels_match_float64(dtype, form):
    from tinyclip_fast.kernels.masked_matmul import (
        masked_matmul_forward,
        masked_matmul_input_grad,
        masked_matmul_weight_grad,
    )

    g = torch.Generator().manual_seed(7)
    m, n_full, k_full = 37, 29, 45
    in_keep, out_keep = {"dense": (1, 1), "gather_in": (0.6, 1), "gather_both": (0.6, 0.7)}[form]
    in_idx, in_pruned = _kept(k_full, in_keep, g)
    out_idx, out_pruned = _kept(n_full, out_keep, g)
    k, n = in_idx.numel(), out_idx.numel()
    x = torch.randn(m, k, generator=g)
    weight = torch.randn(n_full, k_full, generator=g) / k_full**0.5
    bias = torch.randn(n_full, generator=g)
    in_s, out_s = torch.rand(k, generator=g) * 0.9 + 0.1, torch.rand(n, generator=g) * 0.9 + 0.1
    dy = torch.randn(m, n, generator=g) * 3.0

    # float64 formulas of the module docstring
    x64, w64, b64, dy64 = (t.double() for t in (x, weight, bias, dy))
    w_k = w64[out_idx][:, in_idx]
    w_eff = w_k * out_s.double()[:, None] * in_s.double()
    y_ref = x64 @ w_eff.T + b64[out_idx] * out_s.double()
    dx_ref = dy64 @ w_eff
    grad = dy64.T @ x64
    dw_ref = torch.zeros(n_full, k_full, dtype=torch.float64)
    dw_ref[out_idx[:, None], in_idx] = grad * out_s.double()[:, None] * in_s.double()
    d_in_ref = (grad * w_k * out_s.double()[:, None]).sum(0)
    d_out_ref = (grad * w_k * in_s.double()).sum(1)

    dev = {"device": KERNEL_DEVICE}
    x_d, w_d, b_d, dy_d = (t.to(dtype=dtype, **dev) for t in (x, weight, bias, dy))
    gathered_in = form != "dense"
    gathered_out = form == "gather_both"
    idx = {
        "in_idx": in_idx.to(**dev) if gathered_in else None,
        "out_idx": out_idx.to(**dev) if gathered_out else None,
    }
    scales = {"in_scale": in_s.to(**dev), "out_scale": out_s.to(**dev)}
    y = masked_matmul_forward(
        x_d, w_d, b_d, idx["in_idx"], scales["in_scale"], idx["out_idx"], scales["out_scale"],
        out_pruned.to(**dev) if gathered_out else None,
    )  # fmt: skip
    dx = masked_matmul_input_grad(
        dy_d, w_d, idx["out_idx"], scales["out_scale"], idx["in_idx"], scales["in_scale"],
        in_pruned.to(**dev) if gathered_in else None,
    )  # fmt: skip
    dw, db, d_in, d_out = masked_matmul_weight_grad(
        dy_d, x_d, w_d, idx["out_idx"], scales["out_scale"], idx["in_idx"], scales["in_scale"],
        True, True, True, True, splits=3,
    )  # fmt: skip

    tol = TOL[dtype]
    y_full = torch.zeros(m, n_full, dtype=torch.float64)
    y_full[:, out_idx] = y_ref
    dx_full = torch.zeros(m, k_full, dtype=torch.float64)
    dx_full[:, in_idx] = dx_ref
    # Outputs come back in the full width when their side is gathered (pruned columns 0).
    assert rel_err(y, y_full if gathered_out else y_ref) < tol
    assert rel_err(dx, dx_full if gathered_in else dx_ref) < tol
    assert y.dtype == dx.dtype == dw.dtype == dtype
    if gathered_out:
        assert (y.cpu()[:, out_pruned] == 0).all()
    if gathered_in:
        assert (dx.cpu()[:, in_pruned] == 0).all()
    assert rel_err(dw, dw_ref) < tol and (dw.cpu()[dw_ref == 0] == 0).all()
    assert rel_err(db, dy64.sum(0)) < tol
    assert rel_err(d_in, d_in_ref) < tol and rel_err(d_out, d_out_ref) < tol


def test_compact_kernels_reject_activations_they_cannot_read():
    from tinyclip_fast.kernels.masked_matmul import masked_matmul_forward

    weight = torch.randn(8, 12, device=KERNEL_DEVICE)
    x = torch.randn(5, 12, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="unit column stride"):
        masked_matmul_forward(x.T.contiguous().T, weight, None, None, None, None, None)
    with pytest.raises(ValueError, match="kept"):
        masked_matmul_forward(x[:, :7], weight, None, None, None, None, None)
