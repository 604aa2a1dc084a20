"""Typed settings: dataclass fields that carry their own help, read from a file or ``--set``.

A setting is a dataclass field declared with :func:`setting`: its default, help text, allowed
values and, for the options people type, its command-line flag live there and nowhere else.
The command line's flags, ``--help``'s settings list and the table in docs/cli.md are
generated from them (:func:`settings`). Values are checked against the declared type when
they are read; ranges and allowed values by the configuration's ``validate()``. Plain Python:
nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import textwrap
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

# Keys that were removed, with what to write instead.
_REMOVED = {
    "loss.distill_weight": "the loss is (1 - contrastive_weight) L_dist + contrastive_weight "
    "L_clip; open_clip's 1:1 sum is contrastive_weight = 0.5 (half the scale, the same AdamW "
    "steps)",
}


def setting(
    default: Any = MISSING,
    *,
    help: str,  # noqa: A002 - argparse's name for it
    flag: str | bool = False,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    default_factory: Any = MISSING,
) -> Any:
    """A dataclass field with its help text; ``flag``: True (``--field-name``) or the flag's
    spelling gives it a command-line option, ``choices`` its allowed values."""
    metadata = {"help": help, "flag": flag, "metavar": metavar, "choices": choices}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Setting:
    """One leaf field, by its ``--set`` path (``optim.lr``, ``stages.N.steps``)."""

    path: str
    field: Field
    hint: Any
    default: Any

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", "")

    @property
    def choices(self) -> tuple[str, ...] | None:
        return self.field.metadata.get("choices")

    @property
    def flag(self) -> str | None:
        flag = self.field.metadata.get("flag")
        if flag is True:
            return "--" + self.field.name.replace("_", "-")
        return flag or None

    @property
    def metavar(self) -> str | None:
        if self.choices:
            return "{" + ",".join(self.choices) + "}"
        return self.field.metadata.get("metavar")


def settings(cls: type, prefix: str = "") -> list[Setting]:
    """Every leaf field of dataclass ``cls`` with its default, tables and lists walked into
    (a list of dataclasses as ``name.N``)."""
    hints = typing.get_type_hints(cls)
    found: list[Setting] = []
    for f in fields(cls):
        hint, path = hints[f.name], f"{prefix}{f.name}"
        entry = _list_entry(hint)
        if is_dataclass(hint):
            found += settings(hint, f"{path}.")
        elif entry is not None:
            found += settings(entry, f"{path}.N.")
        else:
            default = f.default_factory() if f.default is MISSING else f.default
            found.append(Setting(path, f, hint, default))
    return found


def _list_entry(hint: Any) -> type | None:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list and args and is_dataclass(args[0]):
        return args[0]
    return None


def show(value: Any) -> str:
    """A value as ``--set`` takes it (JSON, strings bare)."""
    return value if isinstance(value, str) else json.dumps(value)


def settings_text(cls: type, width: int = 84) -> str:
    """``--help``'s list of every setting: path, default, help (a help text met before, as
    in ``teachers.N`` after ``teacher``, by reference)."""
    lines, seen = [], {}
    for s in settings(cls):
        head = f"{s.path} (default: {show(s.default)})" + (f" {s.metavar}" if s.choices else "")
        if s.help in seen:
            lines.append(f"{head}: as {seen[s.help]}")
            continue
        seen[s.help] = s.path
        lines += [
            head,
            *textwrap.wrap(
                s.help,
                width,
                initial_indent="    ",
                subsequent_indent="    ",
                break_on_hyphens=False,
            ),
        ]
    return "\n".join(lines)


def settings_markdown(cls: type) -> str:
    """docs/cli.md's table of every setting."""
    rows, seen = ["| key | default | meaning |", "| --- | --- | --- |"], {}
    for s in settings(cls):
        meaning = s.help + (f" One of {', '.join(s.choices)}." if s.choices else "")
        key = f"`{s.path}`" + (f" (`{s.flag}`)" if s.flag and s.help not in seen else "")
        if s.help in seen:
            meaning = f"as `{seen[s.help]}`"
        seen.setdefault(s.help, s.path)
        rows.append(f"| {key} | `{show(s.default)}` | {meaning.replace('|', '/')} |")
    return "\n".join(rows)


def check_choices(config: Any, where: str = "") -> None:
    """Every field declared with ``choices`` holds one of them (or null where allowed)."""
    for f in fields(config):
        value, name = getattr(config, f.name), f"{where}{f.name}"
        if is_dataclass(value):
            check_choices(value, f"{name}.")
        elif isinstance(value, list):
            for i, entry in enumerate(value):
                if is_dataclass(entry):
                    check_choices(entry, f"{name}[{i}].")
        elif f.metadata.get("choices") and value is not None:
            if value not in f.metadata["choices"]:
                raise ValueError(f"{name} must be one of {f.metadata['choices']}, got {value!r}")


def check_range(
    name: str, value: float, low: float, high: float, closed_above: bool = True
) -> None:
    inside = low <= value <= high if closed_above else low <= value < high
    if not (math.isfinite(value) and inside):
        bracket = "]" if closed_above else ")"
        upper = "inf)" if high == math.inf else f"{high}{bracket}"
        raise ValueError(f"{name} must be in [{low}, {upper}, got {value}")


