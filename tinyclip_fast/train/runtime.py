"""Run plumbing: the process group, the device, stop signals, the metrics log, RNG states."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tinyclip_fast.train.step import rng_state


def init_distributed(device: str | torch.device | None) -> tuple[int, int, bool]:
    """(rank, world_size, created): joins torchrun's process group when one is announced."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        use_cuda = torch.cuda.is_available() and (
            device is None or torch.device(device).type == "cuda"
        )
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def resolve_device(device: str | torch.device | None) -> torch.device:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and stops.

    A second signal raises KeyboardInterrupt at once (the user really wants out)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, world_size: int, device: torch.device) -> bool:
        """Whether any rank got a signal (all ranks must stop at the same step)."""
        flag = torch.tensor(float(self.signal is not None), device=device)
        if world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)


class MetricsLog:
    """metrics.jsonl (always) and TensorBoard (when installed); rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.file = self.tensorboard = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "stage"):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        for handle in (self.file, self.tensorboard):
            if handle is not None:
                handle.close()


def all_rng_states(device: torch.device, world_size: int) -> list[list[torch.Tensor]]:
    """Every rank's RNG state (each rank draws its own dropout samples)."""
    mine = rng_state(device)
    if world_size == 1:
        return [mine]
    states: list[Any] = [None] * world_size
    dist.all_gather_object(states, [t.cpu() for t in mine])
    return states


def mean_over_ranks(value: torch.Tensor, world_size: int) -> float:
    if world_size > 1:
        value = value.detach().float().clone()
        dist.all_reduce(value)
        value /= world_size
    return float(value)
