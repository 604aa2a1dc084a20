"""tinyclip_fast: fused kernels and a lean engine for TinyCLIP distillation.

The public names below load their module on first use, so ``import tinyclip_fast`` stays
cheap and does not pull in open_clip until a model-level name is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "affinity_mimicking_loss": "tinyclip_fast.ops.affinity_loss",
    "affinity_loss_square": "tinyclip_fast.ops.affinity_loss",
    "affinity_loss_rows": "tinyclip_fast.ops.affinity_loss",
    "ClipLoss": "tinyclip_fast.losses",
    "DistillClipLoss": "tinyclip_fast.losses",
    "AffinityMimickingLoss": "tinyclip_fast.losses",
    "siglip_loss": "tinyclip_fast.ops.sigmoid_loss",
    "sigmoid_loss_rows": "tinyclip_fast.ops.sigmoid_loss",
    "sigmoid_distill_loss": "tinyclip_fast.ops.sigmoid_loss",
    "SigLipLoss": "tinyclip_fast.losses",
    "DistillSigLipLoss": "tinyclip_fast.losses",
    "gather_features": "tinyclip_fast.distributed",
    "masked_linear": "tinyclip_fast.ops.masked_linear",
    "MaskedLinear": "tinyclip_fast.ops.masked_linear",
    "HardConcreteMask": "tinyclip_fast.pruning.hard_concrete",
    "SparsityController": "tinyclip_fast.pruning.sparsity",
    "TowerMaskProbs": "tinyclip_fast.pruning.sparsity",
    "expected_remaining_params": "tinyclip_fast.pruning.sparsity",
    "expected_sparsity": "tinyclip_fast.pruning.sparsity",
    "full_prunable_params": "tinyclip_fast.pruning.sparsity",
    "manual_inherit": "tinyclip_fast.inheritance.manual",
    "preset_config": "tinyclip_fast.inheritance.presets",
    "PRESETS": "tinyclip_fast.inheritance.presets",
    "MaskedCLIP": "tinyclip_fast.pruning.masked_clip",
    "save_student": "tinyclip_fast.inheritance.student_io",
    "load_student": "tinyclip_fast.inheritance.student_io",
    "save_hf_clip": "tinyclip_fast.inheritance.hf",
    "load_hf_clip": "tinyclip_fast.inheritance.hf",
    "load_hf_teacher": "tinyclip_fast.inheritance.hf",
    "distill": "tinyclip_fast.train.engine",
    "DistillResult": "tinyclip_fast.train.engine",
    "DistillConfig": "tinyclip_fast.train.config",
    "StageConfig": "tinyclip_fast.train.config",
    "load_config": "tinyclip_fast.train.config",
    "build_dataset": "tinyclip_fast.data.datasets",
    "make_loader": "tinyclip_fast.data.loader",
    "ZeroShotEvaluator": "tinyclip_fast.data.zero_shot",
    "RetrievalEvaluator": "tinyclip_fast.data.retrieval",
    "retrieval_recalls": "tinyclip_fast.data.retrieval",
    "TeacherEmbeddingCache": "tinyclip_fast.teachers.embedding_cache",
    "force_backend": "tinyclip_fast.ops.backend",
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
