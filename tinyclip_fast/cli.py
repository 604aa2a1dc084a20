"""``tinyclip-distill``: distil an open_clip teacher into a TinyCLIP student from the shell.

Precedence: built-in defaults < ``--config FILE`` (JSON/TOML) < the flags below < ``--set``.
Multi-stage runs are written in the config file (``[[stages]]``); the student flags
(--preset, --student-config, --sparsity, --from-scratch, --steps, --prune-step) edit a
single-stage run. Under torchrun every rank runs this same command; rank 0 alone prints,
except errors, which every rank writes as one line of its own.

A bad configuration is reported before torch is imported, in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from tinyclip_fast.train.config import (
    ATTENTIONS,
    CACHE_DTYPE_NAMES,
    LOSS_FAMILIES,
    LOSS_KINDS,
    MAX_TEACHERS,
    PRECISIONS,
    DistillConfig,
    StageConfig,
    TeacherConfig,
    apply_override,
    load_config,
)
from tinyclip_fast.train.run_folder import check_run_folder

EPILOG = """\
examples:
  # manual inheritance, one stage, CSV data, zero-shot eval every 500 steps
  tinyclip-distill --teacher ViT-B-32 --pretrained ./vit_b32_laion2b_e16.pt \\
      --preset ViT-40M-32-Text-19M --steps 20000 --data csv:train.csv \\
      --eval folder:imagenet_val/ --eval-every 500 --out-dir runs/manual
  # automatic inheritance to 50% sparsity, pruned after 5000 steps
  tinyclip-distill --teacher ViT-B-32 --pretrained ./vit_b32.pt --sparsity 0.5 \\
      --prune-step 5000 --steps 10000 --data webdataset:'shards/{00000..00999}.tar' \\
      --data-size 10000000 --skip-bad-samples
  # multi-stage progressive distillation from a config file; continue after a stop
  tinyclip-distill --config progressive.toml
  tinyclip-distill --config progressive.toml --resume
  # 8 GPUs: local loss + gather with grad; batch 32768 in micro-batches of 256
  torchrun --nproc_per_node 8 -m tinyclip_fast --config run.toml \\
      --batch-size 32768 --micro-batch-size 256
  # reinforced data: the teacher once over 5 recorded augmentations of every image and every
  # caption (one cache file beside each shard; rerun to continue; torchrun splits the shards),
  # then train without a teacher forward, replaying the stored augmentations
  tinyclip-distill --teacher ViT-B-32 --pretrained ./vit_b32.pt --build-teacher-cache \
      --data webdataset:'shards/{00000..00999}.tar' --cache-augmentations 5 --cache-dtype fp16
  tinyclip-distill --teacher ViT-B-32 --pretrained ./vit_b32.pt --sparsity 0.5 --steps 10000 \
      --data reinforced:'shards/{00000..00999}.tar'
  # Apple's DataCompDR shards (images merged in): their stored ViT-L/14 embeddings are the
  # teacher targets; --teacher only gives the student its weights
  tinyclip-distill --teacher ViT-B-32 --pretrained ./vit_b32.pt --preset ViT-40M-32-Text-19M \
      --data datacompdr:'DataCompDR-12M/{00000000..00001023}.tar'
  # sigmoid (SigLIP-style) distillation from a softmax CLIP teacher: its targets become
  # s(b x.y - 10); the student learns a logit bias (open_clip's SigLIP init: -10, log 10)
  tinyclip-distill --teacher ViT-B-32 --pretrained ./vit_b32.pt --loss sigmoid \
      --teacher-logit-bias -10 --preset ViT-40M-32-Text-19M --data csv:train.csv
  # an ensemble: targets averaged over the teachers (inheritance from the FIRST teacher)
  tinyclip-distill --teacher ViT-B-32 --pretrained ./vit_b32.pt \
      --teacher ViT-B-16 --pretrained ./vit_b16.pt --preset ViT-40M-32-Text-19M \
      --data csv:train.csv
  # print the resolved configuration (a template for --config) and exit
  tinyclip-distill --preset ViT-8M-16-Text-3M --print-config

