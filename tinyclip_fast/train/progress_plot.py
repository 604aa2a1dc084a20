"""The run folder's ``progress.png``: the training loss and the zero-shot top-1 against steps,
redrawn after each evaluation (metrics.jsonl stays the machine-readable record)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinyclip_fast.atomic_io import atomic_write


def draw_progress(history: list[dict[str, Any]], path: Path) -> bool:
    """Draw the loss records and the top-1 records of ``history`` into ``path`` (PNG,
    written atomically); False when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    losses = [(r["step"], r["loss"]) for r in history if "loss" in r]
    accuracy = [(r["step"], 100 * r["top1"]) for r in history if "top1" in r]
    figure, loss_axes = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        if losses:
            loss_axes.plot(*zip(*losses, strict=True), color="tab:blue", label="loss")
        loss_axes.set_xlabel("step")
        loss_axes.set_ylabel("training loss", color="tab:blue")
        top1_axes = loss_axes.twinx()
        if accuracy:
            top1_axes.plot(*zip(*accuracy, strict=True), "o-", color="tab:orange", label="top-1")
        top1_axes.set_ylabel("zero-shot top-1 (%)", color="tab:orange")
        for event in (r for r in history if r.get("event") == "pruned"):
            loss_axes.axvline(event["step"], color="grey", linestyle=":")
        loss_axes.grid(alpha=0.3)
        figure.tight_layout()
        atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    finally:
        plt.close(figure)
    return True
