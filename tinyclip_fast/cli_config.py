"""The command line's values into one :class:`DistillConfig`: the config file, then each flag
into its own field (typed and checked as ``--set`` values are), then ``--set``.

The flags are the settings that declare one (train/config.py); ``--data``/``--eval``
(``KIND:PATH``), ``--teacher``/``--pretrained`` (repeatable, paired in order) and
``--student-config`` (a JSON file) are read here. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from tinyclip_fast.train.config import (
    MAX_TEACHERS,
    DistillConfig,
    StageConfig,
    TeacherConfig,
    apply_override,
    load_config,
)
from tinyclip_fast.train.config_io import Setting, settings, show

PAIRED_FLAGS = ("--teacher", "--pretrained")  # repeatable: one --pretrained per --teacher


def flag_settings() -> dict[str, Setting]:
    """The settings that have a flag, by flag (``--teacher`` is ``teacher.model``)."""
    found: dict[str, Setting] = {}
    for entry in settings(DistillConfig):
        if entry.flag and entry.flag not in found:
            found[entry.flag] = entry
    return found


def dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


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


def _set_flag(config: DistillConfig, path: str, flag: str, value: Any) -> None:
    """One flag's value into its field, typed and checked as ``--set`` values are."""
    raw = "true" if value is True else str(value)
    apply_override(config, f"{path}={raw}", where=flag if value is True else f"{flag} {value}")


def _set_teachers(config: DistillConfig, args: argparse.Namespace) -> None:
    """--teacher (repeated: an ensemble), each with its --pretrained paired in order; one
    --teacher replaces the config's teacher(s)."""
    models = args.teacher or []
    if len(models) > MAX_TEACHERS:
        raise ValueError(f"{len(models)} --teacher given; an ensemble has at most {MAX_TEACHERS}")
    if len(models) == 1:
        config.teacher.model, config.teachers = models[0], []
    elif models:
        config.teacher = TeacherConfig(cache=config.teacher.cache)
        config.teachers = [TeacherConfig(model=name) for name in models]
    values = args.pretrained
    if not values:
        return
    entries = config.teacher_configs()
    if len(entries) == 1:
        values = values[-1:]  # one teacher: the last one given wins, as for other flags
    elif len(values) != len(entries):
        names = ", ".join(e.model for e in entries)
        raise ValueError(
            f"{len(values)} --pretrained for {len(entries)} teachers ({names}): give one "
            "--pretrained per --teacher, in the same order"
        )
    for entry, value in zip(entries, values, strict=True):
        entry.pretrained = value


def _read_student_config(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--student-config {path} does not exist")
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--student-config {path} is not valid JSON: {err}") from None


def _edit_stage(config: DistillConfig, given: dict[str, tuple[str, Any]]) -> StageConfig:
    """The stage flags (field -> (flag, value)) into stage 0, each into its own field;
    returns stage 0 as it was before them."""
    if len(config.stages) != 1:
        flags = ", ".join(flag for flag, _ in given.values())
        raise ValueError(
            f"{flags} edit single-stage runs; this config has {len(config.stages)} stages: "
            "use --set stages.N.KEY=VALUE"
        )
    before = copy.deepcopy(config.stages[0])
    for name, (flag, value) in given.items():
        if name == "student_config":
            config.stages[0].student_config = _read_student_config(value)
        else:
            _set_flag(config, f"stages.0.{name}", flag, value)
    return before


def _check_stage_flags(
    stage: StageConfig, before: StageConfig, given: dict[str, tuple[str, Any]], source: str
) -> None:
    """A stage flag that cannot hold beside fields the config file set is refused naming
    both: the fewest of the file's fields whose reset makes the stage valid."""
    try:
        stage.validate(0)
    except ValueError as err:
        kept = [
            f
            for f in fields(StageConfig)
            if f.name not in given
            and getattr(stage, f.name) != f.default
            and getattr(stage, f.name) == getattr(before, f.name)
        ]
        trial = copy.deepcopy(stage)
        for f in kept:
            setattr(trial, f.name, f.default)
        if not _valid(trial):
            raise
        blocking = []
        for f in kept:  # keep each file field that the flags can stand beside
            setattr(trial, f.name, getattr(stage, f.name))
            if not _valid(trial):
                setattr(trial, f.name, f.default)
                blocking.append(f)
        flags = " ".join(flag if v is True else f"{flag} {v}" for flag, v in given.values())
        named = ", ".join(f"stages[0].{f.name} = {show(getattr(stage, f.name))}" for f in blocking)
        unset = " ".join(f"--set stages.0.{f.name}={show(f.default)}" for f in blocking)
        raise ValueError(
            f"{flags} cannot hold beside {named} from {source} ({err}): drop the flag or {unset}"
        ) from None


def _valid(stage: StageConfig) -> bool:
    try:
        stage.validate(0)
    except ValueError:
        return False
    return True


def _check_builds(config: DistillConfig, args: argparse.Namespace) -> None:
    if args.build_teacher_cache and args.build_reinforced_cache:
        raise ValueError(
            "--build-teacher-cache and --build-reinforced-cache build different caches: give one"
        )
    if args.build_teacher_cache and config.teacher.cache is None:
        raise ValueError(
            "--build-teacher-cache writes the per-sample embedding cache named by "
            "--teacher-cache FILE, and none is given; the reinforced cache of --data is "
            "--build-reinforced-cache"
        )
    if args.build_reinforced_cache and config.teacher.cache is not None:
        raise ValueError(
            f"--build-reinforced-cache writes reinforced data beside --data, and --teacher-cache "
            f"{config.teacher.cache} names the per-sample cache of --build-teacher-cache: "
            "give one of them"
        )


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """Defaults < --config < flags < --set."""
    config = load_config(args.config)
    _set_teachers(config, args)
    stage_flags: dict[str, tuple[str, Any]] = {}
    for flag, entry in flag_settings().items():
        value = getattr(args, dest(flag))
        if value is None or flag in PAIRED_FLAGS:
            continue
        if entry.path.startswith("stages.N."):
            stage_flags[entry.path.removeprefix("stages.N.")] = (flag, value)
        else:
            _set_flag(config, entry.path, flag, value)
    if args.data is not None:
        config.data.kind, config.data.path = _kind_and_path(args.data, "--data")
    if args.eval is not None:
        config.eval.kind, config.eval.path = _kind_and_path(args.eval, "--eval")
    before = _edit_stage(config, stage_flags) if stage_flags else None
    for assignment in args.set:
        apply_override(config, assignment)
    if before is not None and config.stages:
        source = f"--config {args.config}" if args.config else "the defaults"
        _check_stage_flags(config.stages[0], before, stage_flags, source)
    _check_builds(config, args)
    config.eval.require_set()
    config.validate(student=not (args.build_teacher_cache or args.build_reinforced_cache))
    return config
