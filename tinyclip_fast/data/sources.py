"""Image-caption sources read shard by shard: webdataset tars, a CSV/TSV, an image folder.

The reinforced cache is built and read per shard, so every source is a list of shards with
stable names. A tar file is one shard; the rows of a CSV and the images of a folder are cut
into shards of ``shard_size`` samples in file order. A shard yields :class:`Record`s:
a key unique within the shard, the image (decoded on demand) and its captions, real ones
first, then synthetic ones:

- webdataset: ``<key>.jpg|jpeg|png|webp``, the caption in ``<key>.txt`` and synthetic
  captions in ``<key>.syn.json`` (``{"syn_text": [...]}``, as in DataCompDR), both optional
  but not both missing;
- CSV/TSV: image path and caption columns (open_clip's format), optional synthetic columns;
- folder: every image below the root (sorted), its caption in the ``.txt`` of the same stem,
  synthetic captions in ``<stem>.syn.json``.

Cache files go beside the data (``cache_dir`` overrides): ``<shard name>.reinforced.safetensors``.
Shard names keep the input's full file name, so two inputs of one folder cannot share a cache
file: ``set.csv-00000`` and ``set.tsv-00000`` for the rows of set.csv and set.tsv, ``00000`` for
``00000.tar`` (only ``.tar`` is dropped; ``a.tar.gz`` and ``a.tgz`` keep theirs).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinyclip_fast.data.datasets import WDS_IMAGE_EXTENSIONS, expand_urls
from tinyclip_fast.data.images import file_problem, open_rgb

CACHE_SUFFIX = ".reinforced.safetensors"
DEFAULT_SHARD_SIZE = 10_000
SOURCE_KINDS = ("webdataset", "csv", "folder")
SYNTHETIC_KEY = "syn.json"


@dataclass(frozen=True)
class Record:
    """One sample: ``captions[:num_real]`` are real, the rest synthetic."""

    key: str
    load_image: Callable[[], Any]  # -> PIL RGB image
    captions: tuple[str, ...]
    num_real: int
    encoded: Callable[[], bytes] | None = None  # -> the image file's bytes
    where: str = ""  # the sample, for error messages


class TarShard:
    """One local webdataset tar file."""

    def __init__(self, path: str | Path, caption_key: str = "txt") -> None:
        self.path = Path(path)
        self.caption_key = caption_key
        self.name = _tar_shard_name(self.path.name)
        self.num_samples: int | None = None  # unknown until read

    def fingerprint(self) -> str:
        """Changes when the file does (its size: cheap, and a truncated copy differs)."""
        return f"bytes={self.path.stat().st_size}"

    def records(self) -> Iterator[Record]:
        """The samples in file order."""
        for raw in iter_tar_samples(self.path):
            key = raw["__key__"]
            image_ext = next((ext for ext in WDS_IMAGE_EXTENSIONS if ext in raw), None)
            if image_ext is None:
                raise ValueError(
                    f"webdataset sample {key!r} in {self.path} has no image "
                    f"({'/'.join(WDS_IMAGE_EXTENSIONS)}); it has {sample_fields(raw)}"
                )
            real = [raw[self.caption_key].decode("utf-8")] if self.caption_key in raw else []
            synthetic = synthetic_captions(raw.get(SYNTHETIC_KEY), f"{key!r} in {self.path}")
            if not real and not synthetic:
                raise ValueError(
                    f"webdataset sample {key!r} in {self.path} has no caption "
                    f"({self.caption_key} or {SYNTHETIC_KEY}); it has {sample_fields(raw)}"
                )
            where = f"sample {key!r} of {self.path}"
            data = raw[image_ext]
            yield Record(
                key,
                lambda data=data, where=where: decode_image(data, where),
                (*real, *synthetic),
                len(real),
                lambda data=data: data,
                where,
            )

    def __repr__(self) -> str:
        return f"TarShard({str(self.path)!r})"


@dataclass(frozen=True)
class _Entry:
    key: str
    image_path: Path
    captions: tuple[str, ...]
    num_real: int


class ListShard:
    """A slice of a CSV's rows or a folder's images, all paths known up front."""

    def __init__(self, name: str, origin: str, entries: Sequence[_Entry]) -> None:
        self.name, self.origin, self.entries = name, origin, list(entries)
        self.num_samples: int | None = len(self.entries)

    def fingerprint(self) -> str:
        """Hash of the keys, captions, image paths and image sizes in bytes."""
        digest = hashlib.sha256()
        for entry in self.entries:
            size = entry.image_path.stat().st_size if entry.image_path.is_file() else -1
            digest.update(
                json.dumps([entry.key, str(entry.image_path), size, entry.captions]).encode()
            )
        return digest.hexdigest()[:16]

    def records(self) -> Iterator[Record]:
        """The samples in file order."""
        for entry in self.entries:
            yield Record(
                entry.key,
                lambda entry=entry: decode_image(self._path(entry), self._where(entry)),
                entry.captions,
                entry.num_real,
                lambda entry=entry: self._path(entry).read_bytes(),
                self._where(entry),
            )

    def _where(self, entry: _Entry) -> str:
        return f"image {entry.image_path} (sample {entry.key!r} of {self.origin})"

    def _path(self, entry: _Entry) -> Path:
        problem = file_problem(entry.image_path)
        if problem is not None:
            raise FileNotFoundError(f"{self._where(entry)} {problem}")
        return entry.image_path

    def __repr__(self) -> str:
        return f"ListShard({self.name!r}, {len(self.entries)} samples of {self.origin})"


Shard = TarShard | ListShard


class ShardedSource:
    """Shards of one data source and where their cache files live."""

    def __init__(self, kind: str, shards: Sequence[Shard], cache_dir: Path | None) -> None:
        if not shards:
            raise ValueError(f"{kind} source has no shards")
        self.kind, self.shards, self._cache_dir = kind, list(shards), cache_dir
        paths = [self.cache_path(shard) for shard in self.shards]
        if len(set(paths)) != len(paths):
            clash = sorted({str(p) for p in paths if paths.count(p) > 1})
            raise ValueError(
                f"shards with the same name would share a cache file: {clash[:3]}; give them "
                "distinct names or separate folders"
            )

    def cache_path(self, shard: Shard) -> Path:
        """``<cache_dir or the shard's folder>/<shard name>.reinforced.safetensors``."""
        folder = self._cache_dir
        if folder is None:
            folder = shard.path.parent if isinstance(shard, TarShard) else Path(shard.origin)
            folder = folder if folder.is_dir() else folder.parent
        return folder / f"{shard.name}{CACHE_SUFFIX}"

    @property
    def num_samples(self) -> int | None:
        """Total sample count, when every shard knows it (not tars before reading)."""
        counts = [shard.num_samples for shard in self.shards]
        return None if None in counts else sum(counts)


