"""One stage of a run: the model it trains and everything that updates it.

A :class:`Stage` owns the model (a CLIP, or a MaskedCLIP until an automatic-inheritance
stage prunes), its AdamW, and for a MaskedCLIP the sparsity controller with the mask and
Lagrange-multiplier optimizers (docs/method.md §3b). It knows how to run the forward and
backward of a batch (train/step.py), add the sparsity penalty, step the optimizers (clip,
GradScaler step, zero grads, clamps) and prune itself when its :class:`PruneTrigger` fires
(fed the masks' expected sparsity in the original teacher's frame at the top of every step):
the compact student's optimizer keeps the AdamW moments of the kept channels and the
learning rate ramps up again from that step. Hard-concrete masks are drawn from a generator
seeded by the step (``MaskedCLIP.fix_mask_sample``): every micro-batch, both GradCache
passes and every DDP rank use one mask sample per step, as one forward over the whole batch
would.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tinyclip_fast.pruning.masked_clip import MaskedCLIP
from tinyclip_fast.pruning.policy import PruneTrigger
from tinyclip_fast.pruning.sparsity import SparsityController
from tinyclip_fast.train.checkpoint import TrainingState
from tinyclip_fast.train.config import DistillConfig, StageConfig
from tinyclip_fast.train.optim import (
    carry_optimizer_state,
    learning_rate,
    make_optimizer,
    rewarm_steps,
)
from tinyclip_fast.train.step import train_step
from tinyclip_fast.train.students import (
    count_parameters,
    relative_sparsity,
    sparsity_of_teacher,
    teacher_prunable_params,
)

# The mask sample of a step is drawn from a generator seeded by seed * MASK_SEED_STRIDE + step.
MASK_SEED_STRIDE = 1_000_003


@dataclass
class StageContext:
    """What every stage of a run shares: the configuration, the ORIGINAL teacher (sparsity
    targets are fractions of its prunable parameters), the device, the GradScaler, the loss
    and how forwards run (autocast, micro-batch size, fixed scale, sigmoid bias)."""

    config: DistillConfig
    teacher: nn.Module
    device: torch.device
    world_size: int
    scaler: torch.amp.GradScaler
    loss_fn: Callable[..., torch.Tensor]
    autocast: Callable[[], contextlib.AbstractContextManager]
    micro_batch: int
    fixed_scale: torch.Tensor | None
    sigmoid: bool
    _teacher_prunable: int | None = field(default=None, repr=False)

    @property
    def teacher_prunable(self) -> int:
        if self._teacher_prunable is None:
            self._teacher_prunable = teacher_prunable_params(self.teacher)
        return self._teacher_prunable

    def wrap(self, model: nn.Module) -> nn.Module:
        """torch.compile and DDP, as configured (nanoGPT order: compile, then DDP)."""
        if self.config.compile:
            model = torch.compile(model)
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        return model


@dataclass
class PruneReport:
    """How far the masks of a stage got when it pruned (fractions of the original teacher),
    at which stage step, and how the trigger chose it (its reason, and its warning if any)."""

    expected_sparsity: float
    params_before: int
    params_after: int
    stage_step: int
    reason: str
    warning: str | None = None


class Stage:
    """The model a stage trains and its optimizers; build one with :meth:`start`."""

    def __init__(
        self,
        index: int,
        spec: StageConfig,
        model: nn.Module,
        ctx: StageContext,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.index, self.spec, self.model, self.ctx = index, spec, model, ctx
        self.optimizer = optimizer  # None: a stage pruned at its end, nothing to carry
        self.controller: SparsityController | None = None
        self.mask_optimizer: torch.optim.Optimizer | None = None
        self.multiplier_optimizer: torch.optim.Optimizer | None = None
        self.trigger: PruneTrigger | None = None  # a MaskedCLIP's, until it fires
        self.wrapped = model
        # The learning rate ramps up again from the step an auto stage pruned at (None: not
        # pruned yet; the rate before pruning does not depend on when it will).
        self.pruned_at: int | None = None
        self.rewarm: int | None = None

    @classmethod
    def start(cls, index: int, spec: StageConfig, model: nn.Module, ctx: StageContext) -> Stage:
        """``model`` on the device in training mode with a fresh AdamW (and for a MaskedCLIP
        the controller towards the stage's sparsity, with its optimizers), wrapped."""
        model = model.to(ctx.device).train()
        if ctx.fixed_scale is not None:
            model.logit_scale.requires_grad_(False)
        stage = cls(index, spec, model, ctx, make_optimizer(model, ctx.config))
        if stage.masked:
            optim = ctx.config.optim
            target = relative_sparsity(spec, model, ctx.teacher)
            stage.controller = SparsityController(
                target, warmup_steps=spec.target_warmup, control=spec.sparsity_control
            ).to(ctx.device)
            stage.mask_optimizer, stage.multiplier_optimizer = stage.controller.build_optimizers(
                model.mask_parameters(), optim.mask_lr, optim.lagrangian_lr
            )
            stage.trigger = spec.prune_trigger()
        stage.wrapped = ctx.wrap(model)
        return stage

    @property
    def masked(self) -> bool:
        return isinstance(self.model, MaskedCLIP)

    def prunes_at(self, stage_step: int) -> bool:
        """Whether the masks turn into a compact student before step ``stage_step``: the
        trigger's decision on the masks' expected sparsity now (asked once per step)."""
        if not self.masked:
            return False
        # Only "auto" reads the sparsity: on CUDA that read waits for the device, once a step.
        sparsity = math.nan
        if self.trigger.auto:
            sparsity = sparsity_of_teacher(self.model, self.ctx.teacher_prunable)
        return self.trigger.should_prune(stage_step, sparsity)

    def set_pruned_at(self, stage_step: int) -> None:
        """The rate ramps up again from ``stage_step``, where the stage pruned."""
        self.pruned_at = stage_step
        self.rewarm = rewarm_steps(self.ctx.config.optim, self.spec.steps, stage_step)

    def set_learning_rate(self, stage_step: int) -> float:
        """The schedule's rate at ``stage_step``, set on the AdamW; returns it."""
        lr = learning_rate(
            stage_step, self.spec.steps, self.ctx.config.optim, self.pruned_at, self.rewarm
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def backward(
        self, batch: dict[str, torch.Tensor], teacher_args: tuple, step: int
    ) -> torch.Tensor:
        """Forward + backward of the local batch against the teachers' targets (exact
        GradCache accumulation); returns the detached loss."""
        ctx = self.ctx
        if self.masked:  # one mask sample per step, shared by micro-batches and ranks
            self.model.fix_mask_sample(ctx.config.seed * MASK_SEED_STRIDE + step)
        return train_step(
            self.wrapped,
            batch["image"],
            batch["text"],
            teacher_args,
            ctx.loss_fn,
            micro_batch_size=ctx.micro_batch,
            autocast=ctx.autocast,
            scaler=ctx.scaler,
            fixed_scale=ctx.fixed_scale,
            with_bias=ctx.sigmoid,
        )

    def add_penalty(self, stage_step: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Backward of the sparsity Lagrangian of a MaskedCLIP: (expected sparsity, penalty),
        (None, None) for a plain CLIP."""
        if not self.masked:
            return None, None
        sparsity = self.model.expected_sparsity()
        penalty = self.controller(sparsity, stage_step)
        self.ctx.scaler.scale(penalty).backward()
        return sparsity, penalty

    def optimizer_step(self) -> None:
        """Clip the weights' gradient norm, step every optimizer through the GradScaler, zero
        the gradients, clamp the logit scale and the masks."""
        scaler, config = self.ctx.scaler, self.ctx.config
        optimizers = [self.optimizer]
        if self.masked:
            optimizers += [self.mask_optimizer, self.multiplier_optimizer]
        if config.optim.grad_clip > 0:
            scaler.unscale_(self.optimizer)
            weights = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(weights, config.optim.grad_clip)
        for optimizer in optimizers:
            scaler.step(optimizer)
        scaler.update()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            if self.ctx.fixed_scale is None:
                self.model.logit_scale.clamp_(0.0, math.log(config.loss.max_scale))
            if self.masked:
                self.model.clamp_masks()

    def prune(self, stage_step: int) -> tuple[Stage, PruneReport]:
        """The stage continued on the compact student from ``stage_step`` (where the trigger
        fired): a fresh AdamW carrying the moments of the kept channels."""
        compact, report = self._compact(stage_step)
        pruned = Stage.start(self.index, self.spec, compact, self.ctx)
        pruned.set_pruned_at(stage_step)
        carry_optimizer_state(self.model, self.optimizer, pruned.model, pruned.optimizer)
        return pruned, report

    def prune_at_end(self) -> tuple[Stage, PruneReport]:
        """The finished stage's compact student, with no optimizer state to carry (the
        trigger's last step is the stage's last)."""
        end = self.spec.steps
        self.prunes_at(end)  # the trigger's last step: it fires, and says why
        compact, report = self._compact(end)
        return Stage(self.index, self.spec, compact, self.ctx), report

    def _compact(self, stage_step: int) -> tuple[nn.Module, PruneReport]:
        expected = sparsity_of_teacher(self.model, self.ctx.teacher_prunable)
        before = count_parameters(self.model.model)
        compact = self.model.prune()
        trigger = self.trigger
        report = PruneReport(
            expected, before, count_parameters(compact), stage_step, trigger.reason, trigger.warning
        )
        return compact, report

    def state_dicts(self) -> dict[str, Any]:
        """The optimizer (and mask) states a checkpoint keeps (TrainingState fields)."""
        states = {}
        if self.optimizer is not None:
            states["optimizer"] = self.optimizer.state_dict()
        if self.masked:
            states["controller"] = self.controller.state_dict()
            states["mask_optimizer"] = self.mask_optimizer.state_dict()
            states["multiplier_optimizer"] = self.multiplier_optimizer.state_dict()
            states["prune_trigger"] = self.trigger.state_dict()
        if self.pruned_at is not None:
            states["pruned_at"] = self.pruned_at
        return states

    def load_state_dicts(self, state: TrainingState) -> None:
        """Restore the optimizer (and mask) states of a checkpoint taken in this stage."""
        self.optimizer.load_state_dict(state.optimizer)
        if self.masked:
            self.controller.load_state_dict(state.controller)
            self.mask_optimizer.load_state_dict(state.mask_optimizer)
            self.multiplier_optimizer.load_state_dict(state.multiplier_optimizer)
            self.trigger.load_state_dict(state.prune_trigger)
        if state.pruned_at is not None:
            self.set_pruned_at(state.pruned_at)
