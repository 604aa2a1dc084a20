"""tinyclip_fast: fused kernels and a lean engine for TinyCLIP distillation.

The public names below load their module on first use, so ``import tinyclip_fast`` stays
cheap and does not pull in open_clip until a model-level name is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "affinity_mimicking_loss": "tinyclip_fast.affinity_loss",
    "affinity_loss_square": "tinyclip_fast.affinity_loss",
    "affinity_loss_rows": "tinyclip_fast.affinity_loss",
    "ClipLoss": "tinyclip_fast.losses",
    "DistillClipLoss": "tinyclip_fast.losses",
    "AffinityMimickingLoss": "tinyclip_fast.losses",
    "gather_features": "tinyclip_fast.distributed",
    "masked_linear": "tinyclip_fast.masked_linear",
    "MaskedLinear": "tinyclip_fast.masked_linear",
    "HardConcreteMask": "tinyclip_fast.hard_concrete",
    "SparsityController": "tinyclip_fast.sparsity",
    "TowerMaskProbs": "tinyclip_fast.sparsity",
    "expected_remaining_params": "tinyclip_fast.sparsity",
    "expected_sparsity": "tinyclip_fast.sparsity",
    "full_prunable_params": "tinyclip_fast.sparsity",
    "manual_inherit": "tinyclip_fast.inheritance",
    "preset_config": "tinyclip_fast.inheritance",
    "PRESETS": "tinyclip_fast.inheritance",
    "MaskedCLIP": "tinyclip_fast.masked_clip",
    "save_student": "tinyclip_fast.student_io",
    "load_student": "tinyclip_fast.student_io",
    "distill": "tinyclip_fast.engine",
    "DistillResult": "tinyclip_fast.engine",
    "DistillConfig": "tinyclip_fast.config",
    "StageConfig": "tinyclip_fast.config",
    "load_config": "tinyclip_fast.config",
    "build_dataset": "tinyclip_fast.data",
    "make_loader": "tinyclip_fast.data",
    "ZeroShotEvaluator": "tinyclip_fast.zero_shot",
    "TeacherEmbeddingCache": "tinyclip_fast.teacher_cache",
    "force_backend": "tinyclip_fast.backend",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tinyclip_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
