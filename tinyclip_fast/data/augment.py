"""Replayable training augmentation: every random draw recorded as JSON, replayed exactly.

An :class:`AugmentRecipe` is the training transform of open_clip (``image_transform(...,
is_train=True)``: RandomResizedCrop, optional colour jitter and grayscale, ToTensor,
Normalize) plus the ops DataCompDR's reinforcement uses (horizontal flip, RandAugment).
``recipe.sample(h, w, generator)`` draws the parameters of one augmentation as a JSON-ready
dict; ``recipe.apply(image, params)`` replays them, bit for bit the same output every time.

Ops run in one fixed order: crop (resized to ``size``) -> RGB -> flip -> RandAugment ->
colour jitter -> grayscale -> to tensor -> normalize; open_clip's and DataCompDR's
transforms are both subsequences of it. Parameters (``crop`` is always present)::

    {"crop": [top, left, height, width],              # box in the source image, pixels
     "flip": bool,                                     # when hflip_prob > 0
     "rand_augment": [[op_name, magnitude], ...],      # when rand_augment is set
     "color_jitter": null | {"order": [4 ints], "brightness": f | null, ...},
     "gray": bool}                                     # when gray_prob > 0

Images are PIL images (any size) or float tensors [3, H, W] (the demo's in-memory data;
colour ops then need values in [0, 1]). RandAugment replays through torchvision's own op
table (``torchvision.transforms.autoaugment``), as MobileCLIP's DataCompDR code does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from torchvision.transforms import InterpolationMode

from tinyclip_fast.data.images import to_rgb

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
PREPROCESS_FIELDS = ("size", "interpolation", "mean", "std")
_CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop, then a centred fallback

Params = dict[str, Any]
Range = tuple[float, float]


@dataclass(frozen=True)
class AugmentRecipe:
    """What the training transform does; ``params`` say what one draw of it did.

    size: output (height, width). scale / ratio: RandomResizedCrop's area fraction and
    aspect-ratio (w/h) ranges. interpolation of the resize: nearest, bilinear or bicubic.
    mean / std: Normalize (both None: no normalisation, for pre-normalised tensors).
    hflip_prob: horizontal flip. rand_augment: (num_ops, magnitude, num_magnitude_bins) of
    torchvision's RandAugment (nearest interpolation, no fill), applied every time.
    color_jitter: (lo, hi) ranges of brightness, contrast, saturation, hue (None: op off),
    applied with probability color_jitter_prob. gray_prob: grayscale (3 channels).
    """

    size: tuple[int, int]
    scale: Range = (0.9, 1.0)
    ratio: Range = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: str = "bicubic"
    mean: tuple[float, ...] | None = OPENAI_MEAN
    std: tuple[float, ...] | None = OPENAI_STD
    hflip_prob: float = 0.0
    rand_augment: tuple[int, int, int] | None = None
    color_jitter: tuple[Range | None, Range | None, Range | None, Range | None] | None = None
    color_jitter_prob: float = 0.0
    gray_prob: float = 0.0

    def __post_init__(self) -> None:
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        object.__setattr__(self, "size", tuple(int(s) for s in size))
        object.__setattr__(self, "scale", _pair(self.scale, "scale"))
        object.__setattr__(self, "ratio", _pair(self.ratio, "ratio"))
        if len(self.size) != 2 or min(self.size) <= 0:
            raise ValueError(f"size must be (height, width) > 0, got {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(
                f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], got scale "
                f"{self.scale}, ratio {self.ratio}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std must both be given or both be None")
        if self.mean is not None:
            object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
            object.__setattr__(self, "std", tuple(float(s) for s in self.std))
            if len(self.mean) != len(self.std) or min(self.std) <= 0:
                raise ValueError(f"need one std > 0 per mean, got {self.mean}, {self.std}")
        for name in ("hflip_prob", "color_jitter_prob", "gray_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.rand_augment is not None:
            num_ops, magnitude, bins = (int(v) for v in self.rand_augment)
            if num_ops < 0 or bins < 1 or not 0 <= magnitude < bins:
                raise ValueError(
                    f"rand_augment must be (num_ops >= 0, 0 <= magnitude < bins, bins), got "
                    f"{self.rand_augment}"
                )
            object.__setattr__(self, "rand_augment", (num_ops, magnitude, bins))
        if self.color_jitter is not None:
            if len(self.color_jitter) != 4:
                raise ValueError(
                    "color_jitter needs 4 ranges: brightness, contrast, saturation, hue"
                )
            ranges = tuple(
                None if r is None else _pair(r, f"color_jitter {name}")
                for r, name in zip(self.color_jitter, JITTER_OPS, strict=True)
            )
            object.__setattr__(self, "color_jitter", ranges)

    # ---- the recipe as data -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible fields (tuples become lists)."""
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AugmentRecipe:
        """The recipe that :meth:`to_dict` wrote."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown augmentation recipe fields {unknown}")
        values = dict(values)
        if values.get("color_jitter") is not None:
            values["color_jitter"] = tuple(
                None if r is None else tuple(r) for r in values["color_jitter"]
            )
        return cls(**values)

    def preprocess_dict(self) -> dict[str, Any]:
        """The deterministic part: output size, resize interpolation, normalisation."""
        return {k: v for k, v in self.to_dict().items() if k in PREPROCESS_FIELDS}

    def augmentation_dict(self) -> dict[str, Any]:
        """The random part: crop ranges and the optional ops with their probabilities."""
        return {k: v for k, v in self.to_dict().items() if k not in PREPROCESS_FIELDS}

    @property
    def uses_color(self) -> bool:
        """Whether an op needs pixel values in [0, 1] (jitter, grayscale, RandAugment)."""
        return (
            self.rand_augment is not None
            or (self.color_jitter is not None and self.color_jitter_prob > 0)
            or self.gray_prob > 0
        )

    # ---- drawing and replaying --------------------------------------------------------

    def sample(self, height: int, width: int, generator: torch.Generator) -> Params:
        """Parameters of one random augmentation of a ``height`` x ``width`` image."""
        if height <= 0 or width <= 0:
            raise ValueError(f"image must be non-empty, got {height}x{width}")
        params: Params = {"crop": self._sample_crop(height, width, generator)}
        if self.hflip_prob > 0:
            params["flip"] = _bernoulli(self.hflip_prob, generator)
        if self.rand_augment is not None:
            params["rand_augment"] = self._sample_rand_augment(generator)
        if self.color_jitter is not None and self.color_jitter_prob > 0:
            params["color_jitter"] = (
                self._sample_jitter(generator)
                if _bernoulli(self.color_jitter_prob, generator)
                else None
            )
        if self.gray_prob > 0:
            params["gray"] = _bernoulli(self.gray_prob, generator)
        return params

    def apply(self, image: Any, params: Params) -> torch.Tensor:
        """The augmented image, a float32 tensor [3, *size], from recorded ``params``."""
        expected = set(self.sample_keys())
        if set(params) != expected:
            raise ValueError(
                f"augmentation params have keys {sorted(params)}, this recipe records "
                f"{sorted(expected)}: they were drawn by another recipe"
            )
        is_tensor = isinstance(image, torch.Tensor)
        if is_tensor:
            _check_tensor_image(image, self.uses_color)
        else:
            image = to_rgb(image)
        height, width = _image_hw(image)
        top, left, crop_h, crop_w = check_crop(params["crop"], height, width)
        image = F.resized_crop(
            image,
            top,
            left,
            crop_h,
            crop_w,
            list(self.size),
            interpolation=INTERPOLATIONS[self.interpolation],
            antialias=True,
        )
        if params.get("flip"):
            image = F.hflip(image)
        for name, magnitude in params.get("rand_augment", ()):
            image = apply_rand_augment_op(image, name, float(magnitude))
        if params.get("color_jitter") is not None:
            image = apply_jitter(image, params["color_jitter"])
        if params.get("gray"):
            image = F.rgb_to_grayscale(image, num_output_channels=3)
        tensor = image.float() if is_tensor else F.to_tensor(image)
        if self.mean is not None:
            tensor = F.normalize(tensor, self.mean, self.std)
        return tensor

    def __call__(self, image: Any, generator: torch.Generator) -> tuple[torch.Tensor, Params]:
        """Draw one augmentation of ``image`` and apply it: (tensor, params)."""
        if not isinstance(image, torch.Tensor):
            image = to_rgb(image)  # upright first: the crop is drawn on the shown size
        params = self.sample(*_image_hw(image), generator)
        return self.apply(image, params), params

    def sample_keys(self) -> tuple[str, ...]:
        """The keys every params dict of this recipe has."""
        keys = ["crop"]
        if self.hflip_prob > 0:
            keys.append("flip")
        if self.rand_augment is not None:
            keys.append("rand_augment")
        if self.color_jitter is not None and self.color_jitter_prob > 0:
            keys.append("color_jitter")
        if self.gray_prob > 0:
            keys.append("gray")
        return tuple(keys)

    def _sample_crop(self, height: int, width: int, generator: torch.Generator) -> list[int]:
        # RandomResizedCrop: area fraction ~ U(scale), log aspect ~ U(log ratio), placed
        # uniformly; after _CROP_ATTEMPTS misses, the centred box of the nearest allowed ratio.
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(_CROP_ATTEMPTS):
            target = area * _uniform(*self.scale, generator)
            aspect = math.exp(_uniform(log_lo, log_hi, generator))
            crop_w = round(math.sqrt(target * aspect))
            crop_h = round(math.sqrt(target / aspect))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = _randint(height - crop_h + 1, generator)
                left = _randint(width - crop_w + 1, generator)
                return [top, left, crop_h, crop_w]
        aspect = width / height
        if aspect < self.ratio[0]:
            crop_w, crop_h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            crop_w, crop_h = round(height * self.ratio[1]), height
        else:
            crop_w, crop_h = width, height
        return [(height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w]

    def _sample_rand_augment(self, generator: torch.Generator) -> list[list[Any]]:
        num_ops, magnitude, bins = self.rand_augment
        space = rand_augment_space(bins, self.size)
        names = list(space)
        ops = []
        for _ in range(num_ops):
            name = names[_randint(len(names), generator)]
            magnitudes, signed = space[name]
            value = float(magnitudes[magnitude]) if magnitudes.ndim > 0 else 0.0
            if signed and _randint(2, generator):
                value = -value
            ops.append([name, value])
        return ops

    def _sample_jitter(self, generator: torch.Generator) -> dict[str, Any]:
        order = torch.randperm(4, generator=generator).tolist()
        drawn: dict[str, Any] = {"order": order}
        for name, bounds in zip(JITTER_OPS, self.color_jitter, strict=True):
            drawn[name] = None if bounds is None else _uniform(*bounds, generator)
        return drawn

    @classmethod
    def from_transform(cls, transform: Callable) -> AugmentRecipe:
        """The recipe of a torchvision training transform (:func:`recipe_from_transform`)."""
        return recipe_from_transform(transform)

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, aug_cfg: dict[str, Any] | None = None
    ) -> AugmentRecipe:
        """The recipe of open_clip's training transform for ``model`` (its preprocess config:
        image size, mean/std) with open_clip's ``aug_cfg``."""
        import open_clip

        cfg = open_clip.transform.PreprocessCfg(**open_clip.get_model_preprocess_cfg(model))
        return cls.from_transform(
            open_clip.transform.image_transform_v2(cfg, True, aug_cfg=aug_cfg)
        )


