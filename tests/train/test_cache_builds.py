"""The two cache builds from a run's configuration: the embedding cache of map-style data and
the reinforced cache of webdataset shards, each with the line the command line prints."""

import json

import open_clip
import pytest
import torch
from support import TEACHER_CFG, make_config, write_image_shards

from tinyclip_fast.data.reinforced import read_header
from tinyclip_fast.teachers.embedding_cache import TeacherEmbeddingCache
from tinyclip_fast.train.cache_builds import build_embedding_cache, build_reinforced_cache
from tinyclip_fast.train.config import DataConfig, StageConfig, TeacherConfig

# open_clip's own tokenizer (vocabulary 49,408), so the shards' captions tokenize.
OPEN_CLIP_TEXT = {**TEACHER_CFG["text_cfg"], "context_length": 16, "vocab_size": 49408}


@pytest.fixture
def teacher(tmp_path):
    path = tmp_path / "cache-builds-teacher.json"
    path.write_text(json.dumps({**TEACHER_CFG, "text_cfg": OPEN_CLIP_TEXT}))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    weights = tmp_path / "teacher.pt"
    torch.save(open_clip.create_model(path.stem, pretrained=None).state_dict(), weights)
    return TeacherConfig(model=str(path), pretrained=str(weights))


def test_embedding_cache_of_the_run_data(tmp_path, teacher):
    config = make_config(tmp_path, [StageConfig(steps=1)], micro_batch_size=4, device="cpu")
    config.teacher = TeacherConfig(
        model=teacher.model, pretrained=teacher.pretrained, cache=str(tmp_path / "c")
    )
    config.data = DataConfig(kind="synthetic", size=6)
    report = build_embedding_cache(config)
    assert report.line == f"wrote 6 teacher embeddings (dim 32) of 1 teacher(s) to {tmp_path / 'c'}"
    assert len(TeacherEmbeddingCache.load(tmp_path / "c", num_samples=6)) == 6


def test_reinforced_cache_of_webdataset_shards(tmp_path, teacher):
    write_image_shards(tmp_path / "shards", num_shards=2, per_shard=3, synthetic=2)
    shards = f"{tmp_path / 'shards'}/{{00000..00001}}.tar"
    config = make_config(tmp_path, [StageConfig(steps=1)], device="cpu")
    config.teacher = teacher
    config.data = DataConfig(kind="webdataset", path=shards)
    config.reinforced.cache_dir = str(tmp_path / "cache")
    config.reinforced.augmentations = 2
    report = build_reinforced_cache(config)
    assert (report.rank, report.world_size, len(report.shards.built)) == (0, 1, 2)
    assert report.line.startswith(f"reinforced cache ({tmp_path / 'cache'}): rank 0 of 1 built 2")
    assert report.line.endswith(f"train with --data reinforced:{shards}")
    assert read_header(tmp_path / "cache" / "00000.reinforced.safetensors")["num_samples"] == 3
    config.data = DataConfig(kind="synthetic")
    with pytest.raises(ValueError, match="builds a reinforced cache over"):
        build_reinforced_cache(config)
