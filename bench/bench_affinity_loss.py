"""Benchmark of the fused affinity loss against open_clip's DistillClipLoss.

GPU:  python bench/bench_affinity_loss.py [--quick] [--out bench/results]
      forward / backward / full (forward + backward) at n = 256 .. 262,144, d = 512, bf16
      features: ours vs open_clip eager vs torch.compile(open_clip); median time
      (triton.testing.do_bench), peak extra memory, TFLOP/s on the matmul FLOPs the loss must do
      (A and B forward, dX and dY backward) against a measured bf16 GEMM rate. Writes
      <out>/affinity_loss_<gpu>.md and a PNG plot.
CPU:  pytest bench/bench_affinity_loss.py --benchmark-enable
      pytest-benchmark timings of forward + backward at n <= 8,192 (fp32), and the peak RSS
      growth of one forward + backward at n = 8,192, d = 512 measured in a subprocess.
      python bench/bench_affinity_loss.py --cpu writes the same numbers to
      <out>/affinity_loss_cpu.md. On a machine shared with other jobs, run both with
      OMP_WAIT_POLICY=PASSIVE: spinning OpenMP workers otherwise dominate the timing of code
      that alternates GEMMs and elementwise ops (the chunked loss) much more than the
      reference's few large ops.

Both implementations compute the same two terms (distillation and contrastive) so the
comparison is like for like.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

DIM = 512
GPU_SIZES = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144]
QUICK_SIZES = [256, 2048, 16384, 65536]
CPU_SIZES = [1024, 4096, 8192]
IMPLS = ("tinyclip_fast", "open_clip", "open_clip+compile")
MODES = ("forward", "backward", "full")


def make_features(n: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Unit-norm random student (requiring grad) and teacher features, student scale 50."""
    feats = [F.normalize(torch.randn(n, DIM, device=device), dim=1).to(dtype) for _ in range(4)]
    x, y = (f.requires_grad_() for f in feats[:2])
    scale = torch.tensor(50.0, device=device, requires_grad=True)
    return x, y, scale, feats[2], feats[3], torch.tensor(100.0, device=device)


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


# ----------------------------------------------------------------------------- GPU mode


def _gemm_tflops() -> float:
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


def _measure_gpu(impl: str, n: int, mode: str) -> tuple[float, float]:
    """(median ms, peak MB beyond the inputs) of one mode; raises OutOfMemoryError."""
    from triton.testing import do_bench

    fn = loss_fn(impl)
    args = make_features(n, "cuda", torch.bfloat16)
    grads = [args[0], args[1], args[2]]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    if mode == "forward":
        with torch.no_grad():
            ms = do_bench(lambda: fn(*args))
    elif mode == "backward":
        out = fn(*args)
        ms = do_bench(lambda: out.backward(retain_graph=True), grad_to_none=grads)
    else:
        ms = do_bench(lambda: fn(*args).backward(), grad_to_none=grads)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return ms, peak


def run_gpu(sizes: list[int], out_dir: Path) -> None:
    import triton

    name = torch.cuda.get_device_name()
    gemm = _gemm_tflops()
    results: dict[tuple[str, int, str], tuple[float, float] | None] = {}
    for impl in IMPLS:
        out_of_memory = False
        for n in sizes:
            for mode in MODES:
                if out_of_memory:
                    results[impl, n, mode] = None
                    continue
                try:
                    results[impl, n, mode] = _measure_gpu(impl, n, mode)
                except torch.OutOfMemoryError:
                    results[impl, n, mode] = None
                    out_of_memory = mode == "full"
                torch.cuda.empty_cache()
                print(impl, n, mode, results[impl, n, mode], flush=True)
    versions = f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}"
    lines = gpu_report(results, sizes, name, gemm, versions)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "affinity_loss_" + name.replace(" ", "_").replace("/", "_")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    _plot(results, sizes, name, out_dir / f"{stem}.png")
    print("\n".join(lines))


