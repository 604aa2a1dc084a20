"""The demo teacher and student architectures, and loading a saved demo teacher."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinyclip_fast.demo.data import CompactTokenizer, load_demo_split
from tinyclip_fast.inheritance.student_io import load_student

IMAGE_SIZE = 32
PATCH_SIZE = 8
EMBED_DIM = 64
HEAD_WIDTH = 64
TEACHER_META = "demo_teacher.json"


def teacher_config(vocab_size: int, context_length: int) -> dict[str, Any]:
    """The demo teacher: ViT 32px/8 width 128, text width 128, 4 layers each, 2 heads of 64."""
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "width": 128,
            "layers": 4,
            "head_width": HEAD_WIDTH,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": vocab_size,
            "width": 128,
            "heads": 2,
            "layers": 4,
        },
    }


def student_config(vocab_size: int, context_length: int) -> dict[str, Any]:
    """The manual/scratch student (51% of the teacher): the towers lose depth, vision 4 -> 3
    layers, text 4 -> 1 (ten class names need little text modelling); widths stay 128.

    Depth, not width: a residual stream sliced to its first channels keeps little of what
    the teacher knew (about 20% top-1 at inheritance for vision width 64 here, vs about 90%).
    """
    config = teacher_config(vocab_size, context_length)
    config["vision_cfg"]["layers"] = 3
    config["text_cfg"]["layers"] = 1
    return config


def tensor_preprocess(image: Any) -> torch.Tensor:
    """A PIL image as the demo teacher sees it: grey, 32x32, in [-1, 1], three channels."""
    import numpy as np

    grey = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)
    grey = F.interpolate(grey[None, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear")
    return (grey[0] * 2.0 - 1.0).expand(3, -1, -1).contiguous()


def build_demo_teacher(path: str | None) -> tuple[nn.Module, CompactTokenizer, Callable, Callable]:
    """(teacher, tokenizer, preprocess, preprocess) of a demo teacher saved by a demo run.

    ``path``: the teacher folder (default ``runs/demo/teacher``); used by ``tinyclip-distill
    --teacher demo``.
    """
    folder = Path(path or "runs/demo/teacher")
    meta_path = folder / TEACHER_META
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"no demo teacher in {folder}: run `python -m tinyclip_fast demo` first"
        )
    meta = json.loads(meta_path.read_text())
    teacher = load_student(folder)
    tokenizer = load_demo_split(meta["source"], "test", seed=meta["seed"]).tokenizer
    return teacher, tokenizer, tensor_preprocess, tensor_preprocess
