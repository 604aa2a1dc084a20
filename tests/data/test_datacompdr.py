"""DataCompDR: shards written in Apple's layout are read back, their stored augmentations
replayed (checked against an independent torchvision replay), their embeddings and
captions matched, and a distillation step runs from them without a teacher."""

import io
import json

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
import webdataset as wds
from PIL import Image
from support import (
    DIMS,
    MOBILECLIP_OPS,
    STUDENT_CFG,
    SYNTHETIC,
    TEACHERS,
    K,
    WordTokenizer,
    compressed_params,
    encode_image,
    random_image,
    unit_rows,
    write_datacompdr_shards,
)
from torchvision.transforms import InterpolationMode
from torchvision.transforms.autoaugment import _apply_op

from tinyclip_fast.data.augment import OPENAI_MEAN, OPENAI_STD
from tinyclip_fast.data.datacompdr import (
    DataCompDRDataset,
    build_datacompdr_dataset,
    datacompdr_recipe,
    decompress_params,
)
from tinyclip_fast.data.decode import CropDecoder
from tinyclip_fast.data.device_augment import DeviceAugment
from tinyclip_fast.data.loader import collate, make_loader
from tinyclip_fast.data.reinforced import TEACHER_IMAGE, TEACHER_TEXT, teacher_targets
from tinyclip_fast.losses import AffinityMimickingLoss
from tinyclip_fast.ops.backend import force_backend


def independent_replay(jpeg, compressed, size):
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    (top, left, height, width), ops = compressed
    image = TF.resized_crop(
        image, top, left, height, width, [size, size], InterpolationMode.BICUBIC, antialias=True
    )
    for op_id, magnitude in ops or ():
        image = _apply_op(
            image, MOBILECLIP_OPS[op_id], magnitude, InterpolationMode.NEAREST, fill=None
        )
    return TF.normalize(TF.to_tensor(image), OPENAI_MEAN, OPENAI_STD)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("datacompdr")
    return folder, write_datacompdr_shards(folder)


def test_datacompdr_shards_read_back_with_replayed_augmentations(shards):
    folder, stored = shards
    tokenizer = WordTokenizer()
    dataset = DataCompDRDataset(
        f"{folder}/{{00000000..00000001}}.tar",
        tokenizer=tokenizer,
        recipe=datacompdr_recipe(24),
        teachers=TEACHERS,
        shuffle=False,
    )
    for epoch in range(3):
        dataset.set_stream(seed=0, epoch=epoch, rank=0, world_size=1)
        samples = list(dataset)
        assert len(samples) == 6
        for sample, uid in zip(samples, stored, strict=True):
            jpeg, params, captions, image_emb, text_rows = stored[uid]
            aug, caption = sample["aug_index"], sample["caption_index"]
            assert torch.equal(sample["image"], independent_replay(jpeg, params[aug], 24))
            assert torch.equal(sample["text"], tokenizer([captions[caption]])[0])
            assert torch.equal(sample[TEACHER_IMAGE], image_emb[aug])
            assert torch.equal(sample[TEACHER_TEXT], text_rows[caption])
            assert sample[TEACHER_IMAGE].dtype == image_emb.dtype  # float32 npz, bf16 pth.gz


def test_the_split_pipeline_replays_datacompdr_crops_and_rand_augment(shards):
    folder, _ = shards
    datasets = [
        DataCompDRDataset(
            f"{folder}/{{00000000..00000001}}.tar",
            tokenizer=WordTokenizer(),
            recipe=datacompdr_recipe(24),
            teachers=TEACHERS,
            shuffle=False,
        )
        for _ in range(2)
    ]
    datasets[1].decoder = CropDecoder(datasets[1].recipe)
    for dataset in datasets:
        dataset.set_stream(seed=0, epoch=1, rank=0, world_size=1)
    expected, samples = (list(dataset) for dataset in datasets)
    assert samples[0]["image"].dtype == torch.uint8 and "aug_rand_ops" in samples[0]
    batch = DeviceAugment(datasets[1].recipe)(collate(samples))
    assert [s["aug_index"] for s in samples] == [s["aug_index"] for s in expected]
    reference = torch.stack([s["image"] for s in expected])
    std = torch.tensor(OPENAI_STD).view(1, -1, 1, 1)
    assert float(((batch["image"] - reference) * std).abs().mean()) * 255 < 3.0