def recipe_from_transform(transform: Callable) -> AugmentRecipe:
    """The recipe of a torchvision ``Compose`` training transform, e.g. open_clip's
    ``image_transform(size, is_train=True, ...)`` or the train preprocess that
    ``open_clip.create_model_and_transforms`` returns (not the timm variant).

    Raises ValueError naming the first op it cannot record and replay.
    """
    import open_clip.transform as oc

    ops = getattr(transform, "transforms", None)
    if ops is None:
        raise ValueError(
            f"cannot read an augmentation recipe from {type(transform).__name__}: expected "
            "a torchvision Compose (open_clip's training transform)"
        )
    if not any(isinstance(op, T.RandomResizedCrop) for op in ops):
        raise ValueError(
            "the transform has no RandomResizedCrop: pass the training transform "
            "(is_train=True), not the evaluation one"
        )
    values: dict[str, Any] = {}
    stage = 0  # ops must come in apply()'s order
    for op in ops:
        if isinstance(op, T.RandomResizedCrop):
            if op.antialias is False:
                raise ValueError("cannot replay RandomResizedCrop(antialias=False)")
            position = 0
            values.update(
                size=tuple(op.size),
                scale=tuple(op.scale),
                ratio=tuple(op.ratio),
                interpolation=op.interpolation.value,
            )
        elif isinstance(op, (oc.MaybeConvertMode, T.ToTensor)) or op is oc._convert_to_rgb:
            continue  # no parameters; apply() converts to RGB and to a tensor itself
        elif isinstance(op, T.RandomHorizontalFlip):
            position, values["hflip_prob"] = 1, float(op.p)
        elif isinstance(op, T.RandAugment):
            if op.interpolation != InterpolationMode.NEAREST or op.fill is not None:
                raise ValueError("cannot replay RandAugment with interpolation or fill set")
            position = 2
            values["rand_augment"] = (op.num_ops, op.magnitude, op.num_magnitude_bins)
        elif isinstance(op, (oc.color_jitter, T.ColorJitter)):
            jitter = op.transf if isinstance(op, oc.color_jitter) else op
            position = 3
            values["color_jitter"] = tuple(
                None if getattr(jitter, name) is None else tuple(getattr(jitter, name))
                for name in JITTER_OPS
            )
            values["color_jitter_prob"] = float(getattr(op, "p", 1.0))
        elif isinstance(op, (oc.gray_scale, T.RandomGrayscale)):
            position, values["gray_prob"] = 4, float(op.p)
        elif isinstance(op, T.Normalize):
            position = 5
            values.update(mean=tuple(op.mean), std=tuple(op.std))
        else:
            raise ValueError(
                f"cannot record and replay {type(op).__name__} of the training transform "
                "(supported: RandomResizedCrop, RandomHorizontalFlip, RandAugment, "
                "ColorJitter, grayscale, ToTensor, Normalize)"
            )
        if position < stage:
            raise ValueError(
                f"{type(op).__name__} comes after an op that this recipe applies later; "
                "cannot replay the transform in its order"
            )
        stage = position
    values.setdefault("mean", None)
    values.setdefault("std", None)
    return AugmentRecipe(**values)


