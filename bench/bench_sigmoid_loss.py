"""Benchmark of the fused sigmoid (SigLIP) losses against open_clip's SigLipLoss.

Workloads (d = 512, teacher dims 512, student scale 10 / bias -10 as open_clip initialises
SigLIP, teacher scale 100 / bias -10):
  siglip      SigLIP alone
  distill-K   SigLIP + sigmoid distillation (bce) against the mean of K teachers' sigmoids
Implementations:
  tinyclip_fast       sigmoid_loss_rows (Triton on CUDA, the chunked PyTorch path on CPU)
  open_clip           open_clip.loss.SigLipLoss (its get_logits / get_ground_truth / logsigmoid)
                      plus, for distill-K, the per-pair BCE on the materialised teacher sigmoids
  open_clip-chunked   the same over 4,096 x 4,096 blocks of logits, positives on the diagonal
                      blocks (open_clip 3.3 has no chunked SigLIP: this is its distributed
                      algorithm run block by block on one device; autograd keeps every block)
  open_clip+compile   torch.compile of the open_clip reference

GPU:  python bench/bench_sigmoid_loss.py [--quick] [--out bench/results] [--dry-run]
      forward (no grad) / backward / full (forward + backward) at n = 256 .. 262,144, bf16;
      median time (triton.testing.do_bench), steady-state peak memory (the peak allocated
      beyond the inputs over all do_bench calls in one process), TFLOP/s on the matmul FLOPs
      the loss must do, and the ensemble cost time(distill-4) / time(distill-1) against the
      (1 + K) / 2 = 2.5 goal. Writes <out>/sigmoid_loss_<gpu>.md. --dry-run prints the plan.
CPU:  python bench/bench_sigmoid_loss.py --cpu [--out bench/results]
      fp32, forward + backward at n = 1,024 .. 8,192, ours and open_clip alternating in one
      process (fastest of 15 / 7 / 3 calls);
      steady-state peak RSS growth (VmHWM after several consecutive calls in a fresh process,
      minus the RSS before them) at n = 8,192; the ensemble cost ratios. Writes
      <out>/sigmoid_loss_cpu.md. Run with OMP_WAIT_POLICY=PASSIVE on a shared machine.
      pytest bench/bench_sigmoid_loss.py --benchmark-enable: pytest-benchmark timings.

Peers: python bench/bench_sigmoid_loss.py --peers [--cpu] [--quick] [--out ...] [--dry-run]
      SigLIP alone: ours beside siglip-kernel (PyPI, CUDA only) and open_clip's SigLipLoss,
      plain and chunked (chunk_size, where the installed open_clip has it), on the same
      inputs; each peer's loss and gradients checked against ours first, a peer that cannot
      run is a cell saying why (bench/peers.py). Writes <out>/sigmoid_peers_<gpu or cpu>.md.
"""

from __future__ import annotations

import argparse
import json
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
TEACHER_SCALE, TEACHER_BIAS = 100.0, -10.0
CHUNK = 4096
GPU_SIZES = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144]
QUICK_SIZES = [256, 2048, 16384, 65536]
CPU_SIZES = [1024, 4096, 8192]
WORKLOADS = {"siglip": 0, "distill-1": 1, "distill-4": 4}
CPU_WORKLOADS = {"siglip": 0, "distill-1": 1, "distill-2": 2, "distill-4": 4}
IMPLS = ("tinyclip_fast", "open_clip", "open_clip-chunked", "open_clip+compile")
MODES = ("forward", "backward", "full")
RSS_CALLS = 3


def make_inputs(n: int, teachers: int, device: str, dtype: torch.dtype) -> tuple:
    """(x, y, scale, bias) requiring grad, and [(xt, yt, scale_t, bias_t)] * teachers."""
    unit = lambda: F.normalize(torch.randn(n, DIM, device=device), dim=1).to(dtype)
    x, y = unit().requires_grad_(), unit().requires_grad_()
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    teacher = [(unit(), unit(), TEACHER_SCALE, TEACHER_BIAS) for _ in range(teachers)]
    return (x, y, scale, bias), teacher


