"""Photo-like test images in every mode the loader meets, encoded as files are."""

import io

import numpy as np
from PIL import Image


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