def check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


# ---------------------------------------------------------------------------------------------
# Reading values: a config file and --set, checked against the declared field types.


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is tuple:
        return f"a list of {len(args)} {_describe(args[0]).removeprefix('a ')}s"
    if origin is list:
        return "a list"
    if origin is dict or is_dataclass(hint):
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, str(hint)
    )


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the type ``hint`` declares; TypeError naming ``where`` and the type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where)
            except TypeError:
                continue
    elif is_dataclass(hint):
        return from_dict(hint, value, where)
    elif _list_entry(hint) is not None:
        if isinstance(value, list):
            return [from_dict(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(
                coerce(v, a, f"{where}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
    elif origin is dict:
        if isinstance(value, dict):
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise TypeError(f"{where} must be {_describe(hint)}, got {value!r}")


def from_dict(cls: type, values: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys and values of the wrong type
    are errors naming the key."""
    if not isinstance(values, dict):
        raise TypeError(f"{where} must be a table/object, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{where}.{key}"
        if key not in known:
            removed = _REMOVED.get(dotted.removeprefix("config."))
            if removed:
                raise ValueError(f"{dotted} no longer exists: {removed}")
            raise ValueError(f"unknown key {dotted}; known: {sorted(known)}")
        kwargs[key] = coerce(value, hints[key], dotted)
    return cls(**kwargs)


def read_file(path: str | Path) -> dict[str, Any]:
    """The table in the JSON (``.json``) or TOML (``.toml``) file at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError as err:  # Python 3.10
            raise ValueError("TOML config files need Python >= 3.11; use JSON") from err
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {path} is not valid TOML: {err}") from None
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
    raise ValueError(f"config file must end in .json or .toml, got {path}")


def _parse_value(raw: str, hint: Any) -> Any:
    """JSON when it parses, else the raw text; string fields keep the text as written."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    if value is not None and not isinstance(value, str) and _accepts_str_only(hint):
        return raw  # --set out_dir=2024 is the folder "2024"
    return value


def _accepts_str_only(hint: Any) -> bool:
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return options == [str]


def apply_override(config: Any, assignment: str, where: str | None = None) -> None:
    """Apply ``"a.b=value"`` to dataclass ``config`` in place; value is parsed as JSON when it
    can be, else a string, and checked against the field's declared type.

    Paths go through tables (``optim.lr``), list indices (``stages.0.steps``, ``stages.1``
    for a whole stage table) and free tables (``data.options.csv_separator``). Errors start
    with ``where`` (default: ``--set a.b=value``).
    """
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"--set must look like key.sub=value, got {assignment!r}")
    where = where or f"--set {assignment}"
    parts = key.split(".")
    target: Any = config
    walked: list[str] = []
    entry_type: Any = None  # the dataclass of the list walked into (stages, teachers)
    for part in parts[:-1]:
        if is_dataclass(target) and part in {f.name for f in fields(target)}:
            entry_type = _list_entry(typing.get_type_hints(type(target))[part]) or entry_type
        target = _child(target, part, walked, where)
        walked.append(part)
    name, here = parts[-1], ".".join(walked) or "the config"
    if isinstance(target, list):
        index = _index(target, name, here, where)
        try:
            target[index] = from_dict(entry_type, _parse_value(raw, dict), key)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from None
    elif isinstance(target, dict):
        target[name] = _parse_value(raw, Any)
    elif is_dataclass(target) and name in {f.name for f in fields(target)}:
        hint = typing.get_type_hints(type(target))[name]
        try:
            value = coerce(_parse_value(raw, hint), hint, key)
        except TypeError as err:
            raise TypeError(f"{where}: {err}") from None
        setattr(target, name, value)
    else:
        removed = _REMOVED.get(key)
        raise ValueError(
            f"{where}: {key} no longer exists: {removed}"
            if removed
            else (f"{where}: unknown config key {key!r}" + _known(target))
        )


def _known(target: Any) -> str:
    if is_dataclass(target):
        return f"; {type(target).__name__} has {sorted(f.name for f in fields(target))}"
    return ""


def _index(items: list, part: str, here: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ValueError(
            f"{where}: {here} has {len(items)} {'entry' if len(items) == 1 else 'entries'} "
            f"(indices 0..{len(items) - 1}), there is no {here}.{part}"
        )
    return int(part)


def _child(target: Any, part: str, walked: list[str], where: str) -> Any:
    here = ".".join(walked) or "the config"
    if isinstance(target, list):
        return target[_index(target, part, here, where)]
    if isinstance(target, dict):
        if not isinstance(target.get(part), (dict, list)):
            raise ValueError(f"{where}: {here}.{part} is not a table")
        return target[part]
    if is_dataclass(target) and part in {f.name for f in fields(target)}:
        child = getattr(target, part)
        hint = typing.get_type_hints(type(target))[part]
        if child is None and hint == (dict[str, Any] | None):
            child = {}
            setattr(target, part, child)
        if not (is_dataclass(child) or isinstance(child, (list, dict))):
            raise ValueError(f"{where}: {'.'.join([*walked, part])} is a value, not a table")
        return child
    raise ValueError(f"{where}: unknown config key {'.'.join([*walked, part])!r}" + _known(target))
