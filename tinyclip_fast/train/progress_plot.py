"""The run folder's ``progress.png``: the training loss and the evaluation metrics (zero-shot
top-1, or retrieval recalls) against steps, redrawn after each evaluation (metrics.jsonl stays
the machine-readable record)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinyclip_fast.atomic_io import atomic_write


def draw_progress(history: list[dict[str, Any]], path: Path) -> bool:
    """Draw the loss records and the evaluation records of ``history`` into ``path`` (PNG,
    written atomically); False when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    losses = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evaluations = [r for r in history if not {"loss", "event"} & r.keys()]
    metrics: dict[str, list[tuple[int, float]]] = {}
    for record in evaluations:
        for name, value in record.items():
            if name not in ("step", "stage"):
                metrics.setdefault(name, []).append((record["step"], 100 * value))
    figure, loss_axes = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        if losses:
            loss_axes.plot(*zip(*losses, strict=True), color="tab:blue", label="loss")
        loss_axes.set_xlabel("step")
        loss_axes.set_ylabel("training loss", color="tab:blue")
        eval_axes = loss_axes.twinx()
        for name, points in metrics.items():
            eval_axes.plot(*zip(*points, strict=True), "o-", label=name)
        eval_axes.set_ylabel("evaluation (%)")
        if len(metrics) > 1:
            eval_axes.legend(fontsize="small", loc="lower right")
        for event in (r for r in history if r.get("event") == "pruned"):
            loss_axes.axvline(event["step"], color="grey", linestyle=":")
        loss_axes.grid(alpha=0.3)
        figure.tight_layout()
        atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    finally:
        plt.close(figure)
    return True
