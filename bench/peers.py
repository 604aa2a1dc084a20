"""The peers a user would try instead of our losses, side by side with ours in one run.

Each peer is a loss ``fn(*args) -> scalar`` over the same inputs as ours. Before it is timed
its value and input gradients are compared with ours on one shared fp32 input (the same
computation, or the table says it is not); a peer that cannot run on this device (no CUDA,
an import that needs a GPU, an older release) is a cell that says why, never a missing row.
The loss benchmarks define their peers and call :func:`peer_tables`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

CHECK_N = 512  # rows of the fp32 input the values are compared on
# Relative errors allowed: a Triton peer may run its fp32 matmuls in TF32 on the GPU.
LOSS_TOL, GRAD_TOL = 1e-2, 5e-2
CPU_RUNS = 3  # forward + backward calls per CPU timing (the fastest is kept)


class PeerUnavailable(Exception):
    """The peer cannot run here; the message is the table cell."""


@dataclass(frozen=True)
class Peer:
    """``build(device)`` returns the loss function or raises PeerUnavailable."""

    name: str
    build: Callable[[str], Callable[..., torch.Tensor]]


def versions(distributions: list[str]) -> str:
    """'name version' of each installed distribution, 'name not installed' otherwise."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in distributions:
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} not installed")
    return ", ".join(parts)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:120] if text else ''}"


def build_peer(peer: Peer, device: str) -> tuple[Callable | None, str | None]:
    """(loss function, None) or (None, why it cannot run here)."""
    try:
        return peer.build(device), None
    except PeerUnavailable as err:
        return None, str(err)
    except Exception as err:  # a peer's own import or set-up failing is a result to report
        return None, f"cannot start: {_one_line(err)}"


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def _loss_and_grads(fn: Callable, args: tuple, grad_args: int) -> tuple[torch.Tensor, list]:
    for arg in args[:grad_args]:
        arg.grad = None
    loss = fn(*args)
    loss.backward()
    return loss.detach(), [arg.grad.detach().clone() for arg in args[:grad_args]]


def check_value(
    fn: Callable, ours: Callable, make_inputs: Callable, device: str, grad_args: int = 2
) -> tuple[bool, str]:
    """(same computation?, cell): loss and gradient relative errors against ours, fp32."""
    args = make_inputs(CHECK_N, device, torch.float32)
    expected_loss, expected_grads = _loss_and_grads(ours, args, grad_args)
    try:
        loss, grads = _loss_and_grads(fn, args, grad_args)
    except Exception as err:
        return False, f"fails: {_one_line(err)}"
    errors = [_rel(loss, expected_loss)]
    errors += [_rel(g, e) for g, e in zip(grads, expected_grads, strict=True)]
    same = errors[0] < LOSS_TOL and max(errors[1:]) < GRAD_TOL
    cell = f"loss {errors[0]:.1e}, gradients {max(errors[1:]):.1e}"
    return same, f"same ({cell})" if same else f"DIFFERS ({cell})"


def time_call(fn: Callable, args: tuple, device: str, grad_args: int = 2) -> tuple[float, float]:
    """(ms of forward + backward, peak MB beyond the inputs or NaN on the CPU)."""

    def step():
        fn(*args).backward()
        for arg in args[:grad_args]:
            arg.grad = None

    step()  # compiles, autotunes, lazy state
    if device == "cuda":
        from triton.testing import do_bench

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return do_bench(step, return_mode="median"), peak
    times = []
    for _ in range(CPU_RUNS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * min(times), float("nan")


def peer_tables(
    title: str,
    note: str,
    peers: list[Peer],
    make_inputs: Callable[[int, str, torch.dtype], tuple],
    sizes: list[int],
    device: str,
    dtype: torch.dtype,
    write: Callable[[list[str]], None] = lambda lines: None,
) -> list[str]:
    """Markdown: the value check of every peer against ``peers[0]`` (ours), then time and
    memory of every peer at every n on the same inputs. ``write(lines)`` is called after
    every measurement, so a timeout loses nothing measured."""
    built = {peer.name: build_peer(peer, device) for peer in peers}
    ours_fn, why = built[peers[0].name]
    if ours_fn is None:
        raise RuntimeError(f"{peers[0].name} cannot run: {why}")
    checks = {}
    for peer in peers:
        fn, why = built[peer.name]
        checks[peer.name] = (
            (False, why) if fn is None else check_value(fn, ours_fn, make_inputs, device)
        )
    unit = "ms (MB)" if device == "cuda" else "ms"
    lines = [
        f"# {title}",
        "",
        f"{note} Load average (1 min) when written: {os.getloadavg()[0]:.1f}.",
        "",
        f"Value check (fp32, n = {CHECK_N}, relative error against {peers[0].name}; same "
        f"when the loss is within {LOSS_TOL:g} and every input gradient within {GRAD_TOL:g}):",
        "",
        "| implementation | loss and input gradients |",
        "|---|---|",
        *(f"| {peer.name} | {checks[peer.name][1]} |" for peer in peers),
        "",
        "| n | " + " | ".join(f"{peer.name} {unit}" for peer in peers) + " |",
        "|---|" + "---|" * len(peers),
    ]
    for n in sizes:
        cells = []
        ours_ms = None
        for peer in peers:
            fn, why = built[peer.name]
            if fn is None:
                cells.append(f"cannot run: {why}")
                continue
            try:
                ms, mb = time_call(fn, make_inputs(n, device, dtype), device)
            except torch.OutOfMemoryError:
                cells.append("OOM")
            except Exception as err:
                cells.append(f"fails: {_one_line(err)}")
            else:
                ours_ms = ms if peer is peers[0] else ours_ms
                memory = "" if mb != mb else f" ({mb:.0f})"
                speed = "" if peer is peers[0] or not ours_ms else f", {ms / ours_ms:.2f}x ours"
                flag = "" if checks[peer.name][0] else " DIFFERS"
                cells.append(f"{ms:.3f}{memory}{speed}{flag}")
            if device == "cuda":
                torch.cuda.empty_cache()
            print(f"{peer.name} n={n}: {cells[-1]}", flush=True)
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
        write(lines)
    lines += [
        "",
        "Cells: forward + backward ms (peak MB beyond the inputs, CUDA only) and, for a peer, "
        "its time as a multiple of ours (above 1x: ours is faster); DIFFERS: its values are "
        "not ours (see the check table).",
    ]
    write(lines)
    return lines


@dataclass
class PeerSetting:
    """Where and how one peers table runs: device, feature dtype, the machine's name, the
    table's file stem and how its times were taken."""

    device: str
    dtype: torch.dtype
    machine: str
    stem: str
    timing: str


def peer_setting(cpu: bool, prefix: str) -> PeerSetting:
    """The CPU in fp32, or the CUDA device in bf16; ``prefix`` names the table's file."""
    from cpu_info import cpu_name

    machine = f"CPU {cpu_name()}" if cpu else torch.cuda.get_device_name()
    where = "cpu" if cpu else machine.replace(" ", "_").replace("/", "_")
    timing = (
        f"fastest of {CPU_RUNS} calls after a warm-up, {torch.get_num_threads()} threads"
        if cpu
        else "triton do_bench median"
    )
    dtype = torch.float32 if cpu else torch.bfloat16
    return PeerSetting("cpu" if cpu else "cuda", dtype, machine, f"{prefix}_{where}", timing)
