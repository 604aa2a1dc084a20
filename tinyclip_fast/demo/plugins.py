"""The demo's teacher, data and evaluator under the name "demo", for ``tinyclip-distill``.

``--teacher demo``, ``--data demo[:SOURCE]`` and ``--eval demo[:SOURCE]`` work once
:func:`register_demo` has run (the CLI calls it). The engine and the data layer know the demo
only through these registrations; the heavy modules load when a "demo" name is used.
"""

from __future__ import annotations

from typing import Any

import torch

from tinyclip_fast.data.datasets import register_dataset
from tinyclip_fast.teachers.loading import register_teacher
from tinyclip_fast.train.config import EvalConfig
from tinyclip_fast.train.evaluation import register_evaluator

# The data.options keys of --data demo (the engine sets image_size, context_length and seed).
DEMO_DATA_OPTIONS = {
    "source": "auto, digits or fashion-mnist (default: the --data demo:SOURCE path, else auto)",
    "split": "train or test (default: train)",
}


def _teacher(pretrained: str | None) -> tuple:
    from tinyclip_fast.demo.teacher import build_demo_teacher

    return build_demo_teacher(pretrained)


def _dataset(data_cfg: dict[str, Any], preprocess: Any, tokenizer: Any) -> Any:
    """demo: ``path`` (or ``source``: auto/digits/fashion-mnist), ``split`` (train/test),
    ``image_size``, ``context_length``, ``seed``, ``num_samples``. The demo ships tensor
    images and its own compact tokenizer: ``preprocess`` and ``tokenizer`` are ignored."""
    from tinyclip_fast.demo.data import load_demo_split

    return load_demo_split(
        data_cfg.get("source") or data_cfg.get("path") or "auto",
        data_cfg.get("split", "train"),
        image_size=int(data_cfg.get("image_size", 32)),
        context_length=int(data_cfg.get("context_length", 12)),
        seed=int(data_cfg.get("seed", 0)),
        max_samples=data_cfg.get("num_samples"),
    ).dataset


def _evaluator(config: EvalConfig, device: torch.device) -> Any:
    from tinyclip_fast.demo.data import load_demo_split

    return load_demo_split(config.path or "auto", "test").evaluator(device, config.batch_size)


def register_demo() -> None:
    """Register the name "demo" as a teacher, a data kind and an eval kind."""
    register_teacher("demo", _teacher)
    register_dataset("demo", _dataset, options=DEMO_DATA_OPTIONS)
    register_evaluator("demo", _evaluator)
