"""Image-text datasets: CSV/TSV, webdataset shards, in-memory tensors, synthetic pairs.

Every dataset yields dict samples ``{"image": FloatTensor[3, H, W], "text": LongTensor[ctx],
"index": int}`` (labelled datasets add ``"label": int``); ``loader.make_loader`` batches them.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from tinyclip_fast.data.loader import epoch_generator

Preprocess = Callable[[Any], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]

DATASET_KINDS = ("csv", "webdataset", "synthetic")
DatasetBuilder = Callable[[dict[str, Any], "Preprocess | None", "Tokenizer | None"], Dataset]
_DATASETS: dict[str, DatasetBuilder] = {}


def register_dataset(kind: str, builder: DatasetBuilder) -> None:
    """Make ``data_cfg["kind"] = kind`` call ``builder(data_cfg, preprocess, tokenizer)`` (the
    built-in demo registers ``"demo"`` this way, so this module never imports it)."""
    _DATASETS[kind] = builder


WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def load_rgb(source: str | Path | bytes) -> Any:
    """A PIL RGB image from a path or encoded bytes."""
    from PIL import Image

    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with Image.open(source) as image:
        return image.convert("RGB")


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
        separator: str = "\t",
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"CSV data file {self.path} does not exist")
        with open(self.path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=separator)
            columns = reader.fieldnames or []
            for key, role in ((img_key, "csv_img_key"), (caption_key, "csv_caption_key")):
                if key not in columns:
                    raise ValueError(
                        f"CSV {self.path} has no column {key!r} ({role}); columns found with "
                        f"separator {separator!r}: {columns}"
                    )
            rows = [(row[img_key], row[caption_key]) for row in reader]
        if not rows:
            raise ValueError(f"CSV {self.path} has a header but no rows")
        self.image_paths = [self._resolve(image_path) for image_path, _ in rows]
        self.captions = [caption for _, caption in rows]
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    def _resolve(self, image_path: str) -> Path:
        candidate = Path(image_path)
        return candidate if candidate.is_absolute() else self.path.parent / candidate

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path = self.image_paths[index]
        if not image_path.is_file():
            raise FileNotFoundError(
                f"image {image_path} (row {index} of {self.path}) does not exist"
            )
        return {
            "image": self.preprocess(load_rgb(image_path)),
            "text": _tokenize_one(self.tokenizer, self.captions[index]),
            "index": index,
        }


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
        import webdataset as wds

        samples = wds.tarfile_to_samples()(iter({"url": shard} for shard in self._my_shards()))
        position = 0
        for raw in samples:
            image_ext = next((ext for ext in WDS_IMAGE_EXTENSIONS if ext in raw), None)
            if image_ext is None or self.caption_key not in raw:
                raise ValueError(
                    f"webdataset sample {raw.get('__key__')!r} in {raw.get('__url__')} lacks an "
                    f"image ({'/'.join(WDS_IMAGE_EXTENSIONS)}) or caption ({self.caption_key}); "
                    f"it has {sorted(k for k in raw if not k.startswith('__'))}"
                )
            caption = raw[self.caption_key].decode("utf-8")
            yield {
                "image": self.preprocess(load_rgb(raw[image_ext])),
                "text": _tokenize_one(self.tokenizer, caption),
                "index": position,
            }
            position += 1

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("webdataset length unknown: set data_cfg['num_samples']")
        return self.num_samples


def build_dataset(
    data_cfg: dict[str, Any], *, preprocess: Preprocess | None, tokenizer: Tokenizer | None
) -> Dataset:
    """The dataset that ``data_cfg["kind"]`` names (csv, webdataset, synthetic, or registered).

    Keys (``path`` and ``num_samples`` serve every kind, as in config.DataConfig):
    csv: ``path``, ``csv_img_key``, ``csv_caption_key``, ``csv_separator``;
    webdataset: ``path`` (or ``urls``), ``caption_key``, ``shuffle``, ``num_samples``;
    synthetic: ``num_samples`` (or ``size``), ``image_size``, ``context_length``,
    ``vocab_size``, ``seed``; registered kinds: whatever their builder reads.
    """
    kind = data_cfg.get("kind")
    if kind in _DATASETS:
        return _DATASETS[kind](data_cfg, preprocess, tokenizer)
    if kind not in DATASET_KINDS:
        kinds = [*DATASET_KINDS, *sorted(_DATASETS)]
        raise ValueError(f"data_cfg['kind'] must be one of {kinds}, got {kind!r}")
    if kind in ("csv", "webdataset") and (preprocess is None or tokenizer is None):
        raise ValueError(f"data kind {kind!r} needs a preprocess and a tokenizer")
    if kind == "csv":
        return CsvPairDataset(
            _required(data_cfg, "path", "path"),
            preprocess=preprocess,
            tokenizer=tokenizer,
            img_key=data_cfg.get("csv_img_key", "filepath"),
            caption_key=data_cfg.get("csv_caption_key", "title"),
            separator=data_cfg.get("csv_separator", "\t"),
        )
    if kind == "webdataset":
        return WebDatasetPairs(
            _required(data_cfg, "urls", "path"),
            preprocess=preprocess,
            tokenizer=tokenizer,
            caption_key=data_cfg.get("caption_key", "txt"),
            shuffle=data_cfg.get("shuffle", True),
            num_samples=data_cfg.get("num_samples"),
        )
    return SyntheticPairDataset(
        int(_required(data_cfg, "size", "num_samples")),
        image_size=int(data_cfg.get("image_size", 224)),
        context_length=int(data_cfg.get("context_length", 77)),
        vocab_size=int(data_cfg.get("vocab_size", 49408)),
        seed=int(data_cfg.get("seed", 0)),
    )


def _required(data_cfg: dict[str, Any], key: str, alias: str) -> Any:
    value = data_cfg.get(key, data_cfg.get(alias))
    if value is None:
        names = repr(key) if key == alias else f"{key!r} or {alias!r}"
        raise ValueError(f"data kind {data_cfg['kind']!r} needs data_cfg[{names}]")
    return value
