"""The fold of pruning/compact.py: gather-and-scale of weights and the cut of a mask sample."""

import pytest
import torch
from support import rel_err

from tinyclip_fast.pruning.compact import cut_tower, fold_weight


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("rows", [None, "some", "none"])
@pytest.mark.parametrize("cols", [None, "some"])
@pytest.mark.parametrize("scales", ["none", "rows", "cols", "both"])
def test_fold_weight_values_and_gradients_match_indexing(rows, cols, scales):
    g = torch.Generator().manual_seed(0)
    n, k = 11, 7
    weight = torch.randn(n, k, generator=g, dtype=torch.float64)
    row_idx = {
        None: None,
        "some": torch.tensor([0, 3, 4, 9]),
        "none": torch.tensor([], dtype=torch.long),
    }[rows]
    col_idx = {None: None, "some": torch.tensor([1, 2, 6])}[cols]
    n_kept = n if row_idx is None else row_idx.numel()
    k_kept = k if col_idx is None else col_idx.numel()
    rs = (
        torch.rand(n_kept, generator=g, dtype=torch.float64) if scales in ("rows", "both") else None
    )
    cs = (
        torch.rand(k_kept, generator=g, dtype=torch.float64) if scales in ("cols", "both") else None
    )
    grad = torch.randn(n_kept, k_kept, generator=g, dtype=torch.float64) * 3

    ours = _leaves(weight, *(t for t in (rs, cs) if t is not None))
    ref = _leaves(weight, *(t for t in (rs, cs) if t is not None))

    def scales_of(leaves):
        it = iter(leaves[1:])
        return (next(it) if rs is not None else None), (next(it) if cs is not None else None)

    out = fold_weight(ours[0], row_idx, col_idx, *scales_of(ours))
    expected = ref[0] if row_idx is None else ref[0][row_idx]
    expected = expected if col_idx is None else expected[:, col_idx]
    r_s, c_s = scales_of(ref)
    expected = expected * (1 if r_s is None else r_s[:, None]) * (1 if c_s is None else c_s)
    assert out.shape == expected.shape and torch.allclose(out, expected, rtol=0, atol=1e-15)
    out.backward(grad)
    expected.backward(grad)
    for a, b in zip(ours, ref, strict=True):
        assert a.grad.shape == b.grad.shape
        assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-15)


def test_fold_weight_keeps_weight_dtype_and_vector_form():
    weight = torch.randn(6, 4, dtype=torch.bfloat16, requires_grad=True)
    scale = torch.rand(3, requires_grad=True)  # fp32 mask values on a bf16 weight
    out = fold_weight(weight, torch.tensor([0, 2, 5]), None, scale)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert scale.grad.dtype == torch.float32 and weight.grad.dtype == torch.bfloat16
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    z = torch.rand(2, dtype=torch.float64, requires_grad=True)
    folded = fold_weight(bias, torch.tensor([1, 4]), None, z)
    assert folded.shape == (2,) and rel_err(folded, bias[[1, 4]] * z) == 0


def test_cut_tower_reads_the_zero_pattern():
    z_h = torch.tensor([0.5, 0.0, 1.0, 0.25])
    # Two layers of up to 3 heads (head width 2) and 4 MLP channels; layer 1 has 2 heads and
    # 3 MLP channels (a pruned student's padded rows), its last head cut.
    z_head = torch.tensor([[1.0, 0.0, 0.5], [0.7, 0.0, 0.0]])
    z_int = torch.tensor([[0.0, 1.0, 1.0, 0.3], [1.0, 1.0, 1.0, 0.0]])
    cut = cut_tower(z_h, z_head, z_int, [3, 2], [4, 3], head_width=2)
    assert cut.width == 3 and cut.hidden.tolist() == [0, 2, 3]
    assert cut.z_hidden.tolist() == [0.5, 1.0, 0.25]
    first, second = cut.layers
    assert first.heads == 2 and first.head_cols.tolist() == [0, 1, 4, 5]
    assert first.qkv_rows.tolist() == [0, 1, 4, 5, 6, 7, 10, 11, 12, 13, 16, 17]
    assert first.z_head_cols.tolist() == [1.0, 1.0, 0.5, 0.5]
    assert first.mlp == 3 and first.mlp_kept.tolist() == [1, 2, 3]
    assert second.heads == 1 and second.head_cols.tolist() == [0, 1]
    assert second.mlp == 3 and second.mlp_kept is None  # all of its own channels kept
    assert second.z_mlp.tolist() == [1.0, 1.0, 1.0]
