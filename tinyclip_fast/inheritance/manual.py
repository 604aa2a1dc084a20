"""Manual weight inheritance: initialise a smaller open_clip CLIP from a teacher's weights.

Student layer i takes teacher layer ``i * (teacher_depth // student_depth)`` ("every_k", the
TinyCLIP rule) or an evenly spread layer ("even"); every tensor keeps the first k entries of
each dimension, and attention keeps the first h heads of q, k and v with the head width
unchanged. ResNet towers match blocks per stage the same way and keep the first channels.
"""

from __future__ import annotations

import re
from typing import Any

import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from tinyclip_fast.inheritance.architecture import CompactResidualBlock, block_dims

LAYER_SELECTIONS = ("every_k", "even")
SUPPORTED = (
    "open_clip.model.CLIP with a VisionTransformer or ModifiedResNet vision tower and the "
    "built-in text transformer, default (non-custom) residual blocks or pruned students' "
    "CompactResidualBlock, no attentional pooler"
)


def select_layers(teacher_depth: int, student_depth: int, layer_selection: str) -> list[int]:
    """Teacher layer index for each student layer.

    every_k: i * (T // S) (TinyCLIP's rule); even: round(linspace(0, T - 1, S)) (keeps first, last).
    """
    if layer_selection not in LAYER_SELECTIONS:
        raise ValueError(
            f"layer_selection must be one of {LAYER_SELECTIONS}, got {layer_selection!r}"
        )
    if not 1 <= student_depth <= teacher_depth:
        raise ValueError(
            f"student depth {student_depth} must be between 1 and the teacher depth {teacher_depth}"
        )
    if layer_selection == "every_k":
        step = teacher_depth // student_depth
        return [i * step for i in range(student_depth)]
    if student_depth == 1:
        return [0]
    spread = torch.linspace(0, teacher_depth - 1, student_depth, dtype=torch.float64)
    return [int(v) for v in spread.round().tolist()]


def _tower_kind(model: nn.Module, role: str) -> str:
    if type(model) is not open_clip.model.CLIP:
        raise ValueError(f"unsupported {role} model {type(model).__name__}; supported: {SUPPORTED}")
    visual = model.visual
    if isinstance(visual, VisionTransformer):
        if visual.attn_pool is not None:
            raise ValueError(f"{role}: attentional pooler is unsupported; supported: {SUPPORTED}")
        kind = "vit"
    elif isinstance(visual, ModifiedResNet):
        kind = "resnet"
    else:
        raise ValueError(
            f"unsupported {role} vision tower {type(visual).__name__}; supported: {SUPPORTED}"
        )
    blocks = list(model.transformer.resblocks)
    if kind == "vit":
        blocks += list(visual.transformer.resblocks)
    for block in blocks:
        if type(block) not in (ResidualAttentionBlock, CompactResidualBlock):
            raise ValueError(
                f"{role}: unsupported block type {type(block).__name__}; supported: {SUPPORTED}"
            )
    return kind


def _check_heads(teacher_blocks: nn.ModuleList, student_blocks: nn.ModuleList, tower: str) -> None:
    t_hw = block_dims(teacher_blocks[0])["head_width"]
    s_hw = block_dims(student_blocks[0])["head_width"]
    if t_hw != s_hw:
        raise ValueError(
            f"{tower} head width differs: teacher {t_hw}, student {s_hw}; inheritance keeps the "
            f"head width and drops whole heads, so the student needs heads = width // {t_hw}"
        )


def _resnet_block_map(teacher: ModifiedResNet, student: ModifiedResNet, sel: str) -> dict:
    mapping = {}
    for stage in range(1, 5):
        t_depth = len(getattr(teacher, f"layer{stage}"))
        s_depth = len(getattr(student, f"layer{stage}"))
        if s_depth > t_depth:
            raise ValueError(
                f"student visual.layer{stage} has {s_depth} blocks, "
                f"more than the teacher's {t_depth}"
            )
        for i, t in enumerate(select_layers(t_depth, s_depth, sel)):
            mapping[f"visual.layer{stage}.{i}."] = f"visual.layer{stage}.{t}."
    return mapping


def _transformer_map(prefix: str, t_depth: int, s_depth: int, sel: str, tower: str) -> dict:
    if s_depth > t_depth:
        raise ValueError(f"student {tower} has {s_depth} layers, more than the teacher's {t_depth}")
    return {
        f"{prefix}{i}.": f"{prefix}{t}." for i, t in enumerate(select_layers(t_depth, s_depth, sel))
    }


_LAYER_PREFIX = re.compile(
    r"^(visual\.layer\d\.\d+\.|visual\.transformer\.resblocks\.\d+\.|transformer\.resblocks\.\d+\.)"
)


def _teacher_key(student_key: str, mapping: dict) -> str:
    match = _LAYER_PREFIX.match(student_key)
    if match is None:
        return student_key
    return mapping[match.group(1)] + student_key[match.end() :]


