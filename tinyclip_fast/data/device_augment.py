"""The device half of the split image pipeline: a batch of uint8 crops (data/decode.py) in,
the normalised float images of :meth:`AugmentRecipe.apply` out, on the training device.

Same ops, same order as the recipe: resize (PIL's antialiased filter; on CUDA one batched
pair of matrix products for crops of any sizes, elsewhere a call per crop size) -> flip ->
RandAugment -> colour jitter -> grayscale -> /255 -> normalise. Pixels stay uint8 until the
normalisation, rounded after every op as PIL's are, so the result matches open_clip's PIL
transform for the same crop within a few 1/255 steps (bicubic PIL and antialiased tensor
resizing differ slightly; tests/data/test_device_augment.py holds the tolerance). Flip and
grayscale act on the whole batch; RandAugment and jitter, which differ per sample, loop over
the samples that drew them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torchvision.transforms.functional as F

from tinyclip_fast.data.augment import (
    INTERPOLATIONS,
    JITTER_OPS,
    RAND_AUGMENT_OPS,
    AugmentRecipe,
    apply_jitter,
    apply_rand_augment_op,
)
from tinyclip_fast.data.decode import crop_bound
from tinyclip_fast.data.loader import pad_stack

# Batch fields the augmentation reads as Python values: they stay on the host.
HOST_FIELDS = (
    "image_size",
    "aug_flip",
    "aug_gray",
    "aug_jitter",
    "aug_jitter_order",
    "aug_rand_ops",
    "aug_rand_magnitudes",
    "jpeg",
    "jpeg_length",
    "jpeg_box",
)


class DeviceAugment:
    """``augment(batch)``: replaces ``batch["image"]`` (uint8 [B, 3, H, W], each sample's crop
    in its top-left ``image_size``) with float32 [B, 3, *recipe.size] and drops the
    ``HOST_FIELDS``; the images may be on any device, the host fields on the CPU."""

    host_fields = HOST_FIELDS

    def __init__(self, recipe: AugmentRecipe) -> None:
        self.recipe = recipe

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        batch = dict(batch)
        fields = {name: batch.pop(name) for name in HOST_FIELDS if name in batch}
        deferred = _deferred(fields)
        images = resize_crops(
            batch.pop("image"),
            fields["image_size"],
            self.recipe.size,
            self.recipe.interpolation,
            skip=set(deferred),
        )
        if deferred:
            self._decode_into(images, fields, deferred)
        if "aug_flip" in fields:
            images = _where(fields["aug_flip"], images.flip(-1), images)
        if "aug_rand_ops" in fields:
            images = _per_sample(images, _rand_augment_ops(fields))
        if "aug_jitter" in fields:
            images = _per_sample(images, _jitter_ops(fields))
        if "aug_gray" in fields:
            images = _where(fields["aug_gray"], F.rgb_to_grayscale(images, 3), images)
        batch["image"] = self._normalise(images)
        return batch

    def _decode_into(
        self, images: torch.Tensor, fields: dict[str, torch.Tensor], deferred: list[int]
    ) -> None:
        # The JPEGs data/decode.py left encoded: one batched decode on the images' device,
        # then the crops up to crop_bound resized together, larger ones one by one (padding
        # a batch to a full-size photo would cost more memory than it saves launches).
        from torchvision.io import ImageReadMode, decode_jpeg

        lengths = fields["jpeg_length"].tolist()
        encoded = [fields["jpeg"][index, : lengths[index]] for index in deferred]
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=images.device)
        crops = {}
        for index, image in zip(deferred, decoded, strict=True):
            top, left, height, width = fields["jpeg_box"][index].tolist()
            crops[index] = image[:, top : top + height, left : left + width]
        bound = crop_bound(self.recipe)
        small = [index for index, crop in crops.items() if max(crop.shape[-2:]) <= bound]
        if small:
            padded = pad_stack([crops[index] for index in small])
            sizes = torch.tensor([list(crops[index].shape[-2:]) for index in small])
            where = torch.tensor(small, device=images.device)
            images[where] = resize_crops(padded, sizes, self.recipe.size, self.recipe.interpolation)
        mode = INTERPOLATIONS[self.recipe.interpolation]
        for index in set(crops) - set(small):
            images[index] = F.resize(
                crops[index], list(self.recipe.size), interpolation=mode, antialias=True
            )

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.float().div_(255.0)
        if self.recipe.mean is None:
            return pixels
        mean = torch.tensor(self.recipe.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.recipe.std, device=images.device).view(1, -1, 1, 1)
        return pixels.sub_(mean).div_(std)


def resize_crops(
    images: torch.Tensor,
    sizes: torch.Tensor,
    size: tuple[int, int],
    interpolation: str,
    skip: set[int] = frozenset(),
    batched: bool | None = None,
) -> torch.Tensor:
    """uint8 [B, 3, *size]: each image's top-left ``sizes[i]`` (h, w) region resized,
    antialiased; the ``skip`` slots are left unset (or hold anything).

    ``batched`` (default: on CUDA, for bicubic and bilinear): two batched matrix products
    with per-sample filter matrices (:func:`filter_matrices`), one call for the batch;
    otherwise torchvision's resize per group of equal-size regions (a call per distinct size:
    fewer FLOPs, which suits the CPU)."""
    if batched is None:
        batched = images.is_cuda and interpolation in FILTERS
    if batched:
        return _resize_batched(images, sizes, size, interpolation)
    out = torch.empty((images.shape[0], images.shape[1], *size), dtype=torch.uint8)
    out = out.to(images.device)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, (height, width) in enumerate(sizes.tolist()):
        if index in skip:
            continue
        groups.setdefault((height, width), []).append(index)
    mode = INTERPOLATIONS[interpolation]
    for (height, width), indices in groups.items():
        where = torch.tensor(indices, device=images.device)
        crops = images.index_select(0, where)[:, :, :height, :width]
        out[where] = F.resize(crops, list(size), interpolation=mode, antialias=True)
    return out


def _cubic(x: torch.Tensor) -> torch.Tensor:
    # Keys' cubic with a = -0.5, PIL's bicubic filter (support 2).
    x = x.abs()
    near = ((1.5 * x - 2.5) * x) * x + 1.0
    far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _triangle(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x.abs()).clamp_min(0.0)


FILTERS = {"bicubic": _cubic, "bilinear": _triangle}


def filter_matrices(
    lengths: torch.Tensor, out_size: int, padded: int, interpolation: str
) -> torch.Tensor:
    """float32 [B, out_size, padded]: row i of matrix b averages input pixels 0..lengths[b]-1
    into output pixel i as PIL's antialiased resize does (filter stretched by the downscale
    factor, weights normalised; pixels at or past ``lengths[b]`` weigh nothing)."""
    lengths = lengths.to(torch.float32)
    scale = lengths / out_size
    stretch = scale.clamp_min(1.0)
    centres = (torch.arange(out_size, device=lengths.device) + 0.5)[None, :] * scale[:, None]
    taps = torch.arange(padded, device=lengths.device, dtype=torch.float32) + 0.5
    weights = FILTERS[interpolation]((taps - centres[:, :, None]) / stretch[:, None, None])
    weights = weights * (taps < lengths[:, None, None])
    return weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)


def _resize_batched(
    images: torch.Tensor, sizes: torch.Tensor, size: tuple[int, int], interpolation: str
) -> torch.Tensor:
    # fp16 on CUDA: pixel values are exact, products accumulate in fp32.
    dtype = torch.float16 if images.is_cuda else torch.float32
    sizes = sizes.to(images.device)
    height, width = images.shape[-2:]
    rows = filter_matrices(sizes[:, 0].clamp(max=height), size[0], height, interpolation)
    cols = filter_matrices(sizes[:, 1].clamp(max=width), size[1], width, interpolation)
    pixels = images.to(dtype)
    resized = rows.to(dtype)[:, None] @ pixels @ cols.to(dtype).transpose(1, 2)[:, None]
    return resized.float().round_().clamp_(0, 255).to(torch.uint8)


def _deferred(fields: dict[str, torch.Tensor]) -> list[int]:
    if "jpeg_length" not in fields:
        return []
    return [index for index, length in enumerate(fields["jpeg_length"].tolist()) if length]


def _where(mask: torch.Tensor, chosen: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    mask = mask.to(chosen.device, non_blocking=True).view(-1, 1, 1, 1)
    return torch.where(mask, chosen, other)


def _per_sample(images: torch.Tensor, ops: dict[int, Any]) -> torch.Tensor:
    if not ops:
        return images
    images = images.clone()
    for index, op in ops.items():
        images[index] = op(images[index])
    return images


def _rand_augment_ops(fields: dict[str, torch.Tensor]) -> dict[int, Any]:
    ops = fields["aug_rand_ops"].tolist()
    magnitudes = fields["aug_rand_magnitudes"].tolist()

    def replay(drawn: list[tuple[str, float]]) -> Any:
        def run(image: torch.Tensor) -> torch.Tensor:
            for name, magnitude in drawn:
                image = apply_rand_augment_op(image, name, magnitude)
            return image

        return run

    return {
        index: replay([(RAND_AUGMENT_OPS[op], m) for op, m in zip(row, mags, strict=True)])
        for index, (row, mags) in enumerate(zip(ops, magnitudes, strict=True))
        if row
    }


def _jitter_ops(fields: dict[str, torch.Tensor]) -> dict[int, Any]:
    factors = fields["aug_jitter"].tolist()
    orders = fields["aug_jitter_order"].tolist()
    ops = {}
    for index, (row, order) in enumerate(zip(factors, orders, strict=True)):
        if all(math.isnan(f) for f in row):
            continue
        drawn = {
            name: None if math.isnan(f) else f for name, f in zip(JITTER_OPS, row, strict=True)
        }
        drawn["order"] = order
        ops[index] = lambda image, drawn=drawn: apply_jitter(image, drawn)
    return ops
