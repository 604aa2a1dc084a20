"""What the reinforced cache costs: bytes per sample and the read throughput of its loader.

- Bytes per sample: K augmentations x D x dtype + C captions x D x dtype + 16 bytes of
  offsets + the JSON of the keys and augmentation params; measured on a built cache and
  given for the teachers of TARGETS (ViT-B/32: D = 512) and DataCompDR's layout.
- Loader throughput (samples/s through ``make_loader``): the reinforced dataset (decode,
  replay one stored augmentation, tokenize, two embedding rows) against the plain
  webdataset loader with open_clip's training transform over the same shards, measured in
  the same run; and the teacher forward it replaces (images/s of a ViT-B/32 teacher with
  random weights, same batch, on the same device), the cost the cache removes from a step.

CPU:  python bench/bench_reinforced_cache.py [--images 512] [--workers 0] [--no-vit]
      JPEG images of random pixels (128..192 px a side) in 4 shards, a tiny 32 px teacher
      for the build; prints the table. ``cache_cost_rows`` is what bench_distill_step.py
      can call for its README table.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import webdataset as wds
from PIL import Image

from tinyclip_fast.data.augment import AugmentRecipe
from tinyclip_fast.data.datasets import WebDatasetPairs
from tinyclip_fast.data.loader import make_loader
from tinyclip_fast.data.reinforced import CACHE_DTYPES, ReinforcedDataset, load_shard_cache
from tinyclip_fast.data.sources import webdataset_source
from tinyclip_fast.teachers.reinforced_build import CacheTeacher, build_reinforced_shards

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 3},
}
# (name, teacher dims, K augmentations, captions per sample, cache dtype)
LAYOUTS = (
    ("ViT-B/32 teacher, K=5, 1 caption", (512,), 5, 1, "fp16"),
    ("ViT-B/32 teacher, K=5, 1 + 5 synthetic", (512,), 5, 6, "fp16"),
    ("ViT-L/14 teacher, K=10, 1 + 5 synthetic", (768,), 10, 6, "bf16"),
    ("DataCompDR-12M layout (2 x 768, K=30, 1 + 5)", (768, 768), 30, 6, "bf16"),
)


def cache_bytes_per_sample(
    num_augmentations: int, dims: tuple[int, ...], captions: int, dtype: str, json_bytes: float
) -> float:
    """K x D x b (images) + C x D x b (captions) + 16 (int64 offset, count) + JSON bytes."""
    width = sum(dims)
    element = torch.finfo(CACHE_DTYPES[dtype]).bits // 8
    return (num_augmentations + captions) * width * element + 16 + json_bytes


class WordTokenizer:
    """Hash words into a 1000-id vocabulary (the tiny teacher's), context 16."""

    def __call__(self, texts: list[str]) -> torch.Tensor:
        tokens = torch.zeros(len(texts), 16, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [998, *(sum(map(ord, w)) % 995 + 1 for w in text.split()[:14]), 999]
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens


def write_shards(folder: Path, images: int, shards: int) -> str:
    rng = np.random.default_rng(0)
    per_shard = -(-images // shards)
    for shard in range(shards):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
            for i in range(per_shard):
                height, width = (int(v) for v in rng.integers(128, 193, size=2))
                pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                syn = [f"a synthetic caption {j} of picture {i}" for j in range(2)]
                sink.write(
                    {
                        "__key__": f"{shard}-{i:06d}",
                        "jpg": buffer.getvalue(),
                        "txt": f"a photo of picture {i} of shard {shard}",
                        "syn.json": json.dumps({"syn_text": syn}),
                    }
                )
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def samples_per_second(loader, batches: int, batch_size: int) -> float:
    next(loader)  # first batch: file opening, worker start-up
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * batch_size / (time.perf_counter() - start)


@torch.no_grad()
def teacher_images_per_second(model: torch.nn.Module, batch: int, size: int, iters: int) -> float:
    images = torch.randn(batch, 3, size, size)
    model.encode_image(images)
    start = time.perf_counter()
    for _ in range(iters):
        model.encode_image(images)
    return iters * batch / (time.perf_counter() - start)


def cache_cost_rows(json_bytes_per_aug: float) -> list[tuple[str, float]]:
    """(layout, bytes per sample) of LAYOUTS, with the measured JSON bytes per augmentation."""
    return [
        (name, cache_bytes_per_sample(k, dims, c, dtype, k * json_bytes_per_aug))
        for name, dims, k, c, dtype in LAYOUTS
    ]


def run(images: int, batch: int, workers: int, vit: bool) -> str:
    torch.manual_seed(0)
    teacher = open_clip.model.CLIP(**TINY).eval()
    tokenizer = WordTokenizer()
    transform = open_clip.transform.image_transform(32, is_train=True)
    recipe = AugmentRecipe.from_transform(transform)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_shards(Path(tmp), images, shards=4)
        source = webdataset_source(urls)
        report = build_reinforced_shards(
            source,
            [CacheTeacher(teacher, tokenizer)],
            recipe,
            num_augmentations=5,
            dtype="fp16",
            batch_size=128,
            progress=False,
        )
        files = [source.cache_path(s) for s in source.shards]
        file_bytes = sum(p.stat().st_size for p in files) / report.images
        caches = [load_shard_cache(p) for p in files]
        json_bytes = (
            sum(len(json.dumps({"keys": c.keys, "params": c.params})) for c in caches)
            / report.images
        )
        formula = cache_bytes_per_sample(5, (32,), 3, "fp16", json_bytes)
        steps = max(1, images // batch - 1)
        cached = samples_per_second(
            make_loader(
                ReinforcedDataset(source, tokenizer=tokenizer), batch, seed=0, num_workers=workers
            ),
            steps,
            batch,
        )
        plain = samples_per_second(
            make_loader(
                WebDatasetPairs(urls, preprocess=transform, tokenizer=tokenizer),
                batch,
                seed=0,
                num_workers=workers,
            ),
            steps,
            batch,
        )
    lines += [
        f"Build (tiny 32 px teacher, K=5, fp16): {report.images_per_s:,.0f} source images/s",
        "",
        "| measured cache (tiny teacher D=32, K=5, 3 captions, fp16) | bytes/sample |",
        "|---|---|",
        f"| file size / samples | {file_bytes:,.0f} |",
        f"| formula (K+C) x D x 2 + 16 + JSON ({json_bytes:,.0f} B) | {formula:,.0f} |",
        "",
        "| layout (JSON as measured: "
        f"{json_bytes / 5:,.0f} B per augmentation) | bytes/sample | per 1M samples |",
        "|---|---|---|",
    ]
    for name, size in cache_cost_rows(json_bytes / 5):
        lines.append(f"| {name} | {size:,.0f} | {size / 2**30 * 1e6:,.1f} GiB |")
    lines += [
        "",
        f"| loader, batch {batch}, {workers} workers, 32 px output | samples/s | vs plain |",
        "|---|---|---|",
        f"| webdataset + open_clip train transform (no teacher targets) | {plain:,.0f} | 1.00x |",
        f"| reinforced cache (replay + stored embeddings) | {cached:,.0f} | "
        f"{cached / plain:.2f}x |",
    ]
    if vit:
        vit_b = open_clip.create_model("ViT-B-32").eval()
        rate = teacher_images_per_second(vit_b, batch, 224, iters=3)
        lines.append(f"| (replaced) ViT-B/32 teacher image forward, 224 px | {rate:,.1f} | - |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--no-vit", action="store_true", help="skip the ViT-B/32 forward")
    args = parser.parse_args()
    print(
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}, open_clip {open_clip.__version__}, Python "
        f"{platform.python_version()}\n"
    )
    print(run(args.images, args.batch, args.workers, not args.no_vit))


if __name__ == "__main__":
    main()
