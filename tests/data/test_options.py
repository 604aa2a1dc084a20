"""Data options: one set of keys per kind, unknown ones refused naming the valid ones."""

import re

import pytest

from tinyclip_fast.data.datasets import build_dataset, register_dataset
from tinyclip_fast.data.options import (
    DATA_OPTIONS,
    check_data_options,
    data_options,
    describe_data_options,
    given_options,
)


@pytest.mark.parametrize("kind", sorted(DATA_OPTIONS))
def test_every_option_has_a_one_line_help(kind):
    lines = describe_data_options(kind)
    assert lines and all("\n" not in line and ": " in line for line in lines)


@pytest.mark.parametrize("kind", ["csv", "webdataset", "reinforced", "datacompdr"])
def test_the_caption_key_is_caption_key_for_every_kind_with_captions(kind):
    assert check_data_options(kind, {"caption_key": "caption"}) == {"caption_key": "caption"}


def test_open_clip_csv_names_mean_the_same_keys():
    given = {"csv_caption_key": "caption", "csv_img_key": "img", "csv_separator": ";"}
    assert check_data_options("csv", given) == {
        "caption_key": "caption",
        "img_key": "img",
        "separator": ";",
    }
    with pytest.raises(ValueError, match="'caption_key' and 'csv_caption_key' are the same"):
        check_data_options("csv", {"caption_key": "a", "csv_caption_key": "b"})


@pytest.mark.parametrize(
    "kind, options, message",
    [
        (
            "webdataset",
            {"shufle": True},
            "unknown option 'shufle' for data kind 'webdataset'; its options: caption_key, shuffle",
        ),
        ("csv", {"caption": "x"}, "unknown option 'caption' for data kind 'csv'; its options: "),
        ("webdataset", {"csv_img_key": "x"}, "unknown option 'csv_img_key' for data kind"),
        (
            "synthetic",
            {"img_key": "x"},
            "unknown option 'img_key' for data kind 'synthetic'; its options: image_size, "
            "context_length, vocab_size, seed",
        ),
        (
            "csv",
            {"cache_dir": "/tmp"},
            "data option 'cache_dir' is not set in data.options: "
            "use --set reinforced.cache_dir=DIR",
        ),
        ("csv", {"path": "x.csv"}, "data option 'path' is not set in data.options: use --data"),
    ],
    ids=["misspelt", "csv-caption", "alias-of-another-kind", "synthetic", "cache-dir", "path"],
)
def test_unknown_and_misplaced_keys_are_refused(kind, options, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        check_data_options(kind, options)


def test_builders_refuse_unknown_keys_too():
    with pytest.raises(ValueError, match="unknown option 'vocab' for data kind 'synthetic'"):
        build_dataset(
            {"kind": "synthetic", "num_samples": 2, "vocab": 9}, preprocess=None, tokenizer=None
        )


def test_builders_ignore_what_the_engine_passes_to_every_kind():
    data_cfg = {"kind": "webdataset", "path": "a.tar", "image_size": 32, "seed": 3}
    assert given_options({**data_cfg, "shuffle": False}) == {"shuffle": False}
    assert given_options({"kind": "synthetic", "seed": 3, "num_samples": 4}) == {"seed": 3}


def test_csv_training_refuses_options_only_a_cache_build_reads(tmp_path):
    with pytest.raises(ValueError, match=r"\['shard_size'\] of kind 'csv' are read only when"):
        build_dataset(
            {"kind": "csv", "path": str(tmp_path / "a.csv"), "shard_size": 10},
            preprocess=lambda image: image,
            tokenizer=lambda texts: texts,
        )


@pytest.fixture
def registry(monkeypatch):
    """Registrations made by a test are undone after it."""
    import tinyclip_fast.data.datasets as datasets
    import tinyclip_fast.data.options as options

    monkeypatch.setattr(datasets, "_DATASETS", dict(datasets._DATASETS))
    monkeypatch.setattr(options, "_REGISTERED", dict(options._REGISTERED))


def test_registered_kinds_declare_their_options(registry):
    register_dataset("test-kind", lambda cfg, p, t: None, options={"split": "train or test"})
    assert data_options("test-kind") == {"split": "train or test"}
    assert check_data_options("test-kind", {"split": "test"}) == {"split": "test"}
    with pytest.raises(ValueError, match="its options: split"):
        check_data_options("test-kind", {"splits": "test"})
    register_dataset("test-bare", lambda cfg, p, t: None)
    with pytest.raises(ValueError, match="for data kind 'test-bare'; its options: none"):
        check_data_options("test-bare", {"split": "test"})


def test_built_in_kinds_keep_their_options_when_registered(registry):
    register_dataset("reinforced", lambda cfg, p, t: None)
    assert "caption_key" in data_options("reinforced")
