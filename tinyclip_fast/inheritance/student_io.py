"""Student exports: our student folder (weights and config, both written atomically) or a
Hugging Face ``transformers`` CLIPModel folder.

A student folder holds ``open_clip_model.safetensors`` (weights only, no optimizer state) and
``open_clip_config.json`` with the architecture of :func:`architecture.student_config` (an
open_clip ``model_cfg`` plus the per-layer dimensions of each tower). Students whose layers are
uniform (manual inheritance) load with plain open_clip too:
``open_clip.create_model("local-dir:PATH")``; pruned students, with a different head count and
MLP width in every layer, load with :func:`load_student`. The ``"hf"`` format
(inheritance/hf.py, needs ``pip install 'tinyclip-fast[hf]'``) holds uniform students only.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tinyclip_fast.atomic_io import atomic_write
from tinyclip_fast.inheritance.architecture import FORMAT, build_student, student_config

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
EXPORT_FORMATS = ("native", "hf")  # our student folder; a transformers CLIPModel folder


def check_export_format(format: str) -> None:
    """ValueError for an unknown format; ImportError naming the extra to install when
    ``"hf"`` lacks transformers (checked before a run trains, not after)."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown student format {format!r}; formats: {', '.join(EXPORT_FORMATS)}")
    if format == "hf":
        importlib.import_module("tinyclip_fast.inheritance.hf")


def save_student(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "native",
    tokenizer: Any | None = None,
) -> Path:
    """Write ``model`` into directory ``path``; returns the directory.

    ``format="native"``: weights (safetensors) and config (JSON); uniform students load with
    ``open_clip.create_model("local-dir:"+path)``. ``format="hf"``: a transformers CLIPModel
    folder (:func:`tinyclip_fast.inheritance.hf.save_hf_clip`, with ``tokenizer``, the
    student's open_clip tokenizer), a one-line ValueError for students it cannot hold.
    """
    check_export_format(format)
    if format == "hf":
        from tinyclip_fast.inheritance.hf import save_hf_clip

        return save_hf_clip(model, path, tokenizer)
    config = student_config(model)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp))

    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)

    # The config is written last: a directory with a config always has complete weights.
    atomic_write(directory / CONFIG_NAME, write_json)
    return directory


def load_student(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a student written by :func:`save_student` as an open_clip CLIP on ``map_location``."""
    directory = Path(path)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for file in (config_path, weights_path):
        if not file.is_file():
            raise FileNotFoundError(f"student checkpoint is missing {file}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt student config {config_path}: {e}") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT or "model_cfg" not in config:
        raise ValueError(f"{config_path} is not a tinyclip_fast student config (format {FORMAT})")
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"corrupt student weights {weights_path}: {e}") from e
    model = build_student(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights in {weights_path} do not match config {config_path}: {e}") from e
    return model.to(map_location)
