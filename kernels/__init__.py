"""Triton kernels and their launch functions: raw tensors in, tensors out.

Nothing here imports the library. ``INTERPRETING`` records whether the kernels were
defined under the Triton interpreter (``TRITON_INTERPRET=1`` read at import time), which
is the only case in which they accept CPU tensors.
"""

import os
import re

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - triton is Linux-only
    TRITON_AVAILABLE = False

# The first Triton release whose interpreter takes a scalar's element rather than int() of
# its one-element array (triton-lang/triton#9171); 3.6 is the last one checked to need help.
_INTERPRETER_INDEX_FIXED = (3, 8)


def _triton_version() -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", triton.__version__).groups()
    return int(major), int(minor)


def _patch_interpreter_scalar_index() -> None:
    """Make interpreted ``range(0, n)`` over a runtime scalar work under numpy >= 2.4.

    Older interpreters give Triton tensors ``__index__ = int(handle.data)``, and a scalar's
    data is a one-element 1-D array, which numpy >= 2.4 refuses to convert ("only
    0-dimensional arrays can be converted to Python scalars"). The wrapper installs the
    same method on the element, as Triton 3.8 does; compiled kernels never see it.
    """
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_scalar_index_patched", False):
        return

    def index(self) -> int:
        return int(self.handle.data.reshape(-1)[0])

    def patch_lang_tensor(tensor, *scope):
        original(tensor, *scope)
        if scope:  # the scope restores the attribute when the launch ends
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patch_lang_tensor._scalar_index_patched = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRETING and TRITON_AVAILABLE and _triton_version() < _INTERPRETER_INDEX_FIXED:
    _patch_interpreter_scalar_index()
