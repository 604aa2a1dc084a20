"""Opening images: every mode PIL opens, as the 8-bit RGB picture a viewer would show.

``Image.convert("RGB")`` alone is wrong for several modes: 16-bit grayscale is clipped to 255
(a normal photo turns almost white), transparent pixels show whatever colour hides under them,
and EXIF orientation is ignored. :func:`to_rgb` handles each mode:

- EXIF orientation is applied first (a phone's portrait photo comes out upright);
- 16-bit grayscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``): value / 257, rounded (65535 is
  255);
- 32-bit integers ``I``: taken as 8-bit values when all lie in [0, 255], as 16-bit when all lie
  in [0, 65535] (the mode 16-bit PNG and TIFF files had in older Pillow), otherwise the range
  min..max is stretched to 0..255;
- 32-bit floats ``F``: [0, 1] is full scale when all values lie there, then [0, 255], otherwise
  min..max is stretched to 0..255;
- transparency (``RGBA``, ``LA``, premultiplied ``RGBa``/``La``, ``PA``, palette or ``L``/``RGB``
  images with a transparent colour): composited on white (:data:`BACKGROUND`), as a
  transparent PNG shows on a page; dropping the alpha would show the colours under
  transparent pixels, often black;
- ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``1``, ``L``, ``P``: PIL's own conversion.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

BACKGROUND = (255, 255, 255)  # what transparent pixels are composited on
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_PREMULTIPLIED = {"RGBa": "RGBA", "La": "LA"}


def to_rgb(image: Any) -> Any:
    """``image`` (any PIL mode) as an 8-bit RGB PIL image, upright; see the module docstring.
    Returns ``image`` itself when it already is upright RGB."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image) if orientation(image) != 1 else image
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
        return _gray_to_rgb(_scale_to_8_bits(image))
    if image.mode in _PREMULTIPLIED:
        image = image.convert(_PREMULTIPLIED[image.mode])
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        return _on_background(image.convert("RGBA"))
    return image.convert("RGB")


def open_rgb(source: str | Path | bytes) -> Any:
    """The image at a path, or in encoded bytes, as :func:`to_rgb` gives it (read fully, so
    the file is closed on return)."""
    from PIL import Image

    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with Image.open(source) as image:
        image.load()
        rgb = to_rgb(image)
        return image.copy() if rgb is image else rgb


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as an image file, worded for an error message (``does not
    exist``, ``is a directory``, ``is not a regular file``); None when it is a file."""
    if path.is_file():
        return None
    if path.is_dir():
        return "is a directory"
    if path.exists():
        return "is not a regular file"
    return "does not exist"


def orientation(image: Any) -> int:
    """The EXIF orientation of a PIL image (1: stored upright; 5-8 swap width and height)."""
    try:
        return int(image.getexif().get(0x0112, 1))  # 0x0112: the EXIF Orientation tag
    except Exception:  # a broken EXIF block: show the image as stored
        return 1


def _scale_to_8_bits(image: Any) -> np.ndarray:
    values = np.asarray(image).astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode in _SIXTEEN_BIT:
        scaled = values / 257.0
    elif image.mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif low >= 0.0 and high <= 255.0:
        scaled = values
    elif image.mode == "I" and low >= 0.0 and high <= 65535.0:
        scaled = values / 257.0
    else:
        scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(gray)).convert("RGB")  # uint8 [H, W]: mode L


def _on_background(rgba: Any) -> Any:
    from PIL import Image

    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
