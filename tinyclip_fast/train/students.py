"""The student each stage starts from: manual inheritance, masks (auto), scratch, the previous
stage's student or a saved model (``init``: a transformers CLIPModel folder or a student
folder); the student's Hugging Face export."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import get_model_preprocess_cfg, set_model_preprocess_cfg
from torch import nn

from tinyclip_fast.inheritance import HF_PREFIX
from tinyclip_fast.inheritance.manual import manual_inherit
from tinyclip_fast.inheritance.presets import preset_config
from tinyclip_fast.inheritance.student_io import load_student, save_student
from tinyclip_fast.pruning.masked_clip import MaskedCLIP
from tinyclip_fast.teachers.loading import dataset_defaults
from tinyclip_fast.train.config import StageConfig


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (mask log_alphas included for a MaskedCLIP)."""
    return sum(p.numel() for p in model.parameters())


def stage_student(
    stage: StageConfig, teacher: nn.Module, previous: nn.Module | None, seed: int
) -> nn.Module:
    """The student a stage starts from (a MaskedCLIP for automatic inheritance); ``stage.init``
    replaces the previous student (or, in stage 0, the teacher) as what it starts from."""
    if stage.init is not None:
        previous = load_init(stage.init, teacher)
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


def load_init(init: str, teacher: nn.Module) -> nn.Module:
    """The model of a stage's ``init``: ``hf:DIR`` (a transformers CLIPModel folder) or a
    student folder; it must read the teacher's inputs (image size, tokens)."""
    if init.startswith(HF_PREFIX):
        from tinyclip_fast.inheritance.hf import load_hf_clip  # transformers: the optional extra

        model = load_hf_clip(init.removeprefix(HF_PREFIX))
    else:
        model = load_student(init)
    reads, expected = dataset_defaults(model, seed=0), dataset_defaults(teacher, seed=0)
    for key in ("image_size", "context_length", "vocab_size"):
        if reads[key] != expected[key]:
            raise ValueError(
                f"init {init} has {key} {reads[key]}, the teacher {expected[key]}: a student "
                "reads the teacher's images and tokens"
            )
    return model


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


def export_hf(student: nn.Module, path: Path, tokenizer: Any, teacher: nn.Module) -> str:
    """Write ``student`` into ``path`` as a transformers CLIPModel folder with the teacher's
    image preprocessing (what the student was trained on) and ``tokenizer``; returns the line
    that says where, or in one line why CLIPConfig cannot hold this student."""
    preprocess = get_model_preprocess_cfg(teacher)
    if "mean" in preprocess and "std" in preprocess:
        set_model_preprocess_cfg(student, preprocess)
    try:
        save_student(student, path, format="hf", tokenizer=tokenizer)
    except (ValueError, TypeError) as err:
        return f"no {path.name}/ export: {err}"
    return f"student as a transformers CLIPModel in {path}"
