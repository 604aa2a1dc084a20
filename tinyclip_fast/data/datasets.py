"""Image-text datasets: CSV/TSV, webdataset shards, in-memory tensors, synthetic pairs.

Every dataset yields dict samples ``{"image": FloatTensor[3, H, W], "text": LongTensor[ctx],
"index": int}`` (labelled datasets add ``"label": int``); ``loader.make_loader`` batches them.
With a :class:`CropDecoder` as the preprocess, CSV and webdataset samples hold its uint8 crop
and parameters instead (data/decode.py; data/device_augment.py finishes them on the device).

A sample that cannot be read raises :class:`BadSampleError` naming the file, the CSV row or the
shard member. Map-style datasets name each sample's identity with ``sample_key(index)`` (the
CSV path and caption, a content hash, the synthetic seed), from which
:func:`sample_fingerprints` derives the per-sample hashes that tie a teacher cache to the
exact data it was built on.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from tinyclip_fast.data.decode import CropDecoder
from tinyclip_fast.data.images import file_problem, open_rgb
from tinyclip_fast.data.loader import BadSampleError, epoch_generator
from tinyclip_fast.data.options import declare_data_options, given_options

Preprocess = Callable[[Any], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]

DATASET_KINDS = ("csv", "webdataset", "synthetic")
DatasetBuilder = Callable[[dict[str, Any], "Preprocess | None", "Tokenizer | None"], Dataset]
_DATASETS: dict[str, DatasetBuilder] = {}


def register_dataset(
    kind: str, builder: DatasetBuilder, options: Mapping[str, str] | None = None
) -> None:
    """Make ``data_cfg["kind"] = kind`` call ``builder(data_cfg, preprocess, tokenizer)`` (the
    built-in demo registers ``"demo"`` this way, so this module never imports it). ``options``:
    the ``data.options`` keys the builder reads, with a one-line help each (see
    data/options.py); a kind that declares none takes none."""
    _DATASETS[kind] = builder
    if options is not None:
        declare_data_options(kind, options)


WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def csv_separator(path: str | Path, separator: str | None = None) -> str:
    """The given separator, else from the extension: ``.csv`` comma, anything else tab
    (open_clip's default, ``.tsv``)."""
    if separator is not None:
        return separator
    return "," if Path(path).suffix.lower() == ".csv" else "\t"


def sample_fingerprints(dataset: Dataset) -> torch.Tensor | None:
    """int64 [N]: a 64-bit hash of every sample's identity (``dataset.sample_key(i)``) in index
    order; None for datasets that do not name their samples."""
    if not hasattr(dataset, "sample_key"):
        return None
    hashes = [
        int.from_bytes(
            hashlib.blake2b(dataset.sample_key(i).encode(), digest_size=8).digest(),
            "little",
            signed=True,
        )
        for i in range(len(dataset))
    ]
    return torch.tensor(hashes, dtype=torch.long)


def check_sample_fingerprints(
    expected: torch.Tensor, dataset: Dataset, what: str
) -> torch.Tensor | None:
    """ValueError naming the first sample of ``dataset`` whose identity differs from
    ``expected`` (the fingerprints ``what`` was built on); returns the dataset's fingerprints,
    None when the dataset does not name its samples (nothing to check)."""
    actual = sample_fingerprints(dataset)
    if actual is None:
        return None
    if actual.shape != expected.shape:
        raise ValueError(
            f"{what} was built on {expected.numel()} samples, the dataset has {actual.numel()}: "
            "rebuild it for this dataset"
        )
    differs = (actual != expected.to(actual.device)).nonzero()
    if differs.numel():
        first = int(differs[0])
        raise ValueError(
            f"{what} was built on other data: sample {first} ({dataset.sample_key(first)!r}) "
            f"is not the sample it holds there ({differs.numel()} of {actual.numel()} samples "
            "differ; same rows in another order count too): rebuild it for this dataset"
        )
    return actual


def _tokenize_one(tokenizer: Tokenizer, caption: str) -> torch.Tensor:
    tokens = tokenizer([caption])
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] != 1:
        raise TypeError(
            f"tokenizer must map a list of n strings to a LongTensor [n, ctx], got "
            f"{type(tokens).__name__} {getattr(tokens, 'shape', '')}"
        )
    return tokens[0]


