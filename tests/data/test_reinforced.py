"""Reading reinforced caches: per-sample choices are pure functions of (seed, epoch, sample),
resume is exact, replayed images and embeddings match the stored ones, and caches built
with other settings, missing or truncated are refused with what differs and the path."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from open_clip.transform import image_transform
from support import WordTokenizer, write_image_shards

from tinyclip_fast.data.augment import AugmentRecipe
from tinyclip_fast.data.decode import CropDecoder
from tinyclip_fast.data.device_augment import DeviceAugment
from tinyclip_fast.data.loader import collate, make_loader
from tinyclip_fast.data.reinforced import (
    TEACHER_IMAGE,
    TEACHER_TEXT,
    ReinforcedDataset,
    TeacherInfo,
    build_reinforced_dataset,
    choose,
    expected_header,
    load_shard_cache,
    read_header,
    teacher_targets,
    write_shard_cache,
)
from tinyclip_fast.data.sources import webdataset_source

RECIPE = AugmentRecipe(size=16, scale=(0.4, 1.0), hflip_prob=0.5)
TEACHERS = [
    TeacherInfo("a", 6, "f00d", math.log(20.0)),
    TeacherInfo("b", 4, "beef", math.log(50.0), logit_bias=-3.0),
]
K = 3


def fake_cache(source, recipe=RECIPE, teachers=TEACHERS, k=K, dtype="fp16", seed=0):
    """Cache files with random unit embeddings per teacher (no teacher model needed)."""
    width = sum(t.dim for t in teachers)
    generator = torch.Generator().manual_seed(seed)
    for shard in source.shards:
        keys, params, offsets, num_real, captions = [], [], [0], [], 0
        for record in shard.records():
            image = record.load_image()
            params.append([recipe.sample(image.height, image.width, generator) for _ in range(k)])
            keys.append(record.key)
            captions += len(record.captions)
            offsets.append(captions)
            num_real.append(record.num_real)
        n = len(keys)

        def unit(*shape):
            parts = torch.randn(*shape, width, generator=generator).split(
                [t.dim for t in teachers], dim=-1
            )
            return torch.cat([F.normalize(p, dim=-1) for p in parts], dim=-1)

        header = {
            **expected_header(recipe, teachers),
            "shard": shard.name,
            "source_fingerprint": shard.fingerprint(),
            "num_samples": n,
            "num_augmentations": k,
            "dtype": dtype,
            "seed": seed,
        }
        dtype_t = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        write_shard_cache(
            source.cache_path(shard),
            header,
            image_emb=unit(n, k).to(dtype_t),
            text_emb=unit(captions).to(dtype_t),
            caption_offsets=torch.tensor(offsets),
            num_real=torch.tensor(num_real),
            keys=keys,
            params=params,
        )


@pytest.fixture
def source(tmp_path):
    write_image_shards(tmp_path, num_shards=3, per_shard=4, synthetic=2)
    source = webdataset_source(str(tmp_path / "{00000..00002}.tar"))
    fake_cache(source)
    return source


def test_choice_is_a_pure_function():
    values = [choose(0, 1, "shard/key", "augmentation", 5) for _ in range(3)]
    assert values == [choose(0, 1, "shard/key", "augmentation", 5)] * 3
    # Another process (another str hash seed) makes the same choices: no hash(), no RNG.
    code = "from tinyclip_fast.data.reinforced import choose; print(choose(0, 1, 'u', 'a', 997))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert int(other.stdout) == choose(0, 1, "u", "a", 997)
    counts = torch.bincount(torch.tensor([choose(3, 0, f"k{i}", "x", 5) for i in range(5000)]))
    assert counts.min() > 850 and counts.max() < 1150  # uniform: 1000 +- 5 sigma
    by_epoch = {choose(3, epoch, "k", "x", 1000) for epoch in range(20)}
    by_seed = {choose(seed, 0, "k", "x", 1000) for seed in range(20)}
    assert len(by_epoch) > 15 and len(by_seed) > 15
    with pytest.raises(ValueError, match="cannot choose among 0"):
        choose(0, 0, "k", "caption", 0)


def test_samples_replay_the_chosen_augmentation_with_its_embeddings(source):
    tokenizer = WordTokenizer()
    dataset = ReinforcedDataset(source, tokenizer=tokenizer, shuffle=False)
    assert len(dataset) == 12 and dataset.recipe == RECIPE and dataset.teachers == TEACHERS
    caches = {s.name: load_shard_cache(source.cache_path(s)) for s in source.shards}
    records = {(s.name, r.key): r for s in source.shards for r in s.records()}
    for epoch in (0, 1):
        dataset.set_stream(seed=7, epoch=epoch, rank=0, world_size=1)
        samples = list(dataset)
        assert [s["index"] for s in samples] == list(range(12))
        for sample, (name, key) in zip(samples, records, strict=True):
            cache, record = caches[name], records[name, key]
            position = cache.keys.index(key)
            uid = f"{name}/{key}"
            aug = choose(7, epoch, uid, "augmentation", K)
            caption = choose(7, epoch, uid, "all caption", 3)
            assert (sample["aug_index"], sample["caption_index"]) == (aug, caption)
            expected = RECIPE.apply(record.load_image(), cache.params[position][aug])
            assert torch.equal(sample["image"], expected)
            assert torch.equal(sample["text"], tokenizer([record.captions[caption]])[0])
            assert torch.equal(sample[TEACHER_IMAGE], cache.image_emb[position, aug])
            row = int(cache.caption_offsets[position]) + caption
            assert torch.equal(sample[TEACHER_TEXT], cache.text_emb[row])
    # Over the samples and epochs every augmentation and caption index is used.
    dataset.set_stream(seed=1, epoch=0, rank=0, world_size=1)
    assert {s["aug_index"] for s in dataset} == {0, 1, 2}


@pytest.mark.parametrize("decode", ["tensor", "pil"])
def test_the_split_pipeline_replays_the_stored_crops(source, decode):
    # The decoder replays each stored crop from the encoded image; the device half finishes it.
    plain = ReinforcedDataset(source, tokenizer=WordTokenizer(), shuffle=False)
    split = ReinforcedDataset(source, tokenizer=WordTokenizer(), shuffle=False)
    split.decoder = CropDecoder(split.recipe, decode)
    for dataset in (plain, split):
        dataset.set_stream(seed=7, epoch=0, rank=0, world_size=1)
    expected, samples = list(plain), list(split)
    batch = DeviceAugment(split.recipe)(collate(samples))
    assert [s["aug_index"] for s in samples] == [s["aug_index"] for s in expected]
    reference = torch.stack([s["image"] for s in expected])
    std = torch.tensor(RECIPE.std).view(1, -1, 1, 1)
    assert float(((batch["image"] - reference) * std).abs().mean()) * 255 < 3.0
    assert torch.equal(batch[TEACHER_IMAGE], torch.stack([s[TEACHER_IMAGE] for s in expected]))


def test_caption_modes(source):
    for mode, allowed in (("real", {0}), ("synthetic", {1, 2})):
        dataset = ReinforcedDataset(
            source, tokenizer=WordTokenizer(), caption_mode=mode, shuffle=False
        )
        seen = {s["caption_index"] for epoch in range(3) for s in _epoch(dataset, epoch)}
        assert seen == allowed
    with pytest.raises(ValueError, match="caption_mode must be one of"):
        ReinforcedDataset(source, tokenizer=WordTokenizer(), caption_mode="best")


def test_synthetic_mode_without_synthetic_captions_is_an_error(tmp_path):
    write_image_shards(tmp_path, num_shards=1, per_shard=2, synthetic=0)
    source = webdataset_source(str(tmp_path / "00000.tar"))
    fake_cache(source)
    dataset = ReinforcedDataset(source, tokenizer=WordTokenizer(), caption_mode="synthetic")
    with pytest.raises(ValueError, match="cannot choose among 0 synthetic captions of sample"):
        list(dataset)


def _epoch(dataset, epoch, rank=0, world_size=1):
    dataset.set_stream(seed=0, epoch=epoch, rank=rank, world_size=world_size)
    return list(dataset)


def test_resume_mid_epoch_is_exact(source):
    dataset = ReinforcedDataset(source, tokenizer=WordTokenizer())
    full = make_loader(dataset, 3, seed=5)
    batches = [next(full) for _ in range(9)]  # 4 batches an epoch: crosses two boundaries
    resumed = make_loader(
        ReinforcedDataset(source, tokenizer=WordTokenizer()), 3, seed=5, start_step=6
    )
    for expected in batches[6:]:
        got = next(resumed)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)
    assert not torch.equal(batches[0]["aug_index"], batches[4]["aug_index"]) or not torch.equal(
        batches[0]["image"], batches[4]["image"]
    )  # epochs differ


def test_ranks_read_disjoint_shards_and_workers_keep_the_order(source):
    dataset = ReinforcedDataset(source, tokenizer=WordTokenizer())
    seen = [
        {(int(s["aug_index"]), s[TEACHER_IMAGE][0].item()) for s in _epoch(dataset, 0, r, 3)}
        for r in range(3)
    ]
    assert sum(len(s) for s in seen) == 12 and len(set().union(*seen)) == 12
    one = make_loader(dataset, 2, seed=3, num_workers=0)
    two = make_loader(
        ReinforcedDataset(source, tokenizer=WordTokenizer()), 2, seed=3, num_workers=2
    )
    first = [next(one) for _ in range(6)]
    second = [next(two) for _ in range(6)]
    key = lambda batch: sorted(batch[TEACHER_IMAGE][:, 0].tolist())  # noqa: E731
    assert sorted(v for b in first for v in key(b)) == sorted(v for b in second for v in key(b))


def test_teacher_targets_split_normalise_and_scale(source):
    dataset = ReinforcedDataset(source, tokenizer=WordTokenizer())
    batch = next(make_loader(dataset, 4, seed=0))
    assert batch[TEACHER_IMAGE].dtype == torch.float16
    targets = teacher_targets(batch, dataset.teachers)
    assert len(targets) == 2
    for target, teacher, start in zip(targets, TEACHERS, (0, 6), strict=True):
        assert target.image.shape == (4, teacher.dim) and target.image.dtype == torch.float32
        assert torch.allclose(target.image.norm(dim=-1), torch.ones(4), atol=1e-6)
        stored = batch[TEACHER_TEXT][:, start : start + teacher.dim].float()
        assert torch.allclose(target.text, F.normalize(stored, dim=-1))
        assert target.scale.item() == pytest.approx(math.exp(teacher.logit_scale))
    assert targets[0].bias is None and targets[1].bias.item() == -3.0
    with pytest.raises(ValueError, match=r"must both be \[n, 12\]"):
        teacher_targets(batch, [*TEACHERS, TeacherInfo("c", 2, None, 0.0)])


def test_other_recipe_teacher_or_format_is_refused(source, tmp_path):
    path = source.cache_path(source.shards[0])
    other_size = AugmentRecipe(size=20, scale=(0.4, 1.0), hflip_prob=0.5)
    with pytest.raises(ValueError, match=f"{path} was built with another preprocess: size") as e:
        ReinforcedDataset(source, tokenizer=WordTokenizer(), recipe=other_size)
    assert "delete" not in str(e.value)  # the file is valid for its own settings
    assert str(e.value).endswith(
        "in another --set reinforced.cache_dir=DIR (that file stays valid for its own)"
    )
    other_aug = AugmentRecipe(size=16, scale=(0.5, 1.0), hflip_prob=0.5)
    with pytest.raises(ValueError, match=r"another augmentation recipe: scale \[0.4, 1.0\]"):
        ReinforcedDataset(source, tokenizer=WordTokenizer(), recipe=other_aug)
    other_teacher = [TEACHERS[0], TeacherInfo("b", 4, "cafe", 0.0)]
    with pytest.raises(ValueError, match="another teacher: .*beef.* != .*cafe"):
        ReinforcedDataset(source, tokenizer=WordTokenizer(), teachers=other_teacher)
    assert ReinforcedDataset(source, tokenizer=WordTokenizer(), recipe=RECIPE, teachers=TEACHERS)
    # One shard built with another recipe than the others.
    fake_cache(webdataset_source(str(source.shards[2].path)), recipe=other_aug)
    with pytest.raises(ValueError, match="00002.reinforced.safetensors was built with another"):
        ReinforcedDataset(source, tokenizer=WordTokenizer())


def test_other_format_version_is_refused(source):
    path = source.cache_path(source.shards[1])
    cache = load_shard_cache(path)
    write_shard_cache(
        path,
        cache.header,
        image_emb=cache.image_emb,
        text_emb=cache.text_emb,
        caption_offsets=cache.caption_offsets,
        num_real=cache.num_real,
        keys=cache.keys,
        params=cache.params,
    )
    assert read_header(path) == cache.header
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    header = {**cache.header, "format_version": 0}
    save_file(tensors, str(path), metadata={"tinyclip_reinforced": json.dumps(header)})
    with pytest.raises(ValueError, match=f"{path} has format .* version 0, this library reads"):
        ReinforcedDataset(source, tokenizer=WordTokenizer())


def test_missing_and_truncated_files_are_reported_with_their_path(source):
    cache = source.cache_path(source.shards[1])
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"reinforced cache {cache} is truncated"):
        ReinforcedDataset(source, tokenizer=WordTokenizer())
    cache.unlink()
    with pytest.raises(
        FileNotFoundError, match=f"1 of 3 reinforced cache files are missing.*{cache}"
    ):
        ReinforcedDataset(source, tokenizer=WordTokenizer())
    fake_cache(source)
    # The tar is cut short after its cache was built: the fingerprint no longer matches.
    tar = source.shards[2].path
    tar.write_bytes(tar.read_bytes()[:-2048])
    dataset = ReinforcedDataset(source, tokenizer=WordTokenizer(), shuffle=False)
    with pytest.raises(ValueError, match=f"shard TarShard.'{tar}'. changed since its cache"):
        list(dataset)


def test_a_changed_shard_is_detected_sample_by_sample(source, tmp_path):
    # Same file size (same fingerprint) but other keys: the key check still catches it.
    shard = source.shards[0]
    cache = load_shard_cache(source.cache_path(shard))
    header = dict(cache.header)
    keys = list(reversed(cache.keys))
    write_shard_cache(
        source.cache_path(shard),
        header,
        image_emb=cache.image_emb,
        text_emb=cache.text_emb,
        caption_offsets=cache.caption_offsets,
        num_real=cache.num_real,
        keys=keys,
        params=cache.params,
    )
    dataset = ReinforcedDataset(source, tokenizer=WordTokenizer(), shuffle=False)
    with pytest.raises(ValueError, match="disagree at sample 0: 's0-000' in the shard, 's0-003'"):
        list(dataset)


def test_inconsistent_tensors_are_refused_when_written(tmp_path):
    header = {
        **expected_header(RECIPE, TEACHERS),
        "num_samples": 2,
        "num_augmentations": 1,
        "dtype": "fp32",
    }
    good = dict(
        image_emb=torch.zeros(2, 1, 10),
        text_emb=torch.zeros(3, 10),
        caption_offsets=torch.tensor([0, 1, 3]),
        num_real=torch.tensor([1, 1]),
        keys=["a", "b"],
        params=[[{"crop": [0, 0, 1, 1], "flip": False}]] * 2,
    )
    write_shard_cache(tmp_path / "ok.safetensors", header, **good)
    for change, message in (
        ({"image_emb": torch.zeros(2, 2, 10)}, "image_emb"),
        ({"caption_offsets": torch.tensor([0, 3, 3])}, "a sample has no caption"),
        ({"keys": ["a"]}, "1 keys"),
        ({"image_emb": torch.zeros(2, 1, 10, dtype=torch.float16)}, "dtype"),
    ):
        with pytest.raises(ValueError, match=message):
            write_shard_cache(tmp_path / "bad.safetensors", header, **{**good, **change})
    assert not (tmp_path / "bad.safetensors").exists()


def test_dataset_from_a_data_config(source, tmp_path):
    folder = source.shards[0].path.parent
    cfg = {"kind": "reinforced", "path": f"{folder}/{{00000..00002}}.tar", "shuffle": False}
    dataset = build_reinforced_dataset(cfg, None, WordTokenizer())
    assert len(dataset) == 12 and dataset.recipe == RECIPE
    with pytest.raises(ValueError, match="another preprocess: size"):
        build_reinforced_dataset(cfg, image_transform(32, is_train=True), WordTokenizer())
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_reinforced_dataset(cfg, None, None)
