"""``tinyclip-distill``: distil an open_clip teacher into a TinyCLIP student from the shell.

Precedence: built-in defaults < ``--config FILE`` (JSON/TOML) < the flags below < ``--set``.
Multi-stage runs are written in the config file (``[[stages]]``); the student flags
(--preset, --student-config, --sparsity, --from-scratch, --steps, --prune-step) edit a
single-stage run. Under torchrun every rank runs this same command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tinyclip_fast.train.config import (
    ATTENTIONS,
    LOSS_KINDS,
    PRECISIONS,
    DistillConfig,
    StageConfig,
    apply_override,
    load_config,
)

EPILOG = """\
examples:
  # manual inheritance, one stage, CSV data, zero-shot eval every 500 steps
  tinyclip-distill --teacher ViT-B-32 --pretrained ./vit_b32_laion2b_e16.pt \\
      --preset ViT-40M-32-Text-19M --steps 20000 --data csv:train.tsv \\
      --eval folder:imagenet_val/ --eval-every 500 --out-dir runs/manual
  # automatic inheritance to 50% sparsity, pruned after 5000 steps
  tinyclip-distill --teacher ViT-B-32 --pretrained ./vit_b32.pt --sparsity 0.5 \\
      --prune-step 5000 --steps 10000 --data webdataset:'shards/{00000..00999}.tar' \\
      --data-size 10000000
  # multi-stage progressive distillation from a config file; continue after a stop
  tinyclip-distill --config progressive.toml
  tinyclip-distill --config progressive.toml --resume
  # 8 GPUs: local loss + gather with grad; batch 32768 in micro-batches of 256
  torchrun --nproc_per_node 8 -m tinyclip_fast --config run.toml \\
      --batch-size 32768 --micro-batch-size 256
  # print the resolved configuration (a template for --config) and exit
  tinyclip-distill --preset ViT-8M-16-Text-3M --print-config

