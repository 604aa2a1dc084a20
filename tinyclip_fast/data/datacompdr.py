"""DataCompDR (Apple's reinforced DataComp, MobileCLIP): train from its shards, no teacher.

Sources: apple/ml-mobileclip ``training/open_clip.patch`` (``preprocess_dr``: how a sample
is read and replayed), ``training/dr/transforms.py`` (the compressed parameters),
``training/configs/datacompdr12m.json`` and ``run_datacompdr12m.sh`` (recipe, teachers,
scale); ``hf_dataset_example.py``; apple/ml-mobileclip-dr ``src/raygen/datasetio.py`` (the
writer). One webdataset sample::

    <uid>.jpg|jpeg|png|webp  the image (from DataComp: the DR shards carry only url.txt)
    <uid>.txt                the real caption (from DataComp; optional here)
    <uid>.syn.json           {"syn_text": [5 synthetic captions]}
    <uid>.paug.json          {"param_aug": [K compressed params]} (or that list JSON-encoded)
    <uid>.npz                {"image_emb": [K, 1536], "text_emb": [1 + 5, 1536]} float32
      or <uid>.pth.gz        the same dict as gzipped torch.save (bfloat16 in -12M-bf16)
    <uid>.url.txt, .json     the image url, {"uid", "sha256"}: not read

``text_emb`` rows are the real caption(s), then the synthetic ones in ``syn_text`` order (a
separate ``syn_text_emb``, when present, holds the synthetic rows). An embedding is the
concatenation of two L2-normalised 768-d teachers, ViT-L-14 ``openai`` then
``datacomp_xl_s13b_b90k``; K = 30 (DataCompDR-12M) or 10 (-1B). MobileCLIP distils them
with a fixed logit scale of 100. A compressed param is ``[[top, left, height, width],
[[op id, magnitude], ...] | null]``: RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3),
bicubic) then RandAugment (2 ops, magnitude 9 of 31 bins), op ids indexing torchvision's
RandAugment op list; then ToTensor and Normalize (OpenAI mean/std).
"""

from __future__ import annotations

import gzip
import io
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinyclip_fast.data.augment import (
    OPENAI_MEAN,
    OPENAI_STD,
    RAND_AUGMENT_OPS,
    AugmentRecipe,
    Params,
)
from tinyclip_fast.data.datasets import WDS_IMAGE_EXTENSIONS, Tokenizer, expand_urls
from tinyclip_fast.data.options import given_options
from tinyclip_fast.data.reinforced import ReinforcedItem, ReinforcedStream, TeacherInfo
from tinyclip_fast.data.sources import (
    Record,
    decode_image,
    iter_tar_samples,
    sample_fields,
    synthetic_captions,
)

DATACOMPDR_SCALE = 100.0
DATACOMPDR_TEACHERS = (
    TeacherInfo("ViT-L-14/openai", 768, None, math.log(DATACOMPDR_SCALE)),
    TeacherInfo("ViT-L-14/datacomp_xl_s13b_b90k", 768, None, math.log(DATACOMPDR_SCALE)),
)
EMBEDDING_KEYS = ("npz", "pth.gz")


def datacompdr_recipe(
    image_size: int | tuple[int, int] = 224,
    *,
    mean: Sequence[float] | None = OPENAI_MEAN,
    std: Sequence[float] | None = OPENAI_STD,
    interpolation: str = "bicubic",
) -> AugmentRecipe:
    """DataCompDR's augmentation. The stored crop boxes and RandAugment draws replay at any
    output size and normalisation (as MobileCLIP trains other resolutions); the stored
    embeddings are those of the 224 px, OpenAI-normalised view."""
    return AugmentRecipe(
        size=image_size,
        scale=(0.08, 1.0),
        ratio=(3.0 / 4.0, 4.0 / 3.0),
        interpolation=interpolation,
        mean=mean,
        std=std,
        rand_augment=(2, 9, 31),
    )


