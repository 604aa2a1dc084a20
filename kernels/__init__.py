"""Triton kernels and their launch functions: raw tensors in, tensors out.

Nothing here imports the library. ``INTERPRETING`` records whether the kernels were
defined under the Triton interpreter (``TRITON_INTERPRET=1`` read at import time), which
is the only case in which they accept CPU tensors.
"""

import os

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - triton is Linux-only
    TRITON_AVAILABLE = False
