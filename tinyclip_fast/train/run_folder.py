"""The run folder (``--out-dir``): what a run writes there, and the rule that a new run never
writes over another run's files. Imports nothing heavy, so the command line checks it at once.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from tinyclip_fast.atomic_io import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"
# The resolved configuration of the last start (or resume). Not a run file: every start
# replaces it, and one left by a start that failed must not block the next.
CONFIG_NAME = "config.json"
PLOT_NAME = "progress.png"  # loss and accuracy against steps, drawn after each evaluation
METRICS_NAME = "metrics.jsonl"
STUDENT_DIR = "student"
STUDENT_HF_DIR = "student-hf"  # export_hf: the student as a transformers CLIPModel folder
TENSORBOARD_DIR = "tensorboard"
BAD_SAMPLES_PATTERN = "bad_samples*.jsonl"  # rank 0: bad_samples.jsonl, rank r: .rank{r}


def bad_samples_name(rank: int) -> str:
    return "bad_samples.jsonl" if rank == 0 else f"bad_samples.rank{rank}.jsonl"


def run_files(out_dir: Path) -> list[Path]:
    """The files and folders of a run found in ``out_dir`` (nothing else there counts)."""
    names = (CHECKPOINT_NAME, METRICS_NAME, PLOT_NAME, STUDENT_DIR, STUDENT_HF_DIR, TENSORBOARD_DIR)
    named = [out_dir / name for name in names]
    found = [path for path in named if path.exists()]
    return found + (sorted(out_dir.glob(BAD_SAMPLES_PATTERN)) if out_dir.is_dir() else [])


def check_run_folder(out_dir: str | Path, overwrite: bool) -> list[Path]:
    """The run files in ``out_dir`` that ``overwrite`` allows to replace; without it, a folder
    that holds any is a ValueError naming them (and --resume when there is a checkpoint)."""
    out_dir = Path(out_dir)
    found = run_files(out_dir)
    if found and not overwrite:
        listed = ", ".join(path.name for path in found)
        if (out_dir / CHECKPOINT_NAME).exists():
            raise ValueError(
                f"{out_dir} holds another run ({listed}): continue it with --resume, or "
                "replace it with --overwrite (or choose another --out-dir)"
            )
        raise ValueError(
            f"{out_dir} holds files of another run ({listed}) but no checkpoint to resume: "
            "replace them with --overwrite, or choose another --out-dir"
        )
    return found


def write_run_config(out_dir: str | Path, config: dict[str, Any]) -> Path:
    """``config.json``: the run's resolved configuration (a valid ``--config`` file), written
    atomically."""
    text = json.dumps(config, indent=2) + "\n"
    path = Path(out_dir) / CONFIG_NAME
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def remove_run_files(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def cut_jsonl(path: Path, last_step: int) -> None:
    """Keep the records of ``path`` up to ``last_step``: a resumed run writes the later ones
    again. Lines a killed run left half-written are dropped."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", math.inf) <= last_step:
            kept.append(line + "\n")
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept), encoding="utf-8"))
