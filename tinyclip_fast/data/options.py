"""The options of each data kind (``--set data.options.KEY=VALUE``), declared once.

Every kind accepts the keys listed for it here (or declared by ``register_dataset`` for a
registered kind), each with a one-line help; any other key is refused naming the valid ones,
so a misspelt option cannot be ignored silently. The keys are the parameter names of the
reader that uses them, whose defaults apply when a key is not given (the help states them).

Keys the run sets from its own fields are not options: ``kind`` and ``path`` (``--data``),
``num_samples`` (``data.size``), ``skip_bad_samples``, and the reinforced cache's
``cache_dir`` and ``caption_mode``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# How training images are decoded (data.decode; data/decode.py): PIL and the whole transform
# in the loader workers, or the split pipeline with libjpeg-turbo or nvjpeg decoding.
DECODERS = ("pil", "tensor", "nvjpeg")

_CSV = {
    "img_key": "column of image paths, relative to the file's folder (default: filepath)",
    "caption_key": "column of captions (default: title)",
    "separator": "column separator (default from the extension: .csv comma, else tab)",
}
_CACHE_BUILD = {
    "shard_size": "samples per reinforced cache file, when building one (default: 10000)",
}
_CSV_CACHE_BUILD = {
    "synthetic_keys": "columns of synthetic captions, stored when building a reinforced cache",
}
_WEBDATASET = {
    "caption_key": "extension of each sample's caption member (default: txt)",
    "shuffle": "shuffle the shard order every epoch (default: true)",
}

DATA_OPTIONS: dict[str, dict[str, str]] = {
    "csv": {**_CSV, **_CSV_CACHE_BUILD, **_CACHE_BUILD},
    "webdataset": _WEBDATASET,
    "synthetic": {
        "image_size": "image side in pixels (default: the teacher's)",
        "context_length": "tokens per caption (default: the teacher's)",
        "vocab_size": "token vocabulary (default: the teacher's)",
        "seed": "seed of the random pairs (default: the run's seed)",
    },
    "folder": dict(_CACHE_BUILD),
    "reinforced": {
        "source": "kind of the data the cache covers: webdataset, csv or folder (default: "
        "from the path)",
        "img_key": "CSV source: " + _CSV["img_key"],
        "caption_key": "CSV source: column of captions (default: title); webdataset: extension "
        "of the caption member (default: txt)",
        "separator": "CSV source: " + _CSV["separator"],
        **_CSV_CACHE_BUILD,
        **_CACHE_BUILD,
        "shuffle": _WEBDATASET["shuffle"],
    },
    "datacompdr": {
        "caption_key": _WEBDATASET["caption_key"],
        "shuffle": _WEBDATASET["shuffle"],
        "teacher_scale": "the teachers' affinity scale exp(logit_scale) (default: 100)",
        "teacher_dims": "embedding width of each stored teacher (default: [768, 768])",
    },
}

# open_clip's names for the CSV keys (its --csv-img-key, ...): same meaning, still accepted.
ALIASES = {
    "csv_img_key": "img_key",
    "csv_caption_key": "caption_key",
    "csv_separator": "separator",
    "csv_synthetic_keys": "synthetic_keys",
}

# Keys the run sets from its own configuration, and where a user sets them.
RUN_KEYS = {
    "kind": "--data KIND",
    "path": "--data KIND:PATH",
    "num_samples": "--set data.size=N",
    "skip_bad_samples": "--set data.skip_bad_samples=true",
    "cache_dir": "--set reinforced.cache_dir=DIR",
    "caption_mode": "--set reinforced.caption_mode=...",
}
# Keys the engine passes to every kind's builder, used by the kinds that read them.
_ENGINE_DEFAULTS = ("image_size", "context_length", "vocab_size", "seed", "source")

_REGISTERED: dict[str, dict[str, str]] = {}


def declare_data_options(kind: str, options: Mapping[str, str]) -> None:
    """Declare the option keys (and their one-line help) of a registered data kind."""
    _REGISTERED[kind] = dict(options)


def data_options(kind: str) -> dict[str, str]:
    """The option keys of ``kind`` and their help (empty for a kind that declares none)."""
    return dict(DATA_OPTIONS[kind] if kind in DATA_OPTIONS else _REGISTERED.get(kind, {}))


def describe_data_options(kind: str) -> list[str]:
    """``key: help`` lines of ``kind``'s options, for ``--help`` and the docs."""
    return [f"{key}: {help_text}" for key, help_text in data_options(kind).items()]


def check_data_options(kind: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` (``data.options``) with open_clip's CSV names resolved; ValueError naming
    the first key ``kind`` does not take, and the valid ones."""
    valid = data_options(kind)
    resolved: dict[str, Any] = {}
    for key, value in options.items():
        name = ALIASES.get(key, key) if ALIASES.get(key) in valid else key
        if name in RUN_KEYS:
            raise ValueError(
                f"data option {key!r} is not set in data.options: use {RUN_KEYS[name]}"
            )
        if name not in valid:
            listed = ", ".join(valid) if valid else "none"
            raise ValueError(
                f"unknown option {key!r} for data kind {kind!r}; its options: {listed}"
            )
        if name in resolved:
            raise ValueError(f"data options {name!r} and {key!r} are the same option: give one")
        resolved[name] = value
    return resolved


def given_options(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The options a builder receives in ``data_cfg`` (keys of its kind, aliases resolved),
    checked like :func:`check_data_options`; keys the run and the engine set are left out."""
    kind = data_cfg.get("kind")
    extra = {k: v for k, v in data_cfg.items() if k not in RUN_KEYS}
    valid = data_options(kind)
    extra = {k: v for k, v in extra.items() if k in valid or k not in _ENGINE_DEFAULTS}
    return check_data_options(kind, extra)
