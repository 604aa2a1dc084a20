"""The split pipeline (CPU crop of data/decode.py + device augmentation) gives open_clip's
PIL transform's images for the same recorded parameters.

Tolerance: mean absolute difference of MEAN_LEVELS 8-bit levels over the output (bicubic PIL
and antialiased tensor resizing differ slightly; JPEG DCT downscaling more), and no pixel
more than ROW_LEVELS off on average over a row.
"""

import numpy as np
import pytest
import torch
from photos import MAKERS, SHAPES, picture, rgb_jpeg, rgba_png
from PIL import Image

from tinyclip_fast.data.augment import AugmentRecipe
from tinyclip_fast.data.decode import CropDecoder, crop_bound, encode_params
from tinyclip_fast.data.device_augment import DeviceAugment, resize_crops
from tinyclip_fast.data.images import open_rgb
from tinyclip_fast.data.loader import collate

MEAN_LEVELS = 3.0
ROW_LEVELS = 12.0
SIZE = 64


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


@pytest.mark.parametrize("batched", [True, False], ids=["filter-matrices", "per-size"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_both_resizes_match_pils_antialiased_resize(batched, interpolation):
    shapes = [(96, 128), (300, 200), (70, 50), (500, 375), (40, 40)]
    crops = [torch.from_numpy(picture(h, w)).permute(2, 0, 1).contiguous() for h, w in shapes]
    batch = collate([{"image": c, "image_size": torch.tensor(c.shape[-2:])} for c in crops])
    resized = resize_crops(
        batch["image"], batch["image_size"], (64, 48), interpolation, batched=batched
    )
    assert resized.dtype == torch.uint8 and resized.shape == (len(shapes), 3, 64, 48)
    mode = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]
    for crop, ours in zip(crops, resized, strict=True):
        pil = Image.fromarray(crop.permute(1, 2, 0).numpy()).resize((48, 64), mode)
        reference = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()
        diff = (ours.float() - reference).abs()
        assert float(diff.mean()) < 0.3 and float(diff.max()) <= 2
