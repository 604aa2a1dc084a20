"""Which implementation and which operand dtype an op runs: under autocast (or with a
``compute_dtype``) the kernels take fp32 features in a half dtype (cast once inside the op),
the PyTorch path keeps fp32.

The tests hand the ops fp32 features under CPU autocast, as CUDA autocast produces them
(``F.normalize`` returns fp32 there), and record the dtype the kernel launchers receive.
"""

import pytest
import tinyclip_fast.kernels.affinity_loss as affinity_kernels
import tinyclip_fast.kernels.sigmoid_loss as sigmoid_kernels
import torch
import torch.nn.functional as F
from support import KERNEL_DEVICE, rel_err

from tinyclip_fast.ops.affinity_loss import affinity_loss_square
from tinyclip_fast.ops.backend import force_backend, kernel_dtype
from tinyclip_fast.ops.sigmoid_loss import sigmoid_loss_rows

HALF = [torch.bfloat16, torch.float16]
# A half operand has a relative rounding of 2^-8 (bf16) or 2^-11 (fp16).
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture
def launched(monkeypatch):
    """The operand dtypes of every kernel launch (forward and backward) while it lives."""
    dtypes = []

    def recording(module, name):
        original = getattr(module, name)

        def launch(rows, *args, **kwargs):
            dtypes.append(rows.dtype)
            return original(rows, *args, **kwargs)

        monkeypatch.setattr(module, name, launch)

    recording(affinity_kernels, "affinity_stats_forward")
    recording(affinity_kernels, "affinity_grad_backward")
    recording(sigmoid_kernels, "sigmoid_loss_tiles")
    return dtypes


def _features(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)  # the same features in every dtype
    features = [
        F.normalize(torch.randn(37, d, dtype=torch.float64, generator=generator), dim=1)
        for d in (16, 16, 24)
    ]
    return [f.to(dtype).to(KERNEL_DEVICE).requires_grad_() for f in features]


def _affinity(x, y, t, **options):
    scale = torch.tensor(20.0, dtype=x.dtype, device=x.device)
    distill, contrastive = affinity_loss_square(
        x, y, scale, t, t.flip(0), 10.0, compute_contrastive=True, **options
    )
    return distill + 0.5 * contrastive


def _sigmoid(x, y, t, **options):
    contrastive, distill = sigmoid_loss_rows(x, y, 10.0, -3.0, t, t.flip(0), 5.0, 1.0, **options)
    return contrastive + distill


def _run(loss, features, backend, autocast_dtype=None, **options):
    with (
        force_backend(backend),
        torch.autocast(
            "cpu" if KERNEL_DEVICE == "cpu" else "cuda",
            dtype=autocast_dtype or torch.bfloat16,
            enabled=autocast_dtype is not None,
        ),
    ):
        value = loss(*features, **options)
        value.backward()
    return value.detach(), [f.grad for f in features[:2]]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("loss", [_affinity, _sigmoid], ids=["affinity", "sigmoid"])
def test_autocast_runs_the_half_kernels_on_fp32_features(launched, loss, dtype):
    value, grads = _run(loss, _features(), "triton", dtype)
    assert launched and set(launched) == {dtype}
    assert value.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    reference, reference_grads = _run(loss, _features(torch.float64), "torch")
    assert rel_err(value, reference) < TOLERANCE[dtype]
    for grad, expected in zip(grads, reference_grads, strict=True):
        assert rel_err(grad, expected) < TOLERANCE[dtype]
    # Cast once inside the op: the same numbers as features handed over in the half dtype.
    launched.clear()
    half_value, _ = _run(loss, _features(dtype), "triton")
    assert set(launched) == {dtype} and torch.equal(value, half_value)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("loss", [_affinity, _sigmoid], ids=["affinity", "sigmoid"])
def test_compute_dtype_runs_the_half_kernels_without_autocast(launched, loss, dtype):
    value, grads = _run(loss, _features(), "triton", compute_dtype=dtype)
    assert launched and set(launched) == {dtype}
    autocast_value, autocast_grads = _run(loss, _features(), "triton", dtype)
    assert torch.equal(value, autocast_value)
    assert all(torch.equal(g, e) for g, e in zip(grads, autocast_grads, strict=True))


@pytest.mark.parametrize("loss", [_affinity, _sigmoid], ids=["affinity", "sigmoid"])
def test_compute_dtype_float32_keeps_fp32_kernels_under_autocast(launched, loss):
    _run(loss, _features(), "triton", torch.bfloat16, compute_dtype=torch.float32)
    assert launched and set(launched) == {torch.float32}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("loss", [_affinity, _sigmoid], ids=["affinity", "sigmoid"])
def test_compute_dtype_must_be_a_float_dtype(loss, backend):
    with pytest.raises(ValueError, match="compute_dtype"):
        _run(loss, _features(), backend, compute_dtype=torch.float64)


@pytest.mark.parametrize("loss", [_affinity, _sigmoid], ids=["affinity", "sigmoid"])
def test_fp32_features_run_the_fp32_kernels_outside_autocast(launched, loss):
    _run(loss, _features(), "triton")
    assert launched and set(launched) == {torch.float32}


@pytest.mark.parametrize("loss", [_affinity, _sigmoid], ids=["affinity", "sigmoid"])
def test_the_pytorch_path_computes_in_fp32_under_autocast_or_compute_dtype(launched, loss):
    plain, plain_grads = _run(loss, _features(), "torch")
    for options in ({}, {"compute_dtype": torch.float16}):
        value, grads = _run(loss, _features(), "torch", torch.bfloat16, **options)
        assert launched == [] and torch.equal(value, plain)
        assert all(torch.equal(g, e) for g, e in zip(grads, plain_grads, strict=True))


def test_kernel_dtype_only_under_autocast_or_when_asked_on_the_kernel_path():
    x = torch.ones(2, 2, device=KERNEL_DEVICE)
    device = x.device.type
    with force_backend("triton"):
        assert kernel_dtype(x) is None
        with torch.autocast(device, dtype=torch.float16):
            assert kernel_dtype(x) == torch.float16
        assert kernel_dtype(x, torch.bfloat16) == torch.bfloat16
        with torch.autocast(device, dtype=torch.bfloat16):
            assert kernel_dtype(x, torch.float32) is None
    with force_backend("torch"), torch.autocast(device, dtype=torch.bfloat16):
        assert kernel_dtype(x) is None and kernel_dtype(x, torch.float16) is None