class CsvPairDataset(Dataset):
    """Image paths and captions from a CSV/TSV file (open_clip's ``--train-data`` format).

    Relative image paths are resolved against the CSV file's folder; images load lazily.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        preprocess: Preprocess,
        tokenizer: Tokenizer,
        img_key: str = "filepath",
        caption_key: str = "title",
        separator: str | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"CSV data file {self.path} does not exist")
        separator = csv_separator(self.path, separator)
        with open(self.path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=separator)
            columns = reader.fieldnames or []
            for key, role in ((img_key, "img_key"), (caption_key, "caption_key")):
                if key not in columns:
                    raise ValueError(
                        f"CSV {self.path} has no column {key!r} (data.options.{role}); "
                        f"columns found with separator {separator!r}: {columns}"
                    )
            rows = [(row[img_key], row[caption_key]) for row in reader]
        if not rows:
            raise ValueError(f"CSV {self.path} has a header but no rows")
        # As written: resolved per access (10M rows of Path objects would cost gigabytes).
        self.listed_paths = [image_path for image_path, _ in rows]
        self.captions = [caption for _, caption in rows]
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    def image_path(self, index: int) -> Path:
        """Row ``index``'s image; relative paths are relative to the CSV file's folder."""
        candidate = Path(self.listed_paths[index])
        return candidate if candidate.is_absolute() else self.path.parent / candidate

    def __len__(self) -> int:
        return len(self.captions)

    def sample_key(self, index: int) -> str:
        """The row as written: image path and caption (so moving the folder keeps it)."""
        return f"{self.listed_paths[index]}\t{self.captions[index]}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path = self.image_path(index)
        where = f"image {image_path} (row {index} of {self.path})"
        record = {"source": str(self.path), "row": index, "file": str(image_path)}
        problem = file_problem(image_path)
        if problem is not None:
            raise BadSampleError(f"{where} {problem}", record)
        try:
            fields = image_fields(self.preprocess, image_path)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, zlib errors...
            raise BadSampleError(f"{where} cannot be read: {describe_error(err)}", record) from err
        return {
            **fields,
            "text": _tokenize_one(self.tokenizer, self.captions[index]),
            "index": index,
        }


def image_fields(preprocess: Preprocess, source: str | Path | bytes) -> dict[str, Any]:
    """A sample's image fields: a :class:`CropDecoder` reads ``source`` itself (the uint8
    crop and its parameters, data/decode.py); any other preprocess gets the PIL image."""
    if isinstance(preprocess, CropDecoder):
        return preprocess(source)
    return {"image": preprocess(open_rgb(source))}


def describe_error(err: BaseException) -> str:
    """``Type: first line of the message`` (PIL's messages run over several lines)."""
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class TensorPairDataset(Dataset):
    """In-memory pairs: images [N, 3, H, W] float, texts [N, ctx] long, optional labels [N]."""

    def __init__(
        self, images: torch.Tensor, texts: torch.Tensor, labels: torch.Tensor | None = None
    ) -> None:
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError(
                f"images must be a float tensor [N, 3, H, W], got {tuple(images.shape)} "
                f"{images.dtype}"
            )
        if texts.dim() != 2 or texts.dtype != torch.long or texts.shape[0] != images.shape[0]:
            raise ValueError(
                f"texts must be a long tensor [{images.shape[0]}, ctx], got "
                f"{tuple(texts.shape)} {texts.dtype}"
            )
        if labels is not None and tuple(labels.shape) != (images.shape[0],):
            raise ValueError(
                f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}"
            )
        self.images, self.texts, self.labels = images, texts, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = {"image": self.images[index], "text": self.texts[index], "index": int(index)}
        if self.labels is not None:
            sample["label"] = int(self.labels[index])
        return sample

    def sample_key(self, index: int) -> str:
        """A hash of the sample's image and text (its content is its identity)."""
        digest = hashlib.blake2b(digest_size=8)
        for tensor in (self.images[index], self.texts[index]):
            digest.update(np.ascontiguousarray(tensor.detach().cpu().numpy()).tobytes())
        return f"content {digest.hexdigest()}"

    def get_batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The collated batch of ``indices`` by one gather per field (no per-sample work)."""
        batch = {"image": self.images[indices], "text": self.texts[indices], "index": indices}
        if self.labels is not None:
            batch["label"] = self.labels[indices]
        return batch


class SyntheticPairDataset(Dataset):
    """Random images and token sequences, a pure function of (seed, index): for throughput runs.

    Texts are ``[sot, t_1, ..., t_k, eot, 0, ...]`` with sot = vocab_size - 2 and eot =
    vocab_size - 1, so argmax pooling (open_clip's default) finds the end token.
    """

    def __init__(
        self,
        size: int,
        *,
        image_size: int = 224,
        context_length: int = 77,
        vocab_size: int = 49408,
        seed: int = 0,
    ) -> None:
        if size <= 0 or image_size <= 0 or context_length < 2 or vocab_size < 4:
            raise ValueError(
                f"synthetic dataset needs size > 0, image_size > 0, context_length >= 2, "
                f"vocab_size >= 4; got {size}, {image_size}, {context_length}, {vocab_size}"
            )
        self.size, self.image_size = size, image_size
        self.context_length, self.vocab_size, self.seed = context_length, vocab_size, seed

    def __len__(self) -> int:
        return self.size

    def sample_key(self, index: int) -> str:
        shape = (self.seed, self.image_size, self.context_length, self.vocab_size, index)
        return "synthetic seed {} image {} context {} vocabulary {} index {}".format(*shape)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for synthetic dataset of {self.size}")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = torch.randn(3, self.image_size, self.image_size, generator=generator)
        length = int(torch.randint(1, self.context_length - 1, (1,), generator=generator))
        text = torch.zeros(self.context_length, dtype=torch.long)
        text[0] = self.vocab_size - 2
        text[1 : length + 1] = torch.randint(1, self.vocab_size - 2, (length,), generator=generator)
        text[length + 1] = self.vocab_size - 1
        return {"image": image, "text": text, "index": index}


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard list from ``"a-{000..009}.tar::b.tar"`` (braces expanded, ``::`` separates)."""
    import braceexpand

    parts = urls.split("::") if isinstance(urls, str) else list(urls)
    expanded = [url for part in parts for url in braceexpand.braceexpand(part)]
    if not expanded:
        raise ValueError(f"no shard urls in {urls!r}")
    return expanded


ShardT = TypeVar("ShardT")


def split_shards(
    shards: Sequence[ShardT], *, seed: int, epoch: int, rank: int, world_size: int, shuffle: bool
) -> list[ShardT]:
    """The shards this rank and loader worker read in ``epoch``: the list permuted per
    (seed, epoch) when ``shuffle``, then every world_size-th from ``rank``, then every
    num_workers-th from the worker id (so each shard is read once per epoch across the job)."""
    shards = list(shards)
    if shuffle:
        order = torch.randperm(len(shards), generator=epoch_generator(seed, epoch))
        shards = [shards[i] for i in order.tolist()]
    shards = shards[rank::world_size]
    worker = get_worker_info()
    if worker is not None:
        shards = shards[worker.id :: worker.num_workers]
    return shards


class WebDatasetPairs(IterableDataset):
    """Image-text pairs from webdataset tar shards (``.jpg``/``.png``/... + ``.txt``).

    Shards are split by rank and then by loader worker, so every sample is read once per
    epoch across the job; the shard order is shuffled per (seed, epoch) when ``shuffle``.
    ``index`` is the sample's position in this worker's stream, not a dataset-wide id.
    Samples whose image or caption cannot be read, and the rest of a truncated shard, raise
    :class:`BadSampleError` naming the shard and member (or are skipped, see ``__iter__``).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        preprocess: Preprocess,
        tokenizer: Tokenizer,
        caption_key: str = "txt",
        shuffle: bool = True,
        num_samples: int | None = None,
        skip_bad_samples: bool = False,
    ) -> None:
        self.shards = expand_urls(urls)
        local = [
            shard for shard in self.shards if "://" not in shard and not shard.startswith("pipe:")
        ]
        missing = [shard for shard in local if not Path(shard).is_file()]
        if missing:
            raise FileNotFoundError(f"webdataset shards not found: {missing[:5]}")
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.caption_key, self.shuffle, self.num_samples = caption_key, shuffle, num_samples
        self.skip_bad_samples = skip_bad_samples
        self.seed, self.epoch, self.rank, self.world_size = 0, 0, 0, 1

    def set_stream(self, *, seed: int, epoch: int, rank: int, world_size: int) -> None:
        """Pick which shards the next ``iter()`` reads (called by ``make_loader``)."""
        if len(self.shards) < world_size:
            raise ValueError(
                f"{len(self.shards)} webdataset shards cannot be split over {world_size} ranks"
            )
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size

    def _my_shards(self) -> list[str]:
        return split_shards(
            self.shards,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            shuffle=self.shuffle,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Samples in shard order; with ``skip_bad_samples`` an unreadable sample or shard
        yields ``{"bad_sample": record}`` (the loader logs it) instead of raising."""
        position = 0
        for shard in self._my_shards():
            for item in self._read_shard(shard):
                if "bad_sample" in item:
                    if not self.skip_bad_samples:
                        raise BadSampleError(item["bad_sample"]["error"], item["bad_sample"])
                    yield item
                    continue
                yield {**item, "index": position}
                position += 1

    def _read_shard(self, shard: str) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        errors: list[Exception] = []

        def stop_shard(err: Exception) -> bool:
            errors.append(err)
            return False  # a broken tar stream cannot be read past the error

        for raw in wds.tarfile_to_samples(handler=stop_shard)(iter([{"url": shard}])):
            key = raw.get("__key__")
            record = {"shard": shard, "key": key}
            image_ext = next((ext for ext in WDS_IMAGE_EXTENSIONS if ext in raw), None)
            if image_ext is None or self.caption_key not in raw:
                members = sorted(k for k in raw if not k.startswith("__"))
                message = (
                    f"webdataset sample {key!r} in {shard} lacks an image "
                    f"({'/'.join(WDS_IMAGE_EXTENSIONS)}) or caption ({self.caption_key}); it "
                    f"has {members}"
                )
                yield {"bad_sample": BadSampleError(message, record).record}
                continue
            try:
                fields = image_fields(self.preprocess, raw[image_ext])
                caption = raw[self.caption_key].decode("utf-8")
            except Exception as err:  # PIL's many error types, bad UTF-8
                message = (
                    f"webdataset sample {key!r} in {shard} cannot be read: {describe_error(err)}"
                )
                yield {"bad_sample": BadSampleError(message, record).record}
                continue
            yield {**fields, "text": _tokenize_one(self.tokenizer, caption)}
        reason = None
        if errors:  # webdataset appends the stream and the url to the message's arguments
            first = errors[0]
            text = first.args[0] if first.args and isinstance(first.args[0], str) else first
            reason = f"{type(first).__name__}: {str(text).split(' @ ')[0]}"
        if reason is None and Path(shard).is_file():
            reason = tar_truncation(shard)  # tarfile takes some truncations for the end
        if reason is not None:
            message = f"webdataset shard {shard} is unreadable past some point: {reason}"
            yield {"bad_sample": BadSampleError(message, {"shard": shard}).record}

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("webdataset length unknown: give --set data.size=N")
        return self.num_samples


def tar_truncation(path: str | Path) -> str | None:
    """Why the tar file at ``path`` is cut short; None when its end-of-archive marker (a zero
    block) follows the last member. Reads the 512-byte headers only."""
    size = Path(path).stat().st_size
    with open(path, "rb") as handle:
        offset = 0
        while offset + 512 <= size:
            handle.seek(offset)
            header = handle.read(512)
            if header == bytes(512):
                return None
            field = header[124:136]
            if field[0] & 0x80:  # GNU base-256 size of a member over 8 GB
                length = int.from_bytes(field[1:], "big")
            else:
                try:
                    length = int(field.rstrip(b"\0 ").decode() or "0", 8)
                except ValueError:
                    return f"no valid tar header at byte {offset}"
            offset += 512 + -(-length // 512) * 512
    return f"the file ends at byte {size}, inside or after its last member, without the tar end"


def build_dataset(
    data_cfg: dict[str, Any], *, preprocess: Preprocess | None, tokenizer: Tokenizer | None
) -> Dataset:
    """The dataset that ``data_cfg["kind"]`` names (csv, webdataset, synthetic, or registered).

    ``data_cfg`` holds ``kind``, ``path``, ``num_samples``, ``skip_bad_samples`` and the kind's
    options (data/options.py lists them; an unknown key is a ValueError naming the valid ones).
    """
    kind = data_cfg.get("kind")
    check_kind(kind)
    if kind in _DATASETS:
        return _DATASETS[kind](data_cfg, preprocess, tokenizer)
    options = given_options(data_cfg)
    if kind in ("csv", "webdataset") and (preprocess is None or tokenizer is None):
        raise ValueError(f"data kind {kind!r} needs a preprocess and a tokenizer")
    if kind == "csv":
        build_only = sorted(set(options) - {"img_key", "caption_key", "separator"})
        if build_only:
            raise ValueError(
                f"data options {build_only} of kind 'csv' are read only when building a "
                "reinforced cache (--build-teacher-cache)"
            )
        return CsvPairDataset(
            _required_path(data_cfg), preprocess=preprocess, tokenizer=tokenizer, **options
        )
    if kind == "webdataset":
        return WebDatasetPairs(
            _required_path(data_cfg),
            preprocess=preprocess,
            tokenizer=tokenizer,
            num_samples=data_cfg.get("num_samples"),
            skip_bad_samples=bool(data_cfg.get("skip_bad_samples", False)),
            **options,
        )
    if data_cfg.get("path") is not None:
        raise ValueError(f"data kind 'synthetic' reads no files, got path {data_cfg['path']!r}")
    if data_cfg.get("num_samples") is None:
        raise ValueError("data kind 'synthetic' needs a number of samples (--set data.size=N)")
    return SyntheticPairDataset(
        int(data_cfg["num_samples"]), **{key: int(value) for key, value in options.items()}
    )


def check_kind(kind: Any) -> None:
    """ValueError unless ``kind`` is a built-in or registered data kind."""
    if kind not in DATASET_KINDS and kind not in _DATASETS:
        kinds = ", ".join([*DATASET_KINDS, *sorted(_DATASETS)])
        raise ValueError(f"unknown data kind {kind!r} (--data KIND[:PATH]); kinds: {kinds}")


def _required_path(data_cfg: dict[str, Any]) -> Any:
    if data_cfg.get("path") is None:
        kind = data_cfg["kind"]
        raise ValueError(f"data kind {kind!r} needs a path: --data {kind}:PATH")
    return data_cfg["path"]