rules:
  run folder   --out-dir holds checkpoint.pt (resumable state), metrics.jsonl, tensorboard/
               (when installed), bad_samples.jsonl and student/ (weights-only export; load with
               tinyclip_fast.load_student, or open_clip "local-dir:" for uniform students).
               A folder holding another run's files needs --resume (continue it: metrics.jsonl
               is cut back to the checkpoint's step; the last stage may be given more --steps)
               or --overwrite (replace those files). Files get the usual umask permissions.
  precision    default: bf16 autocast on CUDA (fp16 where bf16 is unsupported), fp32 on the
               CPU. The loss is computed and returned in fp32 under any autocast.
  bad data     an unreadable image, CSV row or shard member stops the run with its name;
               --skip-bad-samples skips and logs each to bad_samples.jsonl instead, and stops
               once more than --max-bad-fraction of the samples read were bad.
  cache        --teacher-cache holds the teachers' embeddings of one dataset, in order: a
               cache built on other samples, the same rows reordered or by another teacher
               list is refused, naming the first sample or teacher that differs.
  reinforced   --build-teacher-cache without --teacher-cache writes <shard>.reinforced.
               safetensors per shard (webdataset tar; CSV rows and folder images in shards of
               --set data.options.shard_size=10000) beside the data or in --cache-dir: the
               teacher's embeddings of K augmentations drawn by its training transform (their
               parameters recorded) and of every caption (.txt, synthetic .syn.json). Finished
               shards are skipped, so a rerun continues; each torchrun rank builds its own.
               --data reinforced:PATH (the data the cache was built over; a folder of .tar
               shards for all of them) trains from it: per sample one stored augmentation,
               replayed, and one caption (--set reinforced.caption_mode=all|real|synthetic),
               chosen from (seed, epoch, sample), with the stored embeddings as teacher
               targets: the teacher never runs (it is loaded for weight inheritance and to
               check the cache is its). A cache built with another teacher, preprocess,
               augmentation recipe, K, dtype, seed or format is refused, naming what differs.
               Data holding several teachers' embeddings (an ensemble cache, DataCompDR's
               two ViT-L/14s) is distilled from as their ensemble.
  ensembles    --teacher repeated (2..4; or [[teachers]] tables in --config), each followed
               by its own --pretrained (one per --teacher, paired in order): the loss
               averages the teachers' targets after softmax / after sigmoid. Weight
               inheritance (--preset, --student-config, --sparsity) reads the FIRST teacher.
               Every teacher scores the same images and tokens: teachers whose
               preprocessing or tokenizer differ from the first's are refused, naming what
               differs. Teachers run forward only, so open_clip models with timm towers
               (SigLIP, ConvNeXt, EVA) work; students are open_clip-native.
  sigmoid      --loss sigmoid: per pair, the binary cross-entropy of the student's
               s(a x.y + c) against the teachers' mean probability s(b x.y + c_t) (--loss-kind
               kl drops the teacher entropy, mobileclip is MobileCLIP's form), L_clip the
               SigLIP loss. c_t is the teacher's own logit_bias (SigLIP models have one);
               a softmax CLIP teacher has none: give --teacher-logit-bias. A student without
               a bias gets one: --set loss.init_logit_bias=-10 --set loss.init_logit_scale=2.3026
               (open_clip's SigLIP init, the defaults); checkpoints and the export keep it.
  CSV          --csv-separator defaults to the extension's: .csv comma, else tab (.tsv).
exit status: 0 done, 1 the loss became NaN/inf, 2 bad input, 130 stopped by SIGINT/SIGTERM
(after a checkpoint).
"""


class _Version(argparse.Action):
    """--version, with the versions of the stack (looked up only when asked)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print versions and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from importlib import metadata

        def version(package: str) -> str:
            try:
                return metadata.version(package)
            except metadata.PackageNotFoundError:
                return "not installed"

        stack = ", ".join(
            f"{name} {version(package)}"
            for name, package in (
                ("torch", "torch"),
                ("triton", "triton"),
                ("open_clip", "open_clip_torch"),
            )
        )
        print(f"tinyclip-distill {version('tinyclip-fast')} ({stack})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinyclip-distill",
        description="Distil a CLIP teacher into a small student by affinity mimicking and "
        "weight inheritance (TinyCLIP).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action=_Version)
    p.add_argument("--config", metavar="FILE", help="JSON or TOML config file (see --print-config)")
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override any config field, value parsed as JSON and checked against the "
        "field's type; repeatable. e.g. --set optim.betas=[0.9,0.98] --set "
        "stages.1.prune_step=5000 --set data.options.caption_key=caption",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as JSON and exit"
    )

    g = p.add_argument_group("teacher (frozen; the original model in every stage)")
    g.add_argument(
        "--teacher",
        metavar="NAME",
        action="append",
        help="open_clip model name (ViT-B-32), a path to an open_clip model-config "
        f"JSON, or 'demo' (the built-in demo teacher); repeat for an ensemble of up to "
        f"{MAX_TEACHERS} (weight inheritance reads the FIRST; see 'ensembles' below) "
        f"(default: {TeacherConfig.model})",
    )
    g.add_argument(
        "--pretrained",
        metavar="FILE|TAG",
        action="append",
        help="teacher weights: a local checkpoint file (offline) or an open_clip "
        "pretrained tag (downloads); with several --teacher, one per teacher, in order",
    )
    g.add_argument(
        "--teacher-logit-bias",
        metavar="B|own",
        action="append",
        help="--loss sigmoid: the bias of a teacher's probabilities s(b x.y + B), needed for "
        "a softmax CLIP teacher (e.g. -10); 'own': the teacher's own logit_bias (the "
        "default; SigLIP teachers have one); with several --teacher, one per teacher, in order",
    )
    g.add_argument(
        "--teacher-cache",
        metavar="FILE",
        help="cached teacher embeddings (safetensors): read them instead of running "
        "the teacher; needs map-style data without random augmentation, built on the same "
        "samples in the same order",
    )
    g.add_argument(
        "--build-teacher-cache",
        action="store_true",
        help="run the teacher once over the training data and exit: with --teacher-cache "
        "FILE, one embedding per sample of map-style data (no augmentation); without, the "
        "reinforced cache of --data webdataset:|csv:|folder: (K augmentations per image, every "
        "caption; see 'reinforced' below)",
    )
    g.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="reinforced cache files' folder, for building and for --data reinforced: "
        "(default: beside the shards / CSV / image folder)",
    )
    g.add_argument(
        "--cache-augmentations",
        type=int,
        metavar="K",
        help="reinforced cache: augmentations stored per image",
    )
    g.add_argument(
        "--cache-dtype",
        choices=CACHE_DTYPE_NAMES,
        help="reinforced cache: dtype of the stored embeddings",
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
        help="automatic inheritance: prune after K steps (default: at the end of the stage)",
    )
    g.add_argument(
        "--sparsity-warmup",
        type=int,
        metavar="W",
        help="steps over which the sparsity target ramps from 0 to S, at most the prune step "
        "(default: 1000, at most half the prune step)",
    )
    g.add_argument(
        "--from-scratch",
        action="store_true",
        default=None,
        help="random init with --preset/--student-config's architecture (baseline)",
    )
    g.add_argument("--steps", type=int, help="training steps of the stage")

    g = p.add_argument_group("data (required: name the data a run trains on)")
    g.add_argument(
        "--data",
        metavar="KIND[:PATH]",
        help="csv:FILE (CSV/TSV, open_clip columns filepath/title), "
        "webdataset:'a-{000..099}.tar', reinforced:PATH (a reinforced cache over those shards, "
        "CSV or folder:DIR), datacompdr:'shards/{00000..01000}.tar' (Apple's DataCompDR, "
        "images merged in), demo[:SOURCE], or synthetic (random pairs: throughput checks only)",
    )
    g.add_argument(
        "--data-size",
        type=int,
        metavar="N",
        help="synthetic: number of samples (10,000); webdataset: samples per epoch",
    )
    g.add_argument(
        "--csv-separator",
        metavar="SEP",
        help="CSV column separator (default: from the extension, .csv comma, else tab)",
    )
    g.add_argument(
        "--csv-img-key", metavar="COLUMN", help="CSV column of image paths (default: filepath)"
    )
    g.add_argument(
        "--csv-caption-key", metavar="COLUMN", help="CSV column of captions (default: title)"
    )
    g.add_argument(
        "--skip-bad-samples",
        action="store_true",
        default=None,
        help="skip unreadable samples (logged in --out-dir/bad_samples.jsonl) instead of "
        "stopping at the first",
    )
    g.add_argument(
        "--max-bad-fraction",
        type=float,
        metavar="F",
        help="with --skip-bad-samples: stop once more than F of the samples read were bad",
    )
    g.add_argument("--num-workers", type=int, help="data loader worker processes")

    g = p.add_argument_group("zero-shot evaluation")
    g.add_argument(
        "--eval",
        metavar="KIND[:PATH]",
        help="folder:DIR (one subfolder per class), csv:FILE (filepath,label; .csv comma, "
        "else tab), or demo",
    )
    g.add_argument(
        "--eval-every",
        type=int,
        metavar="K",
        help="evaluate every K steps, 0: off (default with --eval: 1000)",
    )
    g.add_argument("--eval-class-names", metavar="FILE", help="class names, one per line")
    g.add_argument(
        "--eval-templates",
        metavar="FILE",
        help="prompt templates with '{}', one per line (default 'a photo of a {}.')",
    )

    g = p.add_argument_group("loss: (1 - w) L_dist + w L_clip")
    g.add_argument(
        "--loss",
        choices=LOSS_FAMILIES,
        help="softmax: TinyCLIP's affinity mimicking and the CLIP loss; sigmoid: per-pair "
        "binary cross-entropy against the teachers' sigmoid probabilities and the SigLIP "
        "loss, the student learning a logit bias (see 'sigmoid' below)",
    )
    g.add_argument(
        "--contrastive-weight",
        type=float,
        metavar="W",
        help="w in [0, 1]: the CLIP loss's share (0: pure affinity mimicking, TinyCLIP's; "
        "0.5: open_clip's 1:1 sum at half the scale)",
    )
    g.add_argument(
        "--loss-kind",
        choices=LOSS_KINDS,
        help="soft_ce (TinyCLIP/open_clip values; sigmoid: the binary cross-entropy) or kl "
        "(same gradient); sigmoid only: mobileclip (MobileCLIP's -log s((2p - 1) A))",
    )
    g.add_argument(
        "--fixed-scale",
        type=float,
        metavar="S",
        help="fix both logit scales to S > 0 (the authors use 50); default: learnable "
        "student scale clamped to <= 100, teacher keeps its own",
    )

    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--warmup-steps", type=int, help="linear warmup before the cosine")
    g.add_argument(
        "--prune-warmup-steps",
        type=int,
        help="auto stages: the rate ramps up again over this many steps after pruning (at most "
        "a quarter of the steps left); the optimizer's moments carry over to the pruned student",
    )
    g.add_argument(
        "--mask-lr",
        type=float,
        help="auto stages: AdamW rate of the masks' log_alpha (which start at 10); with the "
        "default rates the masks reach the target in 200 or more steps before --prune-step "
        "(demo teacher: 51%% of a 50%% target at 200 steps, 3%% at 100); tens of steps need "
        "about 0.25 and --lagrangian-lr 0.05",
    )
    g.add_argument(
        "--lagrangian-lr",
        type=float,
        help="auto stages: rate of the sparsity Lagrangian's multipliers (gradient ascent)",
    )
    g.add_argument("--weight-decay", type=float, help="on >= 2-D weights only")
    g.add_argument("--grad-clip", type=float, help="max global grad norm, 0 = off")
    g.add_argument("--batch-size", type=int, help="global batch over all ranks")
    g.add_argument(
        "--micro-batch-size",
        type=int,
        help="per-rank micro-batch: exact gradient accumulation (GradCache)",
    )
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="autocast dtype; fp16 adds a GradScaler (default: bf16 on CUDA, fp16 where bf16 "
        "is unsupported; fp32 on the CPU)",
    )
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the student")
    g.add_argument("--attention", choices=ATTENTIONS, help="xformers: CUDA, must be installed")
    g.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    g.add_argument("--seed", type=int, help="seed of the data order and initialisation")

    g = p.add_argument_group("run")
    g.add_argument("--out-dir", metavar="DIR", help="checkpoint, metrics and student export")
    g.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue the run in --out-dir from its checkpoint.pt (more --steps in the last "
        "stage extend a finished run)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="replace another run's files in --out-dir (checkpoint, metrics, student)",
    )
    g.add_argument("--log-every", type=int, metavar="K", help="log metrics every K steps")
    g.add_argument(
        "--save-every", type=int, metavar="K", help="checkpoint every K steps (and at stage ends)"
    )
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    _show_defaults(p)
    return p


