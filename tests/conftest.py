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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
