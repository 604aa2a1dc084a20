"""build_targets picks where targets come from: the embedding cache when one is given, else
the teachers online; the cache and the online teachers give the loss the same arguments,
with the configured fixed scale or the teachers' own, and sigmoid biases when asked."""

import contextlib

import open_clip
import pytest
import torch
from torch.utils.data import IterableDataset

from tinyclip_fast.data.datasets import TensorPairDataset
from tinyclip_fast.teachers.embedding_cache import TeacherEmbeddingCache
from tinyclip_fast.teachers.factory import build_targets
from tinyclip_fast.teachers.targets import CachedTargets, OnlineTargets
from tinyclip_fast.train.config import TeacherConfig

VOCAB, CONTEXT = 40, 8


def tiny_clip(seed: int) -> open_clip.model.CLIP:
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        embed_dim=12,
        vision_cfg={"image_size": 8, "patch_size": 4, "width": 32, "layers": 1, "head_width": 16},
        text_cfg={
            "context_length": CONTEXT,
            "vocab_size": VOCAB,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    )
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def dataset() -> TensorPairDataset:
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(6, 3, 8, 8, generator=generator)
    texts = torch.randint(1, VOCAB - 1, (6, CONTEXT), generator=generator)
    return TensorPairDataset(images, texts)


def _targets(teachers, dataset, cache_path=None, **options):
    settings = dict(
        cache_path=cache_path,
        teacher_configs=[TeacherConfig() for _ in teachers],
        fixed_scale=None,
        sigmoid=False,
        micro_batch=4,
        autocast=contextlib.nullcontext,
        device=torch.device("cpu"),
        say=print,
    )
    return build_targets(teachers, dataset, **{**settings, **options})


def _batch(dataset):
    return {
        "image": dataset.images,
        "text": dataset.texts,
        "index": torch.arange(len(dataset)),
    }


@pytest.mark.parametrize("count", [1, 2])
def test_cache_and_online_teachers_give_the_same_loss_arguments(tmp_path, dataset, count):
    teachers = [tiny_clip(seed) for seed in range(count)]
    path = tmp_path / "cache.safetensors"
    TeacherEmbeddingCache.build(teachers, dataset, path, batch_size=4)
    online = _targets(teachers, dataset)
    cached = _targets(teachers, dataset, cache_path=path)
    assert isinstance(online, OnlineTargets) and isinstance(cached, CachedTargets)
    a, b = online(_batch(dataset)), cached(_batch(dataset))
    assert len(a) == len(b) == 3
    if count == 1:
        a, b = [[part] for part in a], [[part] for part in b]
    for part_a, part_b in zip(a, b, strict=True):
        for x, y in zip(part_a, part_b, strict=True):
            assert torch.allclose(torch.as_tensor(x), torch.as_tensor(y), atol=1e-5)


def test_fixed_scale_and_sigmoid_biases(dataset):
    teacher = tiny_clip(0)
    fixed = torch.tensor(50.0)
    targets = _targets(
        [teacher],
        dataset,
        fixed_scale=fixed,
        sigmoid=True,
        teacher_configs=[TeacherConfig(logit_bias=-10.0)],
    )
    image, text, scale, bias = targets(_batch(dataset))
    assert scale is fixed and float(bias) == -10.0
    own = _targets([teacher], dataset)(_batch(dataset))[2]
    assert float(own) == pytest.approx(float(teacher.logit_scale.exp()))


def test_cache_needs_map_style_data(tmp_path, dataset):
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(())

    with pytest.raises(ValueError, match="--teacher-cache needs map-style data"):
        _targets([tiny_clip(0)], Stream(), cache_path=tmp_path / "any.safetensors")
