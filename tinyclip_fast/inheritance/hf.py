"""Hugging Face ``transformers`` CLIPModel folders to and from open_clip CLIP models.

The released TinyCLIP students are ``CLIPModel`` folders (config.json, model.safetensors,
tokenizer and preprocessor files). :func:`load_hf_clip` turns such a folder into an open_clip
``CLIP`` (a teacher, or a stage's starting student, docs/method.md §2); :func:`save_hf_clip`
writes a student with uniform towers (manual inheritance, scratch) as one. transformers writes
and reads the config, the safetensors file, the tokenizer and the image processor; open_clip
builds the model; this module only renames parameters between the two layouts (the attention's
packed q/k/v projection is split or joined, the projections are transposed).

Students with per-layer head counts or MLP widths (automatic inheritance, docs/method.md §3b)
cannot be expressed by ``CLIPConfig``; they stay in the tinyclip_fast student folder
(:func:`tinyclip_fast.inheritance.student_io.save_student`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import get_model_preprocess_cfg, set_model_preprocess_cfg
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from open_clip.transform import PreprocessCfg, image_transform_v2
from safetensors import SafetensorError
from torch import nn

from tinyclip_fast.inheritance.architecture import student_config

try:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    from transformers import CLIPTokenizer as HFCLIPTokenizer
except ImportError as err:  # the optional extra is missing
    raise ImportError(
        "Hugging Face import/export needs transformers: pip install 'tinyclip-fast[hf]'"
    ) from err

# open_clip residual block -> transformers CLIPEncoderLayer (weight and bias each).
_BLOCK_NAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# open_clip tower modules -> transformers modules (weight and bias each).
_NORM_NAMES = {
    "visual.ln_pre": "vision_model.pre_layrnorm",
    "visual.ln_post": "vision_model.post_layernorm",
    "ln_final": "text_model.final_layer_norm",
}
# open_clip tensors -> transformers tensors; True where transformers holds the transpose.
_TENSOR_NAMES = {
    "visual.conv1.weight": ("vision_model.embeddings.patch_embedding.weight", False),
    "visual.class_embedding": ("vision_model.embeddings.class_embedding", False),
    "visual.positional_embedding": ("vision_model.embeddings.position_embedding.weight", False),
    "visual.proj": ("visual_projection.weight", True),
    "token_embedding.weight": ("text_model.embeddings.token_embedding.weight", False),
    "positional_embedding": ("text_model.embeddings.position_embedding.weight", False),
    "text_projection": ("text_projection.weight", True),
    "logit_scale": ("logit_scale", False),
}
_TOWERS = {  # open_clip residual blocks -> transformers encoder layers
    "visual.transformer.resblocks": "vision_model.encoder.layers",
    "transformer.resblocks": "text_model.encoder.layers",
}
_ACTIVATIONS = {True: "quick_gelu", False: "gelu"}  # open_clip quick_gelu -> hidden_act
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
_OTHER_FORMATS = "save it as a tinyclip_fast student folder (save_student / load_student)"


def _pairs(layers: dict[str, int]) -> list[tuple[str, str]]:
    """(open_clip name, transformers name) of every weight and bias except q/k/v."""
    modules = dict(_NORM_NAMES)
    for oc_tower, hf_tower in _TOWERS.items():
        for i in range(layers[oc_tower]):
            for oc, hf in _BLOCK_NAMES.items():
                modules[f"{oc_tower}.{i}.{oc}"] = f"{hf_tower}.{i}.{hf}"
    return [(f"{oc}.{p}", f"{hf}.{p}") for oc, hf in modules.items() for p in ("weight", "bias")]


def _to_hf_state(state: dict[str, torch.Tensor], layers: dict[str, int]) -> dict[str, Any]:
    hf_state = {hf: state[oc] for oc, hf in _pairs(layers)}
    for oc, (hf, transposed) in _TENSOR_NAMES.items():
        hf_state[hf] = state[oc].t() if transposed else state[oc]
    for oc_tower, hf_tower in _TOWERS.items():
        for i in range(layers[oc_tower]):
            for p in ("weight", "bias"):
                packed = state[f"{oc_tower}.{i}.attn.in_proj_{p}"]
                for part, tensor in zip("qkv", packed.chunk(3), strict=True):
                    hf_state[f"{hf_tower}.{i}.self_attn.{part}_proj.{p}"] = tensor
    return {k: v.detach().clone().contiguous() for k, v in hf_state.items()}


def _from_hf_state(hf_state: dict[str, torch.Tensor], layers: dict[str, int]) -> dict[str, Any]:
    state = {oc: hf_state[hf] for oc, hf in _pairs(layers)}
    for oc, (hf, transposed) in _TENSOR_NAMES.items():
        state[oc] = hf_state[hf].t() if transposed else hf_state[hf]
    for oc_tower, hf_tower in _TOWERS.items():
        for i in range(layers[oc_tower]):
            for p in ("weight", "bias"):
                parts = [hf_state[f"{hf_tower}.{i}.self_attn.{q}_proj.{p}"] for q in "qkv"]
                state[f"{oc_tower}.{i}.attn.in_proj_{p}"] = torch.cat(parts)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _text_tower(model: nn.Module) -> nn.Module:
    return nn.ModuleList([model.transformer, model.ln_final])


def _layer_norm_eps(module: nn.Module, tower: str) -> float:
    eps = {m.eps for m in module.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise ValueError(f"the {tower} tower mixes layer-norm eps {sorted(eps)}")
    return eps.pop()


def _refusal(config: dict[str, Any]) -> str | None:
    """Why CLIPConfig cannot express the student of ``config`` (student_config), or None."""
    model_cfg = config["model_cfg"]
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    if config["vision_layers"] is None:
        return f"a ModifiedResNet vision tower cannot be expressed by CLIPConfig; {_OTHER_FORMATS}"
    if not config["open_clip_compatible"]:
        return (
            "per-layer head counts or MLP widths (automatic inheritance) cannot be expressed by "
            f"transformers' CLIPConfig; {_OTHER_FORMATS}"
        )
    checks = {
        "layer scale": "ls_init_value" in vision or "ls_init_value" in text,
        "a vision tower without ln_pre": vision["no_ln_pre"],
        f"vision pooling {vision['pool_type']!r}": vision["pool_type"] != "tok",
        f"text pooling {text['pool_type']!r}": text["pool_type"] not in ("argmax", "eos"),
        "a text tower without causal mask": text["no_causal_mask"],
        "a text projection that is not one bias-free matrix": "proj_type" in text
        or "proj_bias" in text,
        "a learned logit bias (SigLIP)": "init_logit_bias" in model_cfg,
        "a per-dimension logit scale": model_cfg.get("nonscalar_logit_scale", False),
    }
    found = [name for name, present in checks.items() if present]
    if found:
        return f"transformers' CLIPModel has no {found[0]}; {_OTHER_FORMATS}"
    return None


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    """(start, end) token ids of an open_clip SimpleTokenizer or HFTokenizer."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.tokenizer.bos_token_id, tokenizer.tokenizer.eos_token_id
    return tokenizer.sot_token_id, tokenizer.eot_token_id


