"""Benchmark of the fused affinity loss against open_clip's DistillClipLoss.

GPU:  python bench/bench_affinity_loss.py [--quick] [--out bench/results]
      forward / backward / full (forward + backward) at n = 256 .. 262,144, d = 512, bf16
      features: ours vs open_clip eager vs torch.compile(open_clip); median time
      (triton.testing.do_bench, return_mode="median"), steady-state peak memory beyond the
      inputs (several consecutive calls, gradients included), TFLOP/s on the matmul FLOPs
      the loss must do (A and B forward, dX and dY backward) against a measured bf16 GEMM
      rate. --quick: full mode only, torch.compile at n = 16,384 only (the target size).
      Writes <out>/affinity_loss_<gpu>.md after every size (a timeout loses nothing
      measured) and a PNG plot at the end.
CPU:  python bench/bench_affinity_loss.py --cpu [--quick] [--out bench/results]
      fp32, n = 1,024 .. 8,192: median time of forward + backward, and at n = 8,192 the
      steady-state peak RSS growth over several consecutive calls, each in a fresh process
      (<out>/affinity_loss_cpu.md). pytest bench/bench_affinity_loss.py --benchmark-enable
      runs the same as pytest-benchmark cases. On a machine shared with other jobs, run
      with OMP_WAIT_POLICY=PASSIVE: spinning OpenMP workers otherwise dominate the timing
      of code that alternates GEMMs and elementwise ops (the chunked loss) much more than
      the reference's few large ops.
      --dry-run: print the plan, run every implementation once at n = 64 on the CPU and
      render the table from that (nothing written); needs no GPU.
Ensembles: python bench/bench_affinity_loss.py --ensemble [--cpu] [--quick] [--out ...]
      ours with K = 1, 2, 4 teachers (d = 512 each), targets averaged after softmax:
      time(K) / time(1) of forward + backward against the goal (1 + K) / 2 (each student
      tile computed once, the K teacher tiles streamed beside it), the K alternating call
      by call in one process; on the GPU bf16, do_bench median, n = 16,384 (--quick) or
      4,096 .. 65,536 (<out>/affinity_ensemble_<gpu>.md); on the CPU fp32, n = 8,192, the
      fastest of 3 calls each plus the steady-state peak RSS growth per K, each in a fresh
      process (<out>/affinity_ensemble_cpu.md). With --dry-run: every K once at n = 64.

Both implementations compute the same two terms (distillation and contrastive) so the
comparison is like for like.

Peers: python bench/bench_affinity_loss.py --peers [--cpu] [--quick] [--out ...] [--dry-run]
      the contrastive (InfoNCE) term alone: ours beside Inf-CL (PyPI inf-cl, CUDA only) and
      open_clip's ClipLoss on the same inputs; each peer's loss and gradients checked against
      ours first, a peer that cannot run is a cell saying why (bench/peers.py). Writes
      <out>/contrastive_peers_<gpu or cpu>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cost_model
import pytest
import torch
import torch.nn.functional as F
from cpu_info import cpu_name
from peers import Peer, PeerUnavailable, build_peer, peer_setting, peer_tables
from peers import versions as peer_versions

DIM = 512
GPU_SIZES = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144]
QUICK_SIZES = [256, 2048, 16384, 65536, 262144]
COMPILED_QUICK_SIZES = [16384]
CPU_SIZES = [1024, 4096, 8192]
CPU_QUICK_SIZES = [1024, 8192]
CPU_MEMORY_N = 8192
IMPLS = ("tinyclip_fast", "open_clip", "open_clip+compile")
MODES = ("forward", "backward", "full")
# Consecutive forward + backward calls over which the steady-state peak is taken.
MEMORY_CALLS = 4


def make_features(n: int, device: str, dtype: torch.dtype, teachers: int = 1) -> tuple:
    """Unit-norm random student (requiring grad) and teacher features, student scale 50;
    for ``teachers`` > 1 the teachers' features and scales (100, 80, 60, 40) as lists."""
    unit = lambda: F.normalize(torch.randn(n, DIM, device=device), dim=1).to(dtype)
    x, y = unit().requires_grad_(), unit().requires_grad_()
    scale = torch.tensor(50.0, device=device, requires_grad=True)
    if teachers == 1:
        return x, y, scale, unit(), unit(), torch.tensor(100.0, device=device)
    images, texts = [unit() for _ in range(teachers)], [unit() for _ in range(teachers)]
    scales = [torch.tensor(100.0 - 20 * k, device=device) for k in range(teachers)]
    return x, y, scale, images, texts, scales


