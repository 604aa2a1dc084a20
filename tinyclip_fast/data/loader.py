"""A deterministic, resumable batch loader over map-style and iterable datasets.

``make_loader`` turns a dataset into an endless stream of collated batches whose order
depends only on (seed, epoch, rank), so a resumed run at step k sees exactly the batches the
original run saw from step k on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
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
            order = torch.randperm(self.size, generator=epoch_generator(self.seed, epoch))
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
