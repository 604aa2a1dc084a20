"""Demo data: digits, a fake Fashion-MNIST install, the compact tokenizer."""

import gzip
import struct

import numpy as np
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from tinyclip_fast.demo.data import (
    DIGIT_NAMES,
    FASHION_NAMES,
    CompactTokenizer,
    load_demo_split,
    read_idx,
    resolve_source,
)


def test_compact_tokenizer_is_an_order_preserving_remap():
    corpus = ["a photo of a cat.", "a dog", "the digit seven."]
    tokenizer = CompactTokenizer(corpus, context_length=8)
    base = SimpleTokenizer()(corpus, context_length=8)
    compact = tokenizer(corpus)
    used = torch.unique(base[base != 0])
    assert tokenizer.vocab_size == 2 + used.numel()
    assert torch.equal(compact == 0, base == 0)
    nonzero = base != 0
    expected = torch.searchsorted(used, base[nonzero]) + 2
    assert torch.equal(compact[nonzero], expected)
    # End-of-text is the largest id in both vocabularies: argmax pooling still finds it.
    assert torch.equal(compact.argmax(dim=-1), base.argmax(dim=-1))
    assert compact.max() == tokenizer.vocab_size - 1
    assert tokenizer("a zebra")[0, 2] == CompactTokenizer.UNKNOWN
    with pytest.raises(ValueError, match="does not fit context_length 4"):
        CompactTokenizer(corpus, context_length=4)


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_and_fake_fashion_install(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 30), ("t10k", 12)):
        write_idx(
            tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28))
        )
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    images = read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (12, 28, 28) and images.dtype == np.uint8
    assert resolve_source("auto", tmp_path) == "fashion-mnist"
    split = load_demo_split("auto", "test", fashion_dir=tmp_path, seed=1)
    assert split.source == "fashion-mnist" and split.class_names == FASHION_NAMES
    assert split.dataset.images.shape == (12, 3, 32, 32)
    assert sorted(split.dataset.labels.tolist()) == sorted((np.arange(12) % 10).tolist())
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x09\x01abcd"))
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "bad.gz")


def test_digits_split(tmp_path):
    assert resolve_source("auto", tmp_path / "none") == "digits"
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        resolve_source("fashion-mnist", tmp_path / "none")
    with pytest.raises(ValueError, match="source must be one of"):
        resolve_source("cifar", tmp_path)
    train = load_demo_split("digits", "train", fashion_dir=tmp_path)
    test = load_demo_split("digits", "test", fashion_dir=tmp_path)
    assert len(train.dataset) + len(test.dataset) == 1797
    assert train.class_names == DIGIT_NAMES
    images = train.dataset.images
    assert images.shape[1:] == (3, 32, 32) and images.min() >= -1.0 and images.max() <= 1.0
    # Every caption names its image's class (decoded back through open_clip's vocabulary).
    inverse = {int(c): i for i, c in enumerate(train.tokenizer.lookup.tolist()) if c > 1}
    for i in (0, 5, 99):
        ids = [inverse[t] for t in train.dataset.texts[i].tolist() if t > 1]
        caption = train.tokenizer.base.decode(ids)
        assert DIGIT_NAMES[int(train.dataset.labels[i])] in caption
    with pytest.raises(ValueError, match="split"):
        load_demo_split("digits", "val")
