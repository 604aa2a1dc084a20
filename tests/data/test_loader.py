"""The resumable batch loader: permutations per epoch, exact resume, rank sharding."""

import pytest
import torch
from support import PlainDataset

from tinyclip_fast.data.datasets import TensorPairDataset
from tinyclip_fast.data.loader import collate, make_loader


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