def _hf_config(model: nn.Module, config: dict[str, Any], tokenizer: Any) -> CLIPConfig:
    model_cfg = config["model_cfg"]
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    act = _ACTIVATIONS[model_cfg["quick_gelu"]]
    vision_config = {
        "hidden_size": vision["width"],
        "intermediate_size": config["vision_layers"][0]["mlp_width"],
        "num_hidden_layers": vision["layers"],
        "num_attention_heads": config["vision_layers"][0]["heads"],
        "image_size": vision["image_size"],
        "patch_size": vision["patch_size"],
        "hidden_act": act,
        "layer_norm_eps": _layer_norm_eps(model.visual, "vision"),
        "projection_dim": model_cfg["embed_dim"],
    }
    sot, eot = _special_ids(tokenizer)
    eos = text["eos_id"] if text["pool_type"] == "eos" else eot
    text_config = {
        "vocab_size": text["vocab_size"],
        "hidden_size": text["width"],
        "intermediate_size": config["text_layers"][0]["mlp_width"],
        "num_hidden_layers": text["layers"],
        "num_attention_heads": text["heads"],
        "max_position_embeddings": text["context_length"],
        "hidden_act": act,
        "layer_norm_eps": _layer_norm_eps(_text_tower(model), "text"),
        "projection_dim": model_cfg["embed_dim"],
        "bos_token_id": sot,
        "eos_token_id": eos,
        "pad_token_id": eot,
    }
    return CLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=model_cfg["embed_dim"],
        logit_scale_init_value=float(model.logit_scale.detach()),
    )


