"""The masked phase's speed: a masked training step against the pruned model's, and the masked
matmul against its peers.

    python bench/bench_masked_matmul.py --cpu [--threads N]    # CPU tables (default 2 threads)
    python bench/bench_masked_matmul.py --cpu --only step      # one table alone (step|layer)
    python bench/bench_masked_matmul.py [--quick] [--out DIR]  # CUDA tables
    python bench/bench_masked_matmul.py --dry-run [--quick]    # the plan and a CPU smoke run

Step table (the goal: masked step <= 1.15x the pruned step): ``MaskedCLIP`` in train mode with
one fixed mask sample (``fix_mask_sample``), forward + backward of both towers and a
contrastive loss, against the pruned CLIP of exactly that sample's structure (``prune()`` of
masks holding its zero pattern), interleaved, median of several steps. In the sample every
mask keeps the given fraction of its entries (random positions, log_alpha 10 there: values 1
or soft, a drawn zero about once in 10^5; -20 elsewhere: always 0); "params kept" is the
sample's share of the prunable parameters (the blocks' weights). MaskedCLIP folds the sample
into gathered weights and runs cuBLAS (CUDA) or PyTorch (CPU) on them; the layer table shows
why not the Triton kernels.

Layer table: one linear at ViT-B MLP shapes (CUDA: 51,200 tokens, 768 -> 3072 and 3072 -> 768,
bf16; CPU: 2,048 tokens, 256 -> 1024, fp32), the MLP-side mask keeping the given fraction
(random positions), the hidden-side mask soft without zeros, forward + backward with every
gradient (x, W, b, both masks where the method has them):
    dense           F.linear, no masks;
    tinyclip        F.linear(x * in_mask) * out_mask (full matmul, then multiply);
    masked_linear   our op on full-width activations (Triton on CUDA, PyTorch on the CPU);
    folded          what MaskedCLIP runs: the masks folded into the gathered weight
                    (pruning.compact.fold_weight), then F.linear (cuBLAS on CUDA) on the
                    compact activations;
    folded_triton   the compact-form Triton kernels (weight read through index vectors and
                    scaled in the prologue, mask gradients in the weight-gradient epilogue);
    pruned          F.linear on the already compacted weight: the floor.
ours = folded (what MaskedCLIP runs): the ratio columns ours/dense, tinyclip/ours and
ours/compacted are TARGETS' masked-matmul goals (bench/gpu_summary.py reads them). --quick
(the GPU check): batch 128, 12,800 tokens, layer table at kept 100% and 50% only.
Results: bench/results/masked_step_<cpu|gpu>.md and masked_matmul_<cpu|gpu>.md (card/CPU,
versions), rewritten after every measurement. --dry-run writes nothing: it prints the plan
and runs every step and layer method once on tiny shapes on the CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

KEPT_FRACTIONS = (1.0, 0.75, 0.5, 0.25)
KEPT_LOG_ALPHA, CUT_LOG_ALPHA = 10.0, -20.0
MASK_SEED = 1234
LAYER_METHODS = (
    "dense", "tinyclip", "masked_linear", "folded", "folded_triton", "pruned",
)  # fmt: skip
CPU_LAYER_METHODS = tuple(m for m in LAYER_METHODS if m != "folded_triton")

# ViT width 384 x 6 layers + text width 256 x 4 (CPU); ViT-B/32 + its text tower (CUDA).
CPU_MODEL = {
    "embed_dim": 256,
    "vision_cfg": {
        "image_size": 224,
        "layers": 6,
        "width": 384,
        "patch_size": 32,
        "head_width": 64,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}
GPU_MODEL = {
    "embed_dim": 512,
    "vision_cfg": {
        "image_size": 224,
        "layers": 12,
        "width": 768,
        "patch_size": 32,
        "head_width": 64,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}
CPU_STEP = {"batch": 64, "warmup": 2, "repeats": 9}
GPU_STEP = {"batch": 256, "quick_batch": 128}
CPU_LAYER = {"tokens": 2048, "hidden": 256, "mlp": 1024, "dtype": torch.float32}
GPU_LAYER = {"tokens": 51_200, "quick_tokens": 12_800, "hidden": 768, "mlp": 3072}
QUICK_LAYER_KEPT = (1.0, 0.5)  # what gpu_summary's goals read
# The dry run's smoke shapes (CPU, fp32): a 2-layer ViT and text tower, one small linear.
TINY_MODEL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2},
}
TINY_LAYER = {"tokens": 16, "hidden": 8, "mlp": 32, "dtype": torch.float32}


# ---------------------------------------------------------------------------- step table


def _masked_model(config: dict, kept: float, device: str):
    """(masked, pruned): MaskedCLIP whose fixed sample keeps ``kept`` of every mask's entries,
    and the pruned CLIP of exactly that sample's structure."""
    import open_clip

    from tinyclip_fast.pruning.masked_clip import MaskedCLIP

    torch.manual_seed(0)
    masked = MaskedCLIP(open_clip.model.CLIP(**config)).to(device)
    g = torch.Generator().manual_seed(int(kept * 100))
    with torch.no_grad():
        for mask in masked.mask_parameters():
            n = mask.shape[-1]
            rank = torch.rand(mask.shape, generator=g).argsort(-1).argsort(-1)
            keep = (rank < max(1, round(kept * n))).to(device)
            mask.copy_(torch.where(keep, KEPT_LOG_ALPHA, CUT_LOG_ALPHA))
        masked.train().fix_mask_sample(MASK_SEED)
        # The sample's zero pattern as +-20 masks: prune() then cuts exactly these entries.
        saved = [p.clone() for p in masked.mask_parameters()]
        for index, tower in enumerate((masked.visual_masks, masked.text_masks)):
            masks = (tower.hidden, tower.head, tower.intermediate)
            sample = tower(masked._mask_generator(index))
            for mask, z in zip(masks, (sample[0], sample[1], sample[2]), strict=True):
                mask.log_alpha.copy_(torch.where(z != 0, 20.0, -20.0))
        pruned = masked.eval().prune().train()
        for p, value in zip(masked.mask_parameters(), saved, strict=True):
            p.copy_(value)
    masked.train()
    return masked, pruned


