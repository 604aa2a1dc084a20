"""Building reinforced caches: the stored embeddings are the online teacher's on the replayed
augmentations, an interrupted build continues without rewriting finished shards, ranks
build disjoint shards, caches built otherwise are refused, and training from the cache
equals training with the online teacher on the same augmentation sequence."""

import copy
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from support import (
    STUDENT_CFG,
    TEACHER_CFG,
    WordTokenizer,
    assert_same_weights,
    encode_image,
    make_teacher,
    random_image,
    rel_err,
    write_image_shards,
)

from tinyclip_fast.data.augment import AugmentRecipe
from tinyclip_fast.data.loader import make_loader
from tinyclip_fast.data.reinforced import (
    ReinforcedDataset,
    load_shard_cache,
    read_header,
    teacher_targets,
)
from tinyclip_fast.data.sources import folder_source, webdataset_source
from tinyclip_fast.losses import AffinityMimickingLoss
from tinyclip_fast.ops.backend import force_backend
from tinyclip_fast.teachers.embedding_cache import teacher_fingerprint
from tinyclip_fast.teachers.reinforced_build import CacheTeacher, build_reinforced_shards

RECIPE = AugmentRecipe(size=32, scale=(0.5, 1.0), hflip_prob=0.5, rand_augment=(2, 9, 31))
# Half an ulp at 1.0 of each cache dtype, relative: what rounding once may change.
ROUNDING = {"fp32": 1e-6, "fp16": 2.0**-11, "bf16": 2.0**-8}


@pytest.fixture
def tars(tmp_path):
    write_image_shards(tmp_path / "shards", num_shards=2, per_shard=2, synthetic=2)
    return webdataset_source(str(tmp_path / "shards" / "{00000..00001}.tar"))


def build(source, teachers, **options):
    options = {"num_augmentations": 5, "batch_size": 4, "progress": False, **options}
    return build_reinforced_shards(source, teachers, options.pop("recipe", RECIPE), **options)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cache_equals_the_online_teacher_on_the_replayed_augmentation(tars, dtype):
    teacher, tokenizer = make_teacher(), WordTokenizer()
    report = build(tars, [CacheTeacher(teacher, tokenizer)], dtype=dtype)
    assert len(report.built) == 2 and report.images == 4 and report.images_per_s > 0
    for shard in tars.shards:
        cache = load_shard_cache(tars.cache_path(shard))
        assert cache.header["num_augmentations"] == 5 and cache.image_emb.shape == (2, 5, 32)
        for position, record in enumerate(shard.records()):
            image = record.load_image()
            replayed = torch.stack([RECIPE.apply(image, p) for p in cache.params[position]])
            start, stop = (int(v) for v in cache.caption_offsets[position : position + 2])
            with torch.no_grad():
                online_image = teacher.encode_image(replayed, normalize=True)
                online_text = teacher.encode_text(tokenizer(list(record.captions)), normalize=True)
            for cached, online in (
                (cache.image_emb[position], online_image),
                (cache.text_emb[start:stop], online_text),
            ):
                cosine = F.cosine_similarity(cached.float(), online, dim=-1)
                assert cosine.min() >= (0.9999 if dtype == "fp32" else 0.999), cosine
                # Rounded once from the fp32 features: within half an ulp (plus fp32 noise).
                error = (cached.float() - online).abs()
                assert (error <= online.abs() * ROUNDING[dtype] + 1e-6).all(), error.max()
        assert len({json.dumps(p) for p in cache.params[0]}) == 5  # five distinct draws


