"""Shard-by-shard image-caption sources: webdataset tars, CSV/TSV, image folders."""

import json

import numpy as np
import pytest
from support import encode_image, random_image, write_image_shards

from tinyclip_fast.data.sources import (
    folder_source,
    iter_tar_samples,
    open_source,
    source_kind,
    webdataset_source,
)


def pixels(image):
    return np.asarray(image)


def test_webdataset_source_reads_images_and_captions(tmp_path):
    write_image_shards(tmp_path / "shards", num_shards=2, per_shard=3, synthetic=2)
    source = webdataset_source(str(tmp_path / "shards" / "{00000..00001}.tar"))
    assert source.kind == "webdataset" and [s.name for s in source.shards] == ["00000", "00001"]
    assert source.num_samples is None  # tars are counted only when read
    assert source.cache_path(source.shards[1]) == tmp_path / "shards/00001.reinforced.safetensors"
    records = list(source.shards[1].records())
    assert [r.key for r in records] == ["s1-000", "s1-001", "s1-002"]
    first = records[0]
    assert first.captions == (
        "a photo of thing 3",
        "synthetic 0 of thing 3",
        "synthetic 1 of thing 3",
    )
    assert first.num_real == 1
    assert np.array_equal(pixels(first.load_image()), pixels(random_image(3)))
    other = webdataset_source(str(tmp_path / "shards/00000.tar"), cache_dir=tmp_path / "c")
    assert other.cache_path(other.shards[0]) == tmp_path / "c/00000.reinforced.safetensors"


def test_tar_fingerprint_and_truncation(tmp_path):
    (path,) = write_image_shards(tmp_path, num_shards=1, per_shard=4)
    shard = webdataset_source(str(path)).shards[0]
    before = shard.fingerprint()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    assert shard.fingerprint() != before
    with pytest.raises(ValueError, match=f"webdataset shard {path} is truncated or corrupt"):
        list(shard.records())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_tar_samples(tmp_path / "gone.tar"))
    with pytest.raises(FileNotFoundError, match="shards not found"):
        webdataset_source(str(tmp_path / "gone.tar"))
    with pytest.raises(ValueError, match="need local shard files"):
        webdataset_source("https://example.com/00000.tar")


def test_csv_source_cuts_rows_into_shards(tmp_path):
    lines = ["filepath\ttitle\tsyn"]
    for i in range(5):
        random_image(i).save(tmp_path / f"img{i}.png")
        lines.append(f"img{i}.png\tcaption {i}\t{'extra ' + str(i) if i % 2 else ''}")
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    source = open_source(None, str(tmp_path / "train.tsv"), shard_size=2, synthetic_keys=["syn"])
    assert source.kind == "csv" and source.num_samples == 5
    names = ["train.tsv-00000", "train.tsv-00001", "train.tsv-00002"]
    assert [s.name for s in source.shards] == names
    assert source.cache_path(source.shards[2]) == tmp_path / f"{names[2]}.reinforced.safetensors"
    records = [r for s in source.shards for r in s.records()]
    assert [r.key for r in records] == ["0", "1", "2", "3", "4"]
    assert records[1].captions == ("caption 1", "extra 1") and records[0].captions == ("caption 0",)
    assert np.array_equal(pixels(records[4].load_image()), pixels(random_image(4)))
    fingerprint = source.shards[0].fingerprint()
    random_image(9).save(tmp_path / "img1.png")  # another image, another size
    assert source.shards[0].fingerprint() != fingerprint
    with pytest.raises(ValueError, match="no column 'caption'"):
        open_source("csv", tmp_path / "train.tsv", caption_key="caption")
    (tmp_path / "img2.png").unlink()
    with pytest.raises(FileNotFoundError, match="img2.png .sample '2' of .*train.tsv. does not"):
        list(source.shards[1].records())[0].load_image()
    (tmp_path / "img3.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode the image of image .*img3.png"):
        list(source.shards[1].records())[1].load_image()


def test_folder_source(tmp_path):
    root = tmp_path / "images"
    (root / "b").mkdir(parents=True)
    for i, name in enumerate(["b/x.png", "a.jpg", "b/y.webp"]):
        path = root / name
        path.write_bytes(
            encode_image(
                random_image(i), {"png": "PNG", "jpg": "JPEG"}.get(path.suffix[1:], "WEBP")
            )
        )
        path.with_suffix(".txt").write_text(f"caption of {name}\n")
    (root / "b/x.syn.json").write_text(json.dumps({"syn_text": ["s1", "s2"]}))
    source = open_source(None, str(root), shard_size=2)
    assert source.kind == "folder" and source_kind(None, str(root)) == "folder"
    assert [s.name for s in source.shards] == ["images-00000", "images-00001"]
    assert source.cache_path(source.shards[0]) == root / "images-00000.reinforced.safetensors"
    records = [r for s in source.shards for r in s.records()]
    assert [r.key for r in records] == ["a.jpg", "b/x.png", "b/y.webp"]
    assert records[1].captions == ("caption of b/x.png", "s1", "s2") and records[1].num_real == 1
    assert records[0].load_image().size == random_image(1).size
    (root / "b/y.txt").unlink()
    with pytest.raises(FileNotFoundError, match="has no caption file .*y.txt"):
        folder_source(root)
    (root / "b/x.syn.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="syn.json of .*x.syn.json is not"):
        folder_source(root)


def test_names_that_would_share_a_cache_file_are_refused(tmp_path):
    write_image_shards(tmp_path / "a", num_shards=1, per_shard=1)
    write_image_shards(tmp_path / "b", num_shards=1, per_shard=1)
    urls = f"{tmp_path}/a/00000.tar::{tmp_path}/b/00000.tar"
    assert len(webdataset_source(urls).shards) == 2  # beside their shards: distinct files
    with pytest.raises(ValueError, match="would share a cache file"):
        webdataset_source(urls, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="source kind must be one of"):
        open_source("parquet", "x")


def test_inputs_of_one_folder_with_the_same_stem_get_their_own_cache_files(tmp_path):
    random_image(0).save(tmp_path / "a.png")
    (tmp_path / "set.csv").write_text("filepath,title\na.png,a caption\n")
    (tmp_path / "set.tsv").write_text("filepath\ttitle\na.png\ta caption\n")
    write_image_shards(tmp_path, num_shards=1, per_shard=1)
    (tmp_path / "00000.tar.gz").write_bytes((tmp_path / "00000.tar").read_bytes())
    sources = [
        open_source("csv", str(tmp_path / "set.csv"), separator=","),
        open_source("csv", str(tmp_path / "set.tsv")),
        webdataset_source(str(tmp_path / "00000.tar")),
        webdataset_source(str(tmp_path / "00000.tar.gz")),
    ]
    names = [source.cache_path(source.shards[0]).name for source in sources]
    assert names == [
        "set.csv-00000.reinforced.safetensors",
        "set.tsv-00000.reinforced.safetensors",
        "00000.reinforced.safetensors",
        "00000.tar.gz.reinforced.safetensors",
    ]


def test_a_directory_in_the_image_column_is_named_as_one(tmp_path):
    (tmp_path / "a.png").mkdir()
    (tmp_path / "set.tsv").write_text("filepath\ttitle\na.png\ta caption\n")
    record = next(open_source("csv", str(tmp_path / "set.tsv")).shards[0].records())
    with pytest.raises(
        FileNotFoundError, match=r"a.png \(sample '0' of .*set.tsv\) is a directory$"
    ):
        record.load_image()
