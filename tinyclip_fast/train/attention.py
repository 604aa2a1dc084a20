"""The optional xformers attention route (``--set attention=xformers``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F


def check_attention(attention: str, device: torch.device) -> None:
    if attention != "xformers":
        return
    if device.type != "cuda":
        raise ValueError("attention='xformers' needs a CUDA device; use attention='sdpa'")
    try:
        import xformers.ops  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "attention='xformers' but xformers is not installed: "
            "pip install 'tinyclip-fast[xformers]', or use attention='sdpa'"
        ) from err


@contextlib.contextmanager
def xformers_attention() -> Iterator[None]:
    """Route torch SDPA calls through xformers' memory-efficient kernel while active.

    Covers every attention that calls ``F.scaled_dot_product_attention`` at run time: open_clip's
    nn.MultiheadAttention in training, MaskedCLIP, pruned students. Calls with an explicit
    ``attn_mask`` (the text tower's additive causal mask) stay on torch SDPA.
    """
    import xformers.ops as xops

    torch_sdpa = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or kw:
            return torch_sdpa(
                query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                is_causal=is_causal, scale=scale, **kw,
            )  # fmt: skip
        # torch's layout is [batch, heads, tokens, dim]; xformers' is [batch, tokens, heads, dim].
        out = xops.memory_efficient_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            attn_bias=xops.LowerTriangularMask() if is_causal else None, p=dropout_p, scale=scale,
        )  # fmt: skip
        return out.transpose(1, 2)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = torch_sdpa
