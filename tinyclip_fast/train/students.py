"""The student each stage starts from: manual inheritance, masks (auto), scratch, or the
previous stage's student."""

from __future__ import annotations

import copy

import open_clip
import torch
from torch import nn

from tinyclip_fast.inheritance.manual import manual_inherit
from tinyclip_fast.inheritance.presets import preset_config
from tinyclip_fast.pruning.masked_clip import MaskedCLIP
from tinyclip_fast.train.config import StageConfig


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (mask log_alphas included for a MaskedCLIP)."""
    return sum(p.numel() for p in model.parameters())


def stage_student(
    stage: StageConfig, teacher: nn.Module, previous: nn.Module | None, seed: int
) -> nn.Module:
    """The student a stage starts from (a MaskedCLIP for automatic inheritance)."""
    source = teacher if previous is None else previous
    if stage.kind == "continue":
        return previous
    if stage.kind == "auto":
        base = copy.deepcopy(source).requires_grad_(True)
        return MaskedCLIP(base, mask_hidden=stage.mask_hidden)
    model_cfg = preset_config(stage.preset) if stage.preset else copy.deepcopy(stage.student_config)
    if stage.kind == "scratch":
        # Seeded apart from the run's RNG stream, so a scratch student is the same model
        # whatever ran before it (the demo compares students built in different orders).
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return open_clip.model.CLIP(**model_cfg)
    return manual_inherit(source, model_cfg, layer_selection=stage.layer_selection)


def add_logit_bias(model: nn.Module, init_logit_scale: float, init_logit_bias: float) -> bool:
    """Give a student without a logit bias one, as open_clip initialises SigLIP models: bias
    ``init_logit_bias``, log-scale ``init_logit_scale``. Returns whether it added one (a
    student that has a bias, e.g. inherited from a sigmoid teacher, keeps it and its scale)."""
    base = model.model if isinstance(model, MaskedCLIP) else model
    if getattr(base, "logit_bias", None) is not None:
        return False
    scale = base.logit_scale
    with torch.no_grad():
        scale.fill_(init_logit_scale)
    base.logit_bias = nn.Parameter(torch.full_like(scale, init_logit_bias))
    return True


def teacher_prunable_params(teacher: nn.Module) -> int:
    """The ORIGINAL teacher's prunable parameters: what every stage's sparsity refers to."""
    return MaskedCLIP(teacher).full_prunable_params()


def sparsity_of_teacher(masked: MaskedCLIP, teacher_prunable: int) -> float:
    """The masks' expected sparsity as a fraction of the original teacher's prunable
    parameters (the scale of ``StageConfig.sparsity``)."""
    return 1.0 - float(masked.expected_remaining_params().detach()) / teacher_prunable


def relative_sparsity(stage: StageConfig, masked: MaskedCLIP, teacher: nn.Module) -> float:
    """The target for this model such that ``stage.sparsity`` of the ORIGINAL is removed."""
    full_teacher = teacher_prunable_params(teacher)
    full_here = masked.full_prunable_params()
    target = 1.0 - (1.0 - stage.sparsity) * full_teacher / full_here
    if target <= 0.0:
        raise ValueError(
            f"sparsity {stage.sparsity} of the original is already reached by this stage's "
            f"student ({full_here} of {full_teacher} prunable parameters left)"
        )
    return target