def decompress_params(compressed: Any) -> Params:
    """One DataCompDR param list -> this library's params (``crop``, ``rand_augment``)."""
    if not isinstance(compressed, list) or len(compressed) != 2:
        raise ValueError(
            f"a DataCompDR augmentation is [[top, left, height, width], ops], got {compressed!r}"
        )
    crop, ops = compressed
    if not isinstance(crop, list) or len(crop) != 4:
        raise ValueError(f"DataCompDR crop must be [top, left, height, width], got {crop!r}")
    replay = []
    for op in ops or ():
        op_id, magnitude = op
        if not 0 <= int(op_id) < len(RAND_AUGMENT_OPS):
            raise ValueError(f"RandAugment op id {op_id} outside 0..{len(RAND_AUGMENT_OPS) - 1}")
        replay.append([RAND_AUGMENT_OPS[int(op_id)], float(magnitude)])
    return {"crop": [int(v) for v in crop], "rand_augment": replay}


class DataCompDRDataset(ReinforcedStream):
    """DataCompDR webdataset shards (images merged in) as a reinforced stream: one stored
    augmentation replayed, one caption (real or synthetic, ``caption_mode``) and their
    stored teacher embeddings per sample (fields: data/reinforced.py).

    ``recipe``: the replay (default :func:`datacompdr_recipe`); ``teachers``: how to split
    and scale the stored embeddings (default the two ViT-L-14 at scale 100).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        tokenizer: Tokenizer,
        recipe: AugmentRecipe | None = None,
        teachers: Sequence[TeacherInfo] = DATACOMPDR_TEACHERS,
        caption_key: str = "txt",
        caption_mode: str = "all",
        shuffle: bool = True,
        num_samples: int | None = None,
    ) -> None:
        shards = expand_urls(urls)
        missing = [s for s in shards if not Path(s).is_file()]
        if missing:
            raise FileNotFoundError(f"DataCompDR shards not found: {missing[:5]}")
        recipe = recipe or datacompdr_recipe()
        if recipe.rand_augment is None or recipe.sample_keys() != ("crop", "rand_augment"):
            raise ValueError(
                "DataCompDR params hold a crop and RandAugment ops only; the replay recipe "
                f"must have exactly those, got one recording {recipe.sample_keys()}"
            )
        super().__init__(
            shards,
            tokenizer=tokenizer,
            recipe=recipe,
            teachers=teachers,
            caption_mode=caption_mode,
            shuffle=shuffle,
            num_samples=num_samples,
        )
        self.caption_key = caption_key

    def _items(self, shard: str) -> Iterator[ReinforcedItem]:
        width = sum(t.dim for t in self.teachers)
        for raw in iter_tar_samples(shard):
            key = raw["__key__"]
            where = f"DataCompDR sample {key!r} in {shard}"
            image_ext = next((ext for ext in WDS_IMAGE_EXTENSIONS if ext in raw), None)
            if image_ext is None:
                raise ValueError(
                    f"{where} has no image ({'/'.join(WDS_IMAGE_EXTENSIONS)}): DataCompDR "
                    "shards carry only url.txt; download the images and merge them in by uid"
                )
            for needed in ("paug.json", "syn.json"):
                if needed not in raw:
                    raise ValueError(f"{where} has no {needed}; it has {sample_fields(raw)}")
            params = _param_list(raw["paug.json"], where)
            embeddings = _embeddings(raw, where)
            image_emb = embeddings["image_emb"]
            real = [raw[self.caption_key].decode("utf-8")] if self.caption_key in raw else []
            synthetic = list(synthetic_captions(raw["syn.json"], where))
            text_emb = _caption_rows(embeddings, len(real), len(synthetic), where)
            if image_emb.dim() != 2 or image_emb.shape[0] != len(params):
                raise ValueError(
                    f"{where}: image_emb {tuple(image_emb.shape)} does not hold one row per "
                    f"stored augmentation ({len(params)} in paug.json)"
                )
            if image_emb.shape[1] != width or text_emb.shape[1] != width:
                raise ValueError(
                    f"{where}: embeddings are {image_emb.shape[1]}-d, the teachers "
                    f"{[t.dim for t in self.teachers]} sum to {width}"
                )
            if not real and not synthetic:
                raise ValueError(f"{where} has no caption ({self.caption_key} or syn.json)")
            data = raw[image_ext]
            record = Record(
                key,
                lambda data=data, where=where: decode_image(data, where),
                tuple(real + synthetic),
                len(real),
                lambda data=data: data,
                where,
            )
            yield ReinforcedItem(
                f"{Path(shard).name}/{key}",
                record,
                real + synthetic,
                len(real),
                params,
                image_emb,
                text_emb,
            )


def build_datacompdr_dataset(
    data_cfg: dict[str, Any], preprocess: Any, tokenizer: Tokenizer | None
) -> DataCompDRDataset:
    """``data_cfg["kind"] = "datacompdr"`` for ``datasets.register_dataset``.

    Keys: ``path`` (shards, braces expanded), ``caption_mode``, ``num_samples`` and the
    options of data/options.py: ``caption_key``, ``shuffle``, ``teacher_scale`` (default
    100), ``teacher_dims`` (default [768, 768]). A torchvision ``preprocess`` (the student's
    training transform) sets the replay's output size, interpolation and normalisation, as
    MobileCLIP's training does.
    """
    if tokenizer is None:
        raise ValueError("data kind 'datacompdr' needs a tokenizer")
    path = data_cfg.get("path")
    if path is None:
        raise ValueError("data kind 'datacompdr' needs a path: --data datacompdr:SHARDS")
    options = given_options(data_cfg)
    recipe = datacompdr_recipe()
    if preprocess is not None:
        student = AugmentRecipe.from_transform(preprocess)
        recipe = datacompdr_recipe(
            student.size, mean=student.mean, std=student.std, interpolation=student.interpolation
        )
    scale = math.log(float(options.pop("teacher_scale", DATACOMPDR_SCALE)))
    dims = options.pop("teacher_dims", [t.dim for t in DATACOMPDR_TEACHERS])
    names = [t.name for t in DATACOMPDR_TEACHERS]
    teachers = [
        TeacherInfo(names[i] if i < len(names) else f"teacher{i}", int(d), None, scale)
        for i, d in enumerate(dims)
    ]
    return DataCompDRDataset(
        path,
        tokenizer=tokenizer,
        recipe=recipe,
        teachers=teachers,
        caption_mode=data_cfg.get("caption_mode", "all"),
        num_samples=data_cfg.get("num_samples"),
        **options,
    )


def _param_list(payload: bytes, where: str) -> list[Params]:
    try:
        param_aug = json.loads(payload)["param_aug"]
        if isinstance(param_aug, str):  # the Hugging Face viewer's copy stores it as a string
            param_aug = json.loads(param_aug)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{where}: paug.json is not {{'param_aug': [...]}}") from err
    if not isinstance(param_aug, list) or not param_aug:
        raise ValueError(f"{where}: param_aug must be a non-empty list")
    return [decompress_params(p) for p in param_aug]


def _embeddings(raw: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    try:
        if "npz" in raw:
            with np.load(io.BytesIO(raw["npz"]), allow_pickle=False) as arrays:
                return {name: torch.from_numpy(arrays[name]) for name in arrays.files}
        if "pth.gz" in raw:
            loaded = torch.load(io.BytesIO(gzip.decompress(raw["pth.gz"])), weights_only=True)
            return {name: torch.as_tensor(value) for name, value in loaded.items()}
    except Exception as err:  # numpy and torch.load raise many types on a broken payload
        raise ValueError(f"{where}: its stored embeddings are corrupt ({err!r})") from err
    raise ValueError(f"{where} has no stored embeddings ({' or '.join(EMBEDDING_KEYS)})")


def _caption_rows(
    embeddings: dict[str, torch.Tensor], num_real: int, num_synthetic: int, where: str
) -> torch.Tensor:
    # Rows for our captions: real (when we have the text) then synthetic.
    if "image_emb" not in embeddings or "text_emb" not in embeddings:
        raise ValueError(f"{where}: stored embeddings lack image_emb or text_emb")
    text = embeddings["text_emb"]
    if "syn_text_emb" in embeddings:
        real_rows, synthetic_rows = text, embeddings["syn_text_emb"]
    else:
        stored_real = text.shape[0] - num_synthetic
        if stored_real < 0:
            raise ValueError(
                f"{where}: text_emb has {text.shape[0]} rows for {num_synthetic} synthetic captions"
            )
        real_rows, synthetic_rows = text[:stored_real], text[stored_real:]
    if synthetic_rows.shape[0] != num_synthetic:
        raise ValueError(
            f"{where}: {synthetic_rows.shape[0]} synthetic caption embeddings for "
            f"{num_synthetic} synthetic captions"
        )
    if num_real and real_rows.shape[0] != num_real:
        raise ValueError(
            f"{where}: {real_rows.shape[0]} real caption embeddings for {num_real} real captions"
        )
    return torch.cat([real_rows[:num_real], synthetic_rows])
