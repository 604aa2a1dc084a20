"""What a run shows and records, in one place: rank-0 lines (above the progress bar), the
metrics.jsonl records and their history, the progress bar with loss and images/s, evaluations
(zero-shot top-1 or retrieval recalls, their time kept out of images/s) and the progress plot,
the pruning report and the message of a loss that stopped being finite."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tinyclip_fast.pruning.policy import prune_warning, target_miss
from tinyclip_fast.train.config import DistillConfig, StageConfig
from tinyclip_fast.train.evaluation import Evaluator
from tinyclip_fast.train.progress_plot import draw_progress
from tinyclip_fast.train.run_folder import PLOT_NAME
from tinyclip_fast.train.runtime import MetricsLog
from tinyclip_fast.train.stage import PruneReport

METRIC_NAMES = {"top1": "zero-shot top-1"}  # how a run's line names an evaluation metric


class RunOutput:
    """Rank 0 prints and writes; every rank keeps the history (it goes into checkpoints)."""

    def __init__(
        self,
        config: DistillConfig,
        rank: int,
        evaluator: Evaluator | None,
    ) -> None:
        self.config, self.rank, self.evaluator = config, rank, evaluator
        self.out_dir = Path(config.out_dir)
        self.history: list[dict[str, Any]] = []
        self.progress: tqdm | None = None
        self.log: MetricsLog | None = None
        self._tick, self._images = time.perf_counter(), 0
        self._plots = True  # until matplotlib turns out to be missing
        self._wait, self._steps = 0.0, 0

    def say(self, message: str) -> None:
        """One line on rank 0 (above the progress bar when there is one)."""
        if self.rank != 0:
            return
        if self.progress is not None:
            self.progress.write(message)
        else:
            print(message, flush=True)

    @contextlib.contextmanager
    def open(self, step: int, resume_step: int | None) -> Iterator[RunOutput]:
        """The metrics log (cut back to ``resume_step``) and the progress bar from ``step``."""
        config = self.config
        self.log = MetricsLog(self.out_dir, self.rank == 0, resume_step=resume_step)
        self.progress = tqdm(
            total=config.total_steps,
            initial=step,
            unit="step",
            dynamic_ncols=True,
            disable=not config.progress or self.rank != 0,
        )
        try:
            yield self
        finally:
            self.progress.close()
            self.progress = None
            self.log.close()

    def record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self.log.write(record)

    def start_timing(self) -> None:
        """Images/s and data-wait count from now (a stage's first step)."""
        self._tick, self._images = time.perf_counter(), 0
        self._wait, self._steps = 0.0, 0

    def data_wait(self, seconds: float) -> None:
        """Time the step just taken spent waiting for the loader (data/feed.py)."""
        self._wait += seconds

    @contextlib.contextmanager
    def untimed(self) -> Iterator[None]:
        """Work whose time does not count against images/s (evaluation, checkpoints)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._tick += time.perf_counter() - start

    def step_done(
        self,
        step: int,
        stage: StageConfig,
        stage_index: int,
        stage_step: int,
        loss: float,
        lr: float,
        sparsity: torch.Tensor | None,
        penalty: torch.Tensor | None,
        bad_samples: int | None,
    ) -> None:
        """Count the step's images; every log_every steps (and at a stage's end) a record
        with the loss, rate, images/s, the mean data-wait per step in ms and its share of the
        time (and the masks' sparsity and penalty, bad samples)."""
        self._images += self.config.batch_size
        self._steps += 1
        if step % self.config.log_every == 0 or stage_step == stage.steps:
            elapsed = time.perf_counter() - self._tick
            record = {
                "step": step,
                "stage": stage_index,
                "loss": loss,
                "lr": lr,
                "images_per_s": self._images / max(elapsed, 1e-9),
                "data_wait_ms": 1000 * self._wait / max(self._steps, 1),
                "data_wait_share": min(1.0, self._wait / max(elapsed, 1e-9)),
            }
            if sparsity is not None:
                record["sparsity"] = float(sparsity.detach())
                record["penalty"] = float(penalty.detach())
            if bad_samples is not None:
                record["bad_samples"] = bad_samples
            self.record(record)
            self.progress.set_postfix(
                loss=f"{loss:.4f}",
                img_s=f"{record['images_per_s']:.0f}",
                wait=f"{record['data_wait_ms']:.0f}ms ({record['data_wait_share']:.0%})",
            )
            self.start_timing()
        self.progress.update(1)

    def evaluate(self, model: nn.Module, stage_index: int, step: int) -> None:
        """The evaluator's metrics (zero-shot top-1, or a dict such as retrieval's recalls)
        into the history and one line (rank 0), once per step, untimed."""
        if self.evaluator is None or self.rank != 0:
            return
        last = self.history[-1] if self.history else {}
        if last.get("step") == step and not {"loss", "event"} & last.keys():
            return  # the stage ended on an eval step
        with self.untimed():
            value = self.evaluator(model)
            metrics = value if isinstance(value, dict) else {"top1": value}
            metrics = {name: float(v) for name, v in metrics.items()}
            self.record({"step": step, "stage": stage_index, **metrics})
            shown = ", ".join(f"{METRIC_NAMES.get(k, k)} {v:.4f}" for k, v in metrics.items())
            self.say(f"step {step} stage {stage_index}: {shown}")
            self._plot()

    def _plot(self) -> None:
        """Redraw the run folder's progress plot; one line when matplotlib is missing."""
        if self._plots and not draw_progress(self.history, self.out_dir / PLOT_NAME):
            self._plots = False
            self.say(f"no {PLOT_NAME}: matplotlib is not installed (metrics.jsonl has the record)")

    def pruned(self, report: PruneReport, stage: StageConfig, stage_index: int, step: int) -> None:
        """Say (and record) how far the masks of an auto stage got when it pruned, how the
        step was chosen, and a warning when the trigger gave up or the target was missed."""
        expected, target = report.expected_sparsity, stage.sparsity
        self.record(
            {
                "step": step,
                "stage": stage_index,
                "event": "pruned",
                "expected_sparsity": expected,
                "target_sparsity": target,
                "target_miss": target_miss(expected, target),
                "prune_reason": report.reason,
                "params_before": report.params_before,
                "params_after": report.params_after,
            }
        )
        self.say(
            f"stage {stage_index}: pruned at step {step}: expected sparsity {expected:.1%} of "
            f"target {target:.1%}, params {report.params_before:,} -> {report.params_after:,} "
            f"({report.reason})"
        )
        if report.warning is not None:
            self.say(f"warning: stage {stage_index}: {report.warning}")
        optim = self.config.optim
        warning = prune_warning(
            stage_index,
            expected,
            target,
            mask_steps=report.stage_step,
            mask_lr=optim.mask_lr,
            lagrangian_lr=optim.lagrangian_lr,
        )
        if warning is not None:
            self.say(warning)

    def non_finite_message(
        self, value: float, step: int, stage_index: int, checkpoint_step: int | None, path: Path
    ) -> str:
        """Why the run stopped and how to go on, from the last checkpoint if there is one."""
        advice = "lower --lr, use bf16 instead of fp16, or check the data"
        head = (
            f"loss is {value} at step {step} (stage {stage_index}); stopped before updating "
            "the weights."
        )
        if checkpoint_step is None:
            every = self.config.save_every
            first = f"the first was due at step {every}" if every else "save_every is 0"
            return (
                f"{head} No checkpoint was written yet ({first}): {advice}, then start again "
                "with --overwrite"
            )
        return (
            f"{head} The checkpoint of step {checkpoint_step} ({path}) is "
            f"intact: {advice}, then continue with --resume"
        )
