"""The frozen teacher: an open_clip model built from a name or model-config file.

Other teachers plug in by name with :func:`register_teacher` (the built-in demo registers
``"demo"`` this way), so this module never imports the code that provides them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch import nn

from tinyclip_fast.train.config import TeacherConfig

TeacherBuilder = Callable[[str | None], tuple[nn.Module, Callable, Callable, Callable]]
_TEACHERS: dict[str, TeacherBuilder] = {}


def register_teacher(name: str, builder: TeacherBuilder) -> None:
    """Make ``teacher.model = name`` call ``builder(teacher.pretrained)``, which returns
    (teacher, tokenizer, train preprocess, eval preprocess)."""
    _TEACHERS[name] = builder


def build_teacher(config: TeacherConfig) -> tuple[nn.Module, Callable, Callable, Callable]:
    """(teacher, tokenizer, train preprocess, eval preprocess) from an open_clip name.

    ``model`` may also be a path to an open_clip model-config JSON (registered under its stem)
    or a name given to :func:`register_teacher`. ``pretrained`` is a local checkpoint file
    (works offline) or an open_clip pretrained tag.
    """
    if config.model in _TEACHERS:
        return _TEACHERS[config.model](config.pretrained)
    import open_clip  # seconds to import: only when an open_clip teacher is asked for

    name = config.model
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"teacher model config {path} does not exist")
        open_clip.add_model_config(path)
        name = path.stem
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    pretrained = config.pretrained
    if pretrained is not None and _looks_like_path(pretrained) and not Path(pretrained).is_file():
        raise FileNotFoundError(f"teacher checkpoint {pretrained} does not exist")
    if pretrained is None:
        raise ValueError(
            "teacher.pretrained is required: a local checkpoint file or an open_clip tag "
            f"(open_clip.list_pretrained_tags_by_model({name!r}))"
        )
    try:
        model, train_tf, eval_tf = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, require_pretrained=True
        )
    except (RuntimeError, OSError) as err:
        # open_clip raises RuntimeError for unknown tags, failed downloads, bad state dicts.
        raise ValueError(f"cannot load teacher {name} from {pretrained!r}: {err}") from err
    return model, open_clip.get_tokenizer(name), train_tf, eval_tf


def own_logit_scale(teacher: nn.Module) -> float:
    """A teacher's log-space logit scale (its affinity scale is the exp of it)."""
    return float(teacher.logit_scale.detach().float().reshape(-1)[0])


def own_logit_bias(teacher: nn.Module) -> float | None:
    """A teacher's own logit bias (open_clip's ``logit_bias``; None for softmax CLIPs)."""
    bias = getattr(teacher, "logit_bias", None)
    return None if bias is None else float(bias.detach().float().reshape(-1)[0])


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))
