"""DeviceFeed: batches moved and augmented in order, the loader wait measured; the loader's
CUDA defaults."""

import time

import pytest
import torch
from photos import rgb_jpeg

from tinyclip_fast.data import loader as loader_module
from tinyclip_fast.data.augment import AugmentRecipe
from tinyclip_fast.data.decode import CropDecoder
from tinyclip_fast.data.device_augment import DeviceAugment
from tinyclip_fast.data.feed import DeviceFeed
from tinyclip_fast.data.loader import collate, default_workers


def slow_batches(count: int, delay: float):
    for index in range(count):
        time.sleep(delay)
        yield {"image": torch.full((2, 3), float(index)), "index": torch.tensor([index, index])}


def test_the_feed_yields_the_loaders_batches_in_order_and_times_the_wait():
    feed = DeviceFeed(slow_batches(3, 0.02), torch.device("cpu"))
    for index in range(3):
        batch = next(feed)
        assert torch.equal(batch["image"], torch.full((2, 3), float(index)))
        assert 0.015 <= feed.wait < 1.0
    with pytest.raises(StopIteration):
        next(feed)


def test_the_feed_augments_and_keeps_parameters_on_the_host():
    recipe = AugmentRecipe(size=16, hflip_prob=0.5)
    decoder = CropDecoder(recipe)
    batch = collate([decoder(rgb_jpeg(40, 50)) for _ in range(3)])
    seen = []

    class Spy(DeviceAugment):
        def __call__(self, batch):
            seen.append({k: v.device.type for k, v in batch.items()})
            return super().__call__(batch)

    out = next(DeviceFeed(iter([batch]), torch.device("cpu"), Spy(recipe)))
    assert set(out) == {"image"} and out["image"].shape == (3, 3, 16, 16)
    assert out["image"].dtype == torch.float32 and set(seen[0]) >= {"aug_flip", "image_size"}


def test_workers_default_to_none_off_cuda():
    assert default_workers("cpu") == 0


@pytest.mark.parametrize(
    "cores, gpus, expected", [(16, 1, 12), (16, 2, 7), (8, 8, 1), (64, 4, 12), (2, 1, 1)]
)
def test_workers_on_cuda_follow_the_cores_per_gpu(monkeypatch, cores, gpus, expected):
    monkeypatch.setattr(loader_module.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert default_workers("cuda", local_gpus=gpus) == expected
