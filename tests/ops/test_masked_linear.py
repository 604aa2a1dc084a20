"""masked_linear against a float64 reference: outputs and the gradients of all five inputs."""

import os
import subprocess
import sys

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


def test_weight_grad_token_splits_kernel():
    """The weight-gradient kernel's split over tokens (atomic partial sums) on KERNEL_DEVICE."""
    from tinyclip_fast.kernels.masked_matmul import masked_matmul_backward

    x, weight, _ = make((70, 37), 29)
    in_mask, out_mask = random_mask(37, 0.3), random_mask(29, 0.4)
    dy = torch.randn(70, 29)
    ref = [t.double().requires_grad_() for t in (x, weight, in_mask, out_mask)]
    reference(ref[0], ref[1], None, ref[2], ref[3]).backward(dy.double())

    def selection(mask):
        return (mask.nonzero().flatten(), (mask == 0).nonzero().flatten(), mask)

    dev = [t.to(KERNEL_DEVICE) for t in (dy, x, weight, in_mask, out_mask)]
    _, dw, db, d_in, d_out = masked_matmul_backward(
        *dev[:3], *selection(dev[3]), *selection(dev[4]), False, True, True, True, True,
        weight_grad_splits=3,
    )  # fmt: skip
    assert rel_err(dw, ref[1].grad) < 1e-5
    assert rel_err(db, dy.sum(0) * (out_mask != 0)) < 1e-5
    assert rel_err(d_in, ref[2].grad * (in_mask != 0)) < 1e-5
    assert rel_err(d_out, ref[3].grad * (out_mask != 0)) < 1e-5


_AOT_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import tinyclip_fast.kernels.masked_matmul as kernels

matmul = {"a_ptr": "*bf16", "b_ptr": "*bf16", "bias_ptr": "*bf16", "c_ptr": "*bf16",
          "k_kept_ptr": "*i64", "n_kept_ptr": "*i64", "n_pruned_ptr": "*i64",
          "k_scale_ptr": "*fp32", "n_scale_ptr": "*fp32"}
wgrad = {"dy_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*bf16", "dw_ptr": "*fp32",
         "d_in_ptr": "*fp32", "d_out_ptr": "*fp32", "db_ptr": "*fp32",
         "in_kept_ptr": "*i64", "out_kept_ptr": "*i64", "in_scale_ptr": "*fp32",
         "out_scale_ptr": "*fp32"}
dot = dict(DOT_FP32=False, INPUT_PRECISION="tf32")
for dense in (False, True):
    cases = [
        (kernels._gathered_matmul_kernel, matmul,
         dict(HAS_BIAS=True, HAS_K_SCALE=True, HAS_N_SCALE=True, DENSE_K=dense, DENSE_N=dense,
              BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, **dot)),
        (kernels._masked_weight_grad_kernel, wgrad,
         dict(HAS_IN_SCALE=True, HAS_OUT_SCALE=True, DENSE_IN=dense, DENSE_OUT=dense,
              NEED_DW=True, NEED_DB=True, NEED_D_IN=True, NEED_D_OUT=True,
              BLOCK_N=128, BLOCK_K=128, BLOCK_T=32, **dot)),
    ]
    for autotuned, pointers, consts in cases:
        fn = autotuned.fn
        signature = {name: "constexpr" if name in consts else pointers.get(name, "i32")
                     for name in fn.arg_names}
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for real")
def test_kernels_compile_for_cuda_without_a_gpu():
    """The interpreter never compiles: build the bf16 kernels for sm_90 ahead of time."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, check=True, timeout=300)
