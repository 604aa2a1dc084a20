"""Expected sparsity (docs/method.md §3b) and the Lagrangian sparsity controller in both forms."""

import pytest
import torch

from tinyclip_fast.pruning.hard_concrete import HardConcreteMask
from tinyclip_fast.pruning.policy import OVERSHOOT_MARGIN
from tinyclip_fast.pruning.sparsity import (
    SparsityController,
    TowerMaskProbs,
    expected_remaining_params,
    expected_sparsity,
    full_prunable_params,
)


def outer_formula(tower):
    """docs/method.md §3b's sums of outer products, written out per layer in float64."""
    p_h, w = tower["p_h"].double(), tower["width"]
    per_head = (4 * w**2 + 4 * w) / tower["heads"]
    attention = sum(torch.outer(p_h, p).sum() for p in tower["p_head"].double()) * per_head / w
    mlp = sum(torch.outer(p_h, p).sum() for p in tower["p_int"].double()) * 2
    return attention + mlp


def test_hand_computed_example():
    tower = TowerMaskProbs(
        p_h=torch.tensor([1.0, 0.5, 0.0, 1.0]),
        p_head=torch.tensor([[1.0, 0.5]]),
        p_int=torch.tensor([[1.0, 1.0, 0.0]]),
        width=4,
        heads=2,
    )
    # params_per_head = (64 + 16) / 2 = 40; attention 2.5 * 1.5 * 40 / 4; MLP 2 * 2.5 * 2.
    assert expected_remaining_params([tower]).item() == pytest.approx(37.5 + 10.0)
    assert full_prunable_params([tower]) == 80 + 24
    assert expected_sparsity([tower]).item() == pytest.approx(1 - 47.5 / 104)


def test_all_ones_is_zero_sparsity_and_vit_b_count():
    vit_b = {
        "p_h": torch.ones(768),
        "p_head": torch.ones(12, 12),
        "p_int": torch.ones(12, 3072),
        "width": 768,
        "heads": 12,
    }
    # 12 blocks x (attention 4 w^2 + 4 w, MLP weights 2 w M).
    assert full_prunable_params([vit_b]) == 12 * (4 * 768**2 + 4 * 768) + 12 * 2 * 768 * 3072
    assert expected_remaining_params([vit_b]).item() == pytest.approx(full_prunable_params([vit_b]))
    assert expected_sparsity([vit_b]).abs().item() < 1e-6


def test_random_towers_match_outer_products_jointly():
    towers = [
        {
            "p_h": torch.rand(24),
            "p_head": torch.rand(3, 4),
            "p_int": torch.rand(3, 40),
            "width": 24,
            "heads": 4,
        },
        {
            "p_h": torch.rand(16),
            "p_head": torch.rand(2, 2),
            "p_int": torch.rand(2, 64),
            "width": 16,
            "heads": 2,
        },
    ]
    expected = sum(outer_formula(t) for t in towers)
    assert expected_remaining_params(towers).item() == pytest.approx(expected.item(), rel=1e-5)
    full = sum(
        outer_formula({**t, **{k: torch.ones_like(t[k]) for k in ("p_h", "p_head", "p_int")}})
        for t in towers
    )
    assert full_prunable_params(towers) == pytest.approx(full.item())
    assert expected_sparsity(towers).item() == pytest.approx(1 - (expected / full).item(), rel=1e-5)


def test_tower_shape_check():
    with pytest.raises(ValueError, match="p_head"):
        TowerMaskProbs(torch.ones(4), torch.ones(2, 3), torch.ones(2, 5), width=4, heads=2)


def test_schedule_and_penalty_values():
    controller = SparsityController(
        target_sparsity=0.5, start_sparsity=0.1, warmup_steps=1000, control="one_sided"
    )
    assert [controller.target_at(s) for s in (0, 250, 1000, 5000)] == pytest.approx(
        [0.1, 0.2, 0.5, 0.5]
    )
    gap = 0.5 - 0.3
    assert controller(torch.tensor(0.3), 2000).item() == pytest.approx(10 * gap + 10 * gap**2)
    assert controller(torch.tensor(0.7), 2000).item() == 0.0
    classic = SparsityController(0.5, control="two_sided", init_multipliers=(0.0, 10.0))
    assert classic(torch.tensor(0.7), 2000).item() == pytest.approx(10 * 0.04)
    with torch.no_grad():
        classic.lambda_1.fill_(10.0)
    assert classic(torch.tensor(0.7), 2000).item() == pytest.approx(10 * 0.2 + 10 * 0.04)
    assert classic(torch.tensor(0.3), 2000).item() == pytest.approx(-10 * 0.2 + 10 * 0.04)


