"""The controller and the prune trigger together on a masked tiny CLIP distilled from its
teacher: the two-sided form prunes within the tolerance of the target, the one-sided form
overshoots and the prune warning says so."""

import copy

import pytest
import torch
from support import TEXT, make_teacher

from tinyclip_fast.ops.backend import force_backend
from tinyclip_fast.pruning.masked_clip import MaskedCLIP
from tinyclip_fast.pruning.policy import OVERSHOOT_MARGIN, PruneTrigger, prune_warning
from tinyclip_fast.pruning.sparsity import SparsityController

TARGET, WARMUP, LAST_STEP, MASK_LR = 0.3, 10, 60, 0.2


def mask_learning(control, trigger):
    """Mask learning on feature matching until ``trigger`` fires: (step, expected sparsity)."""
    teacher = make_teacher()
    masked = MaskedCLIP(copy.deepcopy(teacher).requires_grad_(True)).train()
    controller = SparsityController(TARGET, warmup_steps=WARMUP, control=control)
    mask_opt, multiplier_opt = controller.build_optimizers(
        masked.mask_parameters(), lr=MASK_LR, multiplier_lr=0.05
    )
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 32, 32, generator=generator)
    texts = torch.randint(1, TEXT["vocab_size"], (16, TEXT["context_length"]), generator=generator)
    with torch.no_grad():
        target_image, target_text, _ = teacher(images, texts)
    step = 0
    with force_backend("torch"):
        while not trigger.should_prune(step, float(masked.expected_sparsity().detach())):
            masked.fix_mask_sample(step)
            image, text, _ = masked(images, texts)
            loss = (image - target_image).square().sum(-1).mean()
            loss = loss + (text - target_text).square().sum(-1).mean()
            loss = loss + controller(masked.expected_sparsity(), step)
            for optimizer in (mask_opt, multiplier_opt):
                optimizer.zero_grad()
            loss.backward()
            for optimizer in (mask_opt, multiplier_opt):
                optimizer.step()
            masked.clamp_masks()
            step += 1
    return step, float(masked.expected_sparsity().detach())


def test_two_sided_auto_prunes_where_the_target_is_held():
    trigger = PruneTrigger(TARGET, LAST_STEP, tolerance=0.02, hold_steps=5, warmup_steps=WARMUP)
    step, sparsity = mask_learning("two_sided", trigger)
    assert WARMUP <= step < LAST_STEP and trigger.warning is None
    assert abs(sparsity - TARGET) <= 0.02
    assert (
        prune_warning(0, sparsity, TARGET, mask_steps=step, mask_lr=MASK_LR, lagrangian_lr=0.05)
        is None
    )


@pytest.mark.parametrize("control", ["one_sided", "two_sided"])
def test_a_fixed_late_prune_step(control):
    trigger = PruneTrigger(TARGET, LAST_STEP, auto=False)
    step, sparsity = mask_learning(control, trigger)
    assert step == LAST_STEP
    warning = prune_warning(
        0, sparsity, TARGET, mask_steps=step, mask_lr=MASK_LR, lagrangian_lr=0.05
    )
    if control == "one_sided":
        assert sparsity > TARGET + OVERSHOOT_MARGIN
        assert warning.startswith("warning: stage 0 pruned above its target sparsity")
    else:
        assert abs(sparsity - TARGET) <= 0.02 and warning is None