def rand_augment_space(bins: int, size: Sequence[int]) -> dict[str, tuple[torch.Tensor, bool]]:
    """torchvision RandAugment's ops: name -> (magnitude per bin, signed), for an image of
    ``size`` (height, width); the order is that of MobileCLIP's compressed op ids."""
    return T.RandAugment(num_magnitude_bins=bins)._augmentation_space(bins, tuple(size))


RAND_AUGMENT_OPS = tuple(rand_augment_space(31, (32, 32)))


def apply_rand_augment_op(image: Any, name: str, magnitude: float) -> Any:
    """One recorded RandAugment op on a PIL image or tensor (torchvision's op table)."""
    from torchvision.transforms.autoaugment import _apply_op

    if name not in RAND_AUGMENT_OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {RAND_AUGMENT_OPS}")
    return _apply_op(image, name, magnitude, interpolation=InterpolationMode.NEAREST, fill=None)


_JITTER_FUNCTIONS = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


def apply_jitter(image: Any, drawn: dict[str, Any]) -> Any:
    """Recorded colour jitter (``drawn``: order and factors) on a PIL image or tensor."""
    order = drawn["order"]
    if sorted(order) != [0, 1, 2, 3]:
        raise ValueError(f"color_jitter order must be a permutation of 0..3, got {order}")
    for index in order:
        factor = drawn[JITTER_OPS[index]]
        if factor is not None:
            image = _JITTER_FUNCTIONS[index](image, float(factor))
    return image


