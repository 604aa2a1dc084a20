"""A deterministic, resumable batch loader over map-style and iterable datasets.

``make_loader`` turns a dataset into an endless stream of collated batches whose order
depends only on (seed, epoch, rank), so a resumed run at step k sees exactly the batches the
original run saw from step k on.

Unreadable samples (:class:`BadSampleError`, raised by the datasets) stop the stream with
that error, or, given a :class:`BadSampleLog`, are skipped: counted, logged, and the run
stops once more than the log's fraction of samples were bad. A skipped map-style sample is
replaced by the next readable index not yet in its batch, so batches keep their size (DDP
ranks gather equal shapes) and a resumed run reads the same substitutes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

# Consecutive unreadable indices tried for one slot of a batch before giving up.
MAX_SUBSTITUTES = 100
# Loader workers per local GPU when num_workers is not given (CUDA), and batches each worker
# keeps ready: enough to hide a slow image behind the others without holding many batches.
MAX_WORKERS_PER_GPU = 12
PREFETCH_PER_WORKER = 4
BAD_SAMPLES_KEY = "bad_samples"


class BadSampleError(ValueError):
    """A sample that cannot be read; ``record`` names it (file, row or shard member) and the
    reason, as one JSON-able dict for the run's bad-sample log."""

    def __init__(self, message: str, record: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.record = {**(record or {}), "error": message}


def check_batch_settings(
    batch_size: int, world_size: int = 1, *, num_samples: int | None = None
) -> None:
    """ValueError saying why a global ``batch_size`` over ``world_size`` ranks cannot train:
    not a whole number of samples per rank, a batch of one pair (the loss contrasts each image
    with the other captions of the batch: one pair has none, the loss is 0 and nothing is
    learned), one pair per rank, or a map-style dataset of ``num_samples`` smaller than one
    batch (no step of a whole batch exists)."""
    if batch_size <= 0 or world_size <= 0:
        raise ValueError(f"need batch size > 0 and world size > 0, got {batch_size}, {world_size}")
    if batch_size % world_size:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the world size {world_size}: every "
            "rank takes the same number of samples"
        )
    if batch_size == 1:
        raise ValueError(
            "batch size 1 cannot learn: the loss contrasts each image with the other captions "
            "of its batch and one pair has none (the loss is 0 every step); use 2 or more"
        )
    if batch_size == world_size:
        raise ValueError(
            f"batch size {batch_size} over {world_size} ranks is one pair per rank: each "
            "rank's loss rows hold a single pair with no negatives of its own; use at least "
            f"{2 * world_size}"
        )
    if num_samples is not None and num_samples < batch_size:
        raise ValueError(
            f"the dataset has {num_samples} samples, fewer than one batch of {batch_size}: no "
            "step can be taken; lower --batch-size or add data"
        )