_FLAT = {  # flag -> config path
    "teacher_cache": "teacher.cache",
    "cache_dir": "reinforced.cache_dir",
    "cache_augmentations": "reinforced.augmentations",
    "cache_dtype": "reinforced.dtype",
    "data_size": "data.size",
    "skip_bad_samples": "data.skip_bad_samples",
    "max_bad_fraction": "data.max_bad_fraction",
    "num_workers": "num_workers",
    "eval_every": "eval.every",
    "eval_class_names": "eval.class_names",
    "eval_templates": "eval.templates",
    "loss": "loss.family",
    "contrastive_weight": "loss.contrastive_weight",
    "loss_kind": "loss.kind",
    "fixed_scale": "loss.fixed_scale",
    "lr": "optim.lr",
    "warmup_steps": "optim.warmup_steps",
    "prune_warmup_steps": "optim.prune_warmup_steps",
    "mask_lr": "optim.mask_lr",
    "lagrangian_lr": "optim.lagrangian_lr",
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
    "overwrite": "overwrite",
    "log_every": "log_every",
    "save_every": "save_every",
}
_CSV_OPTIONS = {  # flag -> data.options key (open_clip's names)
    "csv_separator": "csv_separator",
    "csv_img_key": "csv_img_key",
    "csv_caption_key": "csv_caption_key",
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


def _get_path(config: Any, path: str) -> Any:
    for part in path.split("."):
        config = getattr(config, part)
    return config


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append '(default: X)' from the config dataclasses to the flags' help texts."""
    defaults, stage = DistillConfig(), StageConfig()
    for action in parser._actions:
        if action.dest in _FLAT:
            value = _get_path(defaults, _FLAT[action.dest])
        elif action.dest in _STAGE_FLAGS:
            value = getattr(stage, action.dest)
        else:
            continue
        if value is not None and value is not False and "(default" not in (action.help or ""):
            action.help = f"{action.help} (default: {value})"


def _set_path(config: DistillConfig, path: str, value: Any) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get_path(config, parent) if parent else config, name, value)


