"""Datasets (CSV, webdataset, synthetic, in-memory) and the deterministic, resumable loader."""

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import IterableDataset

from tinyclip_fast.data.datasets import (
    CsvPairDataset,
    SyntheticPairDataset,
    TensorPairDataset,
    WebDatasetPairs,
    build_dataset,
    check_sample_fingerprints,
    sample_fingerprints,
)
from tinyclip_fast.data.loader import BadSampleError, make_loader
from tinyclip_fast.demo.data import CompactTokenizer

CAPTIONS = [
    f"a photo of pattern {word}" for word in ("red", "green", "blue", "grey", "dark", "pale")
]


def preprocess(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float [3, H, W] in [0, 1], exactly invertible for 8-bit PNGs."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


@pytest.fixture(scope="module")
def tokenizer() -> CompactTokenizer:
    return CompactTokenizer(CAPTIONS, context_length=10)


def random_pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)


@pytest.fixture
def csv_folder(tmp_path):
    (tmp_path / "images").mkdir()
    lines = ["filepath\ttitle"]
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(random_pixels(i)).save(tmp_path / "images" / f"{i}.png")
        lines.append(f"images/{i}.png\t{caption}")
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_csv_dataset_reads_images_and_captions(csv_folder, tokenizer):
    data = build_dataset(
        {"kind": "csv", "path": str(csv_folder / "pairs.tsv")},
        preprocess=preprocess,
        tokenizer=tokenizer,
    )
    assert len(data) == len(CAPTIONS)
    for i in (0, 3, 5):
        sample = data[i]
        assert sample["index"] == i
        expected = torch.from_numpy(random_pixels(i)).permute(2, 0, 1).float() / 255.0
        assert torch.equal(sample["image"], expected)
        assert torch.equal(sample["text"], tokenizer([CAPTIONS[i]])[0])


