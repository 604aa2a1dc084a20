"""The split pipeline (CPU crop of data/decode.py + device augmentation) gives open_clip's
PIL transform's images for the same recorded parameters.

Tolerance: mean absolute difference of MEAN_LEVELS 8-bit levels over the output (bicubic PIL
and antialiased tensor resizing differ slightly; JPEG DCT downscaling more), and no pixel
more than MAX_LEVELS off on average over a row.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tinyclip_fast.data.augment import AugmentRecipe
from tinyclip_fast.data.decode import CropDecoder, crop_bound, encode_params
from tinyclip_fast.data.device_augment import DeviceAugment
from tinyclip_fast.data.images import open_rgb
from tinyclip_fast.data.loader import collate

MEAN_LEVELS = 3.0
ROW_LEVELS = 12.0
SIZE = 64


def picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [H, W, 3]: smooth random colour blobs (a photo-like spectrum) and a sharp bar."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)).copy()
    image[height // 5 : height // 5 + max(2, height // 20), width // 4 : width // 2] = (240, 30, 60)
    return image


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def rgb_jpeg(height, width):
    return encoded(Image.fromarray(picture(height, width)), "JPEG", quality=90)


def gray_jpeg(height, width):
    return encoded(Image.fromarray(picture(height, width)).convert("L"), "JPEG", quality=90)


def cmyk_jpeg(height, width):
    return encoded(Image.fromarray(picture(height, width)).convert("CMYK"), "JPEG", quality=90)


def rgba_png(height, width):
    rgba = np.dstack([picture(height, width), np.full((height, width), 255, np.uint8)])
    rgba[: height // 2, : width // 3, 3] = 90
    return encoded(Image.fromarray(rgba, "RGBA"), "PNG")


def sixteen_bit_png(height, width):
    luma = np.asarray(Image.fromarray(picture(height, width)).convert("L")).astype(np.uint16)
    image = Image.fromarray(luma * 257)
    assert image.mode == "I;16"
    return encoded(image, "PNG")


def exif_rotated_jpeg(height, width):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show upright
    return encoded(Image.fromarray(picture(height, width)), "JPEG", quality=90, exif=exif)


MAKERS = [rgb_jpeg, gray_jpeg, cmyk_jpeg, rgba_png, sixteen_bit_png, exif_rotated_jpeg]
SHAPES = [(96, 128), (300, 200), (700, 520)]  # 700x520 lets libjpeg decode at 1/2 or 1/4

RECIPES = {
    "open_clip": AugmentRecipe(size=SIZE, scale=(0.3, 1.0)),
    "flip+jitter+gray": AugmentRecipe(
        size=SIZE,
        scale=(0.3, 1.0),
        hflip_prob=0.5,
        color_jitter=((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)),
        color_jitter_prob=0.8,
        gray_prob=0.3,
    ),
    "rand_augment": AugmentRecipe(size=SIZE, scale=(0.3, 1.0), rand_augment=(2, 9, 31)),
}


def both(recipe: AugmentRecipe, files: list[bytes], decode: str, *, replay: bool):
    """(PIL transform's [B, 3, S, S], split pipeline's [B, 3, S, S]) for the same params:
    drawn by the decoder (a JPEG crop snapped to libjpeg's reduced grid) or replayed."""
    decoder = CropDecoder(recipe, decode=decode)
    generator = torch.Generator().manual_seed(0)
    reference, samples = [], []
    for data in files:
        image = open_rgb(data)
        if replay:
            params = recipe.sample(image.height, image.width, generator)
            samples.append(decoder(data, params))
        else:
            crop, params = decoder.crop(data)
            samples.append({"image": crop, **encode_params(recipe, params, tuple(crop.shape[-2:]))})
        reference.append(recipe.apply(image, params))
    return torch.stack(reference), DeviceAugment(recipe)(collate(samples))["image"]


def levels(images: torch.Tensor, recipe: AugmentRecipe) -> torch.Tensor:
    """Normalised images back in 8-bit levels."""
    mean = torch.tensor(recipe.mean).view(1, -1, 1, 1)
    std = torch.tensor(recipe.std).view(1, -1, 1, 1)
    return (images * std + mean) * 255.0


def assert_close(reference: torch.Tensor, split: torch.Tensor, recipe: AugmentRecipe) -> None:
    assert split.shape == reference.shape and split.dtype == torch.float32
    diff = (levels(reference, recipe) - levels(split, recipe)).abs()
    assert float(diff.mean()) < MEAN_LEVELS
    assert float(diff.mean(dim=(1, 3)).max()) < ROW_LEVELS


@pytest.mark.parametrize("replay", [False, True], ids=["drawn", "replayed"])
@pytest.mark.parametrize("decode", ["tensor", "pil", "nvjpeg"])
@pytest.mark.parametrize("make", MAKERS, ids=lambda f: f.__name__)
def test_split_pipeline_matches_the_pil_transform_per_mode(make, decode, replay):
    recipe = RECIPES["open_clip"]
    files = [make(*shape) for shape in SHAPES for _ in range(2)]
    assert_close(*both(recipe, files, decode, replay=replay), recipe)


@pytest.mark.parametrize("name", ["flip+jitter+gray", "rand_augment"])
def test_split_pipeline_matches_the_pil_transform_with_colour_ops(name):
    recipe = RECIPES[name]
    files = [rgb_jpeg(*shape) for shape in SHAPES for _ in range(4)]
    assert_close(*both(recipe, files, "tensor", replay=False), recipe)


def test_a_crop_larger_than_the_bound_is_downscaled_on_the_cpu():
    recipe = AugmentRecipe(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    data = rgba_png(200, 200)  # not a JPEG: no DCT scaling
    crop, params = CropDecoder(recipe).crop(data)
    assert params["crop"] == [0, 0, 200, 200]
    assert crop.dtype == torch.uint8 and max(crop.shape[-2:]) == crop_bound(recipe) == 32
    reference = recipe.apply(open_rgb(data), params)
    split = DeviceAugment(recipe)(collate([CropDecoder(recipe)(data, params)]))["image"]
    assert_close(reference[None], split, recipe)


def test_the_crop_is_drawn_on_the_upright_size():
    recipe = AugmentRecipe(size=32, scale=(1.0, 1.0), ratio=(0.1, 10.0))
    crop, params = CropDecoder(recipe).crop(exif_rotated_jpeg(40, 90))
    assert params["crop"] == [0, 0, 90, 40]
    assert tuple(crop.shape) == (3, 90, 40)


def test_a_truncated_jpeg_raises_a_clear_error():
    data = rgb_jpeg(120, 160)
    with pytest.raises(ValueError, match="truncated|incomplete"):
        CropDecoder(RECIPES["open_clip"]).crop(data[: len(data) // 2])


def test_collate_pads_crops_and_records_their_sizes():
    recipe = RECIPES["open_clip"]
    samples = [CropDecoder(recipe)(rgb_jpeg(*shape)) for shape in SHAPES[:2]]
    batch = collate(samples)
    sizes = batch["image_size"].tolist()
    assert batch["image"].shape[-2:] == (max(h for h, _ in sizes), max(w for _, w in sizes))
    for image, sample in zip(batch["image"], samples, strict=True):
        height, width = sample["image"].shape[-2:]
        assert torch.equal(image[:, :height, :width], sample["image"])
        assert not image[:, height:, :].any() and not image[:, :, width:].any()


def test_unknown_decoder_is_refused():
    with pytest.raises(ValueError, match="decode must be one of"):
        CropDecoder(RECIPES["open_clip"], decode="gpu")
