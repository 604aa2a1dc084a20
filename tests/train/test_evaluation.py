"""The evaluator a run's eval configuration builds: kinds, paths and labels checked first."""

import numpy as np
import pytest
import torch
from PIL import Image

from tinyclip_fast.data.loader import BadSampleError
from tinyclip_fast.demo.data import CompactTokenizer
from tinyclip_fast.train.config import EvalConfig
from tinyclip_fast.train.evaluation import build_evaluator

NAMES = ["red", "blue"]


def preprocess(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


@pytest.fixture
def labelled(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((4, 4, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "names.txt").write_text("\n".join(NAMES) + "\n")
    (tmp_path / "labels.csv").write_text("filepath,label\n0.png,0\n1.png,1\n2.png,1\n")
    (tmp_path / "labels.tsv").write_text("filepath\tlabel\n0.png\t0\n1.png\t2\n")
    return tmp_path


def build(config):
    tokenizer = CompactTokenizer([f"a photo of a {n}." for n in NAMES], 10)
    return build_evaluator(config, tokenizer=tokenizer, preprocess=preprocess, device="cpu")


def test_labelled_csv_separator_and_label_range(labelled):
    names = str(labelled / "names.txt")
    evaluator = build(EvalConfig(kind="csv", path=str(labelled / "labels.csv"), class_names=names))
    assert len(evaluator.images) == 3  # .csv read with commas
    # A label outside the class list is refused, naming its row.
    with pytest.raises(ValueError, match=r"row 1 has label 2, outside the 2 class names"):
        build(EvalConfig(kind="csv", path=str(labelled / "labels.tsv"), class_names=names))


def test_kinds_and_paths_are_checked(labelled):
    # A kind without its path says how to give one (--eval KIND:PATH).
    with pytest.raises(ValueError, match="eval kind 'folder' needs a path: --eval folder:DIR"):
        build(EvalConfig(kind="folder"))
    with pytest.raises(ValueError, match="unknown eval kind 'imagenet'.*kinds: folder, csv"):
        build(EvalConfig(kind="imagenet", path="x"))
    with pytest.raises(ValueError, match="needs class names: --set eval.class_names=FILE"):
        build(EvalConfig(kind="csv", path=str(labelled / "labels.csv")))
    (labelled / "red").mkdir()
    (labelled / "red" / "broken.png").write_text("not an image")
    evaluator = build(EvalConfig(kind="folder", path=str(labelled)))
    with pytest.raises(BadSampleError, match="evaluation image .*broken.png cannot be read"):
        evaluator.images[0]


class MeanColour(torch.nn.Module):
    """Image features: the mean colour; text features: the first three token ids."""

    def encode_image(self, images):
        return images.mean(dim=(2, 3))

    def encode_text(self, tokens):
        return tokens[:, :3].float()


def test_retrieval_kind_scores_caption_pairs(labelled):
    pairs = labelled / "pairs.csv"
    pairs.write_text("filepath,title\n0.png,a red\n0.png,a blue\n1.png,red\n2.png,blue\n")
    evaluator = build(EvalConfig(kind="retrieval", path=str(pairs)))
    assert len(evaluator.images) == 3 and evaluator.text_image.tolist() == [0, 0, 1, 2]
    metrics = evaluator(MeanColour())
    assert sorted(metrics) == sorted(
        f"{way}_retrieval_recall@{k}" for way in ("image", "text") for k in (1, 5, 10)
    )
    assert metrics["image_retrieval_recall@5"] == metrics["text_retrieval_recall@5"] == 1.0


@pytest.mark.parametrize("name", ["class_names", "templates"])
def test_retrieval_kind_refuses_zero_shot_settings(labelled, name):
    (labelled / "pairs.csv").write_text("filepath,title\n0.png,a red\n")
    config = EvalConfig(kind="retrieval", path=str(labelled / "pairs.csv"))
    setattr(config, name, str(labelled / "names.txt"))
    with pytest.raises(ValueError, match=f"eval.{name} is for zero-shot classification"):
        build(config)