@pytest.mark.parametrize(
    "keys",
    [("img_key", "caption_key", "separator"), ("csv_img_key", "csv_caption_key", "csv_separator")],
    ids=["keys", "open_clip-names"],
)
def test_csv_dataset_custom_columns_and_separator(tmp_path, tokenizer, keys):
    Image.fromarray(random_pixels(7)).save(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text(f"caption,img\n{CAPTIONS[2]},{tmp_path / 'a.png'}\n")
    options = dict(zip(keys, ("img", "caption", ","), strict=True))
    data = build_dataset(
        {"kind": "csv", "path": str(tmp_path / "pairs.csv"), **options},
        preprocess=preprocess,
        tokenizer=tokenizer,
    )
    assert torch.equal(data[0]["text"], tokenizer([CAPTIONS[2]])[0])
    assert data[0]["image"].shape == (3, 6, 5)


def test_csv_dataset_bad_inputs(tmp_path, csv_folder, tokenizer):
    kwargs = {"preprocess": preprocess, "tokenizer": tokenizer}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CsvPairDataset(tmp_path / "missing.tsv", **kwargs)
    (tmp_path / "empty.tsv").write_text("filepath\ttitle\n")
    with pytest.raises(ValueError, match="no rows"):
        CsvPairDataset(tmp_path / "empty.tsv", **kwargs)
    with pytest.raises(ValueError, match="no column 'caption'.*data.options.caption_key"):
        CsvPairDataset(csv_folder / "pairs.tsv", caption_key="caption", **kwargs)
    with pytest.raises(ValueError, match="no column"):
        CsvPairDataset(csv_folder / "pairs.tsv", separator=",", **kwargs)
    (csv_folder / "images" / "2.png").unlink()
    data = CsvPairDataset(csv_folder / "pairs.tsv", **kwargs)
    with pytest.raises(BadSampleError, match="2.png .row 2 of .*pairs.tsv. does not exist"):
        data[2]
    with pytest.raises(ValueError, match="needs a preprocess and a tokenizer"):
        build_dataset({"kind": "csv", "path": "x"}, preprocess=None, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="needs a path: --data csv:PATH"):
        build_dataset({"kind": "csv"}, **kwargs)
    # An unknown kind is named as one, with the kinds there are.
    with pytest.raises(ValueError, match="unknown data kind 'parquet'.*kinds: csv, webdataset"):
        build_dataset({"kind": "parquet", "path": "x"}, **kwargs)
    with pytest.raises(ValueError, match="'synthetic' reads no files"):
        build_dataset({"kind": "synthetic", "path": "x", "num_samples": 2}, **kwargs)


def test_csv_separator_follows_the_extension(tmp_path, tokenizer):
    # .csv is read with commas, anything else with tabs, unless a separator is given.
    Image.fromarray(random_pixels(1)).save(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text(f"filepath,title\na.png,{CAPTIONS[1]}\n")
    (tmp_path / "pairs.tsv").write_text(f"filepath\ttitle\na.png\t{CAPTIONS[1]}\n")
    for name in ("pairs.csv", "pairs.tsv"):
        data = CsvPairDataset(tmp_path / name, preprocess=preprocess, tokenizer=tokenizer)
        assert data.captions == [CAPTIONS[1]]
    with pytest.raises(ValueError, match="columns found with separator ';'"):
        CsvPairDataset(tmp_path / "pairs.csv", preprocess=preprocess, tokenizer=tokenizer,
                       separator=";")  # fmt: skip


def bad_files(folder):
    """A truncated PNG and a text file posing as a PNG, next to good images."""
    good = folder / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(good)
    (folder / "truncated.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (folder / "notes.png").write_text("not an image")


def test_unreadable_images_name_the_file_and_row(tmp_path, tokenizer):
    # A broken image is one line naming the file and the row, not a PIL traceback.
    bad_files(tmp_path)
    rows = ["filepath\ttitle", "good.png\ta", "truncated.png\tb", "notes.png\tc"]
    (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n")
    data = CsvPairDataset(tmp_path / "pairs.tsv", preprocess=preprocess, tokenizer=tokenizer)
    assert data[0]["image"].shape == (3, 64, 64)
    for row, name, reason in ((1, "truncated.png", "OSError"), (2, "notes.png", "Unidentified")):
        with pytest.raises(BadSampleError) as info:
            data[row]
        message = str(info.value)
        assert f"{name} (row {row} of" in message and reason in message
        assert "\n" not in message
        assert info.value.record["row"] == row and info.value.record["file"].endswith(name)


def test_sample_fingerprints_follow_identity_and_order(tmp_path, csv_folder, tokenizer):
    kwargs = {"preprocess": preprocess, "tokenizer": tokenizer}
    data = CsvPairDataset(csv_folder / "pairs.tsv", **kwargs)
    fingerprints = sample_fingerprints(data)
    assert fingerprints.shape == (len(CAPTIONS),) and fingerprints.unique().numel() == len(CAPTIONS)
    lines = (csv_folder / "pairs.tsv").read_text().splitlines()
    (csv_folder / "swapped.tsv").write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]))
    swapped = CsvPairDataset(csv_folder / "swapped.tsv", **kwargs)
    with pytest.raises(ValueError, match=r"sample 0 \('images/1.png\\ta photo of pattern green'\)"):
        check_sample_fingerprints(fingerprints, swapped, "the cache")
    assert torch.equal(check_sample_fingerprints(fingerprints, data, "the cache"), fingerprints)
    tensors = TensorPairDataset(torch.randn(4, 3, 2, 2), torch.randint(0, 9, (4, 3)))
    flipped = TensorPairDataset(tensors.images.flip(0), tensors.texts.flip(0))
    assert not torch.equal(sample_fingerprints(tensors), sample_fingerprints(flipped))
    assert torch.equal(sample_fingerprints(tensors), sample_fingerprints(
        TensorPairDataset(tensors.images.clone(), tensors.texts.clone())))  # fmt: skip
    assert sample_fingerprints(SyntheticPairDataset(3, image_size=4, context_length=4,
                                                    vocab_size=8)).shape == (3,)  # fmt: skip


def write_shards(folder, shards=3, per_shard=4, missing_caption=False):
    import webdataset as wds

    captions = {}
    for shard in range(shards):
        with wds.TarWriter(str(folder / f"shard-{shard}.tar")) as sink:
            for j in range(per_shard):
                key = f"{shard:02d}{j:03d}"
                buffer = io.BytesIO()
                Image.fromarray(random_pixels(shard * 100 + j)).save(buffer, format="PNG")
                caption = CAPTIONS[(shard + j) % len(CAPTIONS)]
                sample = {"__key__": key, "png": buffer.getvalue()}
                if not missing_caption:
                    sample["txt"] = caption
                sink.write(sample)
                captions[key] = caption
    return captions


def test_webdataset_stream_ranks_and_resume(tmp_path, tokenizer):
    write_shards(tmp_path)
    cfg = {"kind": "webdataset", "path": str(tmp_path / "shard-{0..2}.tar"), "shuffle": False}
    data = build_dataset(cfg, preprocess=preprocess, tokenizer=tokenizer)
    assert isinstance(data, IterableDataset)
    samples = list(iter(data))
    assert len(samples) == 12
    assert samples[5]["image"].shape == (3, 6, 5)
    expected = torch.from_numpy(random_pixels(101)).permute(2, 0, 1).float() / 255.0
    assert torch.equal(samples[5]["image"], expected)  # shard 1, sample 1
    assert torch.equal(samples[5]["text"], tokenizer([CAPTIONS[2]])[0])

    # Two ranks read disjoint shards (rank 0: shards 0 and 2, rank 1: shard 1).
    per_rank = []
    for rank in (0, 1):
        loader = make_loader(data, 2, seed=0, rank=rank, world_size=2)
        per_rank.append(torch.cat([next(loader)["image"] for _ in range(2)]))
    assert torch.equal(per_rank[0], torch.stack([s["image"] for s in samples[0:4]]))
    assert torch.equal(per_rank[1], torch.stack([s["image"] for s in samples[4:8]]))

    # Resume: start_step batches are consumed; epochs roll over (3 batches of 4 per epoch).
    full = make_loader(data, 4, seed=1)
    reference = [next(full)["text"] for _ in range(7)]
    resumed = make_loader(data, 4, seed=1, start_step=4)
    for step in range(4, 7):
        assert torch.equal(next(resumed)["text"], reference[step])


def test_webdataset_shuffles_shards_per_epoch(tmp_path, tokenizer):
    write_shards(tmp_path, shards=4, per_shard=2)
    cfg = {"kind": "webdataset", "path": str(tmp_path / "shard-{0..3}.tar")}
    data = build_dataset(cfg, preprocess=preprocess, tokenizer=tokenizer)
    epochs = [
        torch.cat([b["image"] for b in itertools.islice(make_loader(data, 8, seed=s), 2)])
        for s in (3, 3)
    ]
    assert torch.equal(epochs[0], epochs[1])  # same seed: same order
    first, second = epochs[0][:16].reshape(2, 8, -1)
    assert not torch.equal(first, second)  # epoch 1 reads the shards in another order
    assert torch.equal(first.sort(dim=0).values, second.sort(dim=0).values)


def test_webdataset_bad_members_and_truncated_shards(tmp_path, tokenizer):
    # A non-image member and a truncated tar shard are named, shard and member.
    import webdataset as wds

    bad_files(tmp_path)
    members = {"mixed.tar": ("good.png", "notes.png", "good.png"), "whole.tar": ("good.png",) * 6}
    for shard, names in members.items():
        with wds.TarWriter(str(tmp_path / shard)) as sink:
            for key, name in zip("abcdef", names, strict=False):
                sink.write({"__key__": key, "png": (tmp_path / name).read_bytes(), "txt": "x"})
    whole = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: int(len(whole) * 0.8)])  # tarfile: "the end"
    (tmp_path / "torn.tar").write_bytes(whole[: 512 + 6000])  # tarfile: a ReadError
    kwargs = {"preprocess": preprocess, "tokenizer": tokenizer, "shuffle": False}
    strict = WebDatasetPairs(str(tmp_path / "mixed.tar"), **kwargs)
    with pytest.raises(BadSampleError, match="sample 'b' in .*mixed.tar cannot be read"):
        list(strict)
    with pytest.raises(BadSampleError, match="shard .*cut.tar is unreadable past some point"):
        list(WebDatasetPairs(str(tmp_path / "cut.tar"), **kwargs))
    with pytest.raises(BadSampleError, match="torn.tar .*ReadError: unexpected end of data$"):
        list(WebDatasetPairs(str(tmp_path / "torn.tar"), **kwargs))
    lenient = WebDatasetPairs(str(tmp_path / "{mixed,cut}.tar"), skip_bad_samples=True, **kwargs)
    items = list(lenient)
    bad = [item["bad_sample"] for item in items if "bad_sample" in item]
    assert [b.get("key") for b in bad] == ["b", None]
    assert bad[1]["shard"].endswith("cut.tar") and "without the tar end" in bad[1]["error"]
    good = [item for item in items if "bad_sample" not in item]
    assert [item["index"] for item in good] == list(range(len(good))) and len(good) >= 5