def _pair(values: Sequence[float], name: str) -> Range:
    if len(values) != 2:
        raise ValueError(f"{name} must be a (low, high) pair, got {values}")
    low, high = (float(v) for v in values)
    if low > high:
        raise ValueError(f"{name} must have low <= high, got {values}")
    return low, high


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(high, (), generator=generator))


def _bernoulli(prob: float, generator: torch.Generator) -> bool:
    # Certain outcomes draw nothing, so p = 1 consumes the stream as an unconditional op does.
    if prob >= 1.0 or prob <= 0.0:
        return prob >= 1.0
    return bool(torch.rand((), generator=generator, dtype=torch.float64) < prob)


def _image_hw(image: Any) -> tuple[int, int]:
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    width, height = image.size
    return height, width


def _check_tensor_image(image: torch.Tensor, uses_color: bool) -> None:
    if image.dim() != 3 or image.shape[0] not in (1, 3) or not image.is_floating_point():
        raise ValueError(
            f"tensor images must be float [3, H, W] (or [1, H, W]), got {image.dtype} "
            f"{tuple(image.shape)}"
        )
    if uses_color and (image.min() < 0 or image.max() > 1):
        raise ValueError(
            "colour ops (jitter, grayscale, RandAugment) need tensor images in [0, 1]; this one "
            f"spans [{float(image.min()):.3g}, {float(image.max()):.3g}]"
        )


def check_crop(crop: Sequence[int], height: int, width: int) -> tuple[int, int, int, int]:
    """``crop`` as (top, left, height, width) ints; ValueError unless it fits the image."""
    if len(crop) != 4 or any(int(v) != v for v in crop):
        raise ValueError(f"crop must be 4 integers [top, left, height, width], got {crop}")
    top, left, crop_h, crop_w = (int(v) for v in crop)
    if top < 0 or left < 0 or crop_h <= 0 or crop_w <= 0 or top + crop_h > height:
        raise ValueError(_crop_error(crop, height, width))
    if left + crop_w > width:
        raise ValueError(_crop_error(crop, height, width))
    return top, left, crop_h, crop_w


def _crop_error(crop: Sequence[int], height: int, width: int) -> str:
    return (
        f"crop {list(crop)} does not fit a {height}x{width} image: the params were drawn for "
        "another image"
    )