def default_workers(device_type: str, local_gpus: int | None = None) -> int:
    """Loader workers when num_workers is not given: 0 off CUDA (decode in the training
    process, as open_clip's default); on CUDA the cores this process may use per local GPU,
    less one for the training process, capped at MAX_WORKERS_PER_GPU."""
    if device_type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if local_gpus is None:
        local_gpus = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count() or 1))
    return max(1, min(MAX_WORKERS_PER_GPU, (cores or 1) // max(1, local_gpus) - 1))


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # One stream per (seed, epoch): a resumed run rebuilds the same permutation from scratch.
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack tensor fields, turn int fields (index, label) into a LongTensor. Images of
    different sizes (the uint8 crops and encoded bytes of data/decode.py) are zero-padded at
    the end of every dimension to the largest; the samples record their own sizes."""
    batch = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if not isinstance(values[0], torch.Tensor):
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif len({value.shape for value in values}) > 1:
            batch[key] = pad_stack(values)
        else:
            batch[key] = torch.stack(values)
    return batch


def pad_stack(values: list[torch.Tensor]) -> torch.Tensor:
    """The tensors stacked, each zero-padded at the end of every dimension to the largest."""
    shape = [max(sizes) for sizes in zip(*(value.shape for value in values), strict=True)]
    out = values[0].new_zeros((len(values), *shape))
    for slot, value in zip(out, values, strict=True):
        slot[tuple(slice(0, size) for size in value.shape)] = value
    return out


class BadSampleLog:
    """Skipped samples: one JSON line per bad sample in ``path`` (the step that first met it,
    where it is, why), a count of every time one was met, and the stop rule.

    Stops (``BadSampleError``) once bad > max_fraction * max(read, 100) samples, read counting
    good and bad ones alike: the first hundred samples may hold max_fraction * 100 bad ones.
    ``announce(message)`` is told about the first skipped sample.
    """

    MIN_READ = 100

    def __init__(
        self,
        path: str | Path | None,
        max_fraction: float,
        announce: Callable[[str], None] | None = None,
    ) -> None:
        self.path = None if path is None else Path(path)
        self.max_fraction, self.announce = max_fraction, announce
        self.bad = self.read = 0
        self.step = 0  # the training step whose batch is being read (1-based)
        self._logged: set[str] = set()

    def state_dict(self) -> dict[str, int]:
        return {"bad": self.bad, "read": self.read}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.bad, self.read = int(state["bad"]), int(state["read"])

    def good(self, count: int) -> None:
        self.read += count

    def skip(self, record: dict[str, Any]) -> None:
        self.bad += 1
        self.read += 1
        key = json.dumps(record, sort_keys=True)
        if self.path is not None and key not in self._logged:
            self._logged.add(key)  # a bad file is hit again every epoch: log it once
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": self.step, **record}) + "\n")
        if self.bad == 1 and self.announce is not None:
            where = f" (logged in {self.path})" if self.path is not None else ""
            self.announce(f"skipping bad samples{where}; the first: {record['error']}")
        if self.bad > self.max_fraction * max(self.read, self.MIN_READ):
            raise BadSampleError(
                f"{self.bad} of {self.read} samples read were bad, more than data.max_bad_fraction "
                f"{self.max_fraction}; the last: {record['error']}",
                record,
            )


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
            order = torch.randperm(self.size, generator=epoch_generator(self.seed, epoch))
            if not self.drop_last:
                # Wrap around so every rank gets the same number of batches (no DDP hang).
                padded = -(-self.size // self.world_size) * self.world_size
                order = torch.cat([order, order[: padded - self.size]])
            mine = order[self.rank :: self.world_size]
            for step in range(offset, self.steps_per_epoch):
                yield mine[step * self.batch_size : (step + 1) * self.batch_size]
            epoch, offset = epoch + 1, 0


class _BatchReader:
    """``reader[indices] -> batch``: reads the samples of one batch (in a loader worker, too).

    Bad samples never raise here (a worker's exception would reach the user wrapped in its
    traceback): their records travel in the batch under ``BAD_SAMPLES_KEY`` and the main
    process raises or logs. Skipping, a bad index is replaced by the next readable one.
    """

    def __init__(self, dataset: Dataset, skip: bool) -> None:
        self.dataset, self.skip = dataset, skip
        self.known_bad: dict[int, dict[str, Any]] = {}  # index -> record: not read again

    def __getitem__(self, indices: list[int]) -> dict[str, Any]:
        size = len(self.dataset)
        taken = set(indices) | set(self.known_bad)
        samples, bad = [], []
        for index in indices:
            candidate = index
            for _ in range(MAX_SUBSTITUTES):
                try:
                    if candidate in self.known_bad:
                        raise BadSampleError(self.known_bad[candidate]["error"])
                    samples.append(self.dataset[candidate])
                    break
                except BadSampleError as err:
                    record = self.known_bad.setdefault(candidate, err.record)
                    bad.append(record)
                    if not self.skip:
                        return {BAD_SAMPLES_KEY: bad}
                    candidate = _next_free(candidate, size, taken)
                    taken.add(candidate)
            else:
                bad.append(
                    {"error": f"{MAX_SUBSTITUTES} consecutive samples from index {index} are bad"}
                )
                return {BAD_SAMPLES_KEY: bad}
        batch = collate(samples)
        batch[BAD_SAMPLES_KEY] = bad
        return batch


def _next_free(index: int, size: int, taken: set[int]) -> int:
    for step in range(1, size + 1):
        candidate = (index + step) % size
        if candidate not in taken:
            return candidate
    return index  # every index is in this batch: read it again


def _identity(batch: Any) -> Any:
    return batch


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
    bad_samples: BadSampleLog | None = None,
    pin_memory: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless collated batches of ``batch_size`` per rank, in a (seed, epoch)-determined order.

    Map-style: epoch e is ``randperm(N)`` from a generator seeded by (seed, e); rank r takes
    every world_size-th entry; the first ``start_step`` batches are skipped by index arithmetic.
    Iterable: shards go to ranks (``set_stream``) or, for other iterables, every world_size-th
    sample; ``start_step`` batches are consumed and dropped. ``bad_samples`` switches skipping
    of unreadable samples on (module docstring); without it the first one raises.
    ``pin_memory``: map-style batches come from the workers in page-locked memory (for an
    asynchronous copy to CUDA; data/feed.py pins the others), PREFETCH_PER_WORKER ahead.
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
            bad_samples=bad_samples,
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
    if hasattr(dataset, "get_batch"):  # in-memory tensors: nothing to decode, nothing bad
        return (dataset.get_batch(indices) for indices in batches)
    reader = _BatchReader(dataset, skip=bad_samples is not None)
    if num_workers == 0:
        raw = (reader[indices.tolist()] for indices in batches)
    else:
        raw = iter(
            DataLoader(
                reader,
                sampler=_ListBatches(batches),
                batch_size=None,
                num_workers=num_workers,
                collate_fn=_identity,
                persistent_workers=True,
                pin_memory=pin_memory,
                prefetch_factor=PREFETCH_PER_WORKER,
            )
        )
    return _checked(raw, bad_samples, start_step)


def _checked(
    batches: Iterator[dict[str, Any]], bad_samples: BadSampleLog | None, start_step: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Raise or log the bad samples each batch reports."""
    for step, batch in enumerate(batches, start=start_step + 1):
        bad = batch.pop(BAD_SAMPLES_KEY, [])
        if bad_samples is None:
            if bad:
                raise BadSampleError(bad[0]["error"], bad[0])
        else:
            bad_samples.step = step
            for record in bad:
                bad_samples.skip(record)
            if "image" not in batch:  # the reader gave up on a slot
                raise BadSampleError(bad[-1]["error"], bad[-1])
            bad_samples.good(batch["image"].shape[0])
        yield batch


class _ListBatches:
    # The DataLoader's sampler: one list of indices per batch.
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
    bad_samples: BadSampleLog | None,
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
            if "bad_sample" in sample:  # only a dataset built with skip_bad_samples yields these
                record = sample["bad_sample"]
                if bad_samples is None:
                    raise BadSampleError(record["error"], record)
                if step >= start_step:  # batches replayed to reach start_step were logged
                    bad_samples.step = step + 1
                    bad_samples.skip(record)
                continue
            pending.append(sample)
            if len(pending) == batch_size:
                produced += 1
                if step >= start_step:
                    if bad_samples is not None:
                        bad_samples.good(batch_size)
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