def reference_loss(x, y, scale, bias, teachers, block=None) -> torch.Tensor:
    """open_clip's SigLIP loss (+ the materialised per-pair BCE distillation) over blocks."""
    from open_clip.loss import SigLipLoss

    siglip = SigLipLoss()
    n = x.shape[0]
    block = block or n
    total = 0
    for r in range(0, n, block):
        for c in range(0, n, block):
            logits = siglip.get_logits(x[r : r + block], y[c : c + block], scale, bias)
            # Off-diagonal blocks hold negatives only (open_clip's negative_only blocks).
            labels = siglip.get_ground_truth(x.device, x.dtype, logits.shape[0]) if r == c else -1.0
            part = -F.logsigmoid(labels * logits).sum()
            if teachers:
                p = sum(
                    torch.sigmoid(siglip.get_logits(tx[r : r + block], ty[c : c + block], s, b))
                    for tx, ty, s, b in teachers
                ) / len(teachers)
                part = part + F.binary_cross_entropy_with_logits(logits, p, reduction="sum")
            total = total + part
    return total / n


def loss_fn(impl: str):
    """The scalar loss (contrastive + distill) of one implementation."""
    if impl == "tinyclip_fast":
        from tinyclip_fast.ops.sigmoid_loss import sigmoid_loss_rows

        def ours(x, y, scale, bias, teachers):
            columns = [list(column) for column in zip(*teachers, strict=True)] or [None] * 4
            contrastive, distill = sigmoid_loss_rows(x, y, scale, bias, *columns)
            return contrastive + distill

        return ours
    if impl == "open_clip-chunked":
        return lambda *args: reference_loss(*args, block=CHUNK)
    return torch.compile(reference_loss) if impl.endswith("+compile") else reference_loss


def must_do_flops(n: int, teachers: int, mode: str) -> float:
    """Matmul FLOPs no implementation can avoid: A and the B_k forward, dX and dY backward."""
    forward = 2 * n * n * DIM * (1 + teachers)
    backward = 2 * 2 * n * n * DIM
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


def plan(sizes: list[int]) -> list[str]:
    lines = [f"workloads {list(WORKLOADS)}, implementations {list(IMPLS)}, modes {list(MODES)}"]
    lines += [f"n = {sizes}, d = {DIM}, bf16 features; {len(sizes) * 36} measurements at most"]
    lines += ["an implementation stops at the first n where its full mode runs out of memory"]
    return lines


# ----------------------------------------------------------------------------- GPU mode


def _gemm_tflops() -> float:
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / do_bench(lambda: a @ b, return_mode="median") / 1e9


