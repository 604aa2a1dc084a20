"""``tinyclip-distill``: distil an open_clip teacher into a TinyCLIP student from the shell.

Precedence: the config dataclasses' defaults < ``--config FILE`` (JSON/TOML) < the flags <
``--set key.sub=value``. The flags are generated from the dataclass fields that declare one
(train/config.py); every other field is reached with ``--set``, and ``--help`` lists them
all. A flag sets its own field and nothing else. Under torchrun every rank runs this same
command; rank 0 alone prints, except errors, which every rank writes as one line of its own.
The rules of a run are in docs/cli.md.

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

from tinyclip_fast.cli_config import PAIRED_FLAGS, config_from_args, dest, flag_settings
from tinyclip_fast.data.options import DATA_OPTIONS, check_data_options
from tinyclip_fast.train.config import DistillConfig, EvalConfig
from tinyclip_fast.train.config_io import settings, settings_text, show
from tinyclip_fast.train.run_folder import STUDENT_DIR, check_run_folder
from tinyclip_fast.train.run_lock import check_unlocked

EPILOG = """\
examples:
  # manual inheritance, one stage, CSV data, zero-shot evaluation every 500 steps
  tinyclip-distill --teacher ViT-B-32 --pretrained ./vit_b32_laion2b_e16.pt \\
      --preset ViT-40M-32-Text-19M --steps 20000 --data csv:train.csv \\
      --eval folder:imagenet_val/ --set eval.every=500 --out-dir runs/manual
  # automatic inheritance to 50% sparsity, pruned after 5000 steps, bad samples skipped
  tinyclip-distill --teacher ViT-B-32 --pretrained ./vit_b32.pt --sparsity 0.5 \\
      --prune-step 5000 --steps 10000 --data webdataset:'shards/{00000..00999}.tar' \\
      --set data.size=10000000 --set data.skip_bad_samples=true
  # multi-stage progressive distillation from a config file; continue after a stop
  tinyclip-distill --config progressive.toml
  tinyclip-distill --config progressive.toml --resume
  # 8 GPUs: batch 32768 in micro-batches of 256 (exact gradient accumulation)
  torchrun --nproc_per_node 8 -m tinyclip_fast --config run.toml \\
      --batch-size 32768 --micro-batch-size 256
  # reinforced data: the teacher once over 5 augmentations of every image, then training
  # from the stored embeddings without a teacher forward
  tinyclip-distill --teacher ViT-B-32 --pretrained ./vit_b32.pt --build-reinforced-cache \\
      --data webdataset:'shards/{00000..00999}.tar' --set reinforced.augmentations=5
  tinyclip-distill --teacher ViT-B-32 --pretrained ./vit_b32.pt --sparsity 0.5 \\
      --steps 10000 --data reinforced:'shards/{00000..00999}.tar'
  # print the resolved configuration (a template for --config) and exit
  tinyclip-distill --preset ViT-8M-16-Text-3M --print-config

