"""A stage: its optimizers, the re-warm-up of the rate after pruning, the optimizer step's
clamps, and pruning that keeps the AdamW moments and reports how far the masks got."""

import contextlib
import copy
import math

import pytest
import torch
from support import make_config, make_teacher

from tinyclip_fast.pruning.masked_clip import MaskedCLIP
from tinyclip_fast.train.config import OptimConfig, StageConfig
from tinyclip_fast.train.objective import build_objective
from tinyclip_fast.train.optim import learning_rate
from tinyclip_fast.train.stage import Stage, StageContext


def _context(tmp_path, teacher, **overrides):
    optim = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=2, prune_warmup_steps=4)
    config = make_config(tmp_path, [StageConfig(steps=20)], optim=optim, **overrides)
    return StageContext(
        config=config,
        teacher=teacher,
        device=torch.device("cpu"),
        world_size=1,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        loss_fn=build_objective(config.loss),
        autocast=contextlib.nullcontext,
        micro_batch=4,
        fixed_scale=None,
        sigmoid=False,
    )


def test_masked_stage_has_a_controller_and_its_optimizers(tmp_path):
    teacher = make_teacher()
    ctx = _context(tmp_path, teacher)
    spec = StageConfig(steps=20, sparsity=0.5, prune_step=8)
    stage = Stage.start(0, spec, MaskedCLIP(copy.deepcopy(teacher)), ctx)
    assert stage.masked and stage.controller is not None
    assert set(stage.state_dicts()) == {
        "optimizer",
        "controller",
        "mask_optimizer",
        "multiplier_optimizer",
        "prune_trigger",
    }
    assert [stage.prunes_at(s) for s in (6, 7, 8)] == [False, False, True]
    assert stage.trigger.reason == "the configured prune step 8"
    plain = Stage.start(0, StageConfig(steps=20), copy.deepcopy(teacher), ctx)
    assert not plain.masked and set(plain.state_dicts()) == {"optimizer"}
    assert not plain.prunes_at(8)


@pytest.mark.parametrize(
    "steps, prune_step, rewarm",
    [(20, 8, 3), (20, 16, 1), (40, 8, 4)],  # a quarter of the steps left, at most 4
)
def test_rate_ramps_up_again_over_at_most_a_quarter_of_the_steps_left(
    tmp_path, steps, prune_step, rewarm
):
    teacher = make_teacher()
    ctx = _context(tmp_path, teacher)
    spec = StageConfig(steps=steps, sparsity=0.5, prune_step=prune_step)
    stage = Stage.start(0, spec, MaskedCLIP(copy.deepcopy(teacher)), ctx)
    optim = ctx.config.optim
    for step in range(steps):
        if step == prune_step:
            stage, _ = stage.prune(prune_step)
        expected = learning_rate(step, steps, optim, prune_step, rewarm)
        assert stage.set_learning_rate(step) == expected
        assert all(g["lr"] == expected for g in stage.optimizer.param_groups)
    plain = [learning_rate(s, steps, optim) for s in range(steps)]
    after = stage.set_learning_rate(prune_step) / plain[prune_step]
    assert after == pytest.approx(1 / rewarm)


def test_optimizer_step_clamps_the_logit_scale(tmp_path):
    teacher = make_teacher()
    ctx = _context(tmp_path, teacher)
    stage = Stage.start(0, StageConfig(steps=4), copy.deepcopy(teacher), ctx)
    with torch.no_grad():
        stage.model.logit_scale.fill_(10.0)
    stage.model.logit_scale.grad = torch.zeros_like(stage.model.logit_scale)
    stage.optimizer_step()
    limit = math.log(ctx.config.loss.max_scale)
    assert float(stage.model.logit_scale.detach()) == pytest.approx(limit)
    assert all(p.grad is None for p in stage.model.parameters())


@pytest.mark.parametrize("at_end", [False, True])
def test_pruning_reports_the_masks_and_carries_the_optimizer(tmp_path, at_end):
    teacher = make_teacher()
    ctx = _context(tmp_path, teacher)
    spec = StageConfig(steps=4, sparsity=0.5, prune_step=4 if at_end else 2)
    stage = Stage.start(0, spec, MaskedCLIP(copy.deepcopy(teacher)), ctx)
    assert at_end or stage.prunes_at(2)
    pruned, report = stage.prune_at_end() if at_end else stage.prune(2)
    assert not pruned.masked and pruned.index == 0
    assert report.stage_step == (4 if at_end else 2) and report.warning is None
    assert report.reason == f"the configured prune step {report.stage_step}"
    assert report.params_before > 0 and report.params_after > 0
    assert 0.0 <= report.expected_sparsity < 1.0
    assert (pruned.optimizer is None) == at_end
    assert set(pruned.state_dicts()) == (set() if at_end else {"optimizer", "pruned_at"})