def test_ensemble_cache_concatenates_teachers(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(4):
        random_image(i).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a caption number {i}")
    source = folder_source(root, shard_size=3)
    first = make_teacher(1)
    torch.manual_seed(2)
    second = open_clip.model.CLIP(**{**TEACHER_CFG, "embed_dim": 24}).eval()
    with torch.no_grad():
        second.logit_scale.fill_(2.5)
    tokenizer = WordTokenizer()
    teachers = [CacheTeacher(first, tokenizer, "first"), CacheTeacher(second, tokenizer, "second")]
    build(source, teachers, num_augmentations=2, dtype="fp32")
    dataset = ReinforcedDataset(source, tokenizer=tokenizer)
    assert [(t.name, t.dim) for t in dataset.teachers] == [("first", 32), ("second", 24)]
    assert dataset.teachers[1].logit_scale == pytest.approx(2.5)
    assert dataset.teachers[0].fingerprint == teacher_fingerprint(first)
    batch = next(make_loader(dataset, 4, seed=0))
    targets = teacher_targets(batch, dataset.teachers)
    for target, model in zip(targets, (first, second), strict=True):
        with torch.no_grad():
            image = model.encode_image(batch["image"], normalize=True)
            text = model.encode_text(batch["text"], normalize=True)
        assert F.cosine_similarity(target.image, image).min() >= 0.9999
        assert F.cosine_similarity(target.text, text).min() >= 0.9999
        assert target.scale.item() == pytest.approx(model.logit_scale.exp().item())


def test_interrupted_build_continues_without_rewriting_finished_shards(tmp_path):
    folder = tmp_path / "shards"
    paths = write_image_shards(folder, num_shards=3, per_shard=2)
    good_middle = paths[1].read_bytes()
    with wds.TarWriter(str(paths[1])) as sink:  # a broken image stops the build there
        sink.write({"__key__": "s1-000", "png": encode_image(random_image(0))[:40], "txt": "x"})
    source = webdataset_source(str(folder / "{00000..00002}.tar"))
    teachers = [CacheTeacher(make_teacher(), WordTokenizer())]
    with pytest.raises(
        ValueError, match=f"cannot decode the image of sample 's1-000' of {paths[1]}"
    ):
        build(source, teachers)
    done = source.cache_path(source.shards[0])
    assert done.is_file() and not source.cache_path(source.shards[1]).exists()
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
    finished = (done.read_bytes(), done.stat().st_mtime_ns)
    # A build killed while writing shard 1 leaves atomic_write's temporary file behind.
    stale = folder / ".00001.reinforced.safetensors.abc123.tmp"
    stale.write_bytes(b"half a file")
    paths[1].write_bytes(good_middle)
    report = build(source, teachers)
    assert report.skipped == [done]
    assert report.built == [source.cache_path(s) for s in source.shards[1:]]
    assert (done.read_bytes(), done.stat().st_mtime_ns) == finished
    assert not stale.exists()
    assert len(ReinforcedDataset(source, tokenizer=WordTokenizer())) == 6
    again = build(source, teachers)  # everything is there: nothing to do
    assert again.built == [] and len(again.skipped) == 3


def test_ranks_build_disjoint_shards(tmp_path):
    write_image_shards(tmp_path, num_shards=5, per_shard=1)
    source = webdataset_source(str(tmp_path / "{00000..00004}.tar"))
    teachers = [CacheTeacher(make_teacher(), WordTokenizer())]
    built = {}
    for rank in (1, 0, 2):
        report = build(source, teachers, num_augmentations=2, rank=rank, world_size=3)
        built[rank] = [p.name.split(".")[0] for p in report.built]
        assert report.skipped == []
    assert built == {0: ["00000", "00003"], 1: ["00001", "00004"], 2: ["00002"]}
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        build(source, teachers, rank=3, world_size=3)


def test_existing_caches_built_otherwise_are_refused_not_overwritten(tars):
    tokenizer = WordTokenizer()
    build(tars, [CacheTeacher(make_teacher(), tokenizer)])
    path = tars.cache_path(tars.shards[0])
    before = path.read_bytes()
    other_recipe = AugmentRecipe(size=32, scale=(0.6, 1.0), hflip_prob=0.5, rand_augment=(2, 9, 31))
    for options, message in (
        ({"teachers": [CacheTeacher(make_teacher(seed=7), tokenizer)]}, "another teacher"),
        ({"num_augmentations": 4}, "another num augmentations: 5 != 4"),
        ({"dtype": "bf16"}, "another dtype: 'fp16' != 'bf16'"),
        ({"seed": 3}, "another seed: 0 != 3"),
        ({"recipe": other_recipe}, r"another augmentation recipe: scale \[0.5, 1.0\] != \[0.6"),
    ):
        teachers = options.pop("teachers", [CacheTeacher(make_teacher(), tokenizer)])
        with pytest.raises(ValueError, match=f"{path} was built with {message}"):
            build(tars, teachers, **options)
    assert path.read_bytes() == before
    assert read_header(path)["teachers"][0]["fingerprint"] == teacher_fingerprint(make_teacher())
    # The shard itself changed (here: other images) after its cache was built.
    write_image_shards(tars.shards[0].path.parent, num_shards=1, per_shard=3, seed=5)
    with pytest.raises(ValueError, match=f"shard .*00000.tar.* changed since its cache {path}"):
        build(tars, [CacheTeacher(make_teacher(), tokenizer)])
    assert path.read_bytes() == before


def test_bad_build_arguments(tars):
    teachers = [CacheTeacher(make_teacher(), WordTokenizer())]
    with pytest.raises(ValueError, match="takes 32x32 images but the augmentation recipe makes"):
        build(tars, teachers, recipe=AugmentRecipe(size=24))
    with pytest.raises(ValueError, match="dtype must be one of"):
        build(tars, teachers, dtype="int8")
    with pytest.raises(ValueError, match="at least one teacher"):
        build(tars, [])
    with pytest.raises(ValueError, match="num_augmentations > 0"):
        build(tars, teachers, num_augmentations=0)


def test_training_from_the_cache_equals_the_online_teacher(tars):
    teacher, tokenizer = make_teacher(), WordTokenizer()
    build(tars, [CacheTeacher(teacher, tokenizer)], dtype="fp32")
    dataset = ReinforcedDataset(tars, tokenizer=tokenizer)
    batches = [b for _, b in zip(range(4), make_loader(dataset, 3, seed=1), strict=False)]
    torch.manual_seed(0)
    from_cache = open_clip.model.CLIP(**STUDENT_CFG)
    online = copy.deepcopy(from_cache)
    loss_fn = AffinityMimickingLoss(contrastive_weight=0.2)
    losses = {"cache": [], "online": []}
    with force_backend("torch"):
        for name, student in (("cache", from_cache), ("online", online)):
            optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
            for batch in batches:
                if name == "cache":
                    image_t, text_t, scale_t, _ = teacher_targets(batch, dataset.teachers)[0]
                else:
                    with torch.no_grad():
                        image_t, text_t, scale_t = teacher(batch["image"], batch["text"])
                image, text, scale = student(batch["image"], batch["text"])
                loss = loss_fn(image, text, scale, image_t, text_t, scale_t)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses[name].append(loss.item())
    assert rel_err(torch.tensor(losses["cache"]), torch.tensor(losses["online"])) < 1e-5
    assert losses["cache"][0] != losses["cache"][-1]
    assert_same_weights(from_cache, online, tol=1e-4)