def loss_fn(impl: str):
    """The scalar distill + contrastive loss of one implementation."""
    if impl == "tinyclip_fast":
        from tinyclip_fast.ops.affinity_loss import affinity_loss_square

        def ours(*args):
            distill, contrastive = affinity_loss_square(*args, compute_contrastive=True)
            return distill + contrastive

        return ours
    from open_clip.loss import DistillClipLoss

    reference = DistillClipLoss()

    def open_clip_loss(*args):
        contrastive, distill = reference(*args)
        return distill + contrastive

    return torch.compile(open_clip_loss) if impl.endswith("+compile") else open_clip_loss


def must_do_flops(n: int, mode: str) -> float:
    """Matmul FLOPs no implementation can avoid: A and B forward, dX and dY backward."""
    forward = 2 * 2 * n * n * DIM
    backward = 2 * 2 * n * n * DIM
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


def _clear_grads(args) -> None:
    """Gradients dropped after every step, as an optimizer's zero_grad(set_to_none=True)."""
    for tensor in args[:3]:
        tensor.grad = None


# ----------------------------------------------------------------------------- GPU mode


def _gemm_tflops() -> float:
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, return_mode="median")
    return 2 * 8192**3 / ms / 1e9


def _steady_peak_mb(step, calls: int = MEMORY_CALLS) -> float:
    """Peak allocated during ``calls`` consecutive steps, beyond what was allocated before.

    Measured apart from the timing: do_bench allocates its own L2-flush buffer.
    """
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _measure_gpu(impl: str, n: int, mode: str) -> tuple[float, float]:
    """(median ms, steady-state peak MB beyond the inputs) of one mode; may raise OOM."""
    from triton.testing import do_bench

    fn = loss_fn(impl)
    args = make_features(n, "cuda", torch.bfloat16)
    grads = list(args[:3])
    if mode == "forward":

        def step():
            with torch.no_grad():
                fn(*args)

    elif mode == "backward":
        out = fn(*args)

        def step():
            out.backward(retain_graph=True)
            _clear_grads(args)

    else:

        def step():
            fn(*args).backward()
            _clear_grads(args)

    step()  # compiles, autotunes, and sets up lazy state before anything is measured
    peak = _steady_peak_mb(step)
    ms = do_bench(step, grad_to_none=grads, return_mode="median")
    return ms, peak


def gpu_plan(quick: bool) -> list[tuple[str, int, str]]:
    """(impl, n, mode) in the order measured."""
    sizes, modes = (QUICK_SIZES, ("full",)) if quick else (GPU_SIZES, MODES)
    plan = []
    for impl in IMPLS:
        impl_sizes = COMPILED_QUICK_SIZES if quick and impl.endswith("+compile") else sizes
        plan += [(impl, n, mode) for n in impl_sizes for mode in modes]
    return plan


