"""The built-in demo: TinyCLIP's two claims in miniature, on a CPU, offline, in minutes.

1. A demo teacher CLIP is trained contrastively on images that ship in an installed package
   (Fashion-MNIST from Debian's dataset-fashion-mnist, else scikit-learn's digits), captioned
   from class names with varied templates; it is saved and reused on the next run.
2. Three students of the same size budget (<= 60% of the teacher's parameters, all counted)
   are distilled by ``engine.distill`` for the same number of steps from cached teacher
   embeddings: manual inheritance, automatic inheritance (masks, prune, continue) and
   random init (scratch).
3. Zero-shot top-1 on the held-out split is tracked; the table, ``summary.json`` and
   ``accuracy.png`` show how soon each inherited student reaches the scratch student's
   final accuracy.

Run: ``python -m tinyclip_fast demo --out runs/demo`` (``make demo``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn
from tqdm.auto import tqdm

from tinyclip_fast.data.loader import make_loader
from tinyclip_fast.data.zero_shot import ZeroShotEvaluator
from tinyclip_fast.demo.data import SOURCES, DemoSplit, load_demo_split
from tinyclip_fast.demo.teacher import (
    TEACHER_META,
    student_config,
    teacher_config,
    tensor_preprocess,
)
from tinyclip_fast.inheritance.student_io import load_student, save_student
from tinyclip_fast.losses import ClipLoss
from tinyclip_fast.ops.backend import force_backend
from tinyclip_fast.teachers.embedding_cache import TeacherEmbeddingCache
from tinyclip_fast.train.config import (
    DataConfig,
    DistillConfig,
    LossConfig,
    OptimConfig,
    StageConfig,
)
from tinyclip_fast.train.engine import distill
from tinyclip_fast.train.optim import learning_rate, make_optimizer
from tinyclip_fast.train.students import count_parameters

STUDENT_KINDS = {
    "manual": "manual inheritance of the teacher's first layers",
    "auto": "automatic inheritance: learned masks, pruned, then distilled on",
    "scratch": "random initialisation",
}
MAX_STUDENT_FRACTION = 0.60


@dataclass
class DemoSettings:
    """Sizes and schedules; ``quick`` shrinks everything for a smoke run."""

    teacher_steps: int = 150
    student_steps: int = 100
    batch_size: int = 128
    teacher_lr: float = 1e-3
    student_lr: float = 1e-3
    eval_points: int = 20  # evaluations per student run (the accuracy curve's resolution)
    # Auto, the recipe for short mask phases (docs/pruning-and-inheritance.md): half of the
    # teacher's prunable parameters, heads and MLP channels only (no hidden-width masks), the
    # target ramping over 20% of the steps, pruned once it held (prune_step auto) and by 40%
    # of the steps at the latest; the two-sided control and the other settings are defaults.
    auto_sparsity: float = 0.5
    auto_warmup_fraction: float = 0.2
    auto_prune_by_fraction: float = 0.4
    # The authors' 0.02 moves log_alpha over thousands of steps; the demo has tens.
    mask_lr: float = 0.25

    max_train_samples: int | None = None
    max_test_samples: int | None = None

    @classmethod
    def quick(cls) -> DemoSettings:
        """A smoke run of about a minute of CPU time: a shorter teacher, 30 steps per student
        (the automatic student's masks get 12 steps at most)."""
        return cls(
            teacher_steps=60,
            student_steps=30,
            eval_points=6,
            max_train_samples=2000,
            max_test_samples=500,
        )


def train_teacher(
    model: nn.Module,
    split: DemoSplit,
    settings: DemoSettings,
    *,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> None:
    """Contrastive (InfoNCE) training from scratch with the engine's optimizer and schedule."""
    config = DistillConfig(
        optim=OptimConfig(
            lr=settings.teacher_lr,
            warmup_steps=max(1, settings.teacher_steps // 10),
            weight_decay=0.1,
        )
    )
    optimizer = make_optimizer(model, config)
    loss_fn = ClipLoss()
    loader = make_loader(split.dataset, settings.batch_size, seed=seed)
    model.train()
    bar = tqdm(range(settings.teacher_steps), desc="teacher", unit="step", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings.teacher_steps, config.optim)
        batch = next(loader)
        image_f, text_f, scale = model(batch["image"].to(device), batch["text"].to(device))
        loss = loss_fn(image_f, text_f, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, math.log(100.0))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def load_or_train_teacher(
    folder: Path,
    train: DemoSplit,
    evaluator: ZeroShotEvaluator,
    settings: DemoSettings,
    *,
    seed: int,
    device: torch.device,
    progress: bool,
) -> tuple[nn.Module, float, bool]:
    """(teacher, top1, reused): the saved teacher when it was trained for this exact set-up."""
    meta = {
        "source": train.source,
        "seed": seed,
        "steps": settings.teacher_steps,
        "batch_size": settings.batch_size,
        "train_samples": len(train.dataset),
        "config": teacher_config(train.tokenizer.vocab_size, train.tokenizer.context_length),
    }
    meta_path = folder / TEACHER_META
    if meta_path.is_file():
        saved = json.loads(meta_path.read_text())
        if {k: saved.get(k) for k in meta} == meta:
            teacher = load_student(folder, map_location=device).eval()
            return teacher, float(saved["top1"]), True
    torch.manual_seed(seed)
    teacher = open_clip.model.CLIP(**meta["config"]).to(device)
    train_teacher(teacher, train, settings, seed=seed, device=device, progress=progress)
    top1 = evaluator(teacher)
    save_student(teacher, folder)
    # The metadata goes last: its presence means the weights next to it are complete.
    meta_path.write_text(json.dumps({**meta, "top1": top1}, indent=2))
    return teacher, top1, False


def first_step_reaching(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose top-1 is >= ``target``; None if never."""
    return next((step for step, top1 in curve if top1 >= target), None)


def accuracy_curve(history: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, top1) of every evaluation in an engine history, one per step, in step order."""
    by_step = {entry["step"]: entry["top1"] for entry in history if "top1" in entry}
    return sorted(by_step.items())


def student_stage(kind: str, settings: DemoSettings, model_cfg: dict[str, Any]) -> StageConfig:
    """The engine stage of one student kind (manual, auto or scratch)."""
    steps = settings.student_steps
    if kind == "manual":
        return StageConfig(steps=steps, student_config=model_cfg)
    if kind == "scratch":
        return StageConfig(steps=steps, student_config=model_cfg, from_scratch=True)
    return StageConfig(
        steps=steps,
        sparsity=settings.auto_sparsity,
        prune_step="auto",
        prune_by=max(1, int(steps * settings.auto_prune_by_fraction)),
        sparsity_warmup=max(1, int(steps * settings.auto_warmup_fraction)),
        mask_hidden=False,
    )


def run_student(
    kind: str,
    teacher: nn.Module,
    train: DemoSplit,
    evaluator: ZeroShotEvaluator,
    cache_path: Path,
    settings: DemoSettings,
    *,
    out_dir: Path,
    seed: int,
    device: torch.device,
    progress: bool,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Distil one student with the engine; returns (student, the run's history)."""
    model_cfg = student_config(train.tokenizer.vocab_size, train.tokenizer.context_length)
    steps = settings.student_steps
    config = DistillConfig(
        stages=[student_stage(kind, settings, model_cfg)],
        data=DataConfig(kind="demo"),
        loss=LossConfig(contrastive_weight=0.0),
        optim=OptimConfig(
            lr=settings.student_lr,
            warmup_steps=max(1, steps // 10),
            prune_warmup_steps=max(1, steps // 10),
            weight_decay=0.1,
            mask_lr=settings.mask_lr,
        ),
        batch_size=settings.batch_size,
        precision="fp32",
        device=str(device),
        seed=seed,
        out_dir=str(out_dir / kind),
        log_every=max(1, steps // settings.eval_points),
        save_every=0,
        overwrite=True,  # the demo's own folder: a new demo run replaces the last one's
        progress=progress,
    )
    config.teacher.cache = str(cache_path)
    config.eval.every = max(1, steps // settings.eval_points)
    result = distill(
        config,
        teacher=teacher,
        train_dataset=train.dataset,
        evaluator=evaluator,
        tokenizer=train.tokenizer,
        preprocess=tensor_preprocess,
        device=device,
    )
    return result.student, result.history


def summarise(
    teacher_params: int,
    teacher_top1: float,
    students: dict[str, dict[str, Any]],
    settings: DemoSettings,
) -> dict[str, Any]:
    """summary.json: teacher and per-student params/top-1 and the speed-up measure.

    The automatic student counts only from its prune step (the history's pruned record) on:
    before it, the evaluated model is the teacher-sized masked network, not the student. A
    student over the size budget (an automatic one whose masks did not reach their target)
    is marked ``within_budget: false`` and credited with no speed-up: a bigger model
    reaching the scratch student's accuracy sooner shows nothing.
    """
    scratch_final = accuracy_curve(students["scratch"]["history"])[-1][1]
    budget = MAX_STUDENT_FRACTION * teacher_params
    summary: dict[str, Any] = {
        "teacher": {"params": teacher_params, "top1": teacher_top1},
        "size_budget": MAX_STUDENT_FRACTION,
        "students": {},
    }
    for kind, info in students.items():
        info = {**info, "curve": accuracy_curve(info["history"])}
        entry = {"params": info["params"], "top1": info["curve"][-1][1]}
        entry["within_budget"] = info["params"] <= budget
        if kind == "scratch":
            entry["steps"] = settings.student_steps
        else:
            counted = info["curve"]
            if kind == "auto":
                pruned = next(r for r in info["history"] if r.get("event") == "pruned")
                entry["prune_step"], entry["prune_reason"] = pruned["step"], pruned["prune_reason"]
                counted = [(step, top1) for step, top1 in counted if step >= pruned["step"]]
            reached = first_step_reaching(counted, scratch_final)
            entry["steps_to_scratch_top1"] = reached if entry["within_budget"] else None
        entry["curve"] = [[step, top1] for step, top1 in info["curve"]]
        summary["students"][kind] = entry
    return summary


def write_plot(summary: dict[str, Any], path: Path) -> None:
    """Zero-shot top-1 against steps for the three students, teacher as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for kind, entry in summary["students"].items():
        steps, top1 = zip(*entry["curve"], strict=True)
        axes.plot(
            steps,
            [100 * t for t in top1],
            marker="o",
            markersize=3,
            label=f"{kind} ({entry['params'] / 1e6:.2f}M params)",
        )
    axes.axhline(
        100 * summary["teacher"]["top1"],
        color="grey",
        linestyle="--",
        label=f"teacher ({summary['teacher']['params'] / 1e6:.2f}M params)",
    )
    axes.axvline(
        summary["students"]["auto"]["prune_step"],
        color="grey",
        linestyle=":",
        label="auto: pruned (masked full size before)",
    )
    axes.set_xlabel("distillation step")
    axes.set_ylabel("zero-shot top-1 (%)")
    axes.set_title(f"TinyCLIP demo on {summary['data']}: inherited vs scratch students")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def format_table(summary: dict[str, Any]) -> str:
    """The printed comparison: params, share of the teacher, top-1, when scratch is reached."""
    teacher = summary["teacher"]
    rows = [f"{'model':<10}{'params':>12}{'vs teacher':>12}{'top-1':>9}{'reaches scratch':>17}"]
    rows.append(
        f"{'teacher':<10}{teacher['params']:>12,}{'100%':>12}{teacher['top1']:>9.1%}{'':>17}"
    )
    for kind, entry in summary["students"].items():
        if kind == "scratch":
            reach = f"final @ {entry['steps']}"
        elif not entry["within_budget"]:
            reach = "too big: n/a"
        elif entry["steps_to_scratch_top1"] is None:
            reach = "never"
        else:
            reach = f"@ step {entry['steps_to_scratch_top1']}"
        rows.append(
            f"{kind:<10}{entry['params']:>12,}{entry['params'] / teacher['params']:>12.0%}"
            f"{entry['top1']:>9.1%}{reach:>17}"
        )
    over = [kind for kind, entry in summary["students"].items() if not entry["within_budget"]]
    if over:
        rows.append(
            f"{', '.join(over)}: more than {summary['size_budget']:.0%} of the teacher's "
            "parameters (the masks did not reach their target), so no speed-up is claimed"
        )
    return "\n".join(rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tinyclip_fast demo",
        description="Distil a demo CLIP teacher into manual, automatic and scratch students "
        "on built-in data (CPU, offline) and compare how fast they learn.",
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="distillation steps per student (default 100; 30 with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of about 70 s of CPU time (the full demo: about 200 s): tiny "
        "subsets, 30 steps per student",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data",
        default="auto",
        choices=SOURCES,
        help="auto: Fashion-MNIST when Debian's package is installed, else digits",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: the demo's matrices are small, and on a busy 2-core "
        "machine two OpenMP threads spent 2.5x the CPU time of one)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 2:
        parser.error("--steps must be >= 2")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tinyclip_fast demo``; returns the exit status."""
    args = parse_args(argv)
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    if args.steps is not None:
        settings.student_steps = args.steps
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    started = time.perf_counter()
    # The demo is about the method: CPU tensors take the PyTorch ops, never the (1000x
    # slower) Triton interpreter, even when TRITON_INTERPRET=1 is set (as in the tests).
    backend = "torch" if device.type == "cpu" else None
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with force_backend(backend):
            summary = _run(args, settings, device, out_dir, progress)
    finally:
        torch.set_num_threads(threads)
    summary["runtime_s"] = round(time.perf_counter() - started, 1)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    write_plot(summary, out_dir / "accuracy.png")
    print(format_table(summary))
    print(
        f"\n{summary['data']}, {settings.student_steps} steps per student, "
        f"{summary['runtime_s']:.0f} s; wrote {out_dir / 'summary.json'} and "
        f"{out_dir / 'accuracy.png'}"
    )
    return 0


def _run(
    args: argparse.Namespace,
    settings: DemoSettings,
    device: torch.device,
    out_dir: Path,
    progress: bool,
) -> dict[str, Any]:
    train = load_demo_split(
        args.data, "train", seed=args.seed, max_samples=settings.max_train_samples
    )
    test = load_demo_split(args.data, "test", seed=args.seed, max_samples=settings.max_test_samples)
    evaluator = test.evaluator(device)
    print(
        f"demo data: {train.source}, {len(train.dataset)} train / {len(test.dataset)} "
        f"held-out images, {len(train.class_names)} classes, vocabulary "
        f"{train.tokenizer.vocab_size} tokens"
    )
    teacher, teacher_top1, reused = load_or_train_teacher(
        out_dir / "teacher",
        train,
        evaluator,
        settings,
        seed=args.seed,
        device=device,
        progress=progress,
    )
    teacher_params = count_parameters(teacher)
    print(
        f"teacher: {teacher_params:,} params, zero-shot top-1 {teacher_top1:.1%}"
        f"{' (reused)' if reused else ''}"
    )
    cache_path = out_dir / "teacher_embeddings.safetensors"
    TeacherEmbeddingCache.build(teacher, train.dataset, cache_path, device=device)
    students = {}
    for kind in STUDENT_KINDS:
        print(f"student '{kind}': {STUDENT_KINDS[kind]}, {settings.student_steps} steps")
        student, history = run_student(
            kind,
            teacher,
            train,
            evaluator,
            cache_path,
            settings,
            out_dir=out_dir,
            seed=args.seed,
            device=device,
            progress=progress,
        )
        params = count_parameters(student)
        if params > MAX_STUDENT_FRACTION * teacher_params:
            print(
                f"warning: {kind} student has {params / teacher_params:.0%} of the teacher's "
                f"parameters (budget {MAX_STUDENT_FRACTION:.0%})"
            )
        students[kind] = {"params": params, "history": history}
    summary = summarise(teacher_params, teacher_top1, students, settings)
    summary["data"] = train.source
    summary["device"] = str(device)
    summary["teacher"]["reused"] = reused
    return summary
