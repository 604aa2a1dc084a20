"""What a run shows and records, in one place: rank-0 lines (above the progress bar), the
metrics.jsonl records and their history, the progress bar with loss and images/s, zero-shot
evaluations (their time kept out of images/s), the pruning report and the message of a loss
that stopped being finite."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tinyclip_fast.train.config import DistillConfig, StageConfig
from tinyclip_fast.train.runtime import MetricsLog
from tinyclip_fast.train.stage import PruneReport

# An auto stage that pruned at less than this share of its target gets a warning line.
FAR_BELOW_TARGET = 0.8


class RunOutput:
    """Rank 0 prints and writes; every rank keeps the history (it goes into checkpoints)."""

    def __init__(
        self,
        config: DistillConfig,
        rank: int,
        evaluator: Callable[[nn.Module], float] | None,
    ) -> None:
        self.config, self.rank, self.evaluator = config, rank, evaluator
        self.out_dir = Path(config.out_dir)
        self.history: list[dict[str, Any]] = []
        self.progress: tqdm | None = None
        self.log: MetricsLog | None = None
        self._tick, self._images = time.perf_counter(), 0
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
        """Zero-shot top-1 into the history (rank 0), once per step, untimed."""
        if self.evaluator is None or self.rank != 0:
            return
        last = self.history[-1] if self.history else {}
        if last.get("step") == step and "top1" in last:
            return  # the stage ended on an eval step
        with self.untimed():
            top1 = float(self.evaluator(model))
            record = {"step": step, "stage": stage_index, "top1": top1}
            self.record(record)
            self.say(f"step {step} stage {stage_index}: zero-shot top-1 {top1:.4f}")

    def pruned(self, report: PruneReport, stage: StageConfig, stage_index: int, step: int) -> None:
        """Say (and record) how far the masks of an auto stage got when it pruned."""
        expected, before, after = (
            report.expected_sparsity,
            report.params_before,
            report.params_after,
        )
        self.record(
            {
                "step": step,
                "stage": stage_index,
                "event": "pruned",
                "expected_sparsity": expected,
                "target_sparsity": stage.sparsity,
                "params_before": before,
                "params_after": after,
            }
        )
        self.say(
            f"stage {stage_index}: pruned at step {step}: expected sparsity {expected:.1%} of "
            f"target {stage.sparsity:.1%}, params {before:,} -> {after:,}"
        )
        if expected < FAR_BELOW_TARGET * stage.sparsity:
            optim = self.config.optim
            self.say(
                f"warning: stage {stage_index} pruned far below its target sparsity: the masks "
                f"had {stage.mask_steps} steps at optim.mask_lr {optim.mask_lr:g} and "
                f"optim.lagrangian_lr {optim.lagrangian_lr:g}; raise these (--set) or --prune-step"
            )

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