def _kind_and_path(value: str, flag: str) -> tuple[str, str | None]:
    """``KIND:PATH`` -> (kind, path); a bare path is an error suggesting its kind."""
    kind, sep, path = value.partition(":")
    if not sep and ("/" in value or Path(value).suffix):
        suffix = Path(value).suffix.lower()
        if flag == "--data":
            guess = "webdataset" if suffix == ".tar" or "{" in value else "csv"
        else:
            guess = "csv" if suffix in (".csv", ".tsv") else "folder"
        raise ValueError(f"{flag} {value}: name the kind first, e.g. {flag} {guess}:{value}")
    return kind, (path if sep else None)


def _edit_stage(config: DistillConfig, args: argparse.Namespace) -> None:
    given = {k: getattr(args, k) for k in _STAGE_FLAGS if getattr(args, k) is not None}
    if not given:
        return
    if len(config.stages) != 1:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in given)
        raise ValueError(
            f"{flags} edit single-stage runs; this config has {len(config.stages)} stages: "
            "use --set stages.N.KEY=VALUE"
        )
    stage = config.stages[0]
    if {"preset", "student_config", "sparsity", "from_scratch"} & given.keys():
        stage = StageConfig(steps=stage.steps)  # a new student: drop the old way to build it
    if "student_config" in given:
        path = Path(given.pop("student_config"))
        if not path.is_file():
            raise FileNotFoundError(f"--student-config {path} does not exist")
        try:
            stage.student_config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"--student-config {path} is not valid JSON: {err}") from None
    for key, value in given.items():
        setattr(stage, key, value)
    config.stages[0] = stage