def _kept_params(masked, pruned) -> float:
    """The sample's kept share of the prunable parameters (the blocks' weights)."""

    def prunable(model):
        blocks = [*model.visual.transformer.resblocks, *model.transformer.resblocks]
        return sum(p.numel() for b in blocks for n, p in b.named_parameters() if "ln_" not in n)

    return prunable(pruned) / prunable(masked.model)


def _step_inputs(config: dict, batch: int, device: str):
    g = torch.Generator().manual_seed(0)
    size = config["vision_cfg"]["image_size"]
    text_cfg = config["text_cfg"]
    image = torch.randn(batch, 3, size, size, generator=g).to(device)
    text = torch.randint(1, text_cfg["vocab_size"] - 1, (batch, text_cfg["context_length"]))
    return image, text.to(device)


def _train_step(model, image, text, autocast) -> None:
    model.zero_grad(set_to_none=True)
    with autocast():
        image_f, text_f, scale = model(image, text)[:3]
        logits = scale * image_f @ text_f.T
        labels = torch.arange(logits.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()


def _cpu_median(fns: dict[str, Callable[[], None]], warmup: int, repeats: int) -> tuple[dict, dict]:
    """Median wall seconds and median process CPU seconds of each function, interleaved (the
    order reversed every other round) so load drift hits all alike. On a shared machine the
    CPU time of a one-thread run counts this process's work without the time other jobs held
    the core."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for round_ in range(repeats):
        for name in list(fns)[:: 1 if round_ % 2 == 0 else -1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    median = lambda times: {name: statistics.median(t) for name, t in times.items()}
    return median(wall), median(cpu)


def _gpu_median(fns: dict[str, Callable[[], None]], quick: bool) -> dict:
    from triton.testing import do_bench

    rep = 100 if quick else 300
    return {
        name: do_bench(fn, warmup=25, rep=rep, return_mode="median") / 1e3
        for name, fn in fns.items()
    }


def step_table(
    device: str, quick: bool, smoke: bool = False, on_row: Callable[[list], None] | None = None
) -> list[tuple]:
    """Rows (kept, kept params, masked s, pruned s, masked CPU s, pruned CPU s; CPU seconds
    None on CUDA); ``smoke``: tiny model, one call each."""
    import contextlib

    cpu = device == "cpu"
    config = TINY_MODEL if smoke else CPU_MODEL if cpu else GPU_MODEL
    batch = 4 if smoke else _step_batch(device, quick)
    image, text = _step_inputs(config, batch, device)
    if cpu:
        autocast = contextlib.nullcontext
    else:

        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)

    rows = []
    for kept in KEPT_FRACTIONS:
        masked, pruned = _masked_model(config, kept, device)
        fns = {
            "masked": lambda m=masked: _train_step(m, image, text, autocast),
            "pruned": lambda m=pruned: _train_step(m, image, text, autocast),
        }
        c = {"masked": None, "pruned": None}
        if smoke:
            t, c = _cpu_median(fns, warmup=0, repeats=1)
        elif cpu:
            t, c = _cpu_median(fns, CPU_STEP["warmup"], CPU_STEP["repeats"])
        else:
            t = _gpu_median(fns, quick)
        share = _kept_params(masked, pruned)
        rows.append((kept, share, t["masked"], t["pruned"], c["masked"], c["pruned"]))
        if on_row is not None:
            on_row(rows)
        print(
            f"kept {kept:.0%} (params {share:.0%}): masked {t['masked'] * 1e3:.1f} ms, "
            f"pruned {t['pruned'] * 1e3:.1f} ms, ratio {t['masked'] / t['pruned']:.3f}",
            flush=True,
        )
        del masked, pruned, fns
        if not cpu:
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------- layer table


def make_layer(tokens, k_in, n_out, kept, pruned_side, device, dtype, seed=0) -> dict:
    """One linear's inputs; the ``pruned_side`` ("in"/"out") mask keeps ``kept`` of its
    channels (random positions), the other mask is soft without zeros."""
    g = torch.Generator().manual_seed(seed)

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


def layer_step(method: str, p: dict) -> Callable[[], None]:
    """A closure running forward + backward of ``method`` on ``p``, every gradient."""
    from tinyclip_fast.ops.masked_linear import masked_linear
    from tinyclip_fast.pruning.compact import fold_weight

    in_idx, out_idx = p["in_mask"].nonzero().flatten(), p["out_mask"].nonzero().flatten()
    in_s, out_s = p["in_mask"][in_idx], p["out_mask"][out_idx]
    x_k = p["x"].index_select(1, in_idx).contiguous()
    dy_k = p["dy"].index_select(1, out_idx).contiguous()
    if method == "folded_triton":
        return _folded_triton_step(p, x_k, dy_k, in_idx, out_idx, in_s, out_s)
    leaf = {k: p[k].detach().clone().requires_grad_() for k in p if k != "dy"}
    dy = p["dy"]
    if method == "dense":
        leaves = [leaf["x"], leaf["weight"], leaf["bias"]]

        def forward():
            return F.linear(*leaves)

    elif method == "tinyclip":
        leaves = list(leaf.values())

        def forward():
            x = leaf["x"] * leaf["in_mask"]
            return F.linear(x, leaf["weight"], leaf["bias"]) * leaf["out_mask"]

    elif method == "masked_linear":
        leaves = list(leaf.values())

        def forward():
            return masked_linear(**leaf)

    elif method == "folded":
        scales = [in_s.clone().requires_grad_(), out_s.clone().requires_grad_()]
        x_leaf = x_k.clone().requires_grad_()
        leaves = [x_leaf, leaf["weight"], leaf["bias"], *scales]
        dy = dy_k

        def forward():
            w = fold_weight(leaf["weight"], out_idx, in_idx, scales[1], scales[0])
            b = fold_weight(leaf["bias"], out_idx, None, scales[1])
            return F.linear(x_leaf, w, b)

    elif method == "pruned":
        leaves = [
            x_k.clone().requires_grad_(),
            p["weight"][out_idx][:, in_idx].contiguous().requires_grad_(),
            p["bias"][out_idx].clone().requires_grad_(),
        ]
        dy = dy_k

        def forward():
            return F.linear(*leaves)

    else:
        raise ValueError(f"unknown method {method!r}")

    def step():
        for t in leaves:
            t.grad = None
        forward().backward(dy)

    return step


def _folded_triton_step(p, x_k, dy_k, in_idx, out_idx, in_s, out_s) -> Callable[[], None]:
    """The compact-form kernels' forward, input gradient and weight gradient (with the mask
    gradients) as MaskedCLIP would launch them, index vectors None where nothing is cut."""
    from tinyclip_fast.kernels.masked_matmul import (
        masked_matmul_forward,
        masked_matmul_input_grad,
        masked_matmul_weight_grad,
    )

    weight, bias = p["weight"], p["bias"]
    in_idx = None if in_idx.numel() == weight.shape[1] else in_idx.to(torch.int32)
    out_idx = None if out_idx.numel() == weight.shape[0] else out_idx.to(torch.int32)

    def step():
        masked_matmul_forward(x_k, weight, bias, in_idx, in_s, out_idx, out_s)
        masked_matmul_input_grad(dy_k, weight, out_idx, out_s, in_idx, in_s)
        masked_matmul_weight_grad(
            dy_k, x_k, weight, out_idx, out_s, in_idx, in_s, True, True, True, True
        )

    return step


def _check_folded(p: dict) -> float:
    """Relative error of the folded cuBLAS path against the TinyCLIP-style product."""
    from tinyclip_fast.pruning.compact import fold_weight

    in_idx, out_idx = p["in_mask"].nonzero().flatten(), p["out_mask"].nonzero().flatten()
    w = fold_weight(p["weight"], out_idx, in_idx, p["out_mask"][out_idx], p["in_mask"][in_idx])
    b = fold_weight(p["bias"], out_idx, None, p["out_mask"][out_idx])
    ours = F.linear(p["x"].index_select(1, in_idx), w, b).float()
    ref = F.linear(p["x"].float() * p["in_mask"], p["weight"].float(), p["bias"].float())
    ref = (ref * p["out_mask"])[:, out_idx]
    return float((ours - ref).norm() / ref.norm())


def layer_table(
    device: str, quick: bool, smoke: bool = False, on_row: Callable[[list], None] | None = None
) -> list[tuple]:
    """Rows (layer, kept, {method: seconds}, rel err); ``smoke``: tiny shapes, one call each."""
    cpu = device == "cpu"
    spec = TINY_LAYER if smoke else CPU_LAYER if cpu else GPU_LAYER
    dtype = spec["dtype"] if cpu else torch.bfloat16
    methods = CPU_LAYER_METHODS if cpu else LAYER_METHODS
    hidden, mlp = spec["hidden"], spec["mlp"]
    rows = []
    for name, k_in, n_out, side in (
        (f"fc1 {hidden}->{mlp}", hidden, mlp, "out"),
        (f"fc2 {mlp}->{hidden}", mlp, hidden, "in"),
    ):
        for kept in QUICK_LAYER_KEPT if quick and not cpu else KEPT_FRACTIONS:
            p = make_layer(
                _layer_tokens(device, quick, smoke), k_in, n_out, kept, side, device, dtype
            )
            fns = {method: layer_step(method, p) for method in methods}
            if smoke:
                t = _cpu_median(fns, warmup=0, repeats=1)[0]
            elif cpu:
                t = _cpu_median(fns, warmup=2, repeats=7)[0]
            else:
                t = _gpu_median(fns, quick)
            err = _check_folded(p)
            rows.append((name, kept, t, err))
            if on_row is not None:
                on_row(rows)
            print(
                name, f"kept {kept:.0%}", {k: f"{v * 1e3:.3f} ms" for k, v in t.items()}, flush=True
            )
            del p, fns
    return rows


def _step_batch(device: str, quick: bool) -> int:
    return CPU_STEP["batch"] if device == "cpu" else GPU_STEP["quick_batch" if quick else "batch"]


def _layer_tokens(device: str, quick: bool, smoke: bool = False) -> int:
    if smoke:
        return TINY_LAYER["tokens"]
    if device == "cpu":
        return CPU_LAYER["tokens"]
    return GPU_LAYER["quick_tokens" if quick else "tokens"]


# ---------------------------------------------------------------------------- reporting


def _machine(device: str) -> str:
    import triton

    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    if device == "cpu":
        cpu = platform.processor() or platform.machine()
        load = os.getloadavg()[0]
        return (
            f"CPU: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads "
            f"(a machine shared with other jobs, load average {load:.1f} when written); "
            f"{versions}"
        )
    return f"Card: {torch.cuda.get_device_name()}; {versions}, CUDA {torch.version.cuda}"


def step_markdown(rows, device: str, quick: bool) -> str:
    cpu = device == "cpu"
    config = CPU_MODEL if cpu else GPU_MODEL
    batch = _step_batch(device, quick)
    v, t = config["vision_cfg"], config["text_cfg"]
    how = (
        f"median of {CPU_STEP['repeats']} interleaved steps after {CPU_STEP['warmup']} warm-up "
        "(wall time, and the process's CPU time)"
        if cpu
        else "triton.testing.do_bench median, bf16 autocast, fp32 weights"
    )
    matmul = "PyTorch" if cpu else "cuBLAS"
    lines = [
        "# Masked training step vs the pruned model's step",
        "",
        f"{_machine(device)}.",
        f"ViT width {v['width']} x {v['layers']} layers (image {v['image_size']}, patch "
        f"{v['patch_size']}) + text width {t['width']} x {t['layers']} (context "
        f"{t['context_length']}, vocab {t['vocab_size']}), batch {batch}, train mode, forward + "
        f"backward of both towers and a contrastive loss, one fixed mask sample; {how}.",
        "pruned = the pruned CLIP of exactly the sample's structure. MaskedCLIP folds the sample "
        f"into gathered weights and runs {matmul} on them (masked_matmul tables: cuBLAS on the "
        "folded weight against the Triton kernels).",
        "",
        "| kept | params kept | masked ms | pruned ms | masked / pruned |"
        + (" masked CPU ms | pruned CPU ms | masked / pruned (CPU time) |" if cpu else ""),
        "|---|---|---|---|---|" + ("---|---|---|" if cpu else ""),
    ]
    for kept, share, masked, pruned, masked_cpu, pruned_cpu in rows:
        line = (
            f"| {kept:.0%} | {share:.0%} | {masked * 1e3:.1f} | {pruned * 1e3:.1f} | "
            f"{masked / pruned:.3f} |"
        )
        if cpu:
            line += (
                f" {masked_cpu * 1e3:.1f} | {pruned_cpu * 1e3:.1f} | "
                f"{masked_cpu / pruned_cpu:.3f} |"
            )
        lines.append(line)
    return "\n".join(lines) + "\n"


def layer_markdown(rows, tokens: int, device: str) -> str:
    cpu = device == "cpu"
    methods = CPU_LAYER_METHODS if cpu else LAYER_METHODS
    dtype = "fp32" if cpu else "bf16"
    head = " | ".join(f"{m} ms" for m in methods)
    lines = [
        f"# Masked linear forward + backward (every gradient), {tokens:,} tokens, {dtype}",
        "",
        f"{_machine(device)}. Median ms. Kept = fraction of the MLP-side mask's channels that "
        "are non-zero (random positions); the hidden-side mask is soft without zeros. "
        "folded* run on the compact activations (as MaskedCLIP does); pruned = F.linear on "
        "the already compacted weight (the floor). ours = folded, what MaskedCLIP runs "
        "(ours/compacted = folded / pruned). rel err: folded against the TinyCLIP-style "
        "product.",
        "",
        f"| layer | kept | {head} | ours/dense | tinyclip/ours | ours/compacted | "
        + ("folded_triton/compacted | " if not cpu else "")
        + "rel err |",
        "|" + "---|" * (len(methods) + 6 + (0 if cpu else 1)),
    ]
    for name, kept, t, err in rows:
        cells = " | ".join(f"{t[m] * 1e3:.3f}" for m in methods)
        ours = t["folded"]
        ratios = (
            f"{ours / t['dense']:.2f}x | {t['tinyclip'] / ours:.2f}x | {ours / t['pruned']:.2f}x | "
        )
        if not cpu:
            ratios += f"{t['folded_triton'] / t['pruned']:.2f}x | "
        lines.append(f"| {name} | {kept:.0%} | {cells} | {ratios}{err:.1e} |")
    return "\n".join(lines) + "\n"


def plan(quick: bool) -> str:
    """What each mode measures, for --dry-run."""
    v, t = GPU_MODEL["vision_cfg"], GPU_MODEL["text_cfg"]
    cv, ct = CPU_MODEL["vision_cfg"], CPU_MODEL["text_cfg"]
    kept = ", ".join(f"{k:.0%}" for k in KEPT_FRACTIONS)
    layer_kept = ", ".join(f"{k:.0%}" for k in (QUICK_LAYER_KEPT if quick else KEPT_FRACTIONS))
    return "\n".join(
        [
            f"bench_masked_matmul plan{' (--quick)' if quick else ''}",
            f"  kept fractions: {kept}; fixed mask sample seed {MASK_SEED}",
            "  step table (MaskedCLIP train step vs the pruned CLIP of the same structure):",
            f"    CUDA: ViT {v['width']}x{v['layers']} + text {t['width']}x{t['layers']}, batch "
            f"{_step_batch('cuda', quick)}, bf16 autocast, do_bench median "
            "-> OUT/masked_step_<gpu>.md",
            f"    CPU:  ViT {cv['width']}x{cv['layers']} + text {ct['width']}x{ct['layers']}, "
            f"batch {CPU_STEP['batch']}, fp32, --threads (2), median of {CPU_STEP['repeats']} "
            "interleaved -> OUT/masked_step_cpu.md",
            "  layer table (one linear, fwd + bwd, every gradient):",
            f"    CUDA: {_layer_tokens('cuda', quick):,} tokens, {GPU_LAYER['hidden']} <-> "
            f"{GPU_LAYER['mlp']}, bf16, kept {layer_kept}, methods {', '.join(LAYER_METHODS)} "
            "-> OUT/masked_matmul_<gpu>.md",
            f"    CPU:  {CPU_LAYER['tokens']:,} tokens, {CPU_LAYER['hidden']} <-> "
            f"{CPU_LAYER['mlp']}, fp32, kept {kept}, methods {', '.join(CPU_LAYER_METHODS)} "
            "-> OUT/masked_matmul_cpu.md",
        ]
    )


def smoke_run() -> None:
    """Every step and CPU layer method once on tiny shapes on the CPU (nothing written)."""
    print("smoke run: tiny models and layers on the CPU, one cold call each (times mean nothing)")
    step_table("cpu", False, smoke=True)
    for name, kept, _, err in layer_table("cpu", False, smoke=True):
        if not err < 1e-4:
            raise RuntimeError(f"{name} kept {kept:.0%}: folded rel err {err:.1e}")
    print("smoke run done: every step and layer method ran, folded matches TinyCLIP-style")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="CPU tables")
    parser.add_argument("--threads", type=int, default=2, help="CPU: torch threads")
    parser.add_argument("--only", choices=("step", "layer"), help="one table alone")
    parser.add_argument("--quick", action="store_true", help="CUDA: smaller batch and layer")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, smoke-run")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # before the library loads: compiled kernels only
    if args.dry_run:
        print(plan(args.quick))
        smoke_run()
        return 0
    if args.cpu:
        device = "cpu"
        torch.set_num_threads(args.threads)
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        parser.error("no CUDA device: use --cpu for the CPU tables or --dry-run for the plan")
    slug = "cpu"
    if device == "cuda":
        slug = re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")
    args.out.mkdir(parents=True, exist_ok=True)
    step_path = args.out / f"masked_step_{slug}.md"
    layer_path = args.out / f"masked_matmul_{slug}.md"
    tokens = _layer_tokens(device, args.quick)
    write_step = lambda rows: step_path.write_text(step_markdown(rows, device, args.quick))
    write_layer = lambda rows: layer_path.write_text(layer_markdown(rows, tokens, device))
    if args.only != "layer":
        step_table(device, args.quick, on_row=write_step)
        print(step_path.read_text())
    if args.only != "step":
        layer_table(device, args.quick, on_row=write_layer)
        print(layer_path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
