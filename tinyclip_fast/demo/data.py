"""Built-in demo data: labelled images that ship in an installed package, captioned by templates.

Sources: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (IDX files under
/usr/share/datasets/fashion-mnist) when it is installed, else scikit-learn's 8x8 digits
(``sklearn.datasets.load_digits``). Images become [3, S, S] float tensors (grey replicated,
normalised); each training image gets the caption ``template.format(class name)`` with a
template drawn per image. ``CompactTokenizer`` keeps the demo's vocabulary tiny.
"""

from __future__ import annotations

import functools
import gzip
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer

from tinyclip_fast.data.datasets import TensorPairDataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SOURCES = ("auto", "fashion-mnist", "digits")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FASHION_NAMES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
DIGIT_TEMPLATES = (
    "a photo of the number {}.",
    "a handwritten {}.",
    "the digit {}.",
    "a blurry scan of the digit {}.",
    "a small drawing of a {}.",
    "a picture of the number {}.",
    "{}",
    "a pixelated image of a {}.",
)
FASHION_TEMPLATES = (
    "a photo of a {}.",
    "a grey photo of a {}.",
    "a low resolution photo of a {}.",
    "a product picture of a {}.",
    "a {}.",
    "a {} from a shop.",
    "{}",
    "a blurry photo of the {}.",
)
# Fashion-MNIST has 70,000 images; a subset keeps the demo within its CPU time budget.
FASHION_TRAIN_SUBSET = 12_000
FASHION_TEST_SUBSET = 2_000
DIGITS_TEST_FRACTION = 0.25


@functools.lru_cache(maxsize=1)
def _open_clip_tokenizer() -> SimpleTokenizer:
    # Reading the 49k BPE merges takes about a second: share one instance.
    return SimpleTokenizer()


class CompactTokenizer:
    """open_clip's BPE tokenizer with its ids remapped to a dense vocabulary of a known corpus.

    Ids keep their order (pad 0 -> 0, unknown -> 1, corpus ids ascending from 2), so
    end-of-text, open_clip's largest id, stays the largest and argmax pooling still finds it.
    ``vocab_size`` is the size of the remapped range: the token embedding shrinks from 49,408
    rows to a few dozen.
    """

    PAD, UNKNOWN = 0, 1

    def __init__(self, corpus: Sequence[str], context_length: int = 12) -> None:
        if not corpus:
            raise ValueError("CompactTokenizer needs a non-empty corpus")
        self.base = _open_clip_tokenizer()
        self.context_length = context_length
        used = torch.unique(self.base(list(corpus), context_length=context_length))
        used = used[used != 0]
        longest = max(len(self.base.encode(text)) + 2 for text in corpus)
        if longest > context_length:
            raise ValueError(
                f"corpus text of {longest} tokens does not fit context_length {context_length}"
            )
        self.lookup = torch.full((self.base.vocab_size,), self.UNKNOWN, dtype=torch.long)
        self.lookup[0] = self.PAD
        self.lookup[used] = torch.arange(2, 2 + used.numel())
        self.vocab_size = 2 + used.numel()

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """LongTensor [n, context_length] of compact ids."""
        if isinstance(texts, str):
            texts = [texts]
        return self.lookup[self.base(texts, context_length=context_length or self.context_length)]


@dataclass
class DemoSplit:
    """One split of the demo data with everything needed to caption and evaluate it."""

    dataset: TensorPairDataset  # images [N, 3, S, S], captions [N, ctx], labels [N]
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    tokenizer: CompactTokenizer
    source: str  # "fashion-mnist" or "digits"

    def evaluator(self, device: str | torch.device = "cpu", batch_size: int = 256) -> Any:
        """A ZeroShotEvaluator over this split's images with its class names and templates."""
        from tinyclip_fast.data.zero_shot import ZeroShotEvaluator

        return ZeroShotEvaluator(
            self.dataset.images,
            self.dataset.labels,
            self.class_names,
            self.templates,
            self.tokenizer,
            device,
            batch_size,
        )


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST format, optionally gzipped) as a uint8 array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header shape {shape} does not match {body.size} bytes")
    return body.reshape(shape)


def resolve_source(source: str, fashion_dir: Path = FASHION_MNIST_DIR) -> str:
    """``auto`` -> fashion-mnist when its files are installed, else digits."""
    if source not in SOURCES:
        raise ValueError(f"demo data source must be one of {SOURCES}, got {source!r}")
    has_fashion = (fashion_dir / "train-images-idx3-ubyte.gz").is_file()
    if source == "fashion-mnist" and not has_fashion:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {fashion_dir}: install Debian's dataset-fashion-mnist "
            f"package or use --data digits"
        )
    if source == "auto":
        return "fashion-mnist" if has_fashion else "digits"
    return source


@functools.lru_cache(maxsize=4)
def _raw_splits(source: str, seed: int, fashion_dir: Path) -> dict[str, tuple[np.ndarray, ...]]:
    """{"train": (images uint8-range float [N, h, w] in [0, 1], labels), "test": (...)}."""
    rng = np.random.default_rng(seed)
    if source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = digits.images.astype(np.float32) / 16.0
        order = rng.permutation(len(images))
        n_test = int(round(len(images) * DIGITS_TEST_FRACTION))
        test, train = order[:n_test], order[n_test:]
        return {
            "train": (images[train], digits.target[train]),
            "test": (images[test], digits.target[test]),
        }
    splits = {}
    for split, prefix, subset in (
        ("train", "train", FASHION_TRAIN_SUBSET),
        ("test", "t10k", FASHION_TEST_SUBSET),
    ):
        images = read_idx(fashion_dir / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(fashion_dir / f"{prefix}-labels-idx1-ubyte.gz")
        keep = rng.permutation(len(images))[:subset]
        splits[split] = (images[keep].astype(np.float32) / 255.0, labels[keep].astype(np.int64))
    return splits


def to_model_images(images: np.ndarray, image_size: int) -> torch.Tensor:
    """[N, h, w] in [0, 1] -> [N, 3, S, S]: bilinear resize, scale to [-1, 1], grey x3."""
    pixels = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    pixels = F.interpolate(
        pixels, size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    # A fixed affine map, so train and test splits are normalised identically.
    pixels = pixels * 2.0 - 1.0
    return pixels.expand(-1, 3, -1, -1).contiguous()


def load_demo_split(
    source: str = "auto",
    split: str = "train",
    *,
    image_size: int = 32,
    seed: int = 0,
    context_length: int = 12,
    max_samples: int | None = None,
    fashion_dir: Path = FASHION_MNIST_DIR,
) -> DemoSplit:
    """The demo's train or test split, captioned with a per-image random template."""
    if split not in ("train", "test"):
        raise ValueError(f"demo split must be 'train' or 'test', got {split!r}")
    source = resolve_source(source, fashion_dir)
    class_names = DIGIT_NAMES if source == "digits" else FASHION_NAMES
    templates = DIGIT_TEMPLATES if source == "digits" else FASHION_TEMPLATES
    tokenizer = CompactTokenizer(
        [template.format(name) for name in class_names for template in templates],
        context_length=context_length,
    )
    images, labels = _raw_splits(source, seed, Path(fashion_dir))[split]
    if max_samples is not None:
        images, labels = images[:max_samples], labels[:max_samples]
    picker = random.Random(seed * 7919 + (split == "test"))
    captions = [picker.choice(templates).format(class_names[label]) for label in labels]
    dataset = TensorPairDataset(
        to_model_images(images, image_size),
        tokenizer(captions),
        torch.as_tensor(labels, dtype=torch.long),
    )
    return DemoSplit(dataset, class_names, templates, tokenizer, source)