def _measure_gpu(impl: str, n: int, teachers: int, mode: str) -> tuple[float, float]:
    """(median ms, steady-state peak MB beyond the inputs); raises OutOfMemoryError."""
    from triton.testing import do_bench

    fn = loss_fn(impl)
    student, teacher = make_inputs(n, teachers, "cuda", torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    if mode == "forward":
        with torch.no_grad():
            ms = do_bench(lambda: fn(*student, teacher), return_mode="median")
    elif mode == "backward":
        out = fn(*student, teacher)
        ms = do_bench(
            lambda: out.backward(retain_graph=True), grad_to_none=student, return_mode="median"
        )
    else:
        ms = do_bench(
            lambda: fn(*student, teacher).backward(), grad_to_none=student, return_mode="median"
        )
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def run_gpu(sizes: list[int], out_dir: Path) -> None:
    import triton

    name = torch.cuda.get_device_name()
    gemm = _gemm_tflops()
    results: dict = {}
    for workload, teachers in WORKLOADS.items():
        for impl in IMPLS:
            out_of_memory = False
            for n in sizes:
                for mode in MODES:
                    result = None
                    if not out_of_memory:
                        try:
                            result = _measure_gpu(impl, n, teachers, mode)
                        except torch.OutOfMemoryError:
                            out_of_memory = mode == "full"
                    results[workload, impl, n, mode] = result
                    torch.cuda.empty_cache()
                    print(workload, impl, n, mode, result, flush=True)
    versions = f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}"
    lines = gpu_report(results, sizes, name, gemm, versions)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "sigmoid_loss_" + name.replace(" ", "_").replace("/", "_")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def gpu_report(results: dict, sizes: list[int], name: str, gemm: float, versions: str) -> list:
    """Markdown lines; results[workload, impl, n, mode] = (ms, MB) or None (out of memory)."""
    lines = [
        f"# Sigmoid (SigLIP) loss: {name}",
        "",
        f"{versions}; d = {DIM}, bf16 features, fp32 math; bf16 GEMM rate {gemm:.0f} TFLOP/s "
        "(8192^3). Time: triton do_bench median. Memory: steady-state peak allocated beyond "
        "the inputs over all do_bench calls. TFLOP/s: the matmul FLOPs the loss must do / "
        "time. OOM = out of memory. Speed-ups are open_clip time / ours. Ours produces the "
        "gradient in the forward when the inputs require grad (forward = the no-grad loss only; "
        "backward = a repeated backward with retain_graph, which recomputes that gradient): "
        "full is the like-for-like number. Model: bench/cost_model.py's prediction for this "
        "card (SigLIP alone), (x measured / predicted).",
        "",
    ]
    fmt = lambda r, i: "OOM" if r is None else f"{r[i]:.3f}" if i == 0 else f"{r[i]:.0f}"
    card, registers = cost_model.card_for(name), cost_model.read_report()
    for workload, teachers in WORKLOADS.items():
        lines += [
            f"## {workload}",
            "",
            "| n | mode | ours ms | open_clip ms | chunked ms | compiled ms | speed-up eager / "
            "chunked / compiled | ours MB | open_clip MB | chunked MB | compiled MB | ours "
            "TFLOP/s (% GEMM) | ours model ms | open_clip model ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for n in sizes:
            for mode in MODES:
                ours, *refs = (results[workload, impl, n, mode] for impl in IMPLS)
                ratios = " / ".join(
                    "-" if ref is None or ours is None else f"{ref[0] / ours[0]:.2f}x"
                    for ref in refs
                )
                tflops = "-"
                if ours is not None:
                    rate = must_do_flops(n, teachers, mode) / ours[0] / 1e9
                    tflops = f"{rate:.0f} ({100 * rate / gemm:.0f}%)"
                times = " | ".join(fmt(r, 0) for r in (ours, *refs))
                memory = " | ".join(fmt(r, 1) for r in (ours, *refs))
                model = "- | -"
                if teachers == 0:  # the model prices SigLIP alone
                    shape = cost_model.Shape(n, n, d=DIM, teachers=0)
                    ms = cost_model.predicted_ms("sigmoid", shape, mode, card, registers)
                    model = " | ".join(
                        cost_model.model_cell(ms[design], r[0] if r is not None else None)
                        for design, r in (
                            ("fused (ours)", ours),
                            ("open_clip bf16 logits", refs[0]),
                        )
                    )
                lines.append(
                    f"| {n} | {mode} | {times} | {ratios} | {memory} | {tflops} | {model} |"
                )
        lines.append("")
    lines += [
        "## Ensemble cost (ours, full mode): time(distill-4) / time(distill-1), goal <= 2.5",
        "",
        "| n | ratio |",
        "|---|---|",
    ]
    for n in sizes:
        one, four = (results[w, IMPLS[0], n, "full"] for w in ("distill-1", "distill-4"))
        ratio = "-" if one is None or four is None else f"{four[0] / one[0]:.2f}"
        lines.append(f"| {n} | {ratio} |")
    return lines


# ----------------------------------------------------------------------------- CPU mode

_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import torch
    sys.path.insert(0, {bench_dir!r})
    from bench_sigmoid_loss import loss_fn, make_inputs

    def status_mb(field):
        # VmHWM is this address space's peak; ru_maxrss would also count the forked parent.
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field))
        return int(line.split()[1]) / 1024

    torch.set_num_threads({threads})
    fn = loss_fn({impl!r})
    student, teachers = make_inputs({n}, {teachers}, "cpu", torch.float32)
    small = make_inputs(64, {teachers}, "cpu", torch.float32)
    fn(*small[0], small[1]).backward()  # warm-up: lazy allocations of the libraries
    before = status_mb("VmRSS:")
    start = time.perf_counter()
    for _ in range({calls}):
        for leaf in student:
            leaf.grad = None
        fn(*student, teachers).backward()
    seconds = (time.perf_counter() - start) / {calls}
    growth = status_mb("VmHWM:") - before
    print(json.dumps({{"peak_growth_mb": growth, "seconds": seconds}}))
    """
)


def cpu_peak_rss_growth(impl: str, teachers: int, n: int = 8192) -> dict:
    """Peak RSS over RSS_CALLS consecutive forward + backward calls minus the RSS before."""
    script = _RSS_SCRIPT.format(
        bench_dir=str(Path(__file__).parent), impl=impl, n=n, teachers=teachers,
        threads=torch.get_num_threads(), calls=RSS_CALLS,
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_runs(n: int) -> int:
    """Calls per implementation: more where a call is short and load from others dominates."""
    return 3 if n >= 8192 else 7 if n >= 4096 else 15


def cpu_seconds(cases: dict[str, tuple[str, int]], n: int, runs: int) -> dict[str, float]:
    """Fastest of ``runs`` forward + backward calls per case {label: (impl, teachers)}.

    The cases alternate call by call after a warm-up call each, so load from other jobs on
    a shared machine falls on all alike; the minimum is the run least disturbed by it.
    """
    calls = {}
    for label, (impl, teachers) in cases.items():
        calls[label] = (loss_fn(impl), *make_inputs(n, teachers, "cpu", torch.float32))
    times: dict[str, list[float]] = {label: [] for label in cases}
    for index in range(runs + 1):
        for label, (fn, student, teacher) in calls.items():
            for leaf in student:
                leaf.grad = None
            start = time.perf_counter()
            fn(*student, teacher).backward()
            if index:
                times[label].append(time.perf_counter() - start)
    return {label: min(t) for label, t in times.items()}


@pytest.mark.parametrize("n", CPU_SIZES)
@pytest.mark.parametrize("workload", list(CPU_WORKLOADS))
@pytest.mark.parametrize("impl", IMPLS[:2])
def test_cpu_forward_backward(benchmark, impl, workload, n):
    fn = loss_fn(impl)
    student, teacher = make_inputs(n, CPU_WORKLOADS[workload], "cpu", torch.float32)
    benchmark.extra_info.update(n=n, dim=DIM, impl=impl, workload=workload)
    benchmark.pedantic(
        lambda: fn(*student, teacher).backward(), rounds=3, iterations=1, warmup_rounds=1
    )


def run_cpu(out_dir: Path) -> None:
    import open_clip

    lines = [
        f"# Sigmoid (SigLIP) loss on CPU: {cpu_name()}, {torch.get_num_threads()} threads",
        "",
        f"torch {torch.__version__}, open_clip {open_clip.__version__}; d = {DIM}, fp32, "
        "forward + backward of SigLIP (+ bce distillation from K teachers, d_t = 512); time = "
        "fastest of 15 / 7 / 3 calls (n = 1024 / 4096 / 8192) after a warm-up, ours and "
        "open_clip alternating call by call in one process (the machine is shared with other "
        "jobs: the minimum is the least disturbed run); memory = "
        f"steady-state peak RSS growth over {RSS_CALLS} consecutive forward + backward calls "
        "in a fresh process (n = 8192 only; gradients included).",
        "",
        "| workload | n | ours s | open_clip s | speed-up | ours MB | open_clip MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for workload, teachers in CPU_WORKLOADS.items():
        for n in CPU_SIZES:
            cases = {impl: (impl, teachers) for impl in IMPLS[:2]}
            seconds = cpu_seconds(cases, n, cpu_runs(n))
            ours, ref = seconds[IMPLS[0]], seconds[IMPLS[1]]
            memory = ["-", "-"]
            if n == 8192:
                memory = [
                    f"{cpu_peak_rss_growth(impl, teachers)['peak_growth_mb']:.0f}"
                    for impl in IMPLS[:2]
                ]
            lines.append(
                f"| {workload} | {n} | {ours:.3f} | {ref:.3f} | {ref / ours:.2f}x "
                f"| {memory[0]} | {memory[1]} |"
            )
            print(lines[-1], flush=True)
    ensembles = [k for k in CPU_WORKLOADS.values() if k > 1]
    lines += [
        "",
        "Ensemble cost (ours): time(distill-K) / time(distill-1) against the (1 + K) / 2 goal, "
        "the K = 1, 2, 4 losses alternating call by call (fastest of the same call counts).",
        "",
        "| n | " + " | ".join(f"K = {k} (goal {(1 + k) / 2})" for k in ensembles) + " |",
        "|---|" + "---|" * len(ensembles),
    ]
    for n in CPU_SIZES:
        cases = {str(k): (IMPLS[0], k) for k in (1, *ensembles)}
        seconds = cpu_seconds(cases, n, cpu_runs(n))
        ratios = " | ".join(f"{seconds[str(k)] / seconds['1']:.2f}" for k in ensembles)
        lines.append(f"| {n} | {ratios} |")
        print(lines[-1], flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sigmoid_loss_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ----------------------------------------------------------------------------- peers

PEER_GPU_SIZES = [1024, 4096, 16384, 65536]
PEER_QUICK_SIZES = [4096, 16384]
PEER_CPU_SIZES = [1024, 4096]
PEER_CHUNK = 512  # open_clip SigLipLoss(chunk_size=...): its pull request's example


def siglip_inputs(n: int, device: str, dtype: torch.dtype) -> tuple:
    """(x, y, scale, bias) of the siglip workload: the peers have no distillation term."""
    return make_inputs(n, 0, device, dtype)[0]


def _ours_siglip(device: str):
    ours = loss_fn("tinyclip_fast")
    return lambda x, y, scale, bias: ours(x, y, scale, bias, [])


def _siglip_kernel(device: str):
    if device != "cuda":
        raise PeerUnavailable("CUDA only: Triton kernels, and its import queries the GPU")
    from siglip_kernel import fused_siglip_loss

    return lambda x, y, scale, bias: fused_siglip_loss(x, y, scale.log(), bias)


def _open_clip_siglip(chunked: bool):
    def build(device: str):
        import inspect

        import open_clip
        from open_clip.loss import SigLipLoss

        if not chunked:
            return SigLipLoss()
        if "chunk_size" not in inspect.signature(SigLipLoss).parameters:
            raise PeerUnavailable(
                f"open_clip {open_clip.__version__} has no chunked SigLipLoss (chunk_size)"
            )
        return SigLipLoss(chunk_size=PEER_CHUNK)

    return build


SIGLIP_PEERS = [
    Peer("tinyclip_fast", _ours_siglip),
    Peer("siglip-kernel", _siglip_kernel),
    Peer("open_clip SigLipLoss", _open_clip_siglip(chunked=False)),
    Peer(f"open_clip SigLipLoss(chunk_size={PEER_CHUNK})", _open_clip_siglip(chunked=True)),
]


def run_peers(quick: bool, cpu: bool, out_dir: Path) -> None:
    """Ours and the peers on the SigLIP loss: <out>/sigmoid_peers_<gpu or cpu>.md."""
    import open_clip

    setting = peer_setting(cpu, "sigmoid_peers")
    device, dtype, name, timing = setting.device, setting.dtype, setting.machine, setting.timing
    sizes = PEER_CPU_SIZES if cpu else PEER_QUICK_SIZES if quick else PEER_GPU_SIZES
    note = (
        f"torch {torch.__version__}, open_clip {open_clip.__version__}, "
        f"{peer_versions(['siglip-kernel'])}; SigLIP alone (no peer has a distillation "
        f"term), d = {DIM}, {str(dtype).removeprefix('torch.')} features, student scale 10 "
        f"and bias -10, the same inputs for every implementation; time: {timing}."
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{setting.stem}.md"
    lines = peer_tables(
        f"Sigmoid (SigLIP) loss and its peers: {name}", note, SIGLIP_PEERS, siglip_inputs,
        sizes, device, dtype, lambda lines: path.write_text("\n".join(lines) + "\n"),
    )  # fmt: skip
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only n in {QUICK_SIZES}")
    parser.add_argument("--cpu", action="store_true", help="CPU table instead of the GPU one")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--peers", action="store_true", help="ours beside siglip-kernel, open_clip")
    args = parser.parse_args()
    if args.peers:
        cpu = args.cpu or not torch.cuda.is_available()
        if args.dry_run:
            print(f"peers: {[peer.name for peer in SIGLIP_PEERS]} on {'CPU' if cpu else 'CUDA'}")
            for peer in SIGLIP_PEERS:
                print(f"  {peer.name}: {build_peer(peer, 'cpu' if cpu else 'cuda')[1] or 'runs'}")
            return
        run_peers(args.quick, cpu, args.out)
        return
    if args.dry_run:
        if args.cpu:
            print(f"CPU: workloads {list(CPU_WORKLOADS)}, n = {CPU_SIZES}, d = {DIM}, fp32")
            print(f"     ours vs open_clip; RSS growth at n = 8192 over {RSS_CALLS} calls")
        else:
            print("\n".join(plan(QUICK_SIZES if args.quick else GPU_SIZES)))
        print(f"writes into {args.out}")
        return
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: running the CPU comparison instead", file=sys.stderr)
    if args.cpu or not torch.cuda.is_available():
        run_cpu(args.out)
    else:
        run_gpu(QUICK_SIZES if args.quick else GPU_SIZES, args.out)


if __name__ == "__main__":
    main()
