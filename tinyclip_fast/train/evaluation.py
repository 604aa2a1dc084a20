"""The evaluator a run's ``eval`` configuration asks for: ``evaluator(model)`` returns zero-shot
top-1 (a float) or a dict of named metrics (retrieval's recall@k).

Built-in kinds: zero-shot classification on a class-per-folder tree or a CSV of (filepath,
label), and image-text retrieval on a CSV of (filepath, title) pairs; others plug in with
:func:`register_evaluator` (the built-in demo registers ``"demo"``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tinyclip_fast.train.config import EvalConfig

Evaluator = Callable[[nn.Module], float | dict[str, float]]
EvaluatorBuilder = Callable[[EvalConfig, torch.device], Evaluator]
BUILT_IN_KINDS = ("folder", "csv", "retrieval")
_EVALUATORS: dict[str, EvaluatorBuilder] = {}


def register_evaluator(kind: str, builder: EvaluatorBuilder) -> None:
    """Make ``eval.kind = kind`` use ``builder(eval_config, device) -> evaluator``."""
    _EVALUATORS[kind] = builder


def eval_kinds() -> list[str]:
    """The built-in and registered ``eval.kind`` values."""
    return [*BUILT_IN_KINDS, *sorted(_EVALUATORS)]


def check_eval_kind(kind: str) -> None:
    if kind not in eval_kinds():
        raise ValueError(
            f"unknown eval kind {kind!r} (--eval KIND[:PATH]); kinds: {', '.join(eval_kinds())}"
        )


def build_evaluator(
    config: EvalConfig, *, tokenizer: Callable, preprocess: Callable, device: torch.device
) -> Evaluator:
    """Zero-shot top-1 on a class-per-folder tree or a CSV of (filepath, label), recall@k on a
    CSV of (filepath, title) pairs, or a registered kind."""
    from tinyclip_fast.data import zero_shot

    check_eval_kind(config.kind)
    if config.kind in _EVALUATORS:
        return _EVALUATORS[config.kind](config, device)
    if config.path is None:
        example = "DIR" if config.kind == "folder" else "FILE"
        raise ValueError(f"eval kind {config.kind!r} needs a path: --eval {config.kind}:{example}")
    if tokenizer is None or preprocess is None:
        raise ValueError("evaluation needs the teacher's tokenizer and preprocess")
    if config.kind == "retrieval":
        return _retrieval_evaluator(config, tokenizer, preprocess, device)
    if config.kind == "folder":
        images, names = zero_shot.load_image_folder(config.path, preprocess)
    else:
        images, names = zero_shot.load_labelled_csv(config.path, preprocess), None
    if config.class_names is not None:
        names = zero_shot.load_names(config.class_names)
    if names is None:
        raise ValueError("eval kind 'csv' needs class names: --set eval.class_names=FILE")
    outside = next(
        (i for i, label in enumerate(images.labels) if not 0 <= label < len(names)), None
    )
    if outside is not None:
        raise ValueError(
            f"evaluation set {config.path}: row {outside} has label {images.labels[outside]}, "
            f"outside the {len(names)} class names (labels count from 0)"
        )
    templates = (
        zero_shot.load_names(config.templates)
        if config.templates is not None
        else list(zero_shot.DEFAULT_TEMPLATES)
    )
    return zero_shot.ZeroShotEvaluator(
        images, None, names, templates, tokenizer, device, config.batch_size
    )


def _retrieval_evaluator(
    config: EvalConfig, tokenizer: Callable, preprocess: Callable, device: torch.device
) -> Evaluator:
    from tinyclip_fast.data.retrieval import RetrievalEvaluator, load_retrieval_pairs

    for name in ("class_names", "templates"):
        if getattr(config, name) is not None:
            raise ValueError(
                f"eval.{name} is for zero-shot classification; eval kind 'retrieval' scores "
                "the captions of its CSV"
            )
    images, captions, text_image = load_retrieval_pairs(config.path, preprocess)
    return RetrievalEvaluator(images, captions, text_image, tokenizer, device, config.batch_size)
