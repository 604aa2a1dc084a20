"""The resumable batch loader: permutations per epoch, exact resume, rank sharding."""

import json

import pytest
import torch
from support import PlainDataset
from torch.utils.data import Dataset, IterableDataset

from tinyclip_fast.data.datasets import TensorPairDataset
from tinyclip_fast.data.loader import (
    BadSampleError,
    BadSampleLog,
    check_batch_settings,
    collate,
    make_loader,
)


def tensor_dataset(size: int) -> TensorPairDataset:
    images = torch.arange(size, dtype=torch.float32).reshape(size, 1, 1, 1).expand(size, 3, 2, 2)
    texts = torch.arange(size).reshape(size, 1).repeat(1, 4)
    return TensorPairDataset(images.contiguous(), texts, labels=torch.arange(size) % 3)


def take(loader, steps):
    return [next(loader) for _ in range(steps)]


def test_loader_epochs_are_permutations_and_deterministic():
    data = tensor_dataset(12)
    batches = take(make_loader(data, 4, seed=5), 6)  # two epochs
    again = take(make_loader(data, 4, seed=5), 6)
    other_seed = take(make_loader(data, 4, seed=6), 3)
    for batch, same in zip(batches, again, strict=True):
        for key in batch:
            assert torch.equal(batch[key], same[key])
    epoch0 = torch.cat([b["index"] for b in batches[:3]])
    epoch1 = torch.cat([b["index"] for b in batches[3:]])
    assert sorted(epoch0.tolist()) == list(range(12)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)
    assert not torch.equal(epoch0, torch.cat([b["index"] for b in other_seed]))
    first = batches[0]
    assert torch.equal(first["image"][:, 0, 0, 0].long(), first["index"])
    assert torch.equal(first["text"][:, 0], first["index"])
    assert torch.equal(first["label"], first["index"] % 3)


def test_loader_resume_skips_exactly():
    data = tensor_dataset(10)  # 3 steps per epoch at batch 3 (drop_last)
    reference = take(make_loader(data, 3, seed=2), 8)
    for start in (1, 3, 5):
        resumed = take(make_loader(data, 3, seed=2, start_step=start), 8 - start)
        for got, expected in zip(resumed, reference[start:], strict=True):
            assert torch.equal(got["index"], expected["index"])


def test_loader_rank_sharding():
    data = tensor_dataset(16)
    ranks = [take(make_loader(data, 2, seed=0, rank=r, world_size=4), 4) for r in range(4)]
    for step in range(4):
        indices = torch.cat([ranks[r][step]["index"] for r in range(4)])
        assert indices.unique().numel() == 8  # disjoint
    everything = torch.cat([b["index"] for r in range(4) for b in ranks[r][:2]])
    assert sorted(everything.tolist()) == list(range(16))  # one epoch covers the data once
    single = take(make_loader(data, 8, seed=0), 1)[0]["index"]
    assert torch.equal(
        torch.cat([ranks[r][0]["index"] for r in range(4)]).sort().values, single.sort().values
    )


def test_loader_without_drop_last_pads_ranks_equally():
    data = tensor_dataset(7)
    counts = []
    for rank in range(2):
        batches = take(make_loader(data, 3, seed=0, rank=rank, world_size=2, drop_last=False), 2)
        counts.append([b["index"].numel() for b in batches])
    assert counts[0] == counts[1] == [3, 1]


def test_loader_paths_agree():
    data = tensor_dataset(9)
    fast = take(make_loader(data, 3, seed=4), 4)
    plain = take(make_loader(PlainDataset(data), 3, seed=4), 4)
    workers = take(make_loader(PlainDataset(data), 3, seed=4, num_workers=1), 4)
    for a, b, c in zip(fast, plain, workers, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])


def test_loader_bad_arguments():
    data = tensor_dataset(4)
    with pytest.raises(ValueError, match="smaller than one global batch"):
        next(make_loader(data, 3, seed=0, world_size=2))
    with pytest.raises(ValueError, match="rank"):
        make_loader(data, 2, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(data, 0, seed=0)
    with pytest.raises(ValueError, match="images must be a float tensor"):
        TensorPairDataset(torch.zeros(2, 3, 4, 4, dtype=torch.long), torch.zeros(2, 3).long())
    with pytest.raises(ValueError, match="texts must be a long tensor"):
        TensorPairDataset(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3).long())


def test_collate_stacks_tensors_and_ints():
    batch = collate([{"image": torch.ones(2), "index": 3}, {"image": torch.zeros(2), "index": 4}])
    assert batch["image"].shape == (2, 2) and batch["index"].tolist() == [3, 4]
    assert batch["index"].dtype == torch.long