Outputs in --out-dir: checkpoint.pt (resumable training state), metrics.jsonl,
tensorboard/ (when installed), student/ (weights-only export; load with
tinyclip_fast.inheritance.student_io.load_student, or open_clip "local-dir:" for uniform students).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinyclip-distill",
        description="Distil a CLIP teacher into a small student by affinity mimicking and "
        "weight inheritance (TinyCLIP).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="JSON or TOML config file (see --print-config)")
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override any config field, value parsed as JSON; repeatable. "
        "e.g. --set optim.betas=[0.9,0.98] --set stages.1.prune_step=5000",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as JSON and exit"
    )

    g = p.add_argument_group("teacher (frozen; the original model in every stage)")
    g.add_argument(
        "--teacher",
        metavar="NAME",
        help="open_clip model name (ViT-B-32), a path to an open_clip model-config "
        "JSON, or 'demo' (the built-in demo teacher)",
    )
    g.add_argument(
        "--pretrained",
        metavar="FILE|TAG",
        help="teacher weights: a local checkpoint file (offline) or an open_clip "
        "pretrained tag (downloads)",
    )
    g.add_argument(
        "--teacher-cache",
        metavar="FILE",
        help="cached teacher embeddings (safetensors): read them instead of running "
        "the teacher; needs a map-style dataset without random augmentation",
    )
    g.add_argument(
        "--build-teacher-cache",
        action="store_true",
        help="run the teacher once over the training data, write --teacher-cache, exit",
    )

    g = p.add_argument_group("student (single-stage shortcuts; multi-stage: config file)")
    g.add_argument(
        "--preset",
        metavar="NAME",
        help="manual inheritance to a released architecture, e.g. ViT-40M-32-Text-19M, "
        "ViT-61M-32-Text-29M, ViT-8M-16-Text-3M (tinyclip_fast.inheritance.presets.PRESETS)",
    )
    g.add_argument(
        "--student-config",
        metavar="FILE",
        help="manual inheritance to an open_clip model config (JSON: embed_dim, "
        "vision_cfg, text_cfg)",
    )
    g.add_argument(
        "--layer-selection",
        choices=("every_k", "even"),
        help="manual inheritance: teacher layer i*k (authors) or evenly spread",
    )
    g.add_argument(
        "--sparsity",
        type=float,
        metavar="S",
        help="automatic inheritance: learn masks until S of the teacher's prunable "
        "parameters are gone, then prune",
    )
    g.add_argument(
        "--prune-step",
        type=int,
        metavar="K",
        help="automatic inheritance: prune after K steps (default: at the end)",
    )
    g.add_argument(
        "--sparsity-warmup",
        type=int,
        metavar="W",
        help="steps over which the sparsity target ramps from 0 to S (default 1000)",
    )
    g.add_argument(
        "--from-scratch",
        action="store_true",
        help="random init with --preset/--student-config's architecture (baseline)",
    )
    g.add_argument("--steps", type=int, help="training steps of the stage")

    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        metavar="KIND[:PATH]",
        help="csv:FILE (CSV/TSV, open_clip columns filepath/title), "
        "webdataset:'a-{000..099}.tar', synthetic, or demo[:SOURCE]",
    )
    g.add_argument(
        "--data-size",
        type=int,
        metavar="N",
        help="synthetic: number of samples (10,000); webdataset: samples per epoch",
    )
    g.add_argument("--num-workers", type=int, help="data loader worker processes")

    g = p.add_argument_group("zero-shot evaluation")
    g.add_argument(
        "--eval",
        metavar="KIND[:PATH]",
        help="folder:DIR (one subfolder per class), csv:FILE (filepath,label), or demo",
    )
    g.add_argument("--eval-every", type=int, metavar="K", help="evaluate every K steps (0: off)")
    g.add_argument("--eval-class-names", metavar="FILE", help="class names, one per line")
    g.add_argument(
        "--eval-templates",
        metavar="FILE",
        help="prompt templates with '{}', one per line (default 'a photo of a {}.')",
    )

    g = p.add_argument_group("loss")
    g.add_argument("--distill-weight", type=float, help="weight of the affinity loss (1.0)")
    g.add_argument("--contrastive-weight", type=float, help="weight of the CLIP loss (0.0)")
    g.add_argument(
        "--loss-kind",
        choices=LOSS_KINDS,
        help="soft_ce (TinyCLIP/open_clip values) or kl (same gradient)",
    )
    g.add_argument(
        "--fixed-scale",
        type=float,
        metavar="S",
        help="fix both logit scales to S (the authors use 50); default: learnable "
        "student scale clamped to <= 100, teacher keeps its own",
    )

    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, help="peak learning rate (1e-4)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup before the cosine (2000)")
    g.add_argument(
        "--prune-warmup-steps",
        type=int,
        help="auto stages: the rate ramps up again over this many steps after pruning (200); "
        "the optimizer's moments carry over to the pruned student",
    )
    g.add_argument("--weight-decay", type=float, help="on >= 2-D weights only (0.2)")
    g.add_argument("--grad-clip", type=float, help="max global grad norm, 0 = off (5.0)")
    g.add_argument("--batch-size", type=int, help="global batch over all ranks (256)")
    g.add_argument(
        "--micro-batch-size",
        type=int,
        help="per-rank micro-batch: exact gradient accumulation (GradCache)",
    )
    g.add_argument(
        "--precision", choices=PRECISIONS, help="autocast dtype (bf16); fp16 adds a GradScaler"
    )
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the student")
    g.add_argument(
        "--attention",
        choices=ATTENTIONS,
        help="sdpa (default) or xformers (CUDA; must be installed)",
    )
    g.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    g.add_argument("--seed", type=int, help="seed of the data order and initialisation (0)")

    g = p.add_argument_group("run")
    g.add_argument("--out-dir", metavar="DIR", help="checkpoint, metrics and student export")
    g.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue the run in --out-dir from its checkpoint.pt",
    )
    g.add_argument("--log-every", type=int, metavar="K", help="log metrics every K steps (10)")
    g.add_argument("--save-every", type=int, metavar="K", help="checkpoint every K steps")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


_FLAT = {  # flag -> config path
    "teacher": "teacher.model",
    "pretrained": "teacher.pretrained",
    "teacher_cache": "teacher.cache",
    "data_size": "data.size",
    "num_workers": "num_workers",
    "eval_every": "eval.every",
    "eval_class_names": "eval.class_names",
    "eval_templates": "eval.templates",
    "distill_weight": "loss.distill_weight",
    "contrastive_weight": "loss.contrastive_weight",
    "loss_kind": "loss.kind",
    "fixed_scale": "loss.fixed_scale",
    "lr": "optim.lr",
    "warmup_steps": "optim.warmup_steps",
    "prune_warmup_steps": "optim.prune_warmup_steps",
    "weight_decay": "optim.weight_decay",
    "grad_clip": "optim.grad_clip",
    "batch_size": "batch_size",
    "micro_batch_size": "micro_batch_size",
    "precision": "precision",
    "compile": "compile",
    "attention": "attention",
    "device": "device",
    "seed": "seed",
    "out_dir": "out_dir",
    "resume": "resume",
    "log_every": "log_every",
    "save_every": "save_every",
}
_STAGE_FLAGS = (
    "preset",
    "student_config",
    "sparsity",
    "from_scratch",
    "steps",
    "prune_step",
    "sparsity_warmup",
    "layer_selection",
)


