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
