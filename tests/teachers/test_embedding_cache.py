"""Teacher-embedding cache: built once, read back exactly, refuses what does not match."""

import json

import open_clip
import pytest
import torch
from support import PlainDataset

from tinyclip_fast.data.datasets import SyntheticPairDataset, TensorPairDataset, WebDatasetPairs
from tinyclip_fast.teachers.embedding_cache import TeacherEmbeddingCache, teacher_fingerprint

VOCAB, CONTEXT = 40, 8


def tiny_clip(seed: int = 0) -> open_clip.model.CLIP:
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
    with torch.no_grad():
        model.logit_scale.fill_(3.21)
    return model


@pytest.fixture(scope="module")
def dataset() -> TensorPairDataset:
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(11, 3, 8, 8, generator=generator)
    texts = torch.randint(1, VOCAB - 1, (11, CONTEXT), generator=generator)
    texts[:, -1] = VOCAB - 1
    return TensorPairDataset(images, texts)


def test_build_matches_the_teacher_and_round_trips(tmp_path, dataset):
    teacher = tiny_clip().train()
    path = tmp_path / "cache" / "teacher.safetensors"
    cache = TeacherEmbeddingCache.build(teacher, dataset, path, batch_size=4)
    assert teacher.training  # mode restored
    assert len(cache) == 11 and cache.dim == 12
    assert cache.logit_scale == pytest.approx(3.21)
    with torch.no_grad():
        teacher.eval()
        expected_image = teacher.encode_image(dataset.images, normalize=True)
        expected_text = teacher.encode_text(dataset.texts, normalize=True)
    assert torch.allclose(cache.image_emb, expected_image, atol=1e-5)
    assert torch.allclose(cache.text_emb, expected_text, atol=1e-5)
    assert torch.allclose(cache.image_emb.norm(dim=-1), torch.ones(11), atol=1e-5)
    assert [p.name for p in path.parent.iterdir()] == ["teacher.safetensors"]  # no temp left

    loaded = TeacherEmbeddingCache.load(path, num_samples=11, teacher=teacher)
    indices = torch.tensor([10, 0, 4, 4])
    image, text = loaded.lookup(indices)
    assert torch.equal(image, cache.image_emb[indices])
    assert torch.equal(text, cache.text_emb[indices])
    assert loaded.logit_scale == cache.logit_scale
    assert json.loads(loaded.metadata["teacher_fingerprints"]) == [teacher_fingerprint(teacher)]


def test_per_sample_datasets_give_the_same_cache(tmp_path, dataset):
    teacher = tiny_clip()
    fast = TeacherEmbeddingCache.build(teacher, dataset, tmp_path / "a.safetensors", batch_size=5)
    slow = TeacherEmbeddingCache.build(teacher, PlainDataset(dataset), tmp_path / "b.safetensors")
    assert torch.allclose(fast.image_emb, slow.image_emb, atol=1e-6)
    assert torch.allclose(fast.text_emb, slow.text_emb, atol=1e-6)
    synthetic = SyntheticPairDataset(3, image_size=8, context_length=CONTEXT, vocab_size=VOCAB)
    assert len(TeacherEmbeddingCache.build(teacher, synthetic, tmp_path / "c.safetensors")) == 3


def test_mismatch_and_corruption_are_clear_errors(tmp_path, dataset):
    teacher = tiny_clip()
    path = tmp_path / "teacher.safetensors"
    TeacherEmbeddingCache.build(teacher, dataset, path)
    with pytest.raises(ValueError, match="holds 11 samples but the dataset has 12"):
        TeacherEmbeddingCache.load(path, num_samples=12)
    with pytest.raises(ValueError, match="different teacher"):
        TeacherEmbeddingCache.load(path, teacher=tiny_clip(seed=1))
    with pytest.raises(FileNotFoundError, match="build it"):
        TeacherEmbeddingCache.load(tmp_path / "missing.safetensors")

    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        TeacherEmbeddingCache.load(tmp_path / "truncated.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt"):
        TeacherEmbeddingCache.load(tmp_path / "garbage.safetensors")
    from safetensors.torch import save_file

    save_file({"weights": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a tinyclip_fast cache"):
        TeacherEmbeddingCache.load(tmp_path / "other.safetensors")


def test_cache_is_tied_to_the_samples_and_their_order(tmp_path, dataset):
    # The same rows in another order are other samples: the cache is refused.
    teacher = tiny_clip()
    path = tmp_path / "teacher.safetensors"
    built = TeacherEmbeddingCache.build(teacher, dataset, path)
    loaded = TeacherEmbeddingCache.load(path, teacher=teacher, dataset=dataset)
    assert torch.equal(loaded.sample_fingerprints, built.sample_fingerprints)
    order = torch.tensor([0, 1, 2, 4, 3, *range(5, 11)])
    reordered = TensorPairDataset(dataset.images[order], dataset.texts[order])
    with pytest.raises(ValueError, match=r"built on other data: sample 3 \('content [0-9a-f]+'\)"):
        TeacherEmbeddingCache.load(path, dataset=reordered)
    with pytest.raises(ValueError, match="holds 11 samples but the dataset has 10"):
        TeacherEmbeddingCache.load(path, dataset=TensorPairDataset(dataset.images[:10],
                                                                   dataset.texts[:10]))  # fmt: skip
    # A dataset that does not name its samples cannot be checked: said, not silent.
    with pytest.warns(UserWarning, match="cannot check that it was built on this data"):
        TeacherEmbeddingCache.load(path, dataset=PlainDataset(dataset))
    # A cache of the earlier format (no sample identities) is refused.
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    old = {k: v for k, v in tensors.items() if k != "sample_fingerprints"}
    meta = {"tinyclip_cache": json.dumps({**built.metadata, "format_version": "1"})}
    save_file(old, str(tmp_path / "old.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"has format '1', expected one of \('2', '3'\); rebuild"):
        TeacherEmbeddingCache.load(tmp_path / "old.safetensors", dataset=dataset)


def test_bad_arguments(tmp_path, dataset):
    teacher = tiny_clip()
    cache = TeacherEmbeddingCache.build(teacher, dataset, tmp_path / "t.safetensors")
    with pytest.raises(IndexError, match="must lie in \\[0, 11\\)"):
        cache.lookup(torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="1-D"):
        cache.lookup(torch.zeros(2, 2, dtype=torch.long))
    empty = TensorPairDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0, CONTEXT, dtype=torch.long))
    with pytest.raises(ValueError, match="empty dataset"):
        TeacherEmbeddingCache.build(teacher, empty, tmp_path / "e.safetensors")
    (tmp_path / "s.tar").write_bytes(b"")
    stream = WebDatasetPairs(str(tmp_path / "s.tar"), preprocess=None, tokenizer=None)
    with pytest.raises(TypeError, match="map-style"):
        TeacherEmbeddingCache.build(teacher, stream, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="both be \\[N, d\\]"):
        TeacherEmbeddingCache(torch.zeros(3, 4), torch.zeros(3, 5), 1.0)