def test_webdataset_bad_inputs(tmp_path, tokenizer):
    kwargs = {"preprocess": preprocess, "tokenizer": tokenizer}
    with pytest.raises(FileNotFoundError, match="shards not found"):
        WebDatasetPairs(str(tmp_path / "nothing-{0..1}.tar"), **kwargs)
    write_shards(tmp_path, shards=1, per_shard=2, missing_caption=True)
    data = WebDatasetPairs(str(tmp_path / "shard-0.tar"), **kwargs)
    with pytest.raises(BadSampleError, match="lacks an image.*or caption"):
        next(iter(data))
    with pytest.raises(ValueError, match="cannot be split over 2 ranks"):
        next(make_loader(data, 1, seed=0, rank=1, world_size=2))
    with pytest.raises(TypeError, match="give --set data.size=N"):  # not data_cfg['num_samples']
        len(data)


def test_synthetic_is_a_function_of_seed_and_index():
    a = build_dataset(
        {
            "kind": "synthetic",
            "num_samples": 10,
            "image_size": 8,
            "context_length": 12,
            "vocab_size": 50,
        },
        preprocess=None,
        tokenizer=None,
    )
    b = SyntheticPairDataset(10, image_size=8, context_length=12, vocab_size=50)
    other = SyntheticPairDataset(10, image_size=8, context_length=12, vocab_size=50, seed=1)
    for i in (0, 7):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["text"], b[i]["text"])
        assert not torch.equal(a[i]["image"], other[i]["image"])
        text = a[i]["text"]
        assert text[0] == 48 and int(text.argmax()) == int((text != 0).sum()) - 1  # eot is max
        assert a[i]["image"].shape == (3, 8, 8)
    assert not torch.equal(a[0]["image"], a[1]["image"])
    with pytest.raises(IndexError):
        a[10]
    with pytest.raises(ValueError, match="context_length >= 2"):
        SyntheticPairDataset(4, context_length=1)