def _transformers_tokenizer(tokenizer: Any, context_length: int) -> Any:
    """A transformers tokenizer that gives the same ids as the open_clip ``tokenizer``."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.tokenizer
    if not isinstance(tokenizer, SimpleTokenizer):
        raise TypeError(
            f"tokenizer must be an open_clip SimpleTokenizer or HFTokenizer, got "
            f"{type(tokenizer).__name__}"
        )
    # open_clip spells the CLIP special tokens <start_of_text>, transformers <|startoftext|>.
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): index for token, index in tokenizer.encoder.items()}
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    return HFCLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


def _image_processor(model: nn.Module) -> CLIPImageProcessor:
    """open_clip's evaluation transform of ``model`` as a CLIPImageProcessor."""
    cfg = get_model_preprocess_cfg(model)
    size = cfg.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    resample = {"bicubic": 3, "bilinear": 2, "nearest": 0}[cfg.get("interpolation", "bicubic")]
    squash = cfg.get("resize_mode", "shortest") == "squash"
    return CLIPImageProcessor(
        size={"height": size, "width": size} if squash else {"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=not squash,
        resample=resample,
        image_mean=list(cfg.get("mean", OPENAI_DATASET_MEAN)),
        image_std=list(cfg.get("std", OPENAI_DATASET_STD)),
    )


def save_hf_clip(model: nn.Module, path: str | os.PathLike, tokenizer: Any | None = None) -> Path:
    """Write ``model`` (an open_clip CLIP with uniform ViT towers) as a transformers CLIPModel
    folder: config.json, model.safetensors, tokenizer and image-processor files.

    ``tokenizer`` is the student's open_clip tokenizer (default: open_clip's CLIP BPE with
    the model's context length). Raises ValueError, in one line, for students CLIPConfig
    cannot express (per-layer widths, ResNet towers, layer scale, SigLIP's logit bias...).
    """
    config = student_config(model)
    reason = _refusal(config)
    if reason is not None:
        raise ValueError(f"cannot export to Hugging Face CLIPModel: {reason}")
    if tokenizer is None:
        tokenizer = SimpleTokenizer(context_length=model.context_length)
    ids_tokenizer = _transformers_tokenizer(tokenizer, model.context_length)
    if len(ids_tokenizer) != model.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(ids_tokenizer)} tokens, the model's vocabulary "
            f"{model.vocab_size}: pass the student's own tokenizer"
        )
    hf_model = CLIPModel(_hf_config(model, config, tokenizer))
    layers = {
        "visual.transformer.resblocks": len(model.visual.transformer.resblocks),
        "transformer.resblocks": len(model.transformer.resblocks),
    }
    state = {k: v.float() for k, v in model.state_dict().items()}
    hf_model.load_state_dict(_to_hf_state(state, layers), strict=True)
    directory = Path(path)
    hf_model.save_pretrained(directory, safe_serialization=True)
    processor = CLIPProcessor(
        image_processor=_image_processor(model),
        tokenizer=ids_tokenizer,
    )
    processor.save_pretrained(directory)
    return directory


def _read_hf_config(directory: Path) -> CLIPConfig:
    if not directory.is_dir():
        raise FileNotFoundError(f"Hugging Face model folder {directory} does not exist")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a transformers model folder: no config.json")
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
        config = CLIPConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"corrupt transformers config {config_path}: {err}") from err
    if model_type != "clip":
        raise ValueError(f"{config_path} holds model_type {model_type!r}, not a CLIPModel ('clip')")
    return config


