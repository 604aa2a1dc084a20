"""An auto stage's policy: the prune step (held target, last allowed step, resume) and the
warning of a prune far below or above its target."""

import pytest

from tinyclip_fast.pruning.policy import (
    DEFAULT_HOLD_STEPS,
    DEFAULT_TOLERANCE,
    FAR_BELOW_TARGET,
    OVERSHOOT_MARGIN,
    PruneTrigger,
    prune_warning,
    target_miss,
)


def first_fire(trigger, sparsities, start=0):
    """The step at which ``trigger`` fires, fed ``sparsities[k]`` at step ``start + k``."""
    for offset, sparsity in enumerate(sparsities):
        if trigger.should_prune(start + offset, sparsity):
            return start + offset
    return None


def test_fires_once_the_target_has_held_for_hold_steps():
    trigger = PruneTrigger(0.5, 100, tolerance=0.02, hold_steps=3, warmup_steps=0)
    # held at steps 2, 3 (broken at 4), then 5, 6, 7: fires at 7.
    sparsities = [0.1, 0.3, 0.49, 0.51, 0.53, 0.515, 0.5, 0.485, 0.5]
    assert first_fire(trigger, sparsities) == 7
    assert trigger.reason == "auto: held within 2.0% of the target for 3 steps"
    assert trigger.warning is None


def test_tolerance_is_inclusive_on_both_sides():
    trigger = PruneTrigger(0.5, 100, tolerance=0.25, hold_steps=2)
    assert first_fire(trigger, [0.25, 0.75]) == 1
    trigger = PruneTrigger(0.5, 100, tolerance=0.25, hold_steps=2)
    assert first_fire(trigger, [0.25, 0.76, 0.74]) is None


def test_waits_for_the_end_of_the_target_warmup():
    trigger = PruneTrigger(0.5, 100, tolerance=0.02, hold_steps=2, warmup_steps=6)
    assert first_fire(trigger, [0.5] * 10) == 6


def test_fires_at_the_last_step_with_a_warning_when_never_held():
    trigger = PruneTrigger(0.5, 8, tolerance=0.02, hold_steps=3, warmup_steps=4)
    assert first_fire(trigger, [0.1 * k for k in range(20)]) == 8
    assert trigger.reason == "auto: the last allowed prune step 8"
    assert trigger.warning == (
        "the expected sparsity did not hold within 2.0% of its target 50.0% for 3 steps by "
        "step 8, the last allowed prune step: pruned there"
    )


def test_holding_at_the_last_step_is_not_a_warning():
    trigger = PruneTrigger(0.5, 4, tolerance=0.02, hold_steps=2)
    assert first_fire(trigger, [0.0, 0.0, 0.0, 0.5, 0.5]) == 4
    assert trigger.reason.startswith("auto: held") and trigger.warning is None


def test_a_fixed_step_fires_there_whatever_the_sparsity():
    trigger = PruneTrigger(0.5, 5, auto=False, warmup_steps=5)
    assert first_fire(trigger, [0.5] * 10) == 5
    assert trigger.reason == "the configured prune step 5" and trigger.warning is None


@pytest.mark.parametrize("auto", [True, False])
def test_refuses_a_last_step_before_the_warmup_ends(auto):
    with pytest.raises(ValueError, match="last prune step 9 comes before the sparsity target's "):
        PruneTrigger(0.5, 9, auto=auto, warmup_steps=10)
    PruneTrigger(0.5, 10, auto=auto, warmup_steps=10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"last_step": 0}, "last prune step must be >= 1"),
        ({"tolerance": 0.0}, "tolerance must be in"),
        ({"tolerance": 1.0}, "tolerance must be in"),
        ({"hold_steps": 0}, "prune_hold_steps must be >= 1"),
    ],
)
def test_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruneTrigger(0.5, **{"last_step": 10, **kwargs})


def test_steps_must_increase():
    trigger = PruneTrigger(0.5, 10)
    trigger.should_prune(3, 0.0)
    with pytest.raises(ValueError, match="step 3 asked after step 3"):
        trigger.should_prune(3, 0.0)


def test_defaults():
    trigger = PruneTrigger(0.5, 10)
    assert (trigger.tolerance, trigger.hold_steps) == (DEFAULT_TOLERANCE, DEFAULT_HOLD_STEPS)
    assert trigger.warmup_steps == 0 and trigger.auto


@pytest.mark.parametrize("cut", [1, 3, 5, 6, 7])
def test_resume_mid_hold_fires_at_the_same_step(cut):
    sparsities = [0.2, 0.49, 0.5, 0.3, 0.5, 0.51, 0.5, 0.49, 0.5, 0.5]

    def fresh():
        return PruneTrigger(0.5, 50, tolerance=0.02, hold_steps=4, warmup_steps=2)

    whole = fresh()
    expected = first_fire(whole, sparsities)
    assert expected == 7
    before = fresh()
    assert first_fire(before, sparsities[:cut]) is None
    state = before.state_dict()
    resumed = fresh()
    resumed.load_state_dict(dict(state))
    assert first_fire(resumed, sparsities[cut:], start=cut) == expected
    assert resumed.reason == whole.reason
    with pytest.raises(ValueError, match="asked after"):
        resumed.should_prune(cut - 1, 0.5)


@pytest.mark.parametrize(
    ("expected", "target", "miss"),
    [
        (0.1, 0.5, "under"),
        (FAR_BELOW_TARGET * 0.5 - 1e-6, 0.5, "under"),
        (FAR_BELOW_TARGET * 0.5, 0.5, None),
        (0.5, 0.5, None),
        (0.5 + OVERSHOOT_MARGIN, 0.5, None),
        (0.5 + OVERSHOOT_MARGIN + 1e-6, 0.5, "over"),
        (0.484, 0.25, "over"),
    ],
)
def test_target_miss_in_both_directions(expected, target, miss):
    assert target_miss(expected, target) == miss


def test_prune_warning_lines():
    args = {"mask_steps": 3, "mask_lr": 0.02, "lagrangian_lr": 0.05}
    under = prune_warning(0, 0.01, 0.5, **args)
    assert under.startswith("warning: stage 0 pruned far below its target sparsity: ")
    assert "3 steps at optim.mask_lr 0.02 and optim.lagrangian_lr 0.05" in under
    over = prune_warning(1, 0.484, 0.25, **args)
    assert over.startswith("warning: stage 1 pruned above its target sparsity: expected 48.4% ")
    assert "of target 25.0%, more than 5.0% over" in over and "two_sided" in over
    assert "\n" not in under + over
    assert prune_warning(0, 0.26, 0.25, **args) is None
    assert prune_warning(0, 0.26, 0.25, margin=0.005, **args) is not None