def _set_teachers(config: DistillConfig, args: argparse.Namespace) -> None:
    """--teacher (repeated: an ensemble), each with its --pretrained and --teacher-logit-bias
    paired in order; one --teacher replaces the config's teacher(s)."""
    models = args.teacher or []
    if len(models) > MAX_TEACHERS:
        raise ValueError(f"{len(models)} --teacher given; an ensemble has at most {MAX_TEACHERS}")
    if len(models) == 1:
        config.teacher.model, config.teachers = models[0], []
    elif models:
        config.teacher = TeacherConfig(cache=config.teacher.cache)
        config.teachers = [TeacherConfig(model=name) for name in models]
    entries = config.teacher_configs()
    for flag, values, field, parse in (
        ("--pretrained", args.pretrained, "pretrained", str),
        ("--teacher-logit-bias", args.teacher_logit_bias, "logit_bias", _parse_bias),
    ):
        if not values:
            continue
        if len(entries) == 1:
            values = values[-1:]  # one teacher: the last one given wins, as for other flags
        elif len(values) != len(entries):
            names = ", ".join(e.model for e in entries)
            raise ValueError(
                f"{len(values)} {flag} for {len(entries)} teachers ({names}): give one "
                f"{flag} per --teacher, in the same order"
            )
        for entry, value in zip(entries, values, strict=True):
            setattr(entry, field, parse(value))


