"""AdamW with the authors' parameter groups, the learning-rate schedule, and carrying the
optimizer state across pruning."""

from __future__ import annotations

import math

import torch
from torch import nn

from tinyclip_fast.pruning.masked_clip import MaskedCLIP
from tinyclip_fast.train.config import DistillConfig, OptimConfig


def make_optimizer(model: nn.Module, config: DistillConfig) -> torch.optim.AdamW:
    """AdamW with the authors' groups (docs/method.md §5): weight decay on >= 2-D weights
    only, none on norms, biases and the logit scale. Mask parameters are not included (they
    have their own optimizer)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad or name.endswith("log_alpha"):
            continue
        (decay if param.ndim >= 2 and "logit_scale" not in name else no_decay).append(param)
    optim = config.optim
    on_cuda = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        fused=True if on_cuda else None,
    )


def learning_rate(
    step: int,
    total: int,
    optim: OptimConfig,
    pruned_at: int | None = None,
    rewarm_steps: int | None = None,
) -> float:
    """Linear warmup over warmup_steps, then cosine from lr down to min_lr at ``total``.

    ``pruned_at``: the stage step at which the student was pruned; from there the rate
    ramps up again over ``rewarm_steps`` (default ``optim.prune_warmup_steps``: the compact
    model is a new start).
    """
    if step < optim.warmup_steps:
        lr = optim.lr * (step + 1) / optim.warmup_steps
    else:
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total - optim.warmup_steps))
        lr = optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))
    rewarm = optim.prune_warmup_steps if rewarm_steps is None else rewarm_steps
    if pruned_at is not None and step >= pruned_at and rewarm > 0:
        lr *= min(1.0, (step - pruned_at + 1) / rewarm)
    return lr


def rewarm_steps(optim: OptimConfig, total: int, pruned_at: int) -> int:
    """The re-warm-up after pruning at ``pruned_at`` of ``total`` stage steps: at most a
    quarter of the steps left after pruning."""
    if pruned_at >= total:
        return optim.prune_warmup_steps
    return min(optim.prune_warmup_steps, max(1, (total - pruned_at) // 4))


def carry_optimizer_state(
    masked: MaskedCLIP,
    old: torch.optim.Optimizer,
    pruned: nn.Module,
    new: torch.optim.Optimizer,
) -> None:
    """Give ``new`` (over the pruned model) the AdamW state of ``old`` (over the masked
    model): moments cut to the kept channels and heads and rescaled for the folded soft mask
    values, so pruning does not restart the optimizer from zero moments (a jolt that costs
    the student accuracy it then has to win back). Parameters without state keep none."""
    names = dict(masked.model.named_parameters())
    states = {name: old.state[p] for name, p in names.items() if "exp_avg" in old.state.get(p, {})}
    if not states:
        return
    moments = {
        key: masked.prune_like_weights({n: s[key] for n, s in states.items()}, power)
        for key, power in (("exp_avg", -1), ("exp_avg_sq", -2))
    }
    trained = {id(p) for group in new.param_groups for p in group["params"]}
    for name, param in pruned.named_parameters():
        if id(param) in trained and name in states:
            new.state[param] = {
                "step": states[name]["step"].clone(),
                **{
                    key: moments[key][name].to(device=param.device, dtype=param.dtype)
                    for key in ("exp_avg", "exp_avg_sq")
                },
            }
