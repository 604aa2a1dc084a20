"""Resumable training state: one file, written atomically, loadable with ``weights_only=True``.

This is NOT the student export (that is ``student_io.save_student``: weights + config only).
The training state holds what an exact resume needs: the student's architecture (the
``student_io`` config, so pruned students with per-layer widths rebuild) and weights, mask
parameters, optimizer / GradScaler / sparsity-controller states, RNG states, the position in
the stage list and the metric history. Everything in it is plain tensors, numbers, strings,
lists and dicts, so loading never unpickles code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinyclip_fast.atomic_io import atomic_write
from tinyclip_fast.inheritance.student_io import CompactResidualBlock, build_student, student_config
from tinyclip_fast.pruning.masked_clip import MaskedCLIP

FORMAT = "tinyclip_fast.training_state/1"


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the previous file intact.

    The bytes go to a temporary file in the same folder, are fsync'ed, then ``os.replace``
    swaps it in (atomic on POSIX and Windows).
    """
    return atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state written by :func:`save_training_state`; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no training checkpoint at {path}; start without --resume or point --out-dir at "
            "the run to continue"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # bad bytes surface as any of a dozen exception types
        raise ValueError(
            f"corrupt training checkpoint {path} ({_load_failure(err)}); restore a copy, or "
            "start over with --overwrite"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tinyclip_fast training checkpoint (format {FORMAT})")
    return state


def _load_failure(err: Exception) -> str:
    """The reason torch.load gave, without its advice to load with weights_only=False (our
    checkpoints hold plain tensors only; a file that needs pickled code is not one of them)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().split(". ", 1)[0]
        return f"not a plain-tensor file: {detail.splitlines()[0] if detail else 'unpickling'}"
    first = text.split(". ", 1)[0].strip()
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def pack_student(model: nn.Module) -> dict[str, Any]:
    """Architecture (student_io config, so pruned students rebuild) + weights (+ masks)."""
    masked = isinstance(model, MaskedCLIP)
    base = model.model if masked else model
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    config = student_config(base)
    if any(isinstance(m, CompactResidualBlock) for m in base.modules()):
        # A pruned student whose layers happen to be uniform would rebuild with open_clip's
        # blocks (other attention kernels): bitwise resume needs the same module classes.
        config["open_clip_compatible"] = False
    return {"config": json.dumps(config), "masked": masked, "state": state}


def unpack_student(packed: dict[str, Any]) -> nn.Module:
    model = build_student(json.loads(packed["config"]))
    if packed["masked"]:
        model = MaskedCLIP(model)
    model.load_state_dict(packed["state"])
    return model
