"""Which implementation runs an op: compiled Triton, interpreted Triton, or PyTorch.

CUDA tensors take the compiled Triton kernels. CPU tensors take the PyTorch path, except
when the kernels were defined under ``TRITON_INTERPRET=1``: then they run through the
interpreter, which is how the test suite exercises every kernel without a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from tinyclip_fast.kernels import INTERPRETING, TRITON_AVAILABLE

_forced: str | None = None
# The torch.library namespace of the package's registered operators.
OP_NAMESPACE = "tinyclip_fast"
HALF_DTYPES = (torch.bfloat16, torch.float16)
BACKENDS = ("triton", "torch")


def use_triton(tensor: torch.Tensor) -> bool:
    """True when ``tensor``'s op should run the Triton kernels."""
    if _forced is not None:
        return _forced == "triton"
    if not TRITON_AVAILABLE:
        return False
    if tensor.device.type == "cuda":
        return True
    return tensor.device.type == "cpu" and INTERPRETING


@contextlib.contextmanager
def force_backend(name: str | None) -> Iterator[None]:
    """Run the ops in this block on one backend ("triton" or "torch"); for tests and benchmarks."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    if name == "triton" and not TRITON_AVAILABLE:
        raise RuntimeError("backend 'triton' requested but triton is not installed")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def kernel_dtype(tensor: torch.Tensor, requested: torch.dtype | None = None) -> torch.dtype | None:
    """The half dtype the kernels take fp32 features in for ``tensor``'s op: ``requested``
    (bf16/fp16; fp32 keeps fp32 operands) or else autocast's on its device (bf16/fp16
    operands on the tensor cores, fp32 accumulation); None outside autocast and on the
    PyTorch path, which computes in fp32 from the features as given."""
    if requested is not None and requested not in (*HALF_DTYPES, torch.float32):
        raise ValueError(f"compute_dtype must be bfloat16, float16 or float32, got {requested}")
    device = tensor.device.type
    if not use_triton(tensor):
        return None
    if requested is not None:
        return requested if requested in HALF_DTYPES else None
    if not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if dtype in HALF_DTYPES else None


def to_kernel_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` cast once to ``dtype`` when it is fp32 (float64 keeps its float64 math)."""
    if dtype is None or tensor.dtype != torch.float32:
        return tensor
    return tensor.to(dtype)