@pytest.mark.parametrize(
    ("control", "multipliers", "betas"),
    [("one_sided", (10.0, 10.0), (0.9, 0.999)), ("two_sided", (0.0, 100.0), (0.5, 0.999))],
)
def test_initial_multipliers_and_mask_betas_of_each_form(control, multipliers, betas):
    controller = SparsityController(0.5, control=control)
    assert (controller.lambda_1.item(), controller.lambda_2.item()) == multipliers
    mask_opt, multiplier_opt = controller.build_optimizers([torch.nn.Parameter(torch.ones(3))])
    assert mask_opt.param_groups[0]["betas"] == betas
    assert multiplier_opt.param_groups[0]["maximize"]
    given = SparsityController(0.5, control=control, init_multipliers=(1.0, 2.0))
    assert (given.lambda_1.item(), given.lambda_2.item()) == (1.0, 2.0)


def test_unknown_control_is_refused():
    with pytest.raises(ValueError, match="control must be one of"):
        SparsityController(0.5, control="both")


def tiny_masks():
    return {
        "hidden": HardConcreteMask(16, init_log_alpha=1.0),
        "head": HardConcreteMask((2, 4), init_log_alpha=1.0),
        "int": HardConcreteMask((2, 32), init_log_alpha=1.0),
    }


def sparsity_of(masks):
    return expected_sparsity(
        [
            TowerMaskProbs(
                masks["hidden"].prob_nonzero(),
                masks["head"].prob_nonzero(),
                masks["int"].prob_nonzero(),
                width=16,
                heads=4,
            )
        ]
    )


@pytest.mark.parametrize("control", ["one_sided", "two_sided"])
def test_ascent_moves_multipliers_and_raises_sparsity(control):
    masks = tiny_masks()
    controller = SparsityController(target_sparsity=0.6, warmup_steps=0, control=control)
    mask_opt, multiplier_opt = controller.build_optimizers([m.log_alpha for m in masks.values()])
    history = [(sparsity_of(masks).item(), controller.lambda_1.item(), controller.lambda_2.item())]
    for step in range(20):
        penalty = controller(sparsity_of(masks), step)
        mask_opt.zero_grad()
        multiplier_opt.zero_grad()
        penalty.backward()
        mask_opt.step()
        multiplier_opt.step()
        for m in masks.values():
            m.clamp_()
        history.append(
            (sparsity_of(masks).item(), controller.lambda_1.item(), controller.lambda_2.item())
        )
    sparsities, l1s, l2s = zip(*history, strict=True)
    assert sparsities[-1] < 0.6  # still below target: the multipliers kept moving every step
    assert all(b > a for a, b in zip(l2s, l2s[1:], strict=False))
    assert all(b > a for a, b in zip(sparsities, sparsities[1:], strict=False))
    if control == "one_sided":
        assert all(b > a for a, b in zip(l1s, l1s[1:], strict=False))
    else:
        # Classic form: d/dl1 = s - t < 0 below target, so ascent lowers l1 (from 0: it
        # pushes s up along with the quadratic term).
        assert all(b < a for a, b in zip(l1s, l1s[1:], strict=False))
        assert l1s[-1] < 0


def drive_masks(control, target, steps, lr=0.1):
    """Expected sparsity after each of ``steps`` steps of the penalty alone on tiny masks."""
    masks = tiny_masks()
    controller = SparsityController(target_sparsity=target, warmup_steps=10, control=control)
    mask_opt, multiplier_opt = controller.build_optimizers(
        [m.log_alpha for m in masks.values()], lr=lr, multiplier_lr=0.05
    )
    sparsities = []
    for step in range(steps):
        penalty = controller(sparsity_of(masks), step)
        for optimizer in (mask_opt, multiplier_opt):
            optimizer.zero_grad()
        penalty.backward()
        for optimizer in (mask_opt, multiplier_opt):
            optimizer.step()
        for m in masks.values():
            m.clamp_()
        sparsities.append(sparsity_of(masks).item())
    return sparsities


def test_one_sided_overshoots_and_stays_over():
    sparsities = drive_masks("one_sided", 0.3, 150)
    assert sparsities[-1] > 0.3 + OVERSHOOT_MARGIN
    assert min(sparsities[-50:]) > 0.3 + OVERSHOOT_MARGIN  # nothing pulls the masks back


def test_two_sided_pulls_back_and_holds_the_target():
    sparsities = drive_masks("two_sided", 0.3, 150)
    assert max(sparsities) > 0.3  # it went past the target...
    assert all(abs(s - 0.3) <= 0.02 for s in sparsities[-30:])  # ...and came back to hold it
