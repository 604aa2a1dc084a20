"""Every image mode PIL opens comes out as the 8-bit RGB picture it shows.

Each file is made from one 8-bit reference picture and compared with it (or with the reference
composited on white where the file is transparent): mean absolute difference in 8-bit levels.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tinyclip_fast.data.datasets import CsvPairDataset
from tinyclip_fast.data.images import BACKGROUND, file_problem, open_rgb, to_rgb
from tinyclip_fast.data.loader import BadSampleError
from tinyclip_fast.data.sources import folder_source
from tinyclip_fast.data.zero_shot import LabelledImageFiles

HEIGHT, WIDTH = 24, 40
EXACT = 0.0
ROUNDING = 0.5  # at most half a level per pixel on average: rounding only
PALETTE = 4.0  # 256-colour quantisation
JPEG = 6.0  # lossy compression at quality 95


def reference() -> np.ndarray:
    """uint8 [H, W, 3]: smooth ramps in every channel, plus an asymmetric block (so a
    rotation or mirror is visible)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    picture = np.stack(
        [x * 255 // (WIDTH - 1), y * 255 // (HEIGHT - 1), (x + y) * 255 // (WIDTH + HEIGHT - 2)],
        axis=-1,
    ).astype(np.uint8)
    picture[2:8, 3:15] = (250, 20, 90)
    return picture


def gray() -> np.ndarray:
    """uint8 [H, W]: the reference's luma, as PIL computes it."""
    return np.asarray(Image.fromarray(reference()).convert("L"))


def as_rgb(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=-1) if values.ndim == 2 else values


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def alpha_mask() -> np.ndarray:
    """uint8 [H, W]: opaque left half, half-transparent block, fully transparent corner."""
    alpha = np.full((HEIGHT, WIDTH), 255, dtype=np.uint8)
    alpha[:, WIDTH // 2 :] = 128
    alpha[HEIGHT // 2 :, 3 * WIDTH // 4 :] = 0
    return alpha


def on_white(picture: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255.0
    return picture * a + np.array(BACKGROUND) * (1.0 - a)


def sixteen_bit_gray() -> np.ndarray:
    """uint16 [H, W]: the luma at full 16-bit scale, with sub-level detail in the low bits."""
    detail = np.random.default_rng(0).integers(0, 100, size=(HEIGHT, WIDTH))
    return (gray().astype(np.int64) * 257 + detail).clip(0, 65535).astype(np.uint16)


def rgb_file():
    return encoded(Image.fromarray(reference()), "PNG"), reference(), EXACT


def gray_png():
    return encoded(Image.fromarray(gray()), "PNG"), gray(), EXACT


def gray16_png():
    image = Image.fromarray(sixteen_bit_gray())
    assert image.mode == "I;16"
    return encoded(image, "PNG"), gray(), ROUNDING


def gray16_big_endian_tiff():
    values = sixteen_bit_gray().astype(">u2").tobytes()
    image = Image.frombytes("I;16B", (WIDTH, HEIGHT), values)
    assert Image.open(io.BytesIO(encoded(image, "TIFF"))).mode == "I;16B"
    return encoded(image, "TIFF"), gray(), ROUNDING


def int32_sixteen_bit_values_tiff():
    image = Image.fromarray(sixteen_bit_gray().astype(np.int32))
    assert image.mode == "I"
    return encoded(image, "TIFF"), gray(), ROUNDING


def int32_eight_bit_values_tiff():
    return encoded(Image.fromarray(gray().astype(np.int32)), "TIFF"), gray(), EXACT


def int32_wide_range_tiff():
    # An arbitrary linear range (e.g. a sensor's counts) is stretched to 0..255.
    values = gray().astype(np.int32) * 4000 - 100_000
    stretched = (gray() - gray().min()) * (255.0 / (gray().max() - gray().min()))
    return encoded(Image.fromarray(values), "TIFF"), np.rint(stretched), ROUNDING


def float_unit_range_tiff():
    image = Image.fromarray(gray().astype(np.float32) / 255.0)
    assert image.mode == "F"
    return encoded(image, "TIFF"), gray(), ROUNDING


def float_eight_bit_range_tiff():
    return encoded(Image.fromarray(gray().astype(np.float32)), "TIFF"), gray(), ROUNDING


def palette_png():
    image = Image.fromarray(reference()).quantize(256)
    return encoded(image, "PNG"), reference(), PALETTE


def palette_with_transparency_png():
    image = Image.fromarray(reference()).quantize(256)
    transparent = image.getpixel((WIDTH - 1, HEIGHT - 1))  # a colour of the bottom-right corner
    indices = np.asarray(image)
    expected = reference().astype(np.float64)
    expected[indices == transparent] = BACKGROUND
    return encoded(image, "PNG", transparency=transparent), expected, PALETTE


def rgba_png():
    image = Image.fromarray(np.dstack([reference(), alpha_mask()]))
    return encoded(image, "PNG"), on_white(reference(), alpha_mask()), ROUNDING


def la_png():
    image = Image.fromarray(np.dstack([gray(), alpha_mask()]), "LA")
    return encoded(image, "PNG"), on_white(as_rgb(gray()), alpha_mask()), ROUNDING


def cmyk_tiff():
    return encoded(Image.fromarray(reference()).convert("CMYK"), "TIFF"), reference(), EXACT


def cmyk_jpeg():
    image = Image.fromarray(reference()).convert("CMYK")
    return encoded(image, "JPEG", quality=95), reference(), JPEG


def one_bit_png():
    threshold = np.where(gray() >= 128, 255, 0).astype(np.uint8)
    image = Image.fromarray(threshold).convert("1", dither=Image.Dither.NONE)
    return encoded(image, "PNG"), threshold, EXACT


def exif_rotated_png():
    # Orientation 6: stored rotated 90 degrees counter-clockwise, shown turned back upright.
    stored = Image.fromarray(reference()).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(stored, "PNG", exif=exif), reference(), EXACT


def exif_mirrored_jpeg():
    # Orientation 2: stored mirrored left to right.
    stored = Image.fromarray(reference()).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    exif = Image.Exif()
    exif[0x0112] = 2
    return encoded(stored, "JPEG", quality=95, exif=exif), reference(), JPEG


FILES = [
    rgb_file,
    gray_png,
    gray16_png,
    gray16_big_endian_tiff,
    int32_sixteen_bit_values_tiff,
    int32_eight_bit_values_tiff,
    int32_wide_range_tiff,
    float_unit_range_tiff,
    float_eight_bit_range_tiff,
    palette_png,
    palette_with_transparency_png,
    rgba_png,
    la_png,
    cmyk_tiff,
    cmyk_jpeg,
    one_bit_png,
    exif_rotated_png,
    exif_mirrored_jpeg,
]


def mean_abs_diff(image: Image.Image, expected: np.ndarray) -> float:
    return float(np.abs(np.asarray(image, dtype=np.float64) - as_rgb(expected)).mean())


@pytest.mark.parametrize("make", FILES, ids=[make.__name__ for make in FILES])
def test_every_mode_reads_as_the_picture_it_shows(make):
    data, expected, tolerance = make()
    image = open_rgb(data)
    assert image.mode == "RGB" and image.size == (WIDTH, HEIGHT)
    assert mean_abs_diff(image, expected) <= tolerance


def test_a_sixteen_bit_image_is_scaled_not_clipped():
    image = open_rgb(gray16_png()[0])
    assert float(np.asarray(image).mean()) == pytest.approx(float(gray().mean()), abs=0.5)
    assert (np.asarray(image) == 255).mean() < 0.05


def test_paths_and_bytes_read_alike_and_the_file_is_closed(tmp_path):
    path = tmp_path / "gray16.png"
    path.write_bytes(gray16_png()[0])
    from_path = open_rgb(path)
    path.unlink()  # nothing still reads the file
    assert np.array_equal(np.asarray(from_path), np.asarray(open_rgb(gray16_png()[0])))


def test_an_upright_rgb_image_is_returned_as_is():
    image = Image.fromarray(reference())
    assert to_rgb(image) is image


def test_a_broken_exif_block_shows_the_image_as_stored():
    data = encoded(Image.fromarray(reference()), "JPEG", quality=95, exif=b"Exif\x00\x00broken")
    assert mean_abs_diff(open_rgb(data), reference()) <= JPEG


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p.write_bytes(b"x"), None),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: None, "does not exist"),
    ],
    ids=["file", "directory", "missing"],
)
def test_file_problem_says_what_is_wrong(tmp_path, make, expected):
    make(tmp_path / "image.png")
    assert file_problem(tmp_path / "image.png") == expected


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def tokenize(captions):
    return torch.zeros(len(captions), 4, dtype=torch.long)


