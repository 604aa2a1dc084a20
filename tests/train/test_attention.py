"""The xformers attention route, with a stand-in for xformers.ops on the CPU."""

import sys
import types

import open_clip
import torch
from support import STUDENT_CFG, rel_err

from tinyclip_fast.train.attention import xformers_attention


def test_xformers_route_matches_torch_sdpa(monkeypatch):
    # A stand-in for xformers.ops with its [batch, tokens, heads, dim] layout, so the route's
    # layout handling is checked on the CPU; the real kernel needs CUDA.
    calls = []
    torch_sdpa = torch.nn.functional.scaled_dot_product_attention

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        calls.append(q.shape)
        out = torch_sdpa(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=attn_bias is not None, dropout_p=p, scale=scale,
        )  # fmt: skip
        return out.transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    ops.LowerTriangularMask = object
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)

    model = open_clip.model.CLIP(**STUDENT_CFG).train()
    images, texts = torch.randn(3, 3, 32, 32), torch.randint(1, 999, (3, 16))
    expected = model(images, texts)
    with xformers_attention():
        got = model(images, texts)
    assert torch.nn.functional.scaled_dot_product_attention is torch_sdpa  # restored
    assert len(calls) == 2  # the vision tower's layers; the causal text tower stays on torch
    for a, b in zip(got, expected, strict=True):
        assert rel_err(a, b) < 1e-6
