"""The CPU half of the split pipeline: crops drawn on the upright image, libjpeg's reduced
decode on a snapped box, the decoder chosen per device, bad images named or skipped."""

import pytest
import torch
from photos import exif_rotated_jpeg, rgb_jpeg

from tinyclip_fast.data import decode as decode_module
from tinyclip_fast.data.augment import AugmentRecipe
from tinyclip_fast.data.datasets import CsvPairDataset, WebDatasetPairs
from tinyclip_fast.data.decode import CropDecoder, resolve_decode
from tinyclip_fast.data.loader import BadSampleError, BadSampleLog, collate, make_loader

RECIPE = AugmentRecipe(size=32, scale=(0.3, 1.0))


def tokenize(texts):
    return torch.zeros(len(texts), 4, dtype=torch.long)


def test_the_crop_is_drawn_on_the_upright_size():
    recipe = AugmentRecipe(size=32, scale=(1.0, 1.0), ratio=(0.1, 10.0))
    crop, params = CropDecoder(recipe).crop(exif_rotated_jpeg(40, 90))
    assert params["crop"] == [0, 0, 90, 40]
    assert tuple(crop.shape) == (3, 90, 40)


@pytest.mark.parametrize("decode", ["tensor", "pil"])
def test_a_large_crop_is_decoded_reduced_on_a_snapped_box(decode):
    recipe = AugmentRecipe(size=16, scale=(0.9, 1.0))
    torch.manual_seed(1)
    crop, params = CropDecoder(recipe, decode).crop(rgb_jpeg(300, 260))
    top, left, height, width = params["crop"]
    assert all(value % 8 == 0 for value in (top, left)) and height >= 128 and width >= 128
    assert tuple(crop.shape[-2:]) == (-(-height // 8), -(-width // 8))


def test_a_replayed_crop_off_the_grid_is_decoded_at_full_size():
    params = {"crop": [3, 5, 250, 201]}
    crop, replayed = CropDecoder(AugmentRecipe(size=100)).crop(rgb_jpeg(300, 260), params)
    assert replayed == params and tuple(crop.shape[-2:]) == (250, 201)


def test_nvjpeg_hands_over_plain_jpegs_undecoded():
    data = rgb_jpeg(60, 80)
    sample = CropDecoder(RECIPE, "nvjpeg")(data, {"crop": [2, 3, 40, 50]})
    assert sample["image"].shape == (3, 0, 0) and bytes(sample["jpeg"].numpy()) == data
    assert sample["jpeg_box"].tolist() == [2, 3, 40, 50] and int(sample["jpeg_length"]) == len(data)
    assert sample["image_size"].tolist() == [40, 50]
    rotated = CropDecoder(RECIPE, "nvjpeg")(exif_rotated_jpeg(60, 80))
    assert rotated["image"].numel() > 0 and int(rotated["jpeg_length"]) == 0


@pytest.mark.parametrize("size", [100, 16], ids=["libjpeg-turbo", "reduced-pil"])
def test_a_truncated_jpeg_raises_a_clear_error(size):
    data = rgb_jpeg(120, 160)
    with pytest.raises(
        (OSError, ValueError), match="^(Image is incomplete or |image file is )truncated"
    ):
        CropDecoder(AugmentRecipe(size=size, scale=(1.0, 1.0))).crop(data[: len(data) // 2])


def test_unknown_decoder_is_refused():
    with pytest.raises(ValueError, match="decode must be one of"):
        CropDecoder(RECIPE, decode="gpu")


def test_collate_pads_crops_and_records_their_sizes():
    samples = [CropDecoder(RECIPE)(rgb_jpeg(*shape)) for shape in ((96, 128), (140, 70))]
    batch = collate(samples)
    sizes = batch["image_size"].tolist()
    assert batch["image"].shape[-2:] == (max(h for h, _ in sizes), max(w for _, w in sizes))
    for image, sample in zip(batch["image"], samples, strict=True):
        height, width = sample["image"].shape[-2:]
        assert torch.equal(image[:, :height, :width], sample["image"])
        assert not image[:, height:, :].any() and not image[:, :, width:].any()


def test_auto_decodes_with_pil_off_cuda(monkeypatch):
    monkeypatch.setattr(decode_module, "gpu_decodes_jpeg", lambda device: True)
    assert resolve_decode("auto", torch.device("cpu")) == "pil"
    assert resolve_decode("tensor", torch.device("cpu")) == "tensor"
    with pytest.raises(ValueError, match="'nvjpeg' decodes on a CUDA GPU"):
        resolve_decode("nvjpeg", torch.device("cpu"))


@pytest.mark.parametrize("has_nvjpeg, chosen", [(True, "nvjpeg"), (False, "tensor")])
def test_auto_on_cuda_takes_nvjpeg_where_the_build_has_it(monkeypatch, has_nvjpeg, chosen):
    probed = []
    monkeypatch.setattr(
        decode_module, "gpu_decodes_jpeg", lambda device: probed.append(device) or has_nvjpeg
    )
    assert resolve_decode("auto", torch.device("cuda", 0)) == chosen
    assert probed == [torch.device("cuda", 0)]


def test_this_build_decodes_no_jpeg_on_a_missing_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert not decode_module.gpu_decodes_jpeg(torch.device("cuda"))


@pytest.fixture
def csv_with_bad_files(tmp_path):
    (tmp_path / "0.jpg").write_bytes(rgb_jpeg(50, 60))
    cut = rgb_jpeg(50, 60)
    (tmp_path / "1.jpg").write_bytes(cut[: len(cut) // 2])
    (tmp_path / "2.jpg").write_bytes(b"not an image")
    for index in range(3, 12):
        (tmp_path / f"{index}.jpg").write_bytes(rgb_jpeg(40 + index, 70))
    rows = "".join(f"{index}.jpg,photo {index}\n" for index in range(12))
    (tmp_path / "pairs.csv").write_text("filepath,title\n" + rows)
    return tmp_path / "pairs.csv"


@pytest.mark.parametrize("decode", ["tensor", "pil", "nvjpeg"])
def test_bad_images_are_named(csv_with_bad_files, decode):
    data = CsvPairDataset(
        csv_with_bad_files, preprocess=CropDecoder(RECIPE, decode), tokenizer=tokenize
    )
    assert data[0]["image"].dtype == torch.uint8
    with pytest.raises(BadSampleError, match=r"1.jpg \(row 1 of .*pairs.csv\) cannot be read"):
        data[1]
    with pytest.raises(BadSampleError, match=r"2.jpg \(row 2 of .*pairs.csv\) cannot be read"):
        data[2]


def test_bad_images_are_skipped_once_each_and_logged(csv_with_bad_files, tmp_path):
    data = CsvPairDataset(csv_with_bad_files, preprocess=CropDecoder(RECIPE), tokenizer=tokenize)
    log = BadSampleLog(tmp_path / "bad.jsonl", max_fraction=0.5)
    loader = make_loader(data, 6, seed=0, bad_samples=log)
    for batch in (next(loader), next(loader)):  # one epoch: every index comes up
        indices = batch["index"].tolist()
        assert len(set(indices)) == 6 and not {1, 2} & set(indices)
        assert batch["image"].shape[0] == 6 and batch["image"].dtype == torch.uint8
    logged = (tmp_path / "bad.jsonl").read_text().splitlines()
    assert sorted(line.split('"file": ')[1].split(",")[0][-6:] for line in logged) == [
        '1.jpg"',
        '2.jpg"',
    ]


def test_webdataset_samples_carry_crops(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        for key in "abc":
            sink.write({"__key__": key, "jpg": rgb_jpeg(50, 64), "txt": "x"})
    data = WebDatasetPairs(
        str(tmp_path / "a.tar"), preprocess=CropDecoder(RECIPE), tokenizer=tokenize, shuffle=False
    )
    samples = list(data)
    assert [s["index"] for s in samples] == [0, 1, 2]
    assert all(s["image"].dtype == torch.uint8 and "image_size" in s for s in samples)
