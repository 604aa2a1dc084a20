"""The released TinyCLIP architectures as open_clip model configs."""

from __future__ import annotations

import copy
from typing import Any

_TEXT = {"context_length": 77, "vocab_size": 49408}


PRESETS: dict[str, dict[str, Any]] = {
    "ViT-61M-32-Text-29M": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 640, "patch_size": 32},
        "text_cfg": {**_TEXT, "width": 512, "heads": 8, "layers": 9},
    },
    "ViT-40M-32-Text-19M": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 512, "patch_size": 32},
        "text_cfg": {**_TEXT, "width": 512, "heads": 8, "layers": 6},
    },
    "ViT-39M-16-Text-19M": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 512, "patch_size": 16},
        "text_cfg": {**_TEXT, "width": 512, "heads": 8, "layers": 6},
    },
    "ViT-8M-16-Text-3M": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 10, "width": 256, "patch_size": 16},
        "text_cfg": {**_TEXT, "width": 256, "heads": 4, "layers": 3},
    },
    "ResNet-30M-Text-29M": {
        "embed_dim": 1024,
        "vision_cfg": {"image_size": 224, "layers": [3, 4, 6, 3], "width": 56},
        "text_cfg": {**_TEXT, "width": 512, "heads": 8, "layers": 9},
    },
    "ResNet-19M-Text-19M": {
        "embed_dim": 1024,
        "vision_cfg": {"image_size": 224, "layers": [3, 4, 6, 3], "width": 44},
        "text_cfg": {**_TEXT, "width": 512, "heads": 8, "layers": 6},
    },
}


def preset_config(name: str) -> dict[str, Any]:
    """A deep copy of the open_clip config of a released TinyCLIP architecture."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
