"""Zero-shot top-1: a hand-built model with a known answer, and a real open_clip CLIP against a
float64 reference classifier written here."""

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from tinyclip_fast.data.datasets import TensorPairDataset
from tinyclip_fast.data.zero_shot import (
    ZeroShotEvaluator,
    load_class_names_and_templates,
    load_image_folder,
    load_labelled_csv,
    load_names,
)
from tinyclip_fast.demo.data import CompactTokenizer

CLASSES = ["cat", "dog", "bird", "fish"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


class OneHotModel(nn.Module):
    """Image feature: the one-hot class written in pixel [0, c, 0] of the image; text feature:
    one-hot of the class word in the prompt. Zero-shot predicts the written class exactly."""

    def __init__(self, tokenizer: CompactTokenizer) -> None:
        super().__init__()
        self.class_tokens = torch.stack([tokenizer([name])[0, 1] for name in CLASSES])
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode_image(self, image, normalize=False):
        features = image[:, 0, 0, : len(CLASSES)] + self.dummy
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text, normalize=False):
        hits = (text[:, :, None] == self.class_tokens[None, None, :]).any(dim=1).float()
        return nn.functional.normalize(hits, dim=-1) if normalize else hits


@pytest.fixture(scope="module")
def tokenizer() -> CompactTokenizer:
    return CompactTokenizer([t.format(c) for c in CLASSES for t in TEMPLATES], context_length=10)


def written_images(written: torch.Tensor) -> torch.Tensor:
    images = torch.rand(written.numel(), 3, 4, 6) * 0.01
    images[torch.arange(written.numel()), 0, 0, written] = 1.0
    return images


def test_known_answer(tokenizer):
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 1, 2])
    written = labels.clone()
    written[[1, 4, 7]] = torch.tensor([0, 3, 2])  # three deliberate mistakes
    evaluator = ZeroShotEvaluator(
        written_images(written), labels, CLASSES, TEMPLATES, tokenizer, batch_size=3
    )
    model = OneHotModel(tokenizer).train()
    assert evaluator(model) == pytest.approx(7 / 10)
    assert model.training  # mode restored
    assert evaluator(OneHotModel(tokenizer).eval()) == pytest.approx(7 / 10)


def test_dataset_inputs_match_tensor_input(tokenizer):
    labels = torch.tensor([3, 2, 1, 0, 3, 2])
    written = torch.tensor([3, 2, 0, 0, 1, 2])
    images = written_images(written)
    model = OneHotModel(tokenizer)

    class Tuples(Dataset):
        def __len__(self):
            return labels.numel()

        def __getitem__(self, i):
            return images[i], int(labels[i])

    texts = torch.zeros(labels.numel(), 10, dtype=torch.long)
    fast = TensorPairDataset(images, texts, labels)
    results = [
        ZeroShotEvaluator(images, labels, CLASSES, TEMPLATES, tokenizer, batch_size=4)(model),
        ZeroShotEvaluator(Tuples(), None, CLASSES, TEMPLATES, tokenizer, batch_size=4)(model),
        ZeroShotEvaluator(fast, None, CLASSES, TEMPLATES, tokenizer, batch_size=4)(model),
    ]
    assert results == [pytest.approx(4 / 6)] * 3


def tiny_clip(vocab_size: int) -> open_clip.model.CLIP:
    return open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 8, "patch_size": 4, "width": 32, "layers": 1, "head_width": 16},
        text_cfg={
            "context_length": 10,
            "vocab_size": vocab_size,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    )


def test_open_clip_model_against_float64_reference(tokenizer):
    torch.manual_seed(1)
    model = tiny_clip(tokenizer.vocab_size).eval()
    images = torch.randn(40, 3, 8, 8)
    labels = torch.randint(0, len(CLASSES), (40,))
    top1 = ZeroShotEvaluator(images, labels, CLASSES, TEMPLATES, tokenizer, batch_size=16)(model)

    reference = model.double()
    with torch.no_grad():
        weights = []
        for name in CLASSES:
            text = reference.encode_text(tokenizer([t.format(name) for t in TEMPLATES]))
            text = text / text.norm(dim=-1, keepdim=True)
            mean = text.mean(dim=0)
            weights.append(mean / mean.norm())
        image = reference.encode_image(images.double())
        image = image / image.norm(dim=-1, keepdim=True)
        predicted = (image @ torch.stack(weights).T).argmax(dim=-1)
    expected = float((predicted == labels).double().mean())
    assert top1 == pytest.approx(expected)
    assert 0.0 < expected < 1.0  # a random model: neither trivially right nor wrong


