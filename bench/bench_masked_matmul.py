"""Benchmark of masked_linear (forward + backward, mask gradients included) against its peers.

GPU:  python bench/bench_masked_matmul.py [--quick] [--out bench/results]
      ViT-B MLP shapes (51,200 tokens, 768 -> 3072 and 3072 -> 768), bf16. Both masks are
      present with soft values; the 3072-wide (MLP intermediate) mask has random, non-aligned
      exact zeros leaving the kept fraction 100/75/50/25%. Methods:
        ours        masked_linear (Triton), gradients of x, W, b and both masks;
        dense       plain F.linear, no masks (gradients of x, W, b);
        tinyclip    F.linear(x * in_mask) * out_mask with autograd (TinyCLIP's way);
        compacted   F.linear on the already-compacted weight and activations (cuBLAS; the
                    compact model after pruning: the floor the masked phase can hope for).
      Writes bench/results/masked_matmul_<gpu>.md (card, versions) and a PNG plot.
CPU:  pytest bench/bench_masked_matmul.py --benchmark-enable   (small shapes, PyTorch path)
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tinyclip_fast.ops.masked_linear import masked_linear

HIDDEN, INTERMEDIATE, TOKENS = 768, 3072, 51_200
KEPT_FRACTIONS = (1.0, 0.75, 0.5, 0.25)
METHODS = ("ours", "dense", "tinyclip", "compacted")


def make_problem(tokens, k_in, n_out, kept, pruned_side, device, dtype, seed=0):
    """One layer's inputs; the ``pruned_side`` ("in"/"out") mask keeps ``kept`` of its channels."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    def mask(n, keep):
        m = torch.rand(n, generator=g) * 0.5 + 0.5
        m[torch.randperm(n, generator=g)[: n - round(keep * n)]] = 0.0
        return m.to(device)

    return {
        "x": randn(tokens, k_in),
        "weight": randn(n_out, k_in, scale=k_in**-0.5),
        "bias": randn(n_out),
        "in_mask": mask(k_in, kept if pruned_side == "in" else 1.0),
        "out_mask": mask(n_out, kept if pruned_side == "out" else 1.0),
        "dy": randn(tokens, n_out),
    }


def step_fn(method: str, p: dict):
    """A closure running forward + backward of ``method`` on ``p`` (fresh .grad each call)."""
    leaf = {k: p[k].detach().clone().requires_grad_() for k in p if k != "dy"}
    dy = p["dy"]
    if method == "ours":
        leaves = list(leaf.values())
        forward = lambda: masked_linear(**leaf)
    elif method == "dense":
        leaves = [leaf["x"], leaf["weight"], leaf["bias"]]
        forward = lambda: F.linear(*leaves)
    elif method == "tinyclip":
        leaves = list(leaf.values())
        forward = lambda: (
            F.linear(leaf["x"] * leaf["in_mask"], leaf["weight"], leaf["bias"]) * leaf["out_mask"]
        )
    elif method == "compacted":
        k_idx, n_idx = p["in_mask"].nonzero().flatten(), p["out_mask"].nonzero().flatten()
        leaves = [
            p["x"].index_select(1, k_idx).requires_grad_(),
            p["weight"][n_idx][:, k_idx].contiguous().requires_grad_(),
            p["bias"][n_idx].requires_grad_(),
        ]
        dy = dy.index_select(1, n_idx).contiguous()
        forward = lambda: F.linear(*leaves)
    else:
        raise ValueError(f"unknown method {method!r}")

    def step():
        for t in leaves:
            t.grad = None
        forward().backward(dy)

    return step


def check_ours_against_tinyclip(p: dict) -> float:
    """Relative error of our output against the TinyCLIP-style product (guards the timings)."""
    ours = masked_linear(p["x"], p["weight"], p["bias"], p["in_mask"], p["out_mask"])
    ref = F.linear(p["x"].float() * p["in_mask"], p["weight"].float(), p["bias"].float())
    ref = ref * p["out_mask"]
    return float((ours.float() - ref).norm() / ref.norm())


def run_gpu(quick: bool, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import triton
    from triton.testing import do_bench

    device, dtype = "cuda", torch.bfloat16
    gpu = torch.cuda.get_device_name()
    tokens = TOKENS // 4 if quick else TOKENS
    shapes = [
        ("fc1 768->3072", HIDDEN, INTERMEDIATE, "out"),
        ("fc2 3072->768", INTERMEDIATE, HIDDEN, "in"),
    ]
    rows = []
    for name, k_in, n_out, side in shapes:
        for kept in KEPT_FRACTIONS:
            p = make_problem(tokens, k_in, n_out, kept, side, device, dtype)
            err = check_ours_against_tinyclip(p)
            times = {}
            for method in METHODS:
                times[method] = do_bench(step_fn(method, p), warmup=25, rep=100 if quick else 300)
            rows.append((name, kept, times, err))
            print(name, kept, {k: round(v, 3) for k, v in times.items()}, f"rel err {err:.1e}")
            del p
            torch.cuda.empty_cache()

    slug = re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_")
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# masked_linear forward+backward (mask gradients included), {tokens:,} tokens, bf16",
        "",
        f"Card: {gpu}; torch {torch.__version__}, triton {triton.__version__}, "
        f"CUDA {torch.version.cuda}. Median ms (triton.testing.do_bench).",
        "Kept = fraction of the 3072-wide mask's channels that are non-zero (random positions);",
        "the 768-wide mask is soft with no zeros. compacted = cuBLAS on the pruned weight.",
        "",
        "| layer | kept | ours ms | dense ms | tinyclip ms | compacted ms | ours/dense | "
        "tinyclip/ours | ours/compacted | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, kept, t, err in rows:
        lines.append(
            f"| {name} | {kept:.0%} | {t['ours']:.3f} | {t['dense']:.3f} | {t['tinyclip']:.3f} | "
            f"{t['compacted']:.3f} | {t['ours'] / t['dense']:.2f}x | "
            f"{t['tinyclip'] / t['ours']:.2f}x | {t['ours'] / t['compacted']:.2f}x | {err:.1e} |"
        )
    table = out_dir / f"masked_matmul_{slug}.md"
    table.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    for ax, (name, *_rest) in zip(axes[0], shapes, strict=True):
        layer_rows = [r for r in rows if r[0] == name]
        for method in METHODS:
            ax.plot(
                [r[1] for r in layer_rows], [r[2][method] for r in layer_rows], "o-", label=method
            )
        ax.set(title=f"{name}, {tokens:,} tokens, bf16", xlabel="kept fraction", ylabel="ms")
        ax.invert_xaxis()
        ax.legend()
    fig.suptitle(f"{gpu}: masked_linear fwd+bwd")
    fig.tight_layout()
    fig.savefig(out_dir / f"masked_matmul_{slug}.png", dpi=120)
    print(f"wrote {table}")


# CPU mode (pytest-benchmark): 2,048 tokens, 256 -> 1024, fp32, PyTorch path.
@pytest.mark.parametrize("kept", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("method", METHODS)
def test_cpu_masked_linear(benchmark, method, kept):
    torch.manual_seed(0)
    p = make_problem(2048, 256, 1024, kept, "out", "cpu", torch.float32)
    benchmark.group = f"kept {kept:.0%}"
    benchmark(step_fn(method, p))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the tokens, fewer reps")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: running the CPU benchmark (pytest-benchmark, small shapes)")
        raise SystemExit(pytest.main([__file__, "-q", "--benchmark-enable"]))
    run_gpu(args.quick, args.out)


if __name__ == "__main__":
    main()
