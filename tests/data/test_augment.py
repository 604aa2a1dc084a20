"""Replayable augmentation: open_clip's training transform reproduced from recorded draws,
replays bit-exact, parameters JSON-safe, bad parameters and transforms refused."""

import json
import math
import random
import warnings

import open_clip
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from open_clip.transform import image_transform
from support import TEACHER_CFG, random_image

from tinyclip_fast.data.augment import RAND_AUGMENT_OPS, AugmentRecipe

FULL = AugmentRecipe(
    size=(24, 28),
    scale=(0.08, 1.0),
    hflip_prob=0.5,
    rand_augment=(2, 9, 31),
    color_jitter=((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)),
    color_jitter_prob=0.8,
    gray_prob=0.3,
)


def jitter_transform():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # open_clip notes that plain color_jitter is unused
        return image_transform(
            32,
            is_train=True,
            aug_cfg={
                "color_jitter": (0.4, 0.3, 0.2, 0.1),
                "color_jitter_prob": 0.7,
                "gray_scale_prob": 0.4,
            },
        )


def test_replay_equals_open_clip_train_transform():
    image = random_image(0)
    transform = image_transform(32, is_train=True)
    recipe = AugmentRecipe.from_transform(transform)
    assert recipe.size == (32, 32) and recipe.scale == (0.9, 1.0)
    assert recipe.interpolation == "bicubic" and recipe.sample_keys() == ("crop",)
    for seed in range(6):
        torch.manual_seed(seed)
        box = T.RandomResizedCrop.get_params(image, recipe.scale, recipe.ratio)
        torch.manual_seed(seed)
        expected = transform(image)
        assert torch.equal(recipe.apply(image, {"crop": list(box)}), expected)


def test_replay_equals_open_clip_with_jitter_and_grayscale():
    image = random_image(1)
    transform = jitter_transform()
    recipe = AugmentRecipe.from_transform(transform)
    assert recipe.color_jitter_prob == 0.7 and recipe.gray_prob == 0.4
    jitter = transform.transforms[2].transf
    outcomes = set()
    for seed in range(12):
        torch.manual_seed(seed)
        random.seed(seed)
        expected = transform(image)
        # The same draws, read off in the order open_clip makes them.
        torch.manual_seed(seed)
        random.seed(seed)
        box = T.RandomResizedCrop.get_params(image, recipe.scale, recipe.ratio)
        drawn = None
        if random.random() < 0.7:
            order, *factors = T.ColorJitter.get_params(
                jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue
            )
            names = ("brightness", "contrast", "saturation", "hue")
            drawn = {"order": order.tolist(), **dict(zip(names, factors, strict=True))}
        gray = random.random() < 0.4
        outcomes.add((drawn is None, gray))
        params = {"crop": list(box), "color_jitter": drawn, "gray": gray}
        assert torch.equal(recipe.apply(image, json.loads(json.dumps(params))), expected)
    assert len(outcomes) >= 3  # jitter on/off and gray on/off both exercised


def test_recipe_for_a_model_matches_its_training_transform():
    model = open_clip.model.CLIP(**TEACHER_CFG)
    recipe = AugmentRecipe.for_model(model)
    assert recipe == AugmentRecipe.from_transform(image_transform(32, is_train=True))


def test_replay_is_bit_exact_and_params_are_json():
    image = random_image(2)
    seen_ops, flips, grays = set(), set(), set()
    for seed in range(20):
        tensor, params = FULL(image, torch.Generator().manual_seed(seed))
        again, params_again = FULL(image, torch.Generator().manual_seed(seed))
        assert params == params_again and torch.equal(tensor, again)
        restored = json.loads(json.dumps(params))
        assert restored == params
        assert torch.equal(FULL.apply(image, restored), tensor)
        assert tensor.shape == (3, 24, 28) and tensor.dtype == torch.float32
        assert torch.isfinite(tensor).all()
        seen_ops.update(name for name, _ in params["rand_augment"])
        flips.add(params["flip"])
        grays.add(params["gray"])
    assert flips == {True, False} and grays == {True, False}
    assert len(seen_ops) >= 8 and seen_ops <= set(RAND_AUGMENT_OPS)
    a = FULL.sample(40, 40, torch.Generator().manual_seed(0))
    b = FULL.sample(40, 40, torch.Generator().manual_seed(1))
    assert a != b