def _set_path(config: DistillConfig, path: str, value: Any) -> None:
    target: Any = config
    *parents, name = path.split(".")
    for part in parents:
        target = getattr(target, part)
    setattr(target, name, value)


def _kind_and_path(value: str) -> tuple[str, str | None]:
    kind, sep, path = value.partition(":")
    return kind, (path if sep else None)


def _edit_stage(config: DistillConfig, args: argparse.Namespace) -> None:
    given = {k: getattr(args, k) for k in _STAGE_FLAGS if getattr(args, k) not in (None, False)}
    if not given:
        return
    if len(config.stages) != 1:
        raise ValueError(
            "student flags edit single-stage runs; this config has "
            f"{len(config.stages)} stages: use --set stages.N.KEY=VALUE"
        )
    stage = config.stages[0]
    if {"preset", "student_config", "sparsity", "from_scratch"} & given.keys():
        stage = StageConfig(steps=stage.steps)  # a new student: drop the old way to build it
    if "student_config" in given:
        path = Path(given.pop("student_config"))
        if not path.is_file():
            raise FileNotFoundError(f"--student-config {path} does not exist")
        stage.student_config = json.loads(path.read_text())
    for key, value in given.items():
        setattr(stage, key, value)
    config.stages[0] = stage


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """Defaults < --config < flags < --set."""
    config = load_config(args.config)
    for flag, path in _FLAT.items():
        value = getattr(args, flag)
        if value is not None:
            _set_path(config, path, value)
    if args.no_progress:
        config.progress = False
    if args.data is not None:
        config.data.kind, config.data.path = _kind_and_path(args.data)
    if args.eval is not None:
        config.eval.kind, config.eval.path = _kind_and_path(args.eval)
        if config.eval.every == 0 and args.eval_every is None:
            config.eval.every = 1000
    _edit_stage(config, args)
    for assignment in args.set:
        apply_override(config, assignment)
    config.validate()
    return config


def _build_teacher_cache(config: DistillConfig) -> None:
    from tinyclip_fast.data.datasets import build_dataset
    from tinyclip_fast.train.engine import dataset_defaults
    from tinyclip_fast.train.teacher import build_teacher
    from tinyclip_fast.train.teacher_cache import TeacherEmbeddingCache

    if config.teacher.cache is None:
        raise ValueError("--build-teacher-cache needs --teacher-cache FILE (where to write it)")
    teacher, tokenizer, _, eval_preprocess = build_teacher(config.teacher)
    data_cfg = {**dataset_defaults(teacher, config.seed), **config.data.as_dict()}
    dataset = build_dataset(data_cfg, preprocess=eval_preprocess, tokenizer=tokenizer)
    device = config.device or ("cuda" if _cuda() else "cpu")
    teacher = teacher.to(device)
    cache = TeacherEmbeddingCache.build(
        teacher,
        dataset,
        config.teacher.cache,
        batch_size=config.micro_batch_size or 256,
        device=device,
    )
    print(f"wrote {len(cache)} teacher embeddings (dim {cache.dim}) to {config.teacher.cache}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    """Run ``tinyclip-distill``; returns the exit status: 0 done, 2 bad input, 1 the loss
    became NaN/inf, 130 SIGINT/SIGTERM stopped the run (after saving a checkpoint)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from tinyclip_fast.demo.plugins import register_demo

    register_demo()
    try:
        config = config_from_args(args)
    except (ValueError, TypeError, FileNotFoundError, json.JSONDecodeError) as err:
        parser.error(str(err))
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    from tinyclip_fast.train.engine import distill

    try:
        if args.build_teacher_cache:
            _build_teacher_cache(config)
            return 0
        result = distill(config)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        print(f"tinyclip-distill: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"tinyclip-distill: stopped: {err}", file=sys.stderr)
        return 1
    if result.interrupted:
        print("tinyclip-distill: interrupted; run again with --resume to continue", file=sys.stderr)
        return 130  # the shell's code for "stopped by a signal", so job schedulers requeue
    print(f"done: student with {result.params:,} parameters in {Path(config.out_dir) / 'student'}")
    return 0