def _slice_first(
    name: str, teacher_t: torch.Tensor, student_shape: torch.Size, exact: tuple
) -> torch.Tensor:
    """teacher_t[:s0, :s1, ...]; dimensions listed in ``exact`` must match exactly."""
    if teacher_t.dim() != len(student_shape):
        raise ValueError(
            f"{name}: teacher tensor has shape {tuple(teacher_t.shape)}, "
            f"student {tuple(student_shape)}"
        )
    # A fixed dimension first: a larger patch is no "bigger student", it is another grid.
    for d, (t, s) in enumerate(zip(teacher_t.shape, student_shape, strict=True)):
        if d in exact and s != t:
            raise ValueError(
                f"{name}: dimension {d} must match the teacher ({t}), got {s}; patch size, image "
                "size and kernel sizes cannot be changed by inheritance"
            )
    for d, (t, s) in enumerate(zip(teacher_t.shape, student_shape, strict=True)):
        if s > t:
            raise ValueError(
                f"student is bigger than the teacher: {name} has shape {tuple(student_shape)}, "
                f"teacher {tuple(teacher_t.shape)} (dimension {d})"
            )
    return teacher_t[tuple(slice(0, s) for s in student_shape)]


def _inherit_tensor(name: str, teacher_t: torch.Tensor, student_t: torch.Tensor) -> torch.Tensor:
    if name.endswith("attn.in_proj_weight") or name.endswith("attn.in_proj_bias"):
        # q, k and v are stacked: keep the first heads (and input channels) of each block alike.
        t_blocks = teacher_t.unflatten(0, (3, -1))
        s_shape = student_t.unflatten(0, (3, -1)).shape
        return _slice_first(name, t_blocks, s_shape, exact=()).flatten(0, 1)
    if name.endswith("num_batches_tracked"):
        return teacher_t
    exact: tuple = ()
    if teacher_t.dim() == 4:
        exact = (2, 3)  # conv kernel sizes
    elif name in ("visual.positional_embedding", "visual.attnpool.positional_embedding"):
        exact = (0,)  # one row per image token: the token grid must not change
    return _slice_first(name, teacher_t, student_t.shape, exact)


@torch.no_grad()
def manual_inherit(
    teacher: nn.Module, student_config: dict[str, Any], *, layer_selection: str = "every_k"
) -> open_clip.model.CLIP:
    """Build ``open_clip.model.CLIP(**student_config)`` initialised from ``teacher``'s weights.

    Every student tensor is ``teacher_tensor[:k0, :k1, ...]`` of the matched teacher layer;
    attention in_proj keeps the first h heads of q, k and v alike.
    """
    if layer_selection not in LAYER_SELECTIONS:
        raise ValueError(
            f"layer_selection must be one of {LAYER_SELECTIONS}, got {layer_selection!r}"
        )
    if not isinstance(student_config, dict) or "vision_cfg" not in student_config:
        raise TypeError(
            "student_config must be an open_clip model config dict "
            "(embed_dim, vision_cfg, text_cfg)"
        )
    t_kind = _tower_kind(teacher, "teacher")
    student = open_clip.model.CLIP(**student_config)
    s_kind = _tower_kind(student, "student")
    if t_kind != s_kind:
        raise ValueError(f"vision tower type differs: teacher {t_kind}, student {s_kind}")

    mapping = _transformer_map(
        "transformer.resblocks.",
        len(teacher.transformer.resblocks),
        len(student.transformer.resblocks),
        layer_selection,
        "text transformer",
    )
    _check_heads(teacher.transformer.resblocks, student.transformer.resblocks, "text")
    if t_kind == "vit":
        t_blocks, s_blocks = (
            teacher.visual.transformer.resblocks,
            student.visual.transformer.resblocks,
        )
        mapping.update(
            _transformer_map(
                "visual.transformer.resblocks.",
                len(t_blocks),
                len(s_blocks),
                layer_selection,
                "vision transformer",
            )
        )
        _check_heads(t_blocks, s_blocks, "vision")
    else:
        mapping.update(_resnet_block_map(teacher.visual, student.visual, layer_selection))
        t_hw = teacher.visual.attnpool.q_proj.out_features // teacher.visual.attnpool.num_heads
        s_hw = student.visual.attnpool.q_proj.out_features // student.visual.attnpool.num_heads
        if t_hw != s_hw:
            raise ValueError(f"vision attnpool head width differs: teacher {t_hw}, student {s_hw}")

    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    for name, student_t in student_state.items():
        t_name = _teacher_key(name, mapping)
        if t_name not in teacher_state:
            raise ValueError(f"student tensor {name} has no teacher counterpart {t_name}")
        student_t.copy_(_inherit_tensor(name, teacher_state[t_name], student_t))
    return student
