"""Shared test set-up.

Without a GPU the Triton kernels run under the interpreter, which must be switched on
before any kernel is defined, so this happens before tinyclip_fast is imported. With a GPU
the kernels compile for CUDA and CPU tensors take the PyTorch path.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN/inf anywhere gives inf."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    if not (torch.isfinite(actual).all() and torch.isfinite(expected).all()):
        return float("inf")
    denom = expected.norm().clamp_min(1e-30)
    return float((actual - expected).norm() / denom)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
