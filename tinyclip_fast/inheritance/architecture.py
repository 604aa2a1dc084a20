"""A student's architecture as JSON, and back: :func:`student_config` describes an open_clip
CLIP (``model_cfg`` plus the heads and MLP width of every layer of each tower) and
:func:`build_student` builds the model of such a description. Pruned students have a different
head count and MLP width in every layer: their residual blocks are
:class:`CompactResidualBlock`, whose parameter names are open_clip's, so students whose layers
are uniform (manual inheritance) are plain open_clip models.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import (
    LayerNorm,
    LayerScale,
    PatchDropout,
    QuickGELU,
    ResidualAttentionBlock,
    VisionTransformer,
)
from torch import nn

FORMAT = "tinyclip_fast.student/1"


class CompactAttention(nn.Module):
    """Multi-head self-attention whose inner width heads * head_width may differ from width.

    Parameter names match nn.MultiheadAttention's, so uniform students load into open_clip.
    """

    def __init__(self, width: int, heads: int, head_width: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.head_width = head_width
        inner = heads * head_width
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            self.out_proj = nn.Linear(inner, width)
            nn.init.normal_(self.in_proj_weight, std=width**-0.5)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_heads == 0:
            # Every head was pruned: only the output bias remains.
            return self.out_proj.bias.expand_as(x)
        batch, tokens, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, tokens, 3, self.num_heads, self.head_width).permute(2, 0, 3, 1, 4)
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(context.transpose(1, 2).reshape(batch, tokens, -1))


class CompactResidualBlock(nn.Module):
    """open_clip's pre-norm residual block with its own head count and MLP width."""

    def __init__(
        self,
        width: int,
        heads: int,
        head_width: int,
        mlp_width: int,
        act_layer: type[nn.Module] = nn.GELU,
        layer_scale: bool = False,
    ) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = CompactAttention(width, heads, head_width)
        self.ls_1 = LayerScale(width, 1.0) if layer_scale else nn.Identity()
        self.ln_2 = LayerNorm(width)
        with warnings.catch_warnings():
            # A fully pruned MLP has zero width; initialising its empty weights is a no-op.
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            self.mlp = nn.Sequential()
            self.mlp.add_module("c_fc", nn.Linear(width, mlp_width))
            self.mlp.add_module("gelu", act_layer())
            self.mlp.add_module("c_proj", nn.Linear(mlp_width, width))
        self.ls_2 = LayerScale(width, 1.0) if layer_scale else nn.Identity()

    def get_weight_dtype(self) -> torch.dtype:
        return self.mlp.c_proj.weight.dtype

    def forward(
        self,
        q_x: torch.Tensor,
        k_x: torch.Tensor | None = None,
        v_x: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # k_x / v_x exist only for open_clip's call signature (checkpointing); self-attention only.
        x = q_x + self.ls_1(self.attn(self.ln_1(q_x), attn_mask=attn_mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


def _square(size: Any) -> Any:
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return size[0] if size[0] == size[1] else list(size)


def block_dims(block: nn.Module) -> dict[str, int]:
    """heads, head_width and mlp_width of an open_clip or compact residual block."""
    if isinstance(block, ResidualAttentionBlock):
        heads = block.attn.num_heads
        head_width = block.attn.embed_dim // heads
    elif isinstance(block, CompactResidualBlock):
        heads, head_width = block.attn.num_heads, block.attn.head_width
    else:
        raise ValueError(f"unsupported residual block {type(block).__name__}")
    return {"heads": heads, "head_width": head_width, "mlp_width": block.mlp.c_fc.out_features}


def _uniform_mlp_ratio(width: int, mlp_widths: list[int]) -> float | None:
    """mlp_ratio that open_clip turns back into exactly these MLP widths, or None."""
    if len(set(mlp_widths)) != 1:
        return None
    ratio = mlp_widths[0] / width
    return ratio if int(width * ratio) == mlp_widths[0] else None


def _tower_layers(blocks: nn.ModuleList) -> list[dict[str, int]]:
    return [block_dims(block) for block in blocks]


def _is_uniform(width: int, layers: list[dict[str, int]]) -> bool:
    """True when open_clip's own blocks can hold these layers (same sizes, inner width = width)."""
    ratio = _uniform_mlp_ratio(width, [d["mlp_width"] for d in layers])
    full_heads = all(d["heads"] * d["head_width"] == width for d in layers)
    return ratio is not None and full_heads and len({d["heads"] for d in layers}) == 1


def _layer_scale(blocks: nn.ModuleList) -> bool:
    return len(blocks) > 0 and isinstance(blocks[0].ls_1, LayerScale)


def _check_clip(model: nn.Module) -> None:
    if type(model) is not open_clip.model.CLIP:
        raise TypeError(
            f"model must be an open_clip.model.CLIP (ViT or ModifiedResNet vision tower), "
            f"got {type(model).__name__}"
        )
    if not isinstance(model.visual, (VisionTransformer, ModifiedResNet)):
        raise TypeError(f"unsupported vision tower {type(model.visual).__name__}")
    if isinstance(model.visual, VisionTransformer) and model.visual.attn_pool is not None:
        raise ValueError("vision towers with an attentional pooler are not supported")


def student_config(model: nn.Module) -> dict[str, Any]:
    """The JSON config of ``model``: open_clip ``model_cfg`` plus per-layer dimensions."""
    _check_clip(model)
    visual = model.visual
    text_blocks = model.transformer.resblocks
    text_width = model.token_embedding.embedding_dim
    text_layers = _tower_layers(text_blocks)
    if not text_layers:
        raise ValueError("text transformer has no layers")
    text_cfg: dict[str, Any] = {
        "context_length": model.context_length,
        "vocab_size": model.vocab_size,
        "width": text_width,
        "heads": text_layers[0]["heads"],
        "layers": len(text_blocks),
        "mlp_ratio": _uniform_mlp_ratio(text_width, [d["mlp_width"] for d in text_layers]) or 4.0,
        "no_causal_mask": model.attn_mask is None,
        "pool_type": model.text_pool_type,
        "eos_id": model.text_eos_id,
    }
    if model.text_projection is None:
        text_cfg["proj_type"] = "none"
    elif isinstance(model.text_projection, nn.Linear):
        text_cfg["proj_bias"] = True
    if _layer_scale(text_blocks):
        text_cfg["ls_init_value"] = 1.0  # the value is overwritten by the saved weights
    act = text_blocks[0].mlp.gelu

    config: dict[str, Any] = {
        "format": FORMAT,
        "text_layers": [{"heads": d["heads"], "mlp_width": d["mlp_width"]} for d in text_layers],
        "text_head_width": text_layers[0]["head_width"],
        "text_width": text_width,
    }
    # Compact blocks use open_clip's parameter names, so uniform ones load into open_clip too.
    uniform = _is_uniform(text_width, text_layers)
    if isinstance(visual, VisionTransformer):
        blocks = visual.transformer.resblocks
        width = visual.conv1.out_channels
        layers = _tower_layers(blocks)
        if not layers:
            raise ValueError("vision transformer has no layers")
        head_width = layers[0]["head_width"]
        vision_cfg: dict[str, Any] = {
            "image_size": _square(visual.image_size),
            "patch_size": _square(visual.patch_size),
            "width": width,
            "layers": len(blocks),
            "head_width": head_width,
            "mlp_ratio": _uniform_mlp_ratio(width, [d["mlp_width"] for d in layers]) or 4.0,
            "no_ln_pre": isinstance(visual.ln_pre, nn.Identity),
            "pool_type": visual.pool_type,
            "final_ln_after_pool": visual.final_ln_after_pool,
            "output_tokens": visual.output_tokens,
        }
        if not visual.positional_embedding.requires_grad:
            vision_cfg["pos_embed_type"] = "sin_cos_2d"
        if isinstance(visual.patch_dropout, PatchDropout):
            vision_cfg["patch_dropout"] = visual.patch_dropout.prob
        if _layer_scale(blocks):
            vision_cfg["ls_init_value"] = 1.0
        embed_dim = visual.output_dim
        config["vision_layers"] = [
            {"heads": d["heads"], "mlp_width": d["mlp_width"]} for d in layers
        ]
        config["vision_head_width"] = head_width
        config["vision_width"] = width
        uniform = uniform and _is_uniform(width, layers)
    else:
        width = visual.conv3.out_channels
        vision_cfg = {
            "image_size": visual.image_size,
            "layers": [len(getattr(visual, f"layer{i}")) for i in range(1, 5)],
            "width": width,
            "head_width": width * 32 // visual.attnpool.num_heads,
        }
        embed_dim = visual.output_dim
        config["vision_layers"] = None
    model_cfg: dict[str, Any] = {
        "embed_dim": embed_dim,
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
        "quick_gelu": isinstance(act, QuickGELU),
    }
    if model.logit_scale.dim() > 0:
        model_cfg["nonscalar_logit_scale"] = True
    if model.logit_bias is not None:
        model_cfg["init_logit_bias"] = 0.0  # overwritten by the saved weights
    config["model_cfg"] = model_cfg
    config["open_clip_compatible"] = uniform
    config["output_dict"] = bool(model.output_dict)
    return config


def _compact_blocks(
    width: int, layers: list[dict[str, int]], head_width: int, act: type[nn.Module], ls: bool
) -> nn.ModuleList:
    return nn.ModuleList(
        CompactResidualBlock(width, d["heads"], head_width, d["mlp_width"], act, ls) for d in layers
    )


def build_student(config: dict[str, Any]) -> open_clip.model.CLIP:
    """An open_clip CLIP with the architecture of ``config`` (from :func:`student_config`).

    Uniform students are plain open_clip models; otherwise the residual blocks are replaced by
    :class:`CompactResidualBlock` with the per-layer head counts and MLP widths.
    """
    model_cfg = copy.deepcopy(config["model_cfg"])
    if config.get("open_clip_compatible", False):
        model = open_clip.model.CLIP(**model_cfg, output_dict=config.get("output_dict", False))
        return model
    # Build the towers with one throwaway single-head block (open_clip's blocks need the
    # inner width to equal the width), then insert the variable-width blocks.
    model_cfg["text_cfg"].update(layers=1, heads=1, mlp_ratio=1.0)
    vision_layers = config.get("vision_layers")
    if vision_layers is not None:
        width = model_cfg["vision_cfg"]["width"]
        model_cfg["vision_cfg"].update(layers=1, head_width=width, mlp_ratio=1.0)
    model = open_clip.model.CLIP(**model_cfg, output_dict=config.get("output_dict", False))
    act = QuickGELU if model_cfg.get("quick_gelu", False) else nn.GELU
    text_ls = model_cfg["text_cfg"].get("ls_init_value") is not None
    model.transformer.resblocks = _compact_blocks(
        config["text_width"], config["text_layers"], config["text_head_width"], act, text_ls
    )
    model.transformer.layers = len(config["text_layers"])
    if vision_layers is not None:
        vision_ls = model_cfg["vision_cfg"].get("ls_init_value") is not None
        model.visual.transformer.resblocks = _compact_blocks(
            config["vision_width"], vision_layers, config["vision_head_width"], act, vision_ls
        )
        model.visual.transformer.layers = len(vision_layers)
    return model