def _parse_bias(value: str) -> float | None:
    if value == "own":
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(
            f"--teacher-logit-bias {value}: give a number or 'own' (the teacher's own bias)"
        ) from None


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """Defaults < --config < flags < --set."""
    config = load_config(args.config)
    _set_teachers(config, args)
    for flag, path in _FLAT.items():
        value = getattr(args, flag)
        if value is not None:
            _set_path(config, path, value)
    for flag, key in _CSV_OPTIONS.items():
        if getattr(args, flag) is not None:
            config.data.options[key] = getattr(args, flag)
    if args.no_progress:
        config.progress = False
    if args.data is not None:
        config.data.kind, config.data.path = _kind_and_path(args.data, "--data")
    if args.eval is not None:
        config.eval.kind, config.eval.path = _kind_and_path(args.eval, "--eval")
        if config.eval.every == 0 and args.eval_every is None:
            config.eval.every = 1000
    _edit_stage(config, args)
    for assignment in args.set:
        apply_override(config, assignment)
    config.validate(student=not args.build_teacher_cache)
    return config


def _build_teacher_cache(config: DistillConfig, rank: int) -> None:
    from tinyclip_fast.data.datasets import build_dataset
    from tinyclip_fast.train.engine import dataset_defaults
    from tinyclip_fast.train.runtime import resolve_device
    from tinyclip_fast.train.teacher_cache import TeacherEmbeddingCache
    from tinyclip_fast.train.teachers import build_teachers

    device = resolve_device(config.device)
    teachers, tokenizer, _, eval_preprocess = build_teachers(config.teacher_configs())
    data_cfg = {**dataset_defaults(teachers[0], config.seed), **config.data.as_dict()}
    dataset = build_dataset(data_cfg, preprocess=eval_preprocess, tokenizer=tokenizer)
    cache = TeacherEmbeddingCache.build(
        [teacher.to(device) for teacher in teachers],
        dataset,
        config.teacher.cache,
        batch_size=config.micro_batch_size or 256,
        device=device,
    )
    if rank == 0:
        dims = ", ".join(map(str, cache.dims))
        print(
            f"wrote {len(cache)} teacher embeddings (dim {dims}) of {cache.teachers} teacher(s) "
            f"to {config.teacher.cache}"
        )


