"""HardConcreteMask: sample statistics, deterministic masks, clamping, initial state."""

import math

import pytest
import torch

from tinyclip_fast.pruning.hard_concrete import HardConcreteMask


def test_sample_nonzero_frequency_matches_prob_nonzero():
    """Each column is one log_alpha drawn n times; 5-sigma binomial bound on the frequency."""
    n = 20_000
    log_alphas = torch.tensor([-4.0, -2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0])
    mask = HardConcreteMask((n, log_alphas.numel()))
    with torch.no_grad():
        mask.log_alpha.copy_(log_alphas.expand(n, -1))
    z = mask.sample()
    assert z.min() >= 0 and z.max() <= 1
    frequency = (z != 0).double().mean(0)
    p = mask.prob_nonzero()[0].double()
    bound = 5 * torch.sqrt(p * (1 - p) / n)
    assert ((frequency - p).abs() <= bound).all(), (frequency, p)
    # The closed form: P(z > 0) = P(s > -l / (r - l)) for logistic noise.
    q = 0.1 / 1.2
    closed = torch.sigmoid(log_alphas.double() - (2 / 3) * math.log(q / (1 - q)))
    assert torch.allclose(p, closed, rtol=1e-6)
    # Exact ones appear too (the stretch past 1 is what makes the mask hard).
    assert (z[:, -1] == 1).float().mean() > 0.5


def test_sample_gradient_flows_except_through_clamped_entries():
    mask = HardConcreteMask((64, 16), init_log_alpha=0.0)
    z = mask.sample()
    weights = torch.randn_like(z)
    (z * weights).sum().backward()
    grad = mask.log_alpha.grad
    clamped = (z == 0) | (z == 1)
    assert clamped.any() and (~clamped).any()
    assert (grad[clamped] == 0).all()
    assert (grad[~clamped] != 0).all()
    assert mask.prob_nonzero().requires_grad


@pytest.mark.parametrize("shape", [(3, 12), (40,), (2, 3, 7)])
def test_deterministic_zero_count_is_rounded_expectation_per_group(shape):
    mask = HardConcreteMask(shape)
    with torch.no_grad():
        mask.log_alpha.uniform_(-3.0, 3.0)
    mask.eval()
    z = mask()
    assert torch.equal(z, mask.deterministic())
    soft = torch.sigmoid(mask.log_alpha / (2 / 3) * 0.8)
    expected_zeros = torch.round(shape[-1] - mask.prob_nonzero().sum(-1))
    assert expected_zeros.max() > 0
    assert torch.equal((z == 0).sum(-1).to(expected_zeros.dtype), expected_zeros)
    kept = z != 0
    assert torch.equal(z[kept], soft[kept])
    # The zeroed entries are the smallest soft values of their group.
    largest_zeroed = torch.where(kept, -torch.inf, soft).amax(-1)
    smallest_kept = torch.where(kept, soft, torch.inf).amin(-1)
    assert (largest_zeroed <= smallest_kept).all()


def test_training_forward_samples():
    mask = HardConcreteMask(500, init_log_alpha=0.0)
    mask.train()
    assert not torch.equal(mask(), mask())


def test_clamp():
    mask = HardConcreteMask((4, 5))
    with torch.no_grad():
        mask.log_alpha.copy_(torch.linspace(-20, 20, 20).view(4, 5))
    mask.clamp_()
    assert mask.log_alpha.min().item() == pytest.approx(math.log(0.01))
    assert mask.log_alpha.max().item() == pytest.approx(math.log(100))
    assert mask.log_alpha.requires_grad


def test_initial_masks_are_near_one():
    mask = HardConcreteMask((12, 3072))
    assert (mask.log_alpha == 10).all()
    assert mask.sample().mean() > 0.999
    assert mask.prob_nonzero().min() > 0.9999
    mask.eval()
    z = mask()
    assert (z != 0).all() and z.min() > 0.9999


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [(((),), {}, "shape"), ((4,), {"limit_l": 0.1}, "limit")],
    ids=["empty-shape", "positive-lower-limit"],
)
def test_bad_arguments_are_refused(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        HardConcreteMask(*args, **kwargs)