def test_a_distillation_step_from_datacompdr_shards(shards):
    folder, _ = shards
    cfg = {
        "kind": "datacompdr",
        "path": f"{folder}/{{00000000..00000001}}.tar",
        "teacher_dims": list(DIMS),
        "teacher_scale": 100.0,
    }
    dataset = build_datacompdr_dataset(
        cfg, open_clip.transform.image_transform(32, True), WordTokenizer()
    )
    assert dataset.recipe.size == (32, 32) and dataset.recipe.scale == (0.08, 1.0)
    torch.manual_seed(0)
    student = open_clip.model.CLIP(**STUDENT_CFG)
    batch = next(make_loader(dataset, 4, seed=0))
    targets = teacher_targets(batch, dataset.teachers)
    assert [t.image.shape[1] for t in targets] == list(DIMS)
    assert all(t.scale.item() == pytest.approx(100.0) for t in targets)
    with force_backend("torch"):
        image, text, scale = student(batch["image"], batch["text"])
        loss = AffinityMimickingLoss()(image, text, scale, *targets[0][:3])
        loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_decompress_params():
    assert decompress_params([[1, 2, 30, 40], [[5, -12.5], [0, 0.0]]]) == {
        "crop": [1, 2, 30, 40],
        "rand_augment": [["Rotate", -12.5], ["Identity", 0.0]],
    }
    assert decompress_params([[0, 0, 4, 4], None])["rand_augment"] == []
    with pytest.raises(ValueError, match="op id 14 outside"):
        decompress_params([[0, 0, 4, 4], [[14, 1.0]]])
    with pytest.raises(ValueError, match="top, left, height, width"):
        decompress_params([[0, 0, 4], None])


def write_one(path, **fields):
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "abc", **fields})


def test_bad_datacompdr_samples_are_clear_errors(tmp_path):
    generator = torch.Generator().manual_seed(1)
    image = random_image(0)
    good = {
        "jpg": encode_image(image, "JPEG"),
        "syn.json": json.dumps({"syn_text": ["s"] * SYNTHETIC}),
        "paug.json": json.dumps({"param_aug": compressed_params(image, generator)}),
        "npz": {
            "image_emb": unit_rows(K, generator).numpy(),
            "text_emb": unit_rows(1 + SYNTHETIC, generator).numpy(),
        },
    }
    cases = [
        ({"jpg": None}, "has no image .*merge them in by uid"),
        ({"paug.json": None}, "has no paug.json"),
        ({"npz": None}, "has no stored embeddings"),
        (
            {
                "npz": {
                    "image_emb": good["npz"]["image_emb"][:2],
                    "text_emb": good["npz"]["text_emb"],
                }
            },
            r"image_emb \(2, 14\) does not hold one row per stored augmentation \(4",
        ),
        (
            {
                "npz": {
                    "image_emb": good["npz"]["image_emb"],
                    "text_emb": good["npz"]["text_emb"][:2],
                }
            },
            "text_emb has 2 rows for 3 synthetic",
        ),
        (
            {
                "txt": "real",
                "npz": {
                    "image_emb": good["npz"]["image_emb"],
                    "text_emb": good["npz"]["text_emb"][1:],
                },
            },
            "0 real caption embeddings for 1 real",
        ),
        ({"pth.gz": b"broken", "npz": None}, "stored embeddings are corrupt"),
    ]
    for index, (change, message) in enumerate(cases):
        fields = {k: v for k, v in {**good, **change}.items() if v is not None}
        path = tmp_path / f"{index:05d}.tar"
        write_one(path, **fields)
        dataset = DataCompDRDataset(str(path), tokenizer=WordTokenizer(), teachers=TEACHERS)
        with pytest.raises(ValueError, match=message):
            list(dataset)
    with pytest.raises(FileNotFoundError, match="DataCompDR shards not found"):
        DataCompDRDataset(str(tmp_path / "none.tar"), tokenizer=WordTokenizer())
    with pytest.raises(ValueError, match="crop and RandAugment ops only"):
        DataCompDRDataset(
            str(tmp_path / "00000.tar"),
            tokenizer=WordTokenizer(),
            recipe=datacompdr_recipe(24).__class__(size=24),
        )
    with pytest.raises(TypeError, match="length unknown"):
        len(DataCompDRDataset(str(tmp_path / "00000.tar"), tokenizer=WordTokenizer()))
    assert np.isclose(np.linalg.norm(good["npz"]["image_emb"][0, :8]), 1.0)
