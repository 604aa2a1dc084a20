"""Limits of the kernel families that the library checks before it launches them.

Plain Python (no triton, no torch): the configuration imports it to refuse bad input early.
"""

# The fused softmax and sigmoid losses stream at most this many teachers' tiles per program.
MAX_TEACHERS = 4
