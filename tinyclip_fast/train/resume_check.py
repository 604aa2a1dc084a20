"""What ``--resume`` may change: the whole saved configuration and the teachers' weights are
compared with the new run's.

A resume continues the checkpoint's run exactly, so every setting that changes what is
trained (teachers and their weights, data, loss, student, stages, optimizer, batch, seed,
precision) must be the same; each one that differs is named in one refusal. Settings that
steer only logging, evaluation, checkpoints, speed or where things run may change, and the
changes are said in one line; the last stage may get more steps (extending a run).
Imports nothing heavy.
"""

from __future__ import annotations

import json
from typing import Any

# Settings (paths, or the prefix of a group) a resume may change: none changes the math.
MAY_CHANGE = (
    "log_every",
    "save_every",
    "eval",
    "num_workers",
    "progress",
    "device",
    "threads",
    "out_dir",
    "compile",
    "attention",
    "micro_batch_size",  # exact gradient accumulation: the same gradients in other pieces
    "data.max_bad_fraction",
)
_NOT_COMPARED = ("resume", "overwrite")  # how this run was started, not what it trains
# The teachers' file names may change when their weights are the same (checked by fingerprint).
_TEACHER_FILES = ("teacher.pretrained", "teachers.N.pretrained")
_ABSENT = object()  # a path only one of the two configurations has (another list length)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1, 2]}}`` -> ``{"a.b.0": 1, "a.b.1": 2}``; empty containers are leaves."""
    if isinstance(value, dict) and value:
        items = value.items()
    elif isinstance(value, list) and value:
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _generic(path: str) -> str:
    """``teachers.1.pretrained`` -> ``teachers.N.pretrained``."""
    return ".".join("N" if part.isdigit() else part for part in path.split("."))


def _under(path: str, names: tuple[str, ...]) -> bool:
    return any(path == name or path.startswith(name + ".") for name in names)


def check_resume(
    saved: dict[str, Any],
    current: dict[str, Any],
    *,
    done_steps: int,
    saved_fingerprints: list[str] | None,
    fingerprints: list[str],
) -> str | None:
    """Refuse (ValueError naming every difference) a resume of the run configured as
    ``saved`` with ``current``; return the line that lists the changes it allows (None: no
    change). ``done_steps``: the steps the last stage has trained in the checkpoint (its
    steps may grow, not shrink below them). Fingerprints: the teachers' weights, in order
    (None from a checkpoint that did not store them: their file names must then match)."""
    before, now = (flatten(json.loads(json.dumps(c))) for c in (saved, current))
    last_steps = f"stages.{len(saved['stages']) - 1}.steps"
    same_stage_count = len(saved["stages"]) == len(current["stages"])
    weights_checked = saved_fingerprints is not None
    refused, allowed = [], []
    for path in sorted(set(before) | set(now), key=_order(before, now)):
        old, new = before.get(path, _ABSENT), now.get(path, _ABSENT)
        if old == new or _under(path, _NOT_COMPARED) or _empty_beside_absent(old, new):
            continue
        change = f"{path} {_show(old)} there, {_show(new)} now"
        if path == last_steps and same_stage_count:
            if new < done_steps:  # more steps extend a run: the stage says so when it starts
                refused.append(
                    f"{change} (the last stage is at its step {done_steps}, past the {new} steps "
                    "given now)"
                )
        elif _under(path, MAY_CHANGE) or (weights_checked and _generic(path) in _TEACHER_FILES):
            allowed.append(f"{path} {_show(old)} -> {_show(new)}")
        else:
            refused.append(change)
    if weights_checked and saved_fingerprints != fingerprints:
        refused.append(_weights_change(saved_fingerprints, fingerprints))
    if refused:
        raise ValueError(
            "cannot resume: this run differs from the checkpoint's in what it trains (a resume "
            f"continues the same run): {'; '.join(refused)}. Give the checkpoint's settings "
            "(its config.json), or start a new run with --overwrite or another --out-dir"
        )
    return f"resuming with changed settings: {', '.join(allowed)}" if allowed else None


def _empty_beside_absent(old: Any, new: Any) -> bool:
    """An empty table or list on one side, entries on the other: those entries are named."""
    present = new if old is _ABSENT else old if new is _ABSENT else None
    return isinstance(present, (dict, list)) and not present


def _order(before: dict[str, Any], now: dict[str, Any]) -> Any:
    """Paths in the order of the configuration (the saved one's first)."""
    position = {path: i for i, path in enumerate([*before, *(p for p in now if p not in before)])}
    return position.__getitem__


def _weights_change(saved: list[str], current: list[str]) -> str:
    if len(saved) != len(current):
        return f"the teachers' weights ({len(saved)} teachers there, {len(current)} now)"
    changed = [str(i) for i, (a, b) in enumerate(zip(saved, current, strict=True)) if a != b]
    return (
        f"the weights of teacher {', '.join(changed)} (fingerprint "
        f"{', '.join(saved[int(i)] for i in changed)} there, "
        f"{', '.join(current[int(i)] for i in changed)} now)"
    )


def _show(value: Any) -> str:
    return "absent" if value is _ABSENT else json.dumps(value)