def _build_reinforced_cache(config: DistillConfig) -> None:
    from tinyclip_fast.train.reinforced_run import build_cache_for_run

    report, rank, world_size = build_cache_for_run(config)
    if rank == 0:
        where = config.reinforced.cache_dir or "beside the data"
        print(
            f"reinforced cache ({where}): rank 0 of {world_size} built {len(report.built)} "
            f"shard files ({report.images} images, {report.images_per_s:.1f} images/s), "
            f"{len(report.skipped)} were already built; train with --data "
            f"reinforced:{config.data.path}",
            flush=True,
        )


def _line(message: str, rank: int, label: str = "error") -> None:
    """``tinyclip-distill: [rank r] label: message`` as ONE write to stderr: the lines of
    ranks failing at once never run together."""
    where = f"[rank {rank}] " if rank else ""
    line = f"tinyclip-distill: {where}{label}: {' '.join(str(message).split())}\n"
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), line.encode())
    except (AttributeError, OSError, ValueError):  # stderr is no file (captured, replaced)
        sys.stderr.write(line)


def main(argv: list[str] | None = None) -> int:
    """Run ``tinyclip-distill``; returns the exit status: 0 done, 2 bad input, 1 the loss
    became NaN/inf, 130 SIGINT/SIGTERM stopped the run (after saving a checkpoint)."""
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        warnings.simplefilter("ignore")  # rank 0 says what there is to say
    try:
        return _run(args, rank)
    except BrokenPipeError:
        # `tinyclip-distill --print-config | head`: the reader has what it wanted.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run(args: argparse.Namespace, rank: int) -> int:
    try:
        config = config_from_args(args)
        if not args.print_config:
            config.data.require()
            if not (config.resume or args.build_teacher_cache):
                check_run_folder(config.out_dir, config.overwrite)  # the engine clears it
    except (ValueError, TypeError, FileNotFoundError) as err:
        if rank == 0:  # every rank read the same configuration
            _line(err, rank)
        return 2
    if args.print_config:
        if rank == 0:
            print(json.dumps(config.to_dict(), indent=2), flush=True)
        return 0

    from tinyclip_fast.data.datasets import check_kind
    from tinyclip_fast.data.loader import BadSampleError
    from tinyclip_fast.demo.plugins import register_demo
    from tinyclip_fast.train.evaluation import check_eval_kind
    from tinyclip_fast.train.reinforced_run import register_reinforced_kinds
    from tinyclip_fast.train.runtime import check_device

    register_demo()
    register_reinforced_kinds()
    reinforced_build = args.build_teacher_cache and config.teacher.cache is None
    try:
        if not reinforced_build:  # that reads source kinds (folder) that do not train
            check_kind(config.data.kind)
        if config.eval.every:
            check_eval_kind(config.eval.kind)
        check_device(config.device)
        from tinyclip_fast.train.engine import distill  # open_clip: seconds to import

        if reinforced_build:
            _build_reinforced_cache(config)
            return 0
        if args.build_teacher_cache:
            _build_teacher_cache(config, rank)
            return 0
        result = distill(config)
    except BadSampleError as err:
        hint = "; --skip-bad-samples skips and logs them"
        if args.build_teacher_cache:
            hint = "; a teacher cache needs every sample: fix the file or drop its row"
        elif config.data.skip_bad_samples:
            hint = ""
        _line(f"{err}{hint}", rank)
        return 2
    except (ValueError, TypeError, OSError, ImportError) as err:
        _line(err, rank)
        return 2
    except FloatingPointError as err:
        _line(err, rank, "stopped")
        return 1
    if result.interrupted:
        if rank == 0:
            _line("run again with --resume to continue", rank, "interrupted")
        return 130  # the shell's code for "stopped by a signal", so job schedulers requeue
    if rank == 0:
        student = Path(config.out_dir) / "student"
        print(f"done: student with {result.params:,} parameters in {student}", flush=True)
    return 0
