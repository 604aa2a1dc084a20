"""Image-text datasets and a deterministic, resumable batch loader.

Every dataset yields dict samples ``{"image": FloatTensor[3, H, W], "text": LongTensor[ctx],
"index": int}`` (labelled datasets add ``"label": int``). ``make_loader`` turns one into an
endless stream of collated batches whose order depends only on (seed, epoch, rank), so a
resumed run at step k sees exactly the batches the original run saw from step k on.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

Preprocess = Callable[[Any], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]

DATASET_KINDS = ("csv", "webdataset", "synthetic", "demo")
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
        shards = list(self.shards)
        if self.shuffle:
            order = torch.randperm(len(shards), generator=_epoch_generator(self.seed, self.epoch))
            shards = [shards[i] for i in order.tolist()]
        shards = shards[self.rank :: self.world_size]
        worker = get_worker_info()
        if worker is not None:
            shards = shards[worker.id :: worker.num_workers]
        return shards

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
    """The dataset that ``data_cfg["kind"]`` names (csv, webdataset, synthetic, demo).

    Keys (``path`` and ``num_samples`` serve every kind, as in config.DataConfig):
    csv: ``path``, ``csv_img_key``, ``csv_caption_key``, ``csv_separator``;
    webdataset: ``path`` (or ``urls``), ``caption_key``, ``shuffle``, ``num_samples``;
    synthetic: ``num_samples`` (or ``size``), ``image_size``, ``context_length``,
    ``vocab_size``, ``seed``;
    demo: ``path`` (or ``source``: auto/digits/fashion-mnist), ``split`` (train/test),
    ``image_size``, ``context_length``, ``seed``, ``num_samples``. The demo ships tensor
    images and its own compact tokenizer: ``preprocess`` and ``tokenizer`` are ignored.
    """
    kind = data_cfg.get("kind")
    if kind not in DATASET_KINDS:
        raise ValueError(f"data_cfg['kind'] must be one of {DATASET_KINDS}, got {kind!r}")
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
    if kind == "synthetic":
        return SyntheticPairDataset(
            int(_required(data_cfg, "size", "num_samples")),
            image_size=int(data_cfg.get("image_size", 224)),
            context_length=int(data_cfg.get("context_length", 77)),
            vocab_size=int(data_cfg.get("vocab_size", 49408)),
            seed=int(data_cfg.get("seed", 0)),
        )
    from tinyclip_fast.demo.data import load_demo_split

    return load_demo_split(
        data_cfg.get("source") or data_cfg.get("path") or "auto",
        data_cfg.get("split", "train"),
        image_size=int(data_cfg.get("image_size", 32)),
        context_length=int(data_cfg.get("context_length", 12)),
        seed=int(data_cfg.get("seed", 0)),
        max_samples=data_cfg.get("num_samples"),
    ).dataset


def _required(data_cfg: dict[str, Any], key: str, alias: str) -> Any:
    value = data_cfg.get(key, data_cfg.get(alias))
    if value is None:
        names = repr(key) if key == alias else f"{key!r} or {alias!r}"
        raise ValueError(f"data kind {data_cfg['kind']!r} needs data_cfg[{names}]")
    return value


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # One stream per (seed, epoch): a resumed run rebuilds the same permutation from scratch.
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack tensor fields, turn int fields (index, label) into a LongTensor."""
    batch = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        batch[key] = (
            torch.stack(values)
            if isinstance(values[0], torch.Tensor)
            else torch.tensor(values, dtype=torch.long)
        )
    return batch


class _EpochBatches:
    """Index batches of one rank, epoch after epoch, from a global step onwards."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        seed: int,
        start_step: int,
        rank: int,
        world_size: int,
        drop_last: bool,
    ) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        global_batch = batch_size * world_size
        if drop_last:
            self.steps_per_epoch = size // global_batch
        else:
            per_rank = -(-size // world_size)
            self.steps_per_epoch = -(-per_rank // batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"dataset of {size} samples is smaller than one global batch "
                f"({batch_size} x {world_size} ranks) with drop_last=True"
            )
        self.start_step = start_step

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch, offset = divmod(self.start_step, self.steps_per_epoch)
        while True:
            order = torch.randperm(self.size, generator=_epoch_generator(self.seed, epoch))
            if not self.drop_last:
                # Wrap around so every rank gets the same number of batches (no DDP hang).
                padded = -(-self.size // self.world_size) * self.world_size
                order = torch.cat([order, order[: padded - self.size]])
            mine = order[self.rank :: self.world_size]
            for step in range(offset, self.steps_per_epoch):
                yield mine[step * self.batch_size : (step + 1) * self.batch_size]
            epoch, offset = epoch + 1, 0


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    drop_last: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless collated batches of ``batch_size`` per rank, in a (seed, epoch)-determined order.

    Map-style: epoch e is ``randperm(N)`` from a generator seeded by (seed, e); rank r takes
    every world_size-th entry; the first ``start_step`` batches are skipped by index arithmetic.
    Iterable: shards go to ranks (``set_stream``) or, for other iterables, every world_size-th
    sample; ``start_step`` batches are consumed and dropped.
    """
    if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size or start_step < 0:
        raise ValueError(
            f"need batch_size > 0, 0 <= rank < world_size, start_step >= 0; got batch_size="
            f"{batch_size}, rank={rank}, world_size={world_size}, start_step={start_step}"
        )
    if isinstance(dataset, IterableDataset):
        return _iterable_batches(
            dataset,
            batch_size,
            seed=seed,
            start_step=start_step,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            drop_last=drop_last,
        )
    batches = _EpochBatches(
        len(dataset),
        batch_size,
        seed=seed,
        start_step=start_step,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
    )
    if hasattr(dataset, "get_batch"):
        return (dataset.get_batch(indices) for indices in batches)
    if num_workers == 0:
        return (collate([dataset[i] for i in indices.tolist()]) for indices in batches)
    loader = DataLoader(
        dataset,
        batch_sampler=_ListBatches(batches),
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=True,
    )
    return iter(loader)


class _ListBatches:
    # DataLoader's batch_sampler wants lists of ints.
    def __init__(self, batches: _EpochBatches) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return (indices.tolist() for indices in self.batches)


def _iterable_batches(
    dataset: IterableDataset,
    batch_size: int,
    *,
    seed: int,
    start_step: int,
    rank: int,
    world_size: int,
    num_workers: int,
    drop_last: bool,
) -> Iterator[dict[str, torch.Tensor]]:
    step, epoch = 0, 0
    while True:
        if hasattr(dataset, "set_stream"):
            dataset.set_stream(seed=seed, epoch=epoch, rank=rank, world_size=world_size)
            stream = _sample_stream(dataset, num_workers)
        else:
            stream = (
                sample
                for position, sample in enumerate(_sample_stream(dataset, num_workers))
                if position % world_size == rank
            )
        pending: list[dict[str, Any]] = []
        produced = 0
        for sample in stream:
            pending.append(sample)
            if len(pending) == batch_size:
                produced += 1
                if step >= start_step:
                    yield collate(pending)
                step, pending = step + 1, []
        if pending and not drop_last:
            produced += 1
            if step >= start_step:
                yield collate(pending)
            step += 1
        if produced == 0:
            raise ValueError(
                f"rank {rank} got no full batch of {batch_size} in epoch {epoch}: the iterable "
                f"dataset is too small for this batch size and world size"
            )
        epoch += 1


def _sample_stream(dataset: IterableDataset, num_workers: int) -> Iterator[dict[str, Any]]:
    if num_workers == 0:
        return iter(dataset)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return iter(loader)
