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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinyclip_fast.atomic_io import atomic_write
from tinyclip_fast.data.loader import BadSampleLog
from tinyclip_fast.inheritance.architecture import (
    CompactResidualBlock,
    build_student,
    student_config,
)
from tinyclip_fast.pruning.masked_clip import MaskedCLIP
from tinyclip_fast.train.runtime import all_rng_states, gather_objects

FORMAT = "tinyclip_fast.training_state/1"


@dataclass
class TrainingState:
    """Everything an exact resume restores, as written at ``stage_step`` of stage ``stage``
    (global ``step``). On disk it is a plain dict (``save_training_state``); the optional
    parts are absent from it when None: ``bad_samples`` without data.skip_bad_samples,
    ``optimizer`` after a stage that pruned at its last step, the mask and prune-trigger
    states outside an automatic-inheritance stage before its pruning, ``pruned_at`` outside
    one after it, ``teacher_fingerprints`` in checkpoints written before they were stored (a
    resume then compares the teachers' file names)."""

    stage: int
    stage_step: int
    step: int
    student: dict[str, Any]  # pack_student
    scaler: dict[str, Any]
    rng: list[list[torch.Tensor]]  # every rank's RNG states
    history: list[dict[str, Any]]
    stage_params: list[int]
    config: str  # DistillConfig.to_dict() as JSON
    bad_samples: list[dict[str, Any]] | None = None  # every rank's BadSampleLog state
    optimizer: dict[str, Any] | None = None
    controller: dict[str, Any] | None = None
    mask_optimizer: dict[str, Any] | None = None
    multiplier_optimizer: dict[str, Any] | None = None
    teacher_fingerprints: list[str] | None = None  # teacher_fingerprint of each, in order
    prune_trigger: dict[str, Any] | None = None  # PruneTrigger state while masked
    pruned_at: int | None = None  # the stage step its auto stage pruned at, after pruning

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically to ``path`` (see :func:`save_training_state`)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return save_training_state(path, {k: v for k, v in values.items() if v is not None})

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainingState:
        """Read ``path`` (see :func:`load_training_state`)."""
        state = load_training_state(path)
        return cls(**{f.name: state.get(f.name) for f in fields(cls)})


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
    packed = {"config": json.dumps(config), "masked": masked, "state": state}
    if masked:
        packed["mask_hidden"] = model.mask_hidden
    return packed


def unpack_student(packed: dict[str, Any]) -> nn.Module:
    model = build_student(json.loads(packed["config"]))
    if packed["masked"]:
        model = MaskedCLIP(model, mask_hidden=packed["mask_hidden"])
    model.load_state_dict(packed["state"])
    return model


class Checkpointer:
    """Writes the run's :class:`TrainingState` to ``path``: every rank takes part (RNG
    states and bad-sample counts are gathered), rank 0 writes. ``last_step``: the step of
    the last checkpoint written or resumed from (None: none yet)."""

    def __init__(
        self,
        path: Path,
        device: torch.device,
        rank: int,
        world_size: int,
        bad_samples: BadSampleLog | None,
    ) -> None:
        self.path, self.device, self.rank, self.world_size = path, device, rank, world_size
        self.bad_samples = bad_samples
        self.last_step: int | None = None

    def save(
        self,
        *,
        stage: int,
        stage_step: int,
        step: int,
        model: nn.Module,
        optimizer_states: dict[str, Any],
        scaler: torch.amp.GradScaler,
        history: list[dict[str, Any]],
        stage_params: list[int],
        config: dict[str, Any],
        teacher_fingerprints: list[str],
    ) -> None:
        """The state at ``stage_step`` of stage ``stage``; at the stage's last step it is the
        finished stage (without optimizer state when it pruned at its end)."""
        rng = all_rng_states(self.device, self.world_size)
        bad = None
        if self.bad_samples is not None:
            bad = gather_objects(self.bad_samples.state_dict(), self.world_size)
        self.last_step = step
        if self.rank != 0:
            return
        TrainingState(
            stage=stage,
            stage_step=stage_step,
            step=step,
            student=pack_student(model),
            scaler=scaler.state_dict(),
            rng=rng,
            history=history,
            stage_params=stage_params,
            config=json.dumps(config),
            bad_samples=bad,
            teacher_fingerprints=teacher_fingerprints,
            **optimizer_states,
        ).save(self.path)