@pytest.fixture
def sixteen_bit_folder(tmp_path):
    (tmp_path / "a.png").write_bytes(gray16_png()[0])
    (tmp_path / "a.txt").write_text("a grey ramp")
    (tmp_path / "pairs.tsv").write_text("filepath\ttitle\na.png\ta grey ramp\n")
    return tmp_path


def readers(folder):
    """The image of ``a.png`` as every reader in data/ returns it (a [3, H, W] tensor)."""
    csv = CsvPairDataset(folder / "pairs.tsv", preprocess=to_tensor, tokenizer=tokenize)
    evaluation = LabelledImageFiles([folder / "a.png"], [0], to_tensor)
    record = next(folder_source(folder).shards[0].records())
    return {
        "csv": csv[0]["image"],
        "zero-shot": evaluation[0]["image"],
        "sources": to_tensor(record.load_image()),
    }


def test_every_reader_scales_sixteen_bit_images(sixteen_bit_folder):
    expected = torch.from_numpy(as_rgb(gray()).astype(np.float32) / 255.0).permute(2, 0, 1)
    for name, image in readers(sixteen_bit_folder).items():
        assert float((image - expected).abs().mean()) * 255 <= ROUNDING, name


def test_a_directory_in_the_image_column_is_named_as_one(tmp_path):
    (tmp_path / "a.png").mkdir()
    (tmp_path / "pairs.tsv").write_text("filepath\ttitle\na.png\ta caption\n")
    data = CsvPairDataset(tmp_path / "pairs.tsv", preprocess=to_tensor, tokenizer=tokenize)
    with pytest.raises(BadSampleError, match=r"a.png \(row 0 of .*pairs.tsv\) is a directory$"):
        data[0]
    evaluation = LabelledImageFiles([tmp_path / "a.png"], [0], to_tensor)
    with pytest.raises(FileNotFoundError, match=r"evaluation image .*a.png is a directory$"):
        evaluation[0]
