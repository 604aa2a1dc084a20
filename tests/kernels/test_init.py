"""kernels/__init__.py: the interpreter fix for numpy >= 2.4, applied only where needed."""

import torch
import triton
import triton.language as tl
from support import KERNEL_DEVICE

from tinyclip_fast import kernels


@triton.jit
def _sum_first_kernel(x_ptr, out_ptr, n):
    # range() over a runtime int: the interpreter calls __index__ on a Triton scalar here.
    total = tl.zeros((), tl.float32)
    for i in range(0, n):
        total += tl.load(x_ptr + i)
    tl.store(out_ptr, total)


def test_loop_over_a_runtime_bound():
    x = torch.randn(37, device=KERNEL_DEVICE)
    out = torch.empty(1, device=KERNEL_DEVICE)
    for n in (1, 20, 37):
        _sum_first_kernel[(1,)](x, out, n)
        torch.testing.assert_close(out[0], x[:n].sum())


def test_patch_only_when_interpreting_an_affected_triton():
    from triton.runtime import interpreter

    patched = getattr(interpreter._patch_lang_tensor, "_scalar_index_patched", False)
    expected = kernels.INTERPRETING and kernels._triton_version() < kernels._INTERPRETER_INDEX_FIXED
    assert patched == expected
