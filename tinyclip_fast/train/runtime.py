"""Run plumbing: the process group, the device and precision (autocast), stop signals, the
metrics log, RNG states."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tinyclip_fast.atomic_io import as_write_error
from tinyclip_fast.teachers.loading import AUTOCAST_DTYPES
from tinyclip_fast.train.attention import xformers_attention
from tinyclip_fast.train.run_folder import METRICS_NAME, TENSORBOARD_DIR, cut_jsonl
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


def check_device(device: str | torch.device | None) -> None:
    """ValueError, in one line, for a device name torch does not know or cannot use here."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if parsed.type != "cuda":
        return
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
        raise ValueError(
            f"device {str(device)!r}: no CUDA GPU is visible (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}{hint}); use --device cpu"
        )
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"device {str(device)!r}: only {count} CUDA device(s) are visible")


def resolve_device(device: str | torch.device | None) -> torch.device:
    check_device(device)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """The configured precision, else bf16 on CUDA (fp16 where bf16 is unsupported) and fp32
    on other devices (CPU autocast to bf16 is several times slower on most x86 CPUs)."""
    if precision is not None:
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_factory(
    device: torch.device, precision: str, attention: str
) -> Callable[[], contextlib.AbstractContextManager]:
    """The context of every forward pass of a run: autocast to ``precision`` (and the
    xformers attention route when ``attention`` is "xformers")."""
    dtype = AUTOCAST_DTYPES[precision]

    def autocast() -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device.type, dtype=dtype, enabled=dtype is not None))
        if attention == "xformers":
            stack.enter_context(xformers_attention())
        return stack

    return autocast


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
    """metrics.jsonl (always) and TensorBoard (when installed); rank 0 only.

    ``resume_step``: the step of the checkpoint a run resumes from; records after it (logged
    before a crash, a kill or a NaN stop) are cut away, so every step appears once. The files
    open with the first record: a run that fails before it leaves nothing to overwrite.
    """

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int | None = None) -> None:
        self.out_dir, self.enabled, self.resume_step = out_dir, enabled, resume_step
        self.file = self.tensorboard = None
        if enabled and resume_step is not None:
            cut_jsonl(out_dir / METRICS_NAME, resume_step)

    def _open(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.out_dir / METRICS_NAME, "a", encoding="utf-8")  # noqa: SIM115
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        purge = None if self.resume_step is None else self.resume_step + 1
        self.tensorboard = SummaryWriter(str(self.out_dir / TENSORBOARD_DIR), purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            if self.file is None:
                self._open()
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as err:  # a full disk: one line naming the file, exit status 3
            raise as_write_error(err, self.out_dir / METRICS_NAME) from err
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "stage") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        for handle in (self.file, self.tensorboard):
            if handle is not None:
                handle.close()
        self.file = self.tensorboard = None


def all_rng_states(device: torch.device, world_size: int) -> list[list[torch.Tensor]]:
    """Every rank's RNG state (each rank draws its own dropout samples)."""
    return gather_objects([t.cpu() for t in rng_state(device)], world_size)


def gather_objects(mine: Any, world_size: int) -> list[Any]:
    """Every rank's ``mine`` (picklable), in rank order."""
    if world_size == 1:
        return [mine]
    states: list[Any] = [None] * world_size
    dist.all_gather_object(states, mine)
    return states


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def set_threads(threads: int | None) -> int:
    """Set torch's CPU threads: ``threads``; None: under torchrun, this node's cores shared
    among its processes (torch's own default gives each process every core, and processes
    that oversubscribe the cores run several times slower); else torch's choice. Returns the
    count."""
    if threads is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local <= 1:
            return torch.get_num_threads()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, (cores or 1) // local)
    torch.set_num_threads(threads)
    return threads


def mean_over_ranks(value: torch.Tensor, world_size: int) -> float:
    if world_size > 1:
        value = value.detach().float().clone()
        dist.all_reduce(value)
        value /= world_size
    return float(value)