def _open_clip_cfg(config: CLIPConfig) -> dict[str, Any]:
    vision, text = config.vision_config, config.text_config
    if vision.hidden_act != text.hidden_act or vision.hidden_act not in _ACTIVATIONS.values():
        raise ValueError(
            f"activations {vision.hidden_act!r}/{text.hidden_act!r}: open_clip CLIP needs "
            "'quick_gelu' or 'gelu' in both towers"
        )
    ratios = {}
    for name, tower in (("vision", vision), ("text", text)):
        ratio = tower.intermediate_size / tower.hidden_size
        if int(tower.hidden_size * ratio) != tower.intermediate_size:
            raise ValueError(f"{name} MLP width {tower.intermediate_size} is not representable")
        ratios[name] = ratio
    # transformers pools the first eos token (the largest id in the CLIP vocabulary, or the
    # legacy eos id 2 that means argmax): open_clip's argmax pooling finds the same token.
    argmax = text.eos_token_id in (2, text.vocab_size - 1)
    return {
        "embed_dim": config.projection_dim,
        "quick_gelu": vision.hidden_act == "quick_gelu",
        "vision_cfg": {
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "width": vision.hidden_size,
            "layers": vision.num_hidden_layers,
            "head_width": vision.hidden_size // vision.num_attention_heads,
            "mlp_ratio": ratios["vision"],
        },
        "text_cfg": {
            "context_length": text.max_position_embeddings,
            "vocab_size": text.vocab_size,
            "width": text.hidden_size,
            "heads": text.num_attention_heads,
            "layers": text.num_hidden_layers,
            "mlp_ratio": ratios["text"],
            "pool_type": "argmax" if argmax else "eos",
            "eos_id": text.eos_token_id,
        },
    }


def _preprocess_cfg(directory: Path, image_size: int) -> dict[str, Any]:
    """open_clip preprocess config from the folder's image processor (CLIP's if absent)."""
    cfg: dict[str, Any] = {"size": image_size, "mean": OPENAI_DATASET_MEAN}
    cfg.update(std=OPENAI_DATASET_STD, interpolation="bicubic", resize_mode="shortest")
    try:
        processor = CLIPImageProcessor.from_pretrained(directory)
    except OSError:  # no processor_config.json / preprocessor_config.json
        return cfg
    cfg.update(mean=tuple(processor.image_mean), std=tuple(processor.image_std))
    names = {0: "nearest", 2: "bilinear", 3: "bicubic"}
    cfg["interpolation"] = names.get(int(processor.resample), "bicubic")
    if not processor.do_center_crop:
        cfg["resize_mode"] = "squash"
    return cfg


def load_hf_clip(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> open_clip.model.CLIP:
    """An open_clip CLIP (fp32, on ``map_location``) with the weights of the transformers
    CLIPModel folder ``path``; its preprocess config (open_clip.get_model_preprocess_cfg)
    comes from the folder's image processor."""
    directory = Path(path)
    config = _read_hf_config(directory)
    model_cfg = _open_clip_cfg(config)
    try:
        hf_model, info = CLIPModel.from_pretrained(
            directory, config=config, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"cannot read the CLIPModel weights in {directory}: {err}") from err
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v} | (
        {"errors": info["error_msgs"]} if info.get("error_msgs") else {}
    )
    if problems:
        raise ValueError(
            f"the CLIPModel weights in {directory} do not match config.json: {problems}"
        )
    model = open_clip.model.CLIP(**model_cfg)
    for tower, module in (
        (config.vision_config, model.visual),
        (config.text_config, _text_tower(model)),
    ):
        for norm in module.modules():
            if isinstance(norm, nn.LayerNorm):
                norm.eps = tower.layer_norm_eps
    layers = {
        "visual.transformer.resblocks": config.vision_config.num_hidden_layers,
        "transformer.resblocks": config.text_config.num_hidden_layers,
    }
    hf_state = {k: v.float() for k, v in hf_model.state_dict().items()}
    model.load_state_dict(_from_hf_state(hf_state, layers), strict=True)
    set_model_preprocess_cfg(model, _preprocess_cfg(directory, config.vision_config.image_size))
    return model.to(map_location)


def hf_tokenizer(path: str | os.PathLike, context_length: int) -> HFTokenizer | SimpleTokenizer:
    """The folder's tokenizer as an open_clip tokenizer (ids [n, context_length]); open_clip's
    CLIP BPE, the released CLIP vocabulary, when the folder holds none."""
    directory = Path(path)
    if any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return HFTokenizer(str(directory), context_length=context_length)
    return SimpleTokenizer(context_length=context_length)


def load_hf_teacher(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[open_clip.model.CLIP, Callable, Callable, Callable]:
    """(model, tokenizer, train preprocess, eval preprocess) of a CLIPModel folder, as
    open_clip.create_model_and_transforms and get_tokenizer give them for a named model."""
    model = load_hf_clip(path, map_location)
    cfg = PreprocessCfg(**get_model_preprocess_cfg(model))
    tokenizer = hf_tokenizer(path, model.context_length)
    return model, tokenizer, image_transform_v2(cfg, is_train=True), image_transform_v2(cfg, False)