def gpu_report(results: dict, sizes: list[int], name: str, gemm: float, versions: str) -> list:
    """Markdown lines of the GPU table; results[impl, n, mode] = (ms, MB) or None (OOM)."""
    lines = [
        f"# Affinity loss: {name}",
        "",
        f"{versions}; d = {DIM}, bf16 features, fp32 math, distill + contrastive; "
        f"bf16 GEMM rate {gemm:.0f} TFLOP/s (8192^3). Time: triton do_bench median. Memory: "
        "peak allocated beyond the inputs. TFLOP/s: matmul FLOPs the loss must do "
        "(8 n^2 d for full) / time. OOM = out of memory.",
        "",
        "| n | mode | ours ms | open_clip ms | compiled ms | speed-up vs eager / compiled "
        "| ours MB | open_clip MB | compiled MB | ours TFLOP/s (% GEMM) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda r, i: "OOM" if r is None else f"{r[i]:.3f}" if i == 0 else f"{r[i]:.0f}"
    for n in sizes:
        for mode in MODES:
            ours, eager, compiled = (results[impl, n, mode] for impl in IMPLS)
            ratio = lambda ref, ours=ours: (
                "-" if ref is None or ours is None else f"{ref[0] / ours[0]:.2f}x"
            )
            tflops = "-"
            if ours is not None:
                rate = must_do_flops(n, mode) / ours[0] / 1e9
                tflops = f"{rate:.0f} ({100 * rate / gemm:.0f}%)"
            lines.append(
                f"| {n} | {mode} | {fmt(ours, 0)} | {fmt(eager, 0)} | {fmt(compiled, 0)} "
                f"| {ratio(eager)} / {ratio(compiled)} | {fmt(ours, 1)} | {fmt(eager, 1)} "
                f"| {fmt(compiled, 1)} | {tflops} |"
            )
    return lines


def _plot(results: dict, sizes: list[int], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for impl in IMPLS:
        points = [(n, results[impl, n, "full"]) for n in sizes]
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
    import json, sys, time
    import torch
    sys.path.insert(0, {bench_dir!r})
    from bench_affinity_loss import loss_fn, make_features

    def status_mb(field):
        # VmHWM is this address space's peak; ru_maxrss would also count the forked parent.
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field))
        return int(line.split()[1]) / 1024

    torch.set_num_threads({threads})
    impl, n = {impl!r}, {n}
    fn = loss_fn(impl)
    args = make_features(n, "cpu", torch.float32)
    fn(*make_features(64, "cpu", torch.float32)).backward()  # warm-up: lazy allocations
    before = status_mb("VmRSS:")
    start = time.perf_counter()
    fn(*args).backward()
    seconds = time.perf_counter() - start
    growth = status_mb("VmHWM:") - before
    print(json.dumps({{"peak_growth_mb": growth, "seconds": seconds}}))
    """
)


def cpu_peak_rss_growth(impl: str, n: int = 8192) -> dict:
    """Peak RSS minus RSS just before one forward + backward, in a fresh process."""
    script = _RSS_SCRIPT.format(
        bench_dir=str(Path(__file__).parent), impl=impl, n=n, threads=torch.get_num_threads()
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("n", CPU_SIZES)
@pytest.mark.parametrize("impl", IMPLS[:2])
def test_cpu_forward_backward(benchmark, impl, n):
    fn = loss_fn(impl)
    args = make_features(n, "cpu", torch.float32)
    benchmark.extra_info.update(n=n, dim=DIM, impl=impl)
    benchmark.pedantic(lambda: fn(*args).backward(), rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", IMPLS[:2])
def test_cpu_peak_rss_growth(record_property, impl):
    result = cpu_peak_rss_growth(impl)
    record_property("peak_rss_growth_mb", result["peak_growth_mb"])
    print(f"\n{impl}: n=8192 d={DIM} peak RSS growth {result['peak_growth_mb']:.0f} MB")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_cpu(out_dir: Path) -> None:
    lines = [
        f"# Affinity loss on CPU: {cpu_name()}, {torch.get_num_threads()} threads",
        "",
        f"torch {torch.__version__}; d = {DIM}, fp32, distill + contrastive, forward + "
        "backward; time = median of 3 runs after a warm-up; memory = peak RSS growth of one "
        "forward + backward in a fresh process (n = 8192 only).",
        "",
        "| n | ours s | open_clip s | speed-up | ours MB | open_clip MB |",
        "|---|---|---|---|---|---|",
    ]
    for n in CPU_SIZES:
        times = {}
        for impl in IMPLS[:2]:
            fn = loss_fn(impl)
            args = make_features(n, "cpu", torch.float32)
            fn(*args).backward()
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                fn(*args).backward()
                runs.append(time.perf_counter() - start)
            times[impl] = sorted(runs)[1]
        memory = ["-", "-"]
        if n == 8192:
            memory = [f"{cpu_peak_rss_growth(impl)['peak_growth_mb']:.0f}" for impl in IMPLS[:2]]
        ours, ref = times["tinyclip_fast"], times["open_clip"]
        lines.append(
            f"| {n} | {ours:.3f} | {ref:.3f} | {ref / ours:.2f}x | {memory[0]} | {memory[1]} |"
        )
        print(lines[-1], flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "affinity_loss_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only n in {QUICK_SIZES}")
    parser.add_argument("--cpu", action="store_true", help="CPU table instead of the GPU one")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: running the CPU comparison instead", file=sys.stderr)
    if args.cpu or not torch.cuda.is_available():
        run_cpu(args.out)
    else:
        run_gpu(QUICK_SIZES if args.quick else GPU_SIZES, args.out)


if __name__ == "__main__":
    main()