The run folder, precision, bad data, the caches, reinforced data, ensembles, sigmoid
distillation, data options, locking, resume and the exit status (0 done, 1 the loss became
NaN/inf, 2 bad input, 3 a file could not be written, 130 stopped): docs/cli.md.
"""

_GROUPS = {  # a flag's group in --help, by the first part of its setting's path
    "teacher": "teacher (frozen; the original model in every stage)",
    "stages": "student (stage 0 of a one-stage run; more stages: --set stages.N.KEY=VALUE)",
}
_RUN_GROUP = "run"


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
        help="set any setting listed below, the value parsed as JSON and checked against the "
        "setting's type; repeatable, applied last. e.g. --set optim.betas=[0.9,0.98] --set "
        "stages.1.prune_step=5000 --set data.options.csv_caption_key=caption",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as JSON and exit"
    )
    groups = {title: p.add_argument_group(title) for title in (*_GROUPS.values(), _RUN_GROUP)}
    run = groups[_RUN_GROUP]
    run.add_argument(
        "--data",
        metavar="KIND[:PATH]",
        help="the training data (required): csv:FILE (CSV/TSV, open_clip columns "
        "filepath/title), webdataset:'a-{000..099}.tar', reinforced:PATH (a reinforced cache "
        "over those shards, CSV or folder:DIR), datacompdr:'shards/{00000..01000}.tar' "
        "(Apple's DataCompDR, images merged in), demo[:SOURCE], or synthetic (random pairs: "
        "throughput checks only)",
    )
    run.add_argument(
        "--eval",
        metavar="KIND[:PATH]",
        help=f"evaluation every eval.every steps (default: {EvalConfig().every}) "
        "and after each stage: folder:DIR (one subfolder per class), csv:FILE (filepath,label; "
        ".csv comma, else tab), retrieval:FILE (filepath,title pairs: image-text recall@1/5/10), "
        "or demo",
    )
    for flag, entry in flag_settings().items():
        group = groups[_GROUPS.get(entry.path.split(".")[0], _RUN_GROUP)]
        text = entry.help
        if entry.default is not None and entry.default is not False:
            text += f" (default: {show(entry.default)})"
        path = entry.path.replace(".N.", ".0.")
        kwargs: dict[str, Any] = {"dest": dest(flag), "help": f"{text} [{path}]"}
        if entry.hint is bool:
            kwargs.update(action="store_true", default=None)
        else:
            kwargs["metavar"] = entry.metavar or ("N" if entry.hint is int else dest(flag).upper())
        if flag in PAIRED_FLAGS:
            kwargs["action"] = "append"
        group.add_argument(flag, **kwargs)
    g = p.add_argument_group("cache builds (build, then exit)")
    g.add_argument(
        "--build-teacher-cache",
        action="store_true",
        help="run the teachers once over map-style --data (no augmentation) and write one "
        "embedding per sample to --teacher-cache FILE",
    )
    g.add_argument(
        "--build-reinforced-cache",
        action="store_true",
        help="run the teachers once over --data webdataset:|csv:|folder: and write reinforced "
        "data (K augmentations per image, every caption) beside it or in "
        "reinforced.cache_dir, for training with --data reinforced:PATH",
    )
    p.add_argument_group(
        "settings (--set KEY=VALUE; N: an index into stages or teachers)",
        description=settings_text(DistillConfig),
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; an unknown option that names a setting says how to set it."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{_suggest(unknown)}")
    return args


def _suggest(unknown: list[str]) -> str:
    options = [arg[2:].split("=")[0].replace("-", "_") for arg in unknown if arg.startswith("--")]
    for entry in settings(DistillConfig):
        spelled = entry.path.replace(".N.", ".").replace(".", "_")
        for name in options:
            if name in (spelled, entry.path.rsplit(".", 1)[-1]):
                return f" (a setting: --set {entry.path}=VALUE)"
    return ""


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
    """Run ``tinyclip-distill``; returns the exit status: 0 done, 1 the loss became NaN/inf,
    2 bad input (configuration, data, a run folder another run holds), 3 a file could not be
    written (disk full, quota, permissions: the previous file is intact), 130 SIGINT/SIGTERM
    stopped the run (after saving a checkpoint) or Ctrl-C stopped a cache build."""
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        warnings.simplefilter("ignore")  # rank 0 says what there is to say
    try:
        return _run(args, rank)
    except BrokenPipeError:
        # `tinyclip-distill --print-config | head`: the reader has what it wanted.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:  # Ctrl-C outside training (which stops at a step, saved)
        if rank == 0:
            _line(f"stopped by Ctrl-C; {_after_interrupt(args)}", rank, "interrupted")
        return 130


def _after_interrupt(args: argparse.Namespace) -> str:
    if args.build_reinforced_cache:
        return "the shard files already built are kept: run the command again to build the rest"
    if args.build_teacher_cache:
        return "no cache was written: run the command again to build it"
    return "outside the training steps: run again, with --resume when the run has a checkpoint"


def _builds(args: argparse.Namespace) -> bool:
    return bool(args.build_teacher_cache or args.build_reinforced_cache)


def _run(args: argparse.Namespace, rank: int) -> int:
    try:
        config = config_from_args(args)
        if not args.print_config:
            config.data.require()
            if config.data.kind in DATA_OPTIONS:  # registered kinds: once registered, below
                check_data_options(config.data.kind, config.data.options)
            if not _builds(args):
                check_unlocked(config.out_dir)
            if not (config.resume or _builds(args)):
                check_run_folder(config.out_dir, config.overwrite)  # the engine clears it
    except (ValueError, TypeError, OSError) as err:
        if rank == 0:  # every rank read the same configuration
            _line(err, rank)
        return 2
    if args.print_config:
        if rank == 0:
            print(json.dumps(config.to_dict(), indent=2), flush=True)
        return 0

    from tinyclip_fast.atomic_io import WriteError
    from tinyclip_fast.data.datasets import check_kind
    from tinyclip_fast.data.loader import BadSampleError, check_batch_settings
    from tinyclip_fast.demo.plugins import register_demo
    from tinyclip_fast.teachers.reinforced_targets import register_reinforced_kinds
    from tinyclip_fast.train.evaluation import check_eval_kind
    from tinyclip_fast.train.runtime import check_device

    register_demo()
    register_reinforced_kinds()
    try:
        if not args.build_reinforced_cache:  # that reads source kinds (folder) that do not train
            check_kind(config.data.kind)
            check_data_options(config.data.kind, config.data.options)
        if not _builds(args):
            check_batch_settings(config.batch_size, int(os.environ.get("WORLD_SIZE", "1")))
        if config.eval.enabled:
            check_eval_kind(config.eval.kind)
        check_device(config.device)
        from tinyclip_fast.train.cache_builds import build_embedding_cache, build_reinforced_cache
        from tinyclip_fast.train.engine import distill  # open_clip: seconds to import

        if _builds(args):
            build = build_reinforced_cache if args.build_reinforced_cache else build_embedding_cache
            report = build(config)
            if rank == 0:
                print(report.line, flush=True)
            return 0
        result = distill(config)
    except BadSampleError as err:
        hint = "; --set data.skip_bad_samples=true skips and logs them"
        if _builds(args):
            hint = "; a teacher cache needs every sample: fix the file or drop its row"
        elif config.data.skip_bad_samples:
            hint = ""
        _line(f"{err}{hint}", rank)
        return 2
    except WriteError as err:
        _line(err, rank)
        return 3
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
        print(_done_line(Path(config.out_dir) / STUDENT_DIR, result.params), flush=True)
    return 0


def _done_line(student: Path, params: int) -> str:
    """The end of a run: where the student is and what loads it."""
    from tinyclip_fast.inheritance.student_io import CONFIG_NAME

    uniform = json.loads((student / CONFIG_NAME).read_text()).get("open_clip_compatible")
    if uniform:
        how = (
            f"open_clip.create_model('local-dir:{student}') loads it; "
            "tinyclip_fast.inheritance.hf.save_hf_clip(model, DIR) exports it for transformers"
        )
    else:
        how = (
            f"tinyclip_fast.load_student('{student}') loads it (its layers have their own "
            "widths, which open_clip's local-dir: cannot build)"
        )
    return f"done: student with {params:,} parameters in {student}; {how}"