def test_bad_inputs(tokenizer):
    images = torch.randn(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="labels must lie in"):
        ZeroShotEvaluator(images, torch.tensor([0, 1, 2, 4]), CLASSES, TEMPLATES, tokenizer)
    with pytest.raises(ValueError, match="labels must have shape"):
        ZeroShotEvaluator(images, labels[:3], CLASSES, TEMPLATES, tokenizer)
    with pytest.raises(ValueError, match="class_names is empty"):
        ZeroShotEvaluator(images, labels, [], TEMPLATES, tokenizer)
    with pytest.raises(ValueError, match="templates need"):
        ZeroShotEvaluator(images, labels, CLASSES, ["a photo"], tokenizer)
    with pytest.raises(ValueError, match="images must be a float tensor"):
        ZeroShotEvaluator(images[0], labels, CLASSES, TEMPLATES, tokenizer)
    with pytest.raises(ValueError, match="labels are required"):
        ZeroShotEvaluator(images, None, CLASSES, TEMPLATES, tokenizer)


def preprocess(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def test_image_folder_csv_and_name_files(tmp_path):
    root = tmp_path / "val"
    for name in ("golden_retriever", "cat"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (5, 4), color=(i * 50, 10, 20)).save(root / name / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    dataset, names = load_image_folder(root, preprocess)
    assert names == ["cat", "golden retriever"]
    assert len(dataset) == 4 and [dataset[i]["label"] for i in range(4)] == [0, 0, 1, 1]
    assert dataset[3]["image"].shape == (3, 4, 5)

    (tmp_path / "labels.csv").write_text("filepath,label\nval/cat/0.png,1\nval/cat/1.png,0\n")
    labelled = load_labelled_csv(tmp_path / "labels.csv", preprocess)
    assert [labelled[i]["label"] for i in range(2)] == [1, 0]
    assert torch.equal(labelled[0]["image"], dataset[0]["image"])

    (tmp_path / "names.txt").write_text("cat\n\ndog\n")
    (tmp_path / "names.json").write_text(json.dumps(["cat", "dog"]))
    assert (
        load_names(tmp_path / "names.txt") == load_names(tmp_path / "names.json") == ["cat", "dog"]
    )
    (tmp_path / "both.json").write_text(json.dumps({"classnames": ["a"], "templates": ["{}!"]}))
    assert load_class_names_and_templates(tmp_path / "both.json") == (["a"], ["{}!"])


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing", preprocess)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        load_image_folder(tmp_path / "empty", preprocess)
    (tmp_path / "empty" / "a").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "empty", preprocess)
    (tmp_path / "bad.csv").write_text("path,label\nx.png,0\n")
    with pytest.raises(ValueError, match="no column 'filepath'"):
        load_labelled_csv(tmp_path / "bad.csv", preprocess)
    (tmp_path / "empty.csv").write_text("filepath,label\n")
    with pytest.raises(ValueError, match="no rows"):
        load_labelled_csv(tmp_path / "empty.csv", preprocess)
    (tmp_path / "words.csv").write_text("filepath,label\nx.png,cat\n")
    with pytest.raises(ValueError, match="must hold integers"):
        load_labelled_csv(tmp_path / "words.csv", preprocess)
    (tmp_path / "blank.txt").write_text("\n")
    with pytest.raises(ValueError, match="holds no names"):
        load_names(tmp_path / "blank.txt")
    with pytest.raises(FileNotFoundError):
        load_names(tmp_path / "nothing.txt")
    missing = load_labelled_csv(tmp_path / "bad.csv", preprocess, img_key="path")
    with pytest.raises(FileNotFoundError, match="x.png"):
        missing[0]
