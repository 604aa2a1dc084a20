"""What the loader costs the CPU: open_clip's training transform against the split pipeline.

Per image size, on generated photo-like JPEGs (20-70 KB) stored as a CSV of files and as a
webdataset shard, each sample read through the library's datasets (CsvPairDataset,
WebDatasetPairs; a free tokenizer, so only the image path counts):

- open_clip: PIL decode + open_clip's ``image_transform(224, is_train=True)`` (bicubic
  RandomResizedCrop, ToTensor, Normalize), today's ``data.decode = "pil"`` path;
- ours: data/decode.py's CPU half (header, crop drawn, libjpeg-turbo decode or DCT-scaled
  PIL decode, uint8 crop), ``data.decode = "tensor"``;
- nvjpeg CPU: the CPU half of ``data.decode = "nvjpeg"`` (header and bytes only);
- device half on the CPU: data/device_augment.py run on the CPU, per image, for runs
  without a GPU (where both halves share the CPU).

CPU milliseconds are process CPU time per image on one thread (``OMP_NUM_THREADS=1``); images/s
per core is 1000 / ms. With CUDA (``--device cuda``) the device half's images/s and the nvjpeg
decode's are measured on the GPU too (a second table).

    OMP_NUM_THREADS=1 python bench/bench_loader.py --out bench/results/loader_cpu.md
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import PIL
import torch
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_info import cpu_name  # noqa: E402

from tinyclip_fast.data.augment import AugmentRecipe  # noqa: E402
from tinyclip_fast.data.datasets import CsvPairDataset, WebDatasetPairs  # noqa: E402
from tinyclip_fast.data.decode import CropDecoder  # noqa: E402
from tinyclip_fast.data.device_augment import DeviceAugment  # noqa: E402
from tinyclip_fast.data.loader import collate  # noqa: E402

SIZES = ((256, 341), (320, 427), (375, 500))  # (height, width): img2dataset-resized web data
OUTPUT = 224
BATCH = 64


def photo(height: int, width: int, rng: np.random.Generator) -> bytes:
    """A JPEG with a photo's mix of smooth regions and texture (quality 85)."""
    coarse = rng.integers(0, 256, size=(height // 24 + 2, width // 24 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    texture = rng.normal(0.0, 6.0, size=(height, width, 1))
    pixels = np.clip(smooth + texture, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def write_data(folder: Path, height: int, width: int, count: int) -> tuple[Path, Path, float]:
    """(CSV file, webdataset shard, mean KB per JPEG) of ``count`` images."""
    rng = np.random.default_rng(height)
    csv_path, shard = folder / f"{height}.csv", folder / f"{height}.tar"
    sizes = []
    with open(csv_path, "w", newline="") as handle, tarfile.open(shard, "w") as tar:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "title"])
        for index in range(count):
            data = photo(height, width, rng)
            sizes.append(len(data))
            name = f"{height}_{index:05d}"
            (folder / f"{name}.jpg").write_bytes(data)
            writer.writerow([f"{name}.jpg", "a photo"])
            for ext, payload in (("jpg", data), ("txt", b"a photo")):
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return csv_path, shard, float(np.mean(sizes)) / 1024


def tokenize(texts: list[str]) -> torch.Tensor:
    return torch.zeros(len(texts), 77, dtype=torch.long)


def cpu_ms(samples: Callable[[], object], count: int) -> float:
    """Process CPU milliseconds per sample over ``count`` samples (after one warm-up)."""
    iterator = iter(samples())
    next(iterator)
    start = time.process_time()
    for _ in range(count - 1):
        next(iterator)
    return (time.process_time() - start) * 1000 / (count - 1)


def datasets(csv_path: Path, shard: Path, preprocess, count: int) -> dict[str, Callable]:
    def from_csv():
        dataset = CsvPairDataset(csv_path, preprocess=preprocess, tokenizer=tokenize)
        return (dataset[i] for i in range(count))

    def from_shard():
        return iter(
            WebDatasetPairs(str(shard), preprocess=preprocess, tokenizer=tokenize, shuffle=False)
        )

    return {"csv": from_csv, "webdataset": from_shard}


def device_half_ms(
    recipe: AugmentRecipe, csv_path: Path, device: torch.device, decode: str = "tensor"
) -> float:
    """Milliseconds per image of the device half on ``device`` (wall clock, synchronised);
    with ``decode="nvjpeg"`` the batched JPEG decode included."""
    decoder = CropDecoder(recipe, decode)
    dataset = CsvPairDataset(csv_path, preprocess=decoder, tokenizer=tokenize)
    batch = collate([dataset[i % len(dataset)] for i in range(BATCH)])
    host = {k: v for k, v in batch.items() if k in DeviceAugment.host_fields}
    moved = {**{k: v.to(device) for k, v in batch.items() if k not in host}, **host}
    augment = DeviceAugment(recipe)
    augment(moved)
    repeats = 5
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        augment(moved)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000 / (repeats * BATCH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=150, help="images per size")
    parser.add_argument("--device", default=None, help="also time the device half there")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_tf = open_clip.image_transform(OUTPUT, is_train=True)
    recipe = AugmentRecipe.from_transform(train_tf)
    pipelines = {
        "open_clip": train_tf,
        "ours": CropDecoder(recipe, "tensor"),
        "nvjpeg CPU": CropDecoder(recipe, "nvjpeg"),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for height, width in SIZES:
            csv_path, shard, kb = write_data(Path(tmp), height, width, args.images)
            ms = {
                (name, source): cpu_ms(make, args.images)
                for name, preprocess in pipelines.items()
                for source, make in datasets(csv_path, shard, preprocess, args.images).items()
            }
            row = {"size": f"{width}x{height}", "kb": kb, "ms": ms}
            row["device_cpu"] = device_half_ms(recipe, csv_path, torch.device("cpu"))
            if args.device:
                gpu = torch.device(args.device)
                row["device_gpu"] = device_half_ms(recipe, csv_path, gpu)
                row["nvjpeg_gpu"] = device_half_ms(recipe, csv_path, gpu, "nvjpeg")
            rows.append(row)
            print(format_row(row), flush=True)
    table = render(rows, args)
    print(table)
    if args.out:
        Path(args.out).write_text(table)


def format_row(row: dict) -> str:
    ms = row["ms"]
    return f"{row['size']}: " + ", ".join(f"{k[0]} {k[1]} {v:.2f} ms" for k, v in ms.items())


def render(rows: list[dict], args: argparse.Namespace) -> str:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    versions = (
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow "
        f"{PIL.__version__}, open_clip {open_clip.__version__}, Python {platform.python_version()}"
    )
    lines = [
        "# Loader: CPU milliseconds per image, open_clip's transform against the split pipeline",
        "",
        f"`OMP_NUM_THREADS=1 python bench/bench_loader.py --images {args.images}`: generated "
        "photo-like JPEGs (quality 85), read through CsvPairDataset and WebDatasetPairs, "
        f"output {OUTPUT} px. {cpu_name()}, one thread, load average {load} (1, 5, 15 min) on "
        f"a shared machine: rough numbers, compare within a row. {versions}.",
        "",
        "CPU ms per image (process time); images/s per core = 1000 / ms. open_clip: PIL decode "
        "+ RandomResizedCrop (bicubic) + ToTensor + Normalize. ours: header + crop draw + "
        "libjpeg-turbo decode + uint8 crop (the loader worker's share). nvjpeg CPU: header + "
        "bytes (the GPU decodes). device half on CPU: resize + normalise of data/"
        "device_augment.py run on the CPU, per image, batch of 64.",
        "",
        "| image | KB | open_clip csv | ours csv | nvjpeg CPU csv | open_clip wds | ours wds "
        "| nvjpeg CPU wds | ours / open_clip | images/s/core open_clip, ours | device half on "
        "CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ms = row["ms"]
        ratio = (ms["open_clip", "csv"] + ms["open_clip", "webdataset"]) / (
            ms["ours", "csv"] + ms["ours", "webdataset"]
        )
        rate = f"{1000 / ms['open_clip', 'csv']:.0f}, {1000 / ms['ours', 'csv']:.0f}"
        cells = [
            row["size"],
            f"{row['kb']:.0f}",
            *(
                f"{ms[name, source]:.2f}"
                for source in ("csv", "webdataset")
                for name in ("open_clip", "ours", "nvjpeg CPU")
            ),
            f"{ratio:.1f}x fewer",
            rate,
            f"{row['device_cpu']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if any("device_gpu" in row for row in rows):
        name = torch.cuda.get_device_name(torch.device(args.device))
        lines += [
            "",
            f"On {name}, batch of {BATCH}: images/s of the device half (resize, normalise) "
            "after the CPU decode, and with the JPEG decode on the GPU (nvjpeg).",
            "",
            "| image | device half, images/s | nvjpeg decode + device half, images/s |",
            "|---|---|---|",
        ]
        lines += [
            f"| {r['size']} | {1000 / r['device_gpu']:,.0f} | {1000 / r['nvjpeg_gpu']:,.0f} |"
            for r in rows
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