class SomeBad(Dataset):
    """Samples 0..size-1 whose image holds the index; the indices in ``bad`` cannot be read."""

    def __init__(self, size, bad):
        self.size, self.bad = size, set(bad)

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if index in self.bad:
            raise BadSampleError(f"file {index}.png cannot be read", {"file": f"{index}.png"})
        return {"image": torch.full((3, 2, 2), float(index)), "index": index}


def test_bad_sample_stops_the_run_naming_it():
    with pytest.raises(BadSampleError, match="file 3.png cannot be read"):
        take(make_loader(SomeBad(8, bad=[3]), 4, seed=0), 2)
    # The same from a loader worker: the message, not a worker traceback.
    with pytest.raises(BadSampleError, match="^file 3.png cannot be read$"):
        take(make_loader(SomeBad(8, bad=[3]), 4, seed=0, num_workers=1), 2)


@pytest.mark.parametrize("workers", [0, 1])
def test_skipped_samples_are_replaced_logged_and_counted(tmp_path, workers):
    log = BadSampleLog(tmp_path / "bad.jsonl", max_fraction=0.5)
    batches = take(make_loader(SomeBad(12, bad=[3, 4]), 4, seed=0, bad_samples=log,
                               num_workers=workers), 6)  # fmt: skip
    for batch in batches:
        indices = batch["index"].tolist()
        assert len(indices) == 4 == len(set(indices)) and not {3, 4} & set(indices)
        assert batch["image"][:, 0, 0, 0].long().tolist() == indices
    assert log.bad == 4 and log.read == 28  # two epochs, two bad files each, read once each
    records = [json.loads(line) for line in (tmp_path / "bad.jsonl").open()]
    assert sorted(r["file"] for r in records) == ["3.png", "4.png"]  # logged once
    assert all(1 <= r["step"] <= 3 and "cannot be read" in r["error"] for r in records)
    # A resumed loader reads the same batches, substitutes included.
    resumed = take(make_loader(SomeBad(12, bad=[3, 4]), 4, seed=0, start_step=4,
                               bad_samples=BadSampleLog(None, 0.5)), 2)  # fmt: skip
    for a, b in zip(resumed, batches[4:], strict=True):
        assert torch.equal(a["index"], b["index"])


def test_too_many_bad_samples_stop_the_run():
    announced = []
    log = BadSampleLog(None, max_fraction=0.01, announce=announced.append)
    loader = make_loader(SomeBad(400, bad=range(0, 400, 50)), 100, seed=0, bad_samples=log)
    with pytest.raises(BadSampleError, match=r"2 of \d+ samples read were bad, more than "):
        take(loader, 4)
    assert len(announced) == 1 and "the first: file" in announced[0]


def test_stream_markers_are_logged_not_batched():
    class Stream(IterableDataset):
        def __iter__(self):
            for i in range(6):
                if i == 2:
                    yield {"bad_sample": {"error": "member 2 is broken"}}
                yield {"image": torch.full((1,), float(i)), "index": i}

    log = BadSampleLog(None, max_fraction=0.5)
    batches = take(make_loader(Stream(), 3, seed=0, bad_samples=log), 4)
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5]] * 2
    assert log.bad == 2 and log.read == 14
    with pytest.raises(BadSampleError, match="member 2 is broken"):
        take(make_loader(Stream(), 3, seed=0), 1)


@pytest.mark.parametrize(
    "batch_size, world_size, num_samples, message",
    [
        (1, 1, None, "batch size 1 cannot learn: the loss contrasts each image with the other"),
        (4, 4, None, "batch size 4 over 4 ranks is one pair per rank"),
        (6, 4, None, "batch size 6 is not divisible by the world size 4"),
        (8, 1, 5, "the dataset has 5 samples, fewer than one batch of 8: no step"),
        (0, 1, None, "need batch size > 0"),
    ],
    ids=["global-batch-1", "one-pair-per-rank", "uneven", "dataset-under-one-batch", "zero"],
)
def test_settings_that_cannot_train_are_refused_saying_why(
    batch_size, world_size, num_samples, message
):
    with pytest.raises(ValueError, match="^" + message):
        check_batch_settings(batch_size, world_size, num_samples=num_samples)


@pytest.mark.parametrize("batch_size, world_size", [(2, 1), (8, 4), (256, 8)])
def test_batches_with_negatives_on_every_rank_are_accepted(batch_size, world_size):
    check_batch_settings(batch_size, world_size, num_samples=batch_size)
