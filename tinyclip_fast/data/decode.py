"""The CPU half of the split image pipeline: encoded bytes in, a uint8 crop and its recorded
augmentation out; data/device_augment.py does the rest on the training device.

open_clip's training transform spends most of its CPU time resizing and converting floats
(PIL decode ~1.3 ms, bicubic RandomResizedCrop ~2.3 ms, ToTensor + Normalize ~0.9 ms for a
341x256 JPEG). Here a loader worker only decodes and cuts the crop out:

1. The header (PIL, no pixels decoded) gives the format, mode, size and EXIF orientation;
   the crop is drawn on the upright size by :meth:`AugmentRecipe.sample` (open_clip's
   RandomResizedCrop, every parameter recorded), or replayed from given parameters.
2. Decode, by the cheapest route that keeps data/images.py's faithful-RGB rules:
   - a JPEG whose crop is at least twice the output size on both sides: PIL with ``draft``
     (libjpeg's DCT scaling by 1/2, 1/4 or 1/8: fewer pixels decoded), the crop box scaled;
   - other RGB or grayscale JPEGs with ``decode="tensor"``: ``torchvision.io.decode_jpeg``
     (libjpeg-turbo, EXIF orientation applied), then the crop is a slice;
   - everything else (CMYK, PNG of any mode, WebP, ``decode="pil"``): PIL and
     :func:`to_rgb`, then the crop.
3. A crop larger than :func:`crop_bound` on a side (only non-JPEGs, or JPEGs over 8x the
   bound) is downscaled on the CPU to fit it, aspect kept: a batch is padded to its largest
   crop, and the bound keeps that below 2 x (output side) x (widest aspect ratio) per side.

The sample's ``image`` is that uint8 crop [3, h, w]; ``image_size`` its (h, w); ``aug_*``
fields hold the rest of the parameters as tensors (see :func:`encode_params`), so the
loader's collate stacks them.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as F

from tinyclip_fast.data.augment import (
    INTERPOLATIONS,
    JITTER_OPS,
    RAND_AUGMENT_OPS,
    AugmentRecipe,
    Params,
    check_crop,
)
from tinyclip_fast.data.images import orientation, to_rgb
from tinyclip_fast.data.options import DECODERS

_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_DRAFT_FACTORS = (8, 4, 2)


def resolve_decode(setting: str, device: torch.device) -> str:
    """The decoder a run on ``device`` uses for ``data.decode = setting``. "auto": on CUDA
    "nvjpeg" where torchvision decodes JPEGs on that GPU, else "tensor"; elsewhere "pil"
    (the device half would share the CPU with the loader and costs more there than PIL's
    resize: bench/results/loader_cpu.md)."""
    if setting == "auto":
        if device.type != "cuda":
            return "pil"
        return "nvjpeg" if gpu_decodes_jpeg(device) else "tensor"
    if setting not in DECODERS:
        raise ValueError(f"data.decode must be auto or one of {DECODERS}, got {setting!r}")
    if setting == "nvjpeg" and device.type != "cuda":
        raise ValueError(f"data.decode 'nvjpeg' decodes on a CUDA GPU; this run is on {device}")
    return setting


def gpu_decodes_jpeg(device: torch.device) -> bool:
    """Whether this torchvision build decodes a JPEG on ``device`` (nvjpeg)."""
    from PIL import Image
    from torchvision.io import decode_jpeg

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(buffer, "JPEG")
    encoded = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    try:
        return decode_jpeg([encoded], device=device)[0].shape == (3, 16, 16)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


def crop_bound(recipe: AugmentRecipe) -> int:
    """The largest crop side handed to the device: twice the output side times the widest
    aspect ratio a crop may have, so a JPEG that libjpeg cannot halve always fits."""
    skew = max(recipe.ratio[1], 1.0 / recipe.ratio[0], 1.0)
    return math.ceil(2 * max(recipe.size) * skew)


@dataclass(frozen=True)
class CropDecoder:
    """``decoder(source) -> sample fields``: ``source`` is a path or encoded bytes; with
    ``params`` (a recorded augmentation) the crop is replayed instead of drawn. ``decode``
    (see :data:`DECODERS`): "pil" decodes everything with PIL, "tensor" RGB/grayscale JPEGs
    with torchvision.io, "nvjpeg" hands those JPEGs' bytes and crop box over undecoded
    (``jpeg``, ``jpeg_box``) for a batched decode on the GPU."""

    recipe: AugmentRecipe
    decode: str = "tensor"

    def __post_init__(self) -> None:
        if self.decode not in DECODERS:
            raise ValueError(f"decode must be one of {DECODERS}, got {self.decode!r}")

    def __call__(self, source: str | Path | bytes, params: Params | None = None) -> dict[str, Any]:
        crop, params, data = self._crop(source, params, defer=self.decode == "nvjpeg")
        fields = {"image": crop}
        if self.decode == "nvjpeg":
            encoded = torch.empty(0, dtype=torch.uint8)
            if data is not None:
                encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            fields.update(
                jpeg=encoded,
                jpeg_length=torch.tensor(encoded.numel()),
                jpeg_box=torch.tensor(params["crop"], dtype=torch.long),
            )
        if data is not None:
            crop_h, crop_w = params["crop"][2:]
        else:
            crop_h, crop_w = crop.shape[-2:]
        return {**fields, **encode_params(self.recipe, params, (crop_h, crop_w))}

    def crop(
        self, source: str | Path | bytes, params: Params | None = None
    ) -> tuple[torch.Tensor, Params]:
        """The uint8 crop [3, h, w] (h, w <= :func:`crop_bound`) and its parameters, decoded
        on the CPU ("nvjpeg" as "tensor")."""
        crop, params, _ = self._crop(source, params, defer=False)
        return crop, params

    def _crop(
        self, source: str | Path | bytes, params: Params | None, *, defer: bool
    ) -> tuple[torch.Tensor, Params, bytes | None]:
        # (crop, params, None), or, deferring a plain JPEG to the GPU decode, (empty
        # [3, 0, 0], params, its bytes).
        from PIL import Image

        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            turn = orientation(image)
            width, height = image.size[::-1] if turn in _TRANSPOSED else image.size
            drawn = params is None
            if drawn:
                # The global stream, as open_clip's transform draws (seeded per worker).
                params = self.recipe.sample(height, width, torch.default_generator)
            box = check_crop(params["crop"], height, width)
            plain_jpeg = image.format == "JPEG" and image.mode in ("RGB", "L")
            if defer and plain_jpeg and turn == 1 and _ends_whole(data):
                return torch.empty((3, 0, 0), dtype=torch.uint8), params, data
            factor = self._draft_factor(image.format, box, height, width, drawn)
            if factor > 1:
                box = _snap(box, factor, height, width)
                params = {**params, "crop": list(box)}
            if factor == 1 and plain_jpeg and self.decode != "pil":
                crop = _jpeg_crop(data, box, upright=turn != 1)
            else:
                crop = _pil_crop(image, box, factor)
        return _bounded(crop, crop_bound(self.recipe), self.recipe.interpolation), params, None

    def _draft_factor(
        self,
        image_format: str | None,
        box: tuple[int, int, int, int],
        height: int,
        width: int,
        drawn: bool,
    ) -> int:
        # A drawn crop is snapped to the DCT grid (its record says so); a replayed one is
        # decoded at full size unless it already lies on the grid.
        if image_format != "JPEG":
            return 1
        out_h, out_w = self.recipe.size
        for factor in _DRAFT_FACTORS:
            big = box[2] >= factor * out_h and box[3] >= factor * out_w
            if big and (drawn or _snap(box, factor, height, width) == box):
                return factor
        return 1


def encode_params(
    recipe: AugmentRecipe, params: Params, crop_size: tuple[int, int]
) -> dict[str, Any]:
    """The parameters after the crop as tensors: ``image_size`` (the crop's h, w),
    ``aug_flip`` / ``aug_gray`` (bool), ``aug_jitter`` [4] factors (NaN: op off) with
    ``aug_jitter_order`` [4], ``aug_rand_ops`` [n] (indices in RAND_AUGMENT_OPS) with
    ``aug_rand_magnitudes`` [n]; only the fields ``recipe`` records."""
    fields: dict[str, Any] = {"image_size": torch.tensor(crop_size, dtype=torch.long)}
    if "flip" in params:
        fields["aug_flip"] = torch.tensor(bool(params["flip"]))
    if "gray" in params:
        fields["aug_gray"] = torch.tensor(bool(params["gray"]))
    if "color_jitter" in params:
        drawn = params["color_jitter"]
        factors = [math.nan] * 4 if drawn is None else [drawn[name] for name in JITTER_OPS]
        factors = [math.nan if f is None else float(f) for f in factors]
        order = list(range(4)) if drawn is None else list(drawn["order"])
        fields["aug_jitter"] = torch.tensor(factors, dtype=torch.float64)
        fields["aug_jitter_order"] = torch.tensor(order, dtype=torch.long)
    if "rand_augment" in params:
        ops = params["rand_augment"]
        fields["aug_rand_ops"] = torch.tensor(
            [RAND_AUGMENT_OPS.index(name) for name, _ in ops], dtype=torch.long
        ).reshape(len(ops))
        fields["aug_rand_magnitudes"] = torch.tensor(
            [float(m) for _, m in ops], dtype=torch.float64
        ).reshape(len(ops))
    return fields


def _ends_whole(data: bytes) -> bool:
    # A JPEG cut short lacks its end-of-image marker: decoded here, it fails naming the file
    # (on the GPU it would fail the whole batch).
    return data.rstrip(b"\0").endswith(b"\xff\xd9")


def _jpeg_crop(data: bytes, box: tuple[int, int, int, int], upright: bool) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        image = decode_jpeg(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=upright)
    except RuntimeError as err:  # "decode_jpeg, <source file>:<line>, <libjpeg's reason>"
        raise ValueError(str(err).split(", ")[-1]) from None
    top, left, crop_h, crop_w = box
    return image[:, top : top + crop_h, left : left + crop_w].clone()


def _snap(
    box: tuple[int, int, int, int], factor: int, height: int, width: int
) -> tuple[int, int, int, int]:
    """``box`` moved to the nearest multiples of ``factor`` (the pixels libjpeg decodes at
    1/factor), so the crop of the reduced image covers exactly the recorded box; a side
    ending at the image's edge keeps ending there."""
    top, left, crop_h, crop_w = box
    rows, cols = -(-height // factor), -(-width // factor)
    top_r, left_r = min(round(top / factor), rows - 1), min(round(left / factor), cols - 1)
    crop_h = min(max(1, round(crop_h / factor)), rows - top_r) * factor
    crop_w = min(max(1, round(crop_w / factor)), cols - left_r) * factor
    top, left = top_r * factor, left_r * factor
    return top, left, min(crop_h, height - top), min(crop_w, width - left)


def _pil_crop(image: Any, box: tuple[int, int, int, int], factor: int) -> torch.Tensor:
    if factor > 1:
        image.draft(image.mode, (-(-image.size[0] // factor), -(-image.size[1] // factor)))
    image.load()
    rgb = to_rgb(image)
    top, left, crop_h, crop_w = box
    reduced = (
        left // factor,
        top // factor,
        min(rgb.width, -(-(left + crop_w) // factor)),
        min(rgb.height, -(-(top + crop_h) // factor)),
    )
    pixels = np.array(rgb.crop(reduced), dtype=np.uint8)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _bounded(crop: torch.Tensor, bound: int, interpolation: str) -> torch.Tensor:
    height, width = crop.shape[-2:]
    if max(height, width) <= bound:
        return crop
    scale = bound / max(height, width)
    size = [max(1, min(bound, round(height * scale))), max(1, min(bound, round(width * scale)))]
    return F.resize(crop, size, interpolation=INTERPOLATIONS[interpolation], antialias=True)