def webdataset_source(
    urls: str | Sequence[str], *, caption_key: str = "txt", cache_dir: str | Path | None = None
) -> ShardedSource:
    """Local tar shards from ``"dir/{00000..00099}.tar"`` (braces, ``::`` lists)."""
    shards = expand_urls(urls)
    remote = [s for s in shards if "://" in s or s.startswith("pipe:")]
    if remote:
        raise ValueError(f"reinforced caches need local shard files, got {remote[:3]}")
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"webdataset shards not found: {missing[:5]}")
    return ShardedSource(
        "webdataset", [TarShard(s, caption_key) for s in shards], _optional_path(cache_dir)
    )


def csv_source(
    path: str | Path,
    *,
    img_key: str = "filepath",
    caption_key: str = "title",
    separator: str = "\t",
    synthetic_keys: Sequence[str] = (),
    shard_size: int = DEFAULT_SHARD_SIZE,
    cache_dir: str | Path | None = None,
) -> ShardedSource:
    """Rows of a CSV/TSV (relative image paths resolve against its folder), ``shard_size``
    rows a shard named ``<file name>-<index>``; keys are row numbers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV data file {path} does not exist")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=separator)
        columns = reader.fieldnames or []
        for key in (img_key, caption_key, *synthetic_keys):
            if key not in columns:
                raise ValueError(
                    f"CSV {path} has no column {key!r}; columns found with separator "
                    f"{separator!r}: {columns}"
                )
        entries = []
        for row_index, row in enumerate(reader):
            image = Path(row[img_key])
            image = image if image.is_absolute() else path.parent / image
            synthetic = tuple(row[k] for k in synthetic_keys if row[k])
            entries.append(_Entry(str(row_index), image, (row[caption_key], *synthetic), 1))
    if not entries:
        raise ValueError(f"CSV {path} has a header but no rows")
    return ShardedSource(
        "csv", _cut(entries, path.name, str(path), shard_size), _optional_path(cache_dir)
    )


def folder_source(
    root: str | Path, *, shard_size: int = DEFAULT_SHARD_SIZE, cache_dir: str | Path | None = None
) -> ShardedSource:
    """Every image below ``root`` (sorted relative paths are the keys), captions from the
    ``.txt`` (required) and ``.syn.json`` (optional) files of the same stem."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    images = sorted(
        p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in WDS_IMAGE_EXTENSIONS
    )
    if not images:
        raise ValueError(f"image folder {root} has no {'/'.join(WDS_IMAGE_EXTENSIONS)} files")
    entries = []
    for image in images:
        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file():
            raise FileNotFoundError(f"image {image} has no caption file {caption_file}")
        synthetic_file = image.with_suffix(".syn.json")
        synthetic = (
            synthetic_captions(synthetic_file.read_bytes(), str(synthetic_file))
            if synthetic_file.is_file()
            else ()
        )
        caption = caption_file.read_text(encoding="utf-8").strip()
        key = image.relative_to(root).as_posix()
        entries.append(_Entry(key, image, (caption, *synthetic), 1))
    return ShardedSource(
        "folder", _cut(entries, root.name, str(root), shard_size), _optional_path(cache_dir)
    )


