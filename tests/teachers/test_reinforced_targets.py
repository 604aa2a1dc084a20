"""Distilling from reinforced data through the engine: a run from the cache equals a run
with the online teacher (or the online ensemble, for a cache of two teachers) on the same
augmentation sequence (losses and final weights), no teacher runs forward, and a cache built
by another teacher is refused."""

import pytest
import torch
from support import (
    STUDENT_CFG,
    WordTokenizer,
    assert_same_weights,
    losses,
    make_config,
    make_teacher,
    rel_err,
    run,
    write_image_shards,
)
from torch.utils.data import IterableDataset

from tinyclip_fast.data.augment import AugmentRecipe
from tinyclip_fast.data.reinforced import TEACHER_IMAGE, TEACHER_TEXT, ReinforcedDataset
from tinyclip_fast.data.sources import webdataset_source
from tinyclip_fast.teachers.reinforced_build import CacheTeacher, build_reinforced_shards
from tinyclip_fast.train.config import StageConfig

RECIPE = AugmentRecipe(size=32, scale=(0.5, 1.0), hflip_prob=0.5, rand_augment=(2, 9, 31))


class WithoutTargets(IterableDataset):
    """The same stream of replayed augmentations and captions, minus the stored embeddings:
    the engine then runs the online teacher on exactly the images the cache was read for."""

    def __init__(self, inner):
        self.inner = inner

    def set_stream(self, **stream):
        self.inner.set_stream(**stream)

    def __iter__(self):
        for sample in self.inner:
            yield {k: v for k, v in sample.items() if k not in (TEACHER_IMAGE, TEACHER_TEXT)}

    def __len__(self):
        return len(self.inner)


class ForwardCounter:
    """Counts forwards of the teacher's towers (an online teacher runs both per step)."""

    def __init__(self, teacher):
        self.calls = 0
        for tower in (teacher.visual, teacher.transformer):
            tower.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.calls += 1


TEACHER_SEEDS = {1: (1,), 2: (1, 3)}  # an ensemble cache stores both teachers side by side


def build_source(tmp_path, teacher_seeds=(1,)):
    # 2 shards x 4 samples at batch 4: 5 steps span 3 epochs, so the stored augmentation and
    # caption of a sample change between epochs.
    write_image_shards(tmp_path / "shards", num_shards=2, per_shard=4, synthetic=2)
    source = webdataset_source(str(tmp_path / "shards" / "{00000..00001}.tar"))
    build_reinforced_shards(
        source,
        [CacheTeacher(make_teacher(seed=s), WordTokenizer()) for s in teacher_seeds],
        RECIPE,
        num_augmentations=3,
        dtype="fp32",
        batch_size=8,
        progress=False,
    )
    return source


@pytest.fixture
def source(tmp_path):
    return build_source(tmp_path)


@pytest.mark.parametrize("num_teachers", [1, 2])
def test_run_from_the_cache_equals_the_online_teacher(tmp_path, num_teachers):
    seeds = TEACHER_SEEDS[num_teachers]
    source = build_source(tmp_path, seeds)
    stages = [StageConfig(steps=5, student_config=STUDENT_CFG)]
    results, calls = {}, {}
    for name in ("cache", "online"):
        teachers = [make_teacher(seed=s) for s in seeds]
        counters = [ForwardCounter(t) for t in teachers]
        dataset = ReinforcedDataset(source, tokenizer=WordTokenizer())
        if name == "online":
            dataset = WithoutTargets(dataset)
        config = make_config(tmp_path / name, stages, batch_size=4)
        teacher = teachers[0] if num_teachers == 1 else teachers
        results[name] = run(config, teacher=teacher, train_dataset=dataset)
        calls[name] = sum(c.calls for c in counters)
    assert calls == {"cache": 0, "online": 2 * 5 * num_teachers}
    cache, online = (losses(results[n].history) for n in ("cache", "online"))
    assert len(cache) == 5 and cache[0] != cache[-1]
    assert rel_err(torch.tensor(cache), torch.tensor(online)) < 1e-5
    assert_same_weights(results["cache"].student, results["online"].student, tol=1e-4)


def test_cache_of_another_teacher_is_refused(source, tmp_path):
    config = make_config(tmp_path, [StageConfig(steps=1, student_config=STUDENT_CFG)])
    dataset = ReinforcedDataset(source, tokenizer=WordTokenizer())
    path = source.cache_path(source.shards[0])
    with pytest.raises(ValueError, match=f"{path} was built with another teacher"):
        run(config, teacher=make_teacher(seed=7), train_dataset=dataset)