def run_gpu(quick: bool, out_dir: Path) -> None:
    import triton

    name = torch.cuda.get_device_name()
    sizes, modes = (QUICK_SIZES, ("full",)) if quick else (GPU_SIZES, MODES)
    gemm = _gemm_tflops()
    versions = f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}"
    stem = "affinity_loss_" + name.replace(" ", "_").replace("/", "_")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, int, str], tuple[float, float] | None] = {}
    out_of_memory: set[str] = set()
    for impl, n, mode in gpu_plan(quick):
        if impl in out_of_memory:  # a larger n cannot fit either
            results[impl, n, mode] = None
            continue
        start = time.perf_counter()
        try:
            results[impl, n, mode] = _measure_gpu(impl, n, mode)
        except torch.OutOfMemoryError:
            results[impl, n, mode] = None
            if mode == "full":
                out_of_memory.add(impl)
        torch.cuda.empty_cache()
        seconds = time.perf_counter() - start
        print(f"{impl} n={n} {mode}: {results[impl, n, mode]} ({seconds:.0f} s)", flush=True)
        # Every finished measurement goes straight into the table.
        lines = gpu_report(results, sizes, modes, name, gemm, versions)
        (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(results, sizes, name, out_dir / f"{stem}.png")
    print(f"wrote {out_dir / stem}.md and .png")


def gpu_report(
    results: dict, sizes: list[int], modes: tuple, name: str, gemm: float, versions: str
) -> list[str]:
    """Markdown lines of the GPU table; results[impl, n, mode] = (ms, MB), None (OOM), or
    missing (not measured, or not yet)."""
    lines = [
        f"# Affinity loss: {name}",
        "",
        f"{versions}; d = {DIM}, bf16 features, fp32 math, distill + contrastive; "
        f"bf16 GEMM rate {gemm:.0f} TFLOP/s (8192^3). Model: bench/cost_model.py's prediction "
        "for this card (H200 by name, else H100), (x measured / predicted). Time: triton "
        "do_bench median. Memory: "
        f"peak allocated over {MEMORY_CALLS} consecutive calls beyond the inputs (the "
        "gradients included). TFLOP/s: matmul FLOPs the loss must do (8 n^2 d for full) / "
        "time. OOM = out of memory, - = not measured.",
        "",
        "| n | mode | ours ms | open_clip ms | compiled ms | speed-up vs eager / compiled "
        "| ours MB | open_clip MB | compiled MB | ours TFLOP/s (% GEMM) | ours model ms "
        "| open_clip model ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    card, registers = cost_model.card_for(name), cost_model.read_report()
    missing = object()
    measured = lambda r: r is not missing and r is not None

    def fmt(r, i):
        if r is missing:
            return "-"
        return "OOM" if r is None else f"{r[i]:.3f}" if i == 0 else f"{r[i]:.0f}"

    for n in sizes:
        for mode in modes:
            ours, eager, compiled = (results.get((impl, n, mode), missing) for impl in IMPLS)
            if all(r is missing for r in (ours, eager, compiled)):
                continue
            ratio = lambda ref, ours=ours: (
                f"{ref[0] / ours[0]:.2f}x" if measured(ref) and measured(ours) else "-"
            )
            tflops = "-"
            if measured(ours):
                rate = must_do_flops(n, mode) / ours[0] / 1e9
                tflops = f"{rate:.0f} ({100 * rate / gemm:.0f}%)"
            shape = cost_model.Shape(n, n, d=DIM)
            model = cost_model.predicted_ms("affinity", shape, mode, card, registers)
            cells = [
                cost_model.model_cell(model[design], r[0] if measured(r) else None)
                for design, r in (("fused (ours)", ours), ("open_clip bf16 logits", eager))
            ]
            lines.append(
                f"| {n} | {mode} | {fmt(ours, 0)} | {fmt(eager, 0)} | {fmt(compiled, 0)} "
                f"| {ratio(eager)} / {ratio(compiled)} | {fmt(ours, 1)} | {fmt(eager, 1)} "
                f"| {fmt(compiled, 1)} | {tflops} | {cells[0]} | {cells[1]} |"
            )
    return lines


def _plot(results: dict, sizes: list[int], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for impl in IMPLS:
        points = [(n, results.get((impl, n, "full"))) for n in sizes]
        points = [(n, r) for n, r in points if r is not None]
        if points:
            ax_time.plot([n for n, _ in points], [r[0] for _, r in points], "o-", label=impl)
            ax_mem.plot([n for n, _ in points], [r[1] for _, r in points], "o-", label=impl)
    for ax, label in ((ax_time, "forward + backward ms"), (ax_mem, "peak extra MB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch n")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Affinity loss, d = {DIM}, bf16 ({title})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- CPU mode

_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, {bench_dir!r})
    from bench_affinity_loss import cpu_steady_state_rss

    torch.set_num_threads({threads})
    print(json.dumps(cpu_steady_state_rss({impl!r}, {n}, {calls}, {teachers})))
    """
)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field))
    return int(line.split()[1]) / 1024


def cpu_steady_state_rss(impl: str, n: int, calls: int, teachers: int = 1) -> dict:
    """Per call, the peak RSS beyond the RSS with the inputs in place; run in a subprocess.

    Before each call the high-water mark is reset (``/proc/self/clear_refs``), so every
    call's peak is its own, with whatever the allocator kept from the calls before.
    """
    fn = loss_fn(impl)
    # Warm-up: lazy allocations.
    fn(*make_features(64, "cpu", torch.float32, teachers)).backward()
    args = make_features(n, "cpu", torch.float32, teachers)
    base = _status_mb("VmRSS:")
    peaks, seconds = [], []
    for _ in range(calls):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        start = time.perf_counter()
        fn(*args).backward()
        seconds.append(time.perf_counter() - start)
        peaks.append(_status_mb("VmHWM:") - base)
        _clear_grads(args)
    grad_mb = sum(t.numel() * t.element_size() for t in args[:3]) / 2**20
    return {"peak_mb": peaks, "grad_mb": grad_mb, "seconds": seconds}


def cpu_peak_rss(
    impl: str, n: int = CPU_MEMORY_N, calls: int = MEMORY_CALLS, teachers: int = 1
) -> dict:
    """cpu_steady_state_rss in a fresh process (the measure sees nothing of this one)."""
    script = _RSS_SCRIPT.format(
        bench_dir=str(Path(__file__).parent),
        impl=impl,
        n=n,
        calls=calls,
        teachers=teachers,
        threads=torch.get_num_threads(),
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_median_seconds(impl: str, n: int, runs: int = 3) -> float:
    """Median wall time of forward + backward after one warm-up call."""
    fn = loss_fn(impl)
    args = make_features(n, "cpu", torch.float32)
    fn(*args).backward()
    _clear_grads(args)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(*args).backward()
        times.append(time.perf_counter() - start)
        _clear_grads(args)
    return statistics.median(times)


@pytest.mark.parametrize("n", CPU_SIZES)
@pytest.mark.parametrize("impl", IMPLS[:2])
def test_cpu_forward_backward(benchmark, impl, n):
    fn = loss_fn(impl)
    args = make_features(n, "cpu", torch.float32)
    benchmark.extra_info.update(n=n, dim=DIM, impl=impl)

    def step():
        fn(*args).backward()
        _clear_grads(args)

    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", IMPLS[:2])
def test_cpu_steady_state_peak_rss(record_property, impl):
    result = cpu_peak_rss(impl)
    record_property("peak_rss_growth_mb", max(result["peak_mb"]))
    print(f"\n{impl}: n={CPU_MEMORY_N} d={DIM} peak RSS growth per call {result['peak_mb']}")


def cpu_report(times: dict, memory: dict, sizes: list[int]) -> list[str]:
    """Markdown lines; times[impl, n] = median s, memory[impl] = cpu_steady_state_rss()."""
    lines = [
        f"# Affinity loss on CPU: {cpu_name()}, {torch.get_num_threads()} threads",
        "",
        f"torch {torch.__version__}, Python {platform.python_version()}; d = {DIM}, fp32, "
        "distill + contrastive, forward + backward; time = median of 3 calls after a "
        f"warm-up (ours and open_clip alternate by size). Memory at n = {CPU_MEMORY_N}: peak "
        f"RSS growth of each of {MEMORY_CALLS} consecutive calls in one fresh process, over "
        "the RSS with the inputs in place, gradients set to None after each call; the "
        "steady state is the largest, and 'beyond grads' subtracts the returned gradients. "
        f"Load average (1 min) when the table was written: {os.getloadavg()[0]:.1f}.",
        "",
        "| n | ours s | open_clip s | speed-up | ours MB per call | open_clip MB per call "
        "| ours MB beyond grads |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        ours, ref = times["tinyclip_fast", n], times["open_clip", n]
        cells = ["-", "-", "-"]
        if n == CPU_MEMORY_N and memory:
            per_call = lambda r: ", ".join(f"{p:.0f}" for p in r["peak_mb"])
            mine = memory["tinyclip_fast"]
            beyond = max(mine["peak_mb"]) - mine["grad_mb"]
            cells = [per_call(mine), per_call(memory["open_clip"]), f"{beyond:.0f}"]
        lines.append(
            f"| {n} | {ours:.3f} | {ref:.3f} | {ref / ours:.2f}x | {cells[0]} | {cells[1]} "
            f"| {cells[2]} |"
        )
    return lines


def run_cpu(quick: bool, out_dir: Path) -> None:
    sizes = CPU_QUICK_SIZES if quick else CPU_SIZES
    times, memory = {}, {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for n in sizes:
        for impl in IMPLS[:2]:
            times[impl, n] = cpu_median_seconds(impl, n)
        if n == CPU_MEMORY_N:
            memory = {impl: cpu_peak_rss(impl) for impl in IMPLS[:2]}
        lines = cpu_report(times, memory, [s for s in sizes if ("open_clip", s) in times])
        (out_dir / "affinity_loss_cpu.md").write_text("\n".join(lines) + "\n")
        print(lines[-1], flush=True)
    print("\n".join(lines))


def dry_run(cpu: bool, quick: bool, out_dir: Path) -> None:
    """The plan, and every implementation once at n = 64 on the CPU; nothing written."""
    if cpu:
        sizes = CPU_QUICK_SIZES if quick else CPU_SIZES
        print(f"plan (CPU): {', '.join(IMPLS[:2])} at n = {sizes}, fp32, median of 3 calls;")
        print(f"  steady-state RSS at n = {CPU_MEMORY_N} over {MEMORY_CALLS} calls")
        print(f"  -> {out_dir}/affinity_loss_cpu.md")
    else:
        plan = gpu_plan(quick)
        print(f"plan (CUDA): {len(plan)} measurements -> {out_dir}/affinity_loss_<gpu>.md")
        for impl in IMPLS:
            points = [(n, mode) for i, n, mode in plan if i == impl]
            print(f"  {impl}: " + ", ".join(f"{n} {mode}" for n, mode in points))
    results = {}
    for impl in IMPLS[:2]:
        args = make_features(64, "cpu", torch.float32)
        start = time.perf_counter()
        loss = loss_fn(impl)(*args)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(args[0].grad).all()
        results[impl, 64, "full"] = (1000 * (time.perf_counter() - start), 0.0)
    loss_fn(IMPLS[2])  # torch.compile is only wrapped here: compiling needs the real run
    lines = gpu_report(results, [64], ("full",), "dry run (CPU, n = 64)", 1.0, "no CUDA")
    print("\n".join(lines))


# ----------------------------------------------------------------------------- ensemble mode

ENSEMBLE_TEACHERS = (1, 2, 4)
ENSEMBLE_GPU_SIZES = [4096, 16384, 65536]
ENSEMBLE_QUICK_SIZES = [16384]
ENSEMBLE_ROUNDS = 5


def ensemble_goal(teachers: int) -> float:
    """time(K) / time(1) allowed: one student pass plus K teacher passes, a teacher pass
    costing at most the student's (the student's includes its gradient GEMMs)."""
    return (1 + teachers) / 2


def _ensemble_step(n: int, teachers: int, device: str, dtype: torch.dtype):
    fn = loss_fn("tinyclip_fast")
    args = make_features(n, device, dtype, teachers)

    def step():
        fn(*args).backward()
        _clear_grads(args)

    step()  # compiles, autotunes, sets up lazy state
    return step, args


def cpu_ensemble_times(n: int, rounds: int = ENSEMBLE_ROUNDS) -> dict[int, float]:
    """Fastest forward + backward of each K over ``rounds``, the K alternating call by call
    (a shared machine's load then hits every K alike)."""
    steps = {k: _ensemble_step(n, k, "cpu", torch.float32)[0] for k in ENSEMBLE_TEACHERS}
    times: dict[int, list[float]] = {k: [] for k in ENSEMBLE_TEACHERS}
    for _ in range(rounds):
        for k, step in steps.items():
            start = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - start)
            print(f"  K={k}: {times[k][-1]:.3f} s", flush=True)
    return {k: min(t) for k, t in times.items()}


def ensemble_report(title: str, note: str, rows: list[tuple]) -> list[str]:
    """Markdown lines; rows = (n, K, seconds, seconds of K = 1, MB or None)."""
    lines = [
        f"# Affinity loss with teacher ensembles: {title}",
        "",
        note,
        "",
        "| n | K | s | time(K) / time(1) | goal (1 + K) / 2 | met | peak MB per call |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, k, seconds, base, memory in rows:
        ratio, goal = seconds / base, ensemble_goal(k)
        lines.append(
            f"| {n} | {k} | {seconds:.3f} | {ratio:.2f} | {goal:.1f} | "
            f"{'yes' if ratio <= goal else 'NO'} | {memory if memory is not None else '-'} |"
        )
    return lines


def run_cpu_ensemble(out_dir: Path, memory_calls: int = 3) -> None:
    n = CPU_MEMORY_N
    times = cpu_ensemble_times(n)
    memory = {
        k: cpu_peak_rss("tinyclip_fast", n, memory_calls, k)["peak_mb"] for k in ENSEMBLE_TEACHERS
    }
    note = (
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{torch.get_num_threads()} threads; ours only (open_clip has no ensemble loss), "
        f"d = {DIM} for the student and every teacher, fp32, distill + contrastive, forward + "
        f"backward, targets averaged after softmax. Time: fastest of {ENSEMBLE_ROUNDS} calls "
        "after a warm-up, K = 1, 2, 4 alternating call by call in one process. Memory: peak "
        f"RSS growth of each of {memory_calls} consecutive calls in a fresh process per K, "
        "over the RSS with the inputs in place (gradients included, set to None after each "
        f"call). Load average (1 min) when written: {os.getloadavg()[0]:.1f}."
    )
    rows = [
        (n, k, times[k], times[1], ", ".join(f"{p:.0f}" for p in memory[k]))
        for k in ENSEMBLE_TEACHERS
    ]
    lines = ensemble_report(f"CPU {cpu_name()}", note, rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "affinity_ensemble_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def run_gpu_ensemble(quick: bool, out_dir: Path) -> None:
    import triton
    from triton.testing import do_bench

    name = torch.cuda.get_device_name()
    versions = f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}"
    note = (
        f"{versions}; ours only (open_clip has no ensemble loss), d = {DIM} for the student "
        "and every teacher, bf16 features, fp32 math, distill + contrastive, forward + "
        "backward. Time: do_bench median, K = 1, 2, 4 measured one after another per n. "
        f"Memory: peak allocated over {MEMORY_CALLS} consecutive calls beyond the inputs."
    )
    stem = "affinity_ensemble_" + name.replace(" ", "_").replace("/", "_")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in ENSEMBLE_QUICK_SIZES if quick else ENSEMBLE_GPU_SIZES:
        base = None
        for k in ENSEMBLE_TEACHERS:
            step, args = _ensemble_step(n, k, "cuda", torch.bfloat16)
            peak = _steady_peak_mb(step)
            seconds = do_bench(step, grad_to_none=list(args[:3]), return_mode="median") / 1e3
            base = seconds if k == 1 else base
            rows.append((n, k, seconds, base, f"{peak:.0f}"))
            print(f"n={n} K={k}: {seconds * 1e3:.3f} ms, {peak:.0f} MB", flush=True)
            del step, args
            torch.cuda.empty_cache()
            lines = ensemble_report(name, note, rows)
            (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def dry_run_ensemble() -> None:
    """Every K once at n = 64 on the CPU, through the same table; nothing written."""
    rows, base = [], None
    for k in ENSEMBLE_TEACHERS:
        step, _ = _ensemble_step(64, k, "cpu", torch.float32)
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        base = seconds if k == 1 else base
        rows.append((64, k, seconds, base, None))
    print("\n".join(ensemble_report("dry run (CPU, n = 64)", "no CUDA", rows)))


# ----------------------------------------------------------------------------- peers

PEER_GPU_SIZES = [1024, 4096, 16384, 65536]
PEER_QUICK_SIZES = [4096, 16384]
PEER_CPU_SIZES = [1024, 4096]


def contrastive_inputs(n: int, device: str, dtype: torch.dtype) -> tuple:
    """(x, y, scale): the student's features and scale; the peers compute InfoNCE only."""
    x, y, scale, *_ = make_features(n, device, dtype)
    return x, y, scale


def _ours_contrastive(device: str):
    from tinyclip_fast.ops.affinity_loss import affinity_loss_square

    def ours(x, y, scale):
        return affinity_loss_square(x, y, scale, compute_distill=False, compute_contrastive=True)[1]

    return ours


def _inf_cl(device: str):
    if device != "cuda":
        raise PeerUnavailable("CUDA only: its Triton kernels assert q.is_cuda")
    from inf_cl import cal_flash_loss

    def inf_cl(x, y, scale):
        # cal_flash_loss is one direction's per-row cross-entropy: both, averaged, = InfoNCE.
        rows = cal_flash_loss(x, y, scale=scale).mean()
        return (rows + cal_flash_loss(y, x, scale=scale).mean()) / 2

    return inf_cl


def _open_clip_contrastive(device: str):
    from open_clip.loss import ClipLoss

    return ClipLoss()


CONTRASTIVE_PEERS = [
    Peer("tinyclip_fast", _ours_contrastive),
    Peer("Inf-CL", _inf_cl),
    Peer("open_clip ClipLoss", _open_clip_contrastive),
]


def run_peers(quick: bool, cpu: bool, out_dir: Path) -> None:
    """Ours and the peers on the contrastive (InfoNCE) term: <out>/contrastive_peers_<...>.md."""
    import open_clip

    setting = peer_setting(cpu, "contrastive_peers")
    device, dtype, name, timing = setting.device, setting.dtype, setting.machine, setting.timing
    sizes = PEER_CPU_SIZES if cpu else PEER_QUICK_SIZES if quick else PEER_GPU_SIZES
    note = (
        f"torch {torch.__version__}, open_clip {open_clip.__version__}, "
        f"{peer_versions(['inf-cl'])}; the contrastive term alone, (CE(A, diag) + CE(A^T, "
        f"diag)) / 2 with A = scale X Y^T (Inf-CL has no distillation term), d = {DIM}, "
        f"{str(dtype).removeprefix('torch.')} features, scale 50, the same inputs for every "
        f"implementation; time: {timing}."
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{setting.stem}.md"
    lines = peer_tables(
        f"Contrastive (InfoNCE) loss and its peers: {name}", note, CONTRASTIVE_PEERS,
        contrastive_inputs, sizes, device, dtype,
        lambda lines: path.write_text("\n".join(lines) + "\n"),
    )  # fmt: skip
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and modes")
    parser.add_argument("--cpu", action="store_true", help="CPU table instead of the GPU one")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, smoke-run")
    parser.add_argument("--ensemble", action="store_true", help="K = 1, 2, 4 teachers, ours")
    parser.add_argument("--peers", action="store_true", help="contrastive: ours, Inf-CL, open_clip")
    args = parser.parse_args()
    cpu = args.cpu or not torch.cuda.is_available()
    if args.peers:
        if args.dry_run:
            print(
                f"peers: {[peer.name for peer in CONTRASTIVE_PEERS]} on {'CPU' if cpu else 'CUDA'}"
            )
            for peer in CONTRASTIVE_PEERS:
                print(f"  {peer.name}: {build_peer(peer, 'cpu' if cpu else 'cuda')[1] or 'runs'}")
            return
        run_peers(args.quick, cpu, args.out)
        return
    if cpu and not args.cpu and not args.dry_run:
        print("no CUDA device: running the CPU comparison instead", file=sys.stderr)
    if args.ensemble:
        if args.dry_run:
            dry_run_ensemble()
        elif cpu:
            run_cpu_ensemble(args.out)
        else:
            run_gpu_ensemble(args.quick, args.out)
    elif args.dry_run:
        dry_run(args.cpu, args.quick, args.out)
    elif cpu:
        run_cpu(args.quick, args.out)
    else:
        run_gpu(args.quick, args.out)


if __name__ == "__main__":
    main()