def source_kind(kind: str | None, path: str | Sequence[str]) -> str:
    """``kind`` checked, or when None inferred: a folder if ``path`` is one, a CSV for
    .csv/.tsv, else webdataset shards."""
    if kind is None:
        single = isinstance(path, (str, Path))
        if single and Path(path).is_dir():
            return "folder"
        if single and str(path).lower().endswith((".csv", ".tsv")):
            return "csv"
        return "webdataset"
    if kind not in SOURCE_KINDS:
        raise ValueError(f"source kind must be one of {SOURCE_KINDS}, got {kind!r}")
    return kind


def open_source(kind: str | None, path: str | Sequence[str], **options: Any) -> ShardedSource:
    """The source of ``kind`` (see :func:`source_kind`) with that factory's ``options``."""
    factories = {"webdataset": webdataset_source, "csv": csv_source, "folder": folder_source}
    return factories[source_kind(kind, path)](path, **options)


def iter_tar_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """Raw webdataset samples ``{"__key__", ext: bytes}`` of one local tar, in file order;
    a truncated or corrupt file is a ValueError naming it."""
    import tarfile

    import webdataset as wds

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"webdataset shard {path} does not exist")
    try:
        yield from wds.tarfile_to_samples()(iter([{"url": str(path)}]))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ValueError(f"webdataset shard {path} is truncated or corrupt ({err!r})") from err


def decode_image(data: bytes | Path, where: str) -> Any:
    """``open_rgb`` with an undecodable image reported as a ValueError naming ``where``."""
    try:
        return open_rgb(data)
    except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for broken files
        raise ValueError(f"cannot decode the image of {where}: {err}") from err


def synthetic_captions(data: bytes | str | None, where: str) -> tuple[str, ...]:
    """The ``syn_text`` list of a ``syn.json`` payload (empty without one)."""
    if data is None:
        return ()
    try:
        captions = json.loads(data)["syn_text"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{SYNTHETIC_KEY} of {where} is not {{'syn_text': [...]}}") from err
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{SYNTHETIC_KEY} of {where}: syn_text must be a list of strings")
    return tuple(captions)


def _cut(entries: list[_Entry], stem: str, origin: str, shard_size: int) -> list[ListShard]:
    if shard_size <= 0:
        raise ValueError(f"shard_size must be > 0, got {shard_size}")
    return [
        ListShard(f"{stem}-{start // shard_size:05d}", origin, entries[start : start + shard_size])
        for start in range(0, len(entries), shard_size)
    ]


def _tar_shard_name(name: str) -> str:
    return name.removesuffix(".tar")


def sample_fields(raw: dict[str, Any]) -> list[str]:
    """The payload names of a raw webdataset sample (for error messages)."""
    return sorted(k for k in raw if not k.startswith("__"))


def _optional_path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(os.fspath(value))