def test_crops_respect_scale_and_ratio():
    recipe = AugmentRecipe(size=16, scale=(0.3, 0.6), ratio=(0.5, 2.0))
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = recipe.sample(50, 70, generator)["crop"]
        assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 70
        assert 0.3 - 0.05 <= h * w / (50 * 70) <= 0.6 + 0.05  # rounding to whole pixels
        assert 0.5 - 0.05 <= w / h <= 2.0 + 0.1
    # An impossible area fraction falls back to the centred box of the nearest allowed ratio.
    wide = AugmentRecipe(size=8, scale=(5.0, 6.0), ratio=(1.0, 1.0))
    assert wide.sample(10, 30, torch.Generator().manual_seed(0))["crop"] == [0, 10, 10, 10]


def test_tensor_images_as_in_the_demo():
    # Pre-normalised tensors in [-1, 1]: geometric ops only, no normalisation.
    recipe = AugmentRecipe(size=(16, 16), scale=(0.5, 1.0), hflip_prob=1.0, mean=None, std=None)
    image = torch.rand(3, 30, 26) * 2 - 1
    tensor, params = recipe(image, torch.Generator().manual_seed(4))
    top, left, h, w = params["crop"]
    bicubic = T.InterpolationMode.BICUBIC
    expected = F.hflip(F.resized_crop(image, top, left, h, w, [16, 16], bicubic, antialias=True))
    assert params["flip"] is True and torch.equal(tensor, expected)
    with pytest.raises(ValueError, match=r"need tensor images in \[0, 1\]"):
        AugmentRecipe(size=16, gray_prob=0.5, mean=None, std=None).apply(
            image, {"crop": [0, 0, 10, 10], "gray": True}
        )
    with pytest.raises(ValueError, match="float"):
        recipe.apply(torch.zeros(3, 8, 8, dtype=torch.uint8), {"crop": [0, 0, 4, 4], "flip": 0})


def test_recipe_round_trips_and_splits():
    for recipe in (FULL, AugmentRecipe.from_transform(jitter_transform())):
        restored = AugmentRecipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
        assert restored == recipe
        assert set(recipe.preprocess_dict()) == {"size", "interpolation", "mean", "std"}
        assert {**recipe.preprocess_dict(), **recipe.augmentation_dict()} == recipe.to_dict()


def test_bad_params_and_transforms_are_refused():
    image = random_image(3)  # at least 28 x 28
    recipe = AugmentRecipe(size=16)
    with pytest.raises(ValueError, match="drawn by another recipe"):
        recipe.apply(image, {"crop": [0, 0, 8, 8], "flip": True})
    with pytest.raises(ValueError, match=r"crop \[0, 0, 99, 8\] does not fit"):
        recipe.apply(image, {"crop": [0, 0, 99, 8]})
    with pytest.raises(ValueError, match="4 integers"):
        recipe.apply(image, {"crop": [0, 0, 8]})
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        AugmentRecipe(size=16, rand_augment=(1, 9, 31)).apply(
            image, {"crop": [0, 0, 8, 8], "rand_augment": [["Explode", 1.0]]}
        )
    with pytest.raises(ValueError, match="cannot record and replay RandomRotation"):
        AugmentRecipe.from_transform(T.Compose([T.RandomResizedCrop(8), T.RandomRotation(5)]))
    with pytest.raises(ValueError, match="no RandomResizedCrop"):
        AugmentRecipe.from_transform(image_transform(32, is_train=False))
    with pytest.raises(ValueError, match="in its order"):
        AugmentRecipe.from_transform(
            T.Compose(
                [T.RandomResizedCrop(8), T.Normalize([0.5] * 3, [0.5] * 3), T.RandomGrayscale()]
            )
        )
    with pytest.raises(ValueError, match="expected a torchvision Compose"):
        AugmentRecipe.from_transform(lambda image: image)
    for bad in (
        {"size": 0},
        {"size": 8, "scale": (0.9, 0.1)},
        {"size": 8, "interpolation": "lanczos"},
        {"size": 8, "mean": None},
        {"size": 8, "hflip_prob": 1.5},
        {"size": 8, "rand_augment": (2, 40, 31)},
    ):
        with pytest.raises(ValueError):
            AugmentRecipe(**bad)
    assert math.isclose(AugmentRecipe(size=8).ratio[1], 4 / 3)
