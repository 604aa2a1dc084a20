"""Automatic weight inheritance: an open_clip CLIP under learned structured masks.

The masks of docs/method.md §3b.

Each tower (ViT image tower, text transformer) gets three hard-concrete masks: a hidden mask
z_h [width] shared by every layer, a head mask z_head [layers, heads] and an intermediate
mask z_int [layers, mlp_width]. They enter the forward pass as

    x0 = embeddings * z_h
    LN_z(x) = LN over the channels with z_h != 0, 0 elsewhere (no scaling by z_h)
    attn = out_proj(concat_h softmax(q_h k_h^T / sqrt(d)) v_h * z_head[l, h]) * z_h
    mlp = c_proj(GELU(c_fc(x)) * z_int[l]) * z_h
    features = LN_z(x) * z_h @ proj

Without the hidden mask (``mask_hidden=False``) z_h = 1: every tower keeps its width and
only heads and MLP channels are pruned (the recipe for short mask phases,
docs/pruning-and-inheritance.md). Every forward runs the masks as the compact model of the
kept size (docs/method.md §8, ``compact.py``): the mask sample is folded into gathered
weights, so a masked step costs about what the pruned model's step costs.
:meth:`MaskedCLIP.prune` is the same fold with the deterministic masks, kept: a compact
open_clip CLIP with a different head count and MLP width in every layer.
"""

from __future__ import annotations

import copy
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from tinyclip_fast.inheritance.architecture import (
    CompactResidualBlock,
    block_dims,
    build_student,
    student_config,
)
from tinyclip_fast.pruning.compact import (
    TowerCut,
    cut_tower,
    cut_towers,
    encode_image,
    encode_text,
    fold_text,
    fold_visual,
)
from tinyclip_fast.pruning.hard_concrete import HardConcreteMask
from tinyclip_fast.pruning.sparsity import (
    TowerMaskProbs,
    expected_remaining_params,
    expected_sparsity,
)

# Padding entries of the masks of pruned students (rows longer than a layer): always exactly 0.
PAD_LOG_ALPHA = -30.0


class TowerMasks(nn.Module):
    """The hidden, head and intermediate hard-concrete masks of one transformer tower.

    Without ``mask_hidden`` there is no hidden mask: z_h = 1 and p_h = 1 (not learned).

    A pruned student has its own head count and MLP width per layer: the masks are
    [layers, max heads] / [layers, max MLP width] and the entries past a layer's size are
    padding, held at exactly 0 (log_alpha PAD_LOG_ALPHA, zero probability, never sampled).
    """

    def __init__(
        self,
        width: int,
        head_width: int,
        layer_heads: list[int],
        layer_mlp: list[int],
        init_log_alpha: float,
        mask_hidden: bool = True,
    ) -> None:
        super().__init__()
        self.width, self.head_width = width, head_width
        self.layer_heads, self.layer_mlp = list(layer_heads), list(layer_mlp)
        self.heads, self.mlp_width = max(max(layer_heads), 1), max(max(layer_mlp), 1)
        layers = len(layer_heads)
        self.hidden = None
        if mask_hidden:
            self.hidden = HardConcreteMask((width,), init_log_alpha=init_log_alpha)
        self.register_buffer("hidden_ones", torch.ones(width), persistent=False)
        self.head = HardConcreteMask((layers, self.heads), init_log_alpha=init_log_alpha)
        self.intermediate = HardConcreteMask(
            (layers, self.mlp_width), init_log_alpha=init_log_alpha
        )
        head_valid = torch.arange(self.heads) < torch.tensor(layer_heads)[:, None]
        int_valid = torch.arange(self.mlp_width) < torch.tensor(layer_mlp)[:, None]
        self.register_buffer("head_valid", head_valid, persistent=False)
        self.register_buffer("int_valid", int_valid, persistent=False)
        self.padded = not bool(head_valid.all() and int_valid.all())
        self.repad()

    @torch.no_grad()
    def repad(self) -> None:
        """Put the padding entries back to PAD_LOG_ALPHA (after a clamp)."""
        if self.padded:
            self.head.log_alpha.masked_fill_(~self.head_valid, PAD_LOG_ALPHA)
            self.intermediate.log_alpha.masked_fill_(~self.int_valid, PAD_LOG_ALPHA)

    def forward(
        self, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_h [width], z_head [layers, heads], z_int [layers, mlp_width]); train mode samples
        (from ``generator`` when given, else the global RNG)."""
        z_head, z_int = self.head(generator), self.intermediate(generator)
        if self.padded:
            z_head = z_head.masked_fill(~self.head_valid, 0.0)
            z_int = z_int.masked_fill(~self.int_valid, 0.0)
        return self._z_hidden(generator), z_head, z_int

    def _z_hidden(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.hidden_ones if self.hidden is None else self.hidden(generator)

    def masks(self) -> list[HardConcreteMask]:
        """The learned masks: (hidden,) head and intermediate."""
        return [m for m in (self.hidden, self.head, self.intermediate) if m is not None]

    def probs(self, full: bool = False) -> TowerMaskProbs:
        """Non-zero probabilities (all ones on the real entries with ``full``) for sparsity.py.

        sparsity.py charges (4 w^2 + 4 w) / (H w) per (hidden channel, head) pair, which is
        4 hd (w + 1) / w for an inner attention width H hd = w. Pruned students' inner width
        differs from w, so p_head is rescaled by H hd / w to keep that per-pair cost.
        """
        if full or self.hidden is None:
            p_h = self.hidden_ones
        else:
            p_h = self.hidden.prob_nonzero()
        if full:
            p_head = self.head_valid.to(p_h.dtype)
            p_int = self.int_valid.to(p_h.dtype)
        else:
            p_head = self.head.prob_nonzero() * self.head_valid
            p_int = self.intermediate.prob_nonzero() * self.int_valid
        inner_ratio = self.heads * self.head_width / self.width
        if inner_ratio != 1:
            p_head = p_head * inner_ratio
        return TowerMaskProbs(
            p_h=p_h, p_head=p_head, p_int=p_int, width=self.width, heads=self.heads
        )

    def cut(self, z_h: torch.Tensor, z_head: torch.Tensor, z_int: torch.Tensor) -> TowerCut:
        """What masks (z_h, z_head, z_int) of this tower keep (one host sync)."""
        return cut_tower(*self.cut_args(z_h, z_head, z_int))

    def cut_args(self, z_h: torch.Tensor, z_head: torch.Tensor, z_int: torch.Tensor) -> tuple:
        """The arguments of ``cut_tower`` / one entry of ``cut_towers`` for these masks."""
        return z_h, z_head, z_int, self.layer_heads, self.layer_mlp, self.head_width


def _tower_masks(
    blocks: nn.ModuleList, width: int, tower: str, init_log_alpha: float, mask_hidden: bool
) -> TowerMasks:
    """The masks of a tower of open_clip blocks or a pruned student's compact blocks."""
    if len(blocks) == 0:
        raise ValueError(f"MaskedCLIP: the {tower} transformer has no layers")
    for block in blocks:
        if type(block) not in (ResidualAttentionBlock, CompactResidualBlock):
            raise ValueError(
                f"MaskedCLIP: unsupported {tower} block {type(block).__name__}; only open_clip's "
                "default ResidualAttentionBlock (no qk-norm / scaled cosine attention) and "
                "pruned students' CompactResidualBlock are supported"
            )
        if isinstance(block, ResidualAttentionBlock) and not block.attn.batch_first:
            raise ValueError(f"MaskedCLIP: {tower} attention must be batch_first")
    dims = [block_dims(block) for block in blocks]
    head_widths = {d["head_width"] for d in dims}
    if len(head_widths) != 1:
        raise ValueError(f"MaskedCLIP: {tower} layers differ in head width: {sorted(head_widths)}")
    return TowerMasks(
        width,
        head_widths.pop(),
        [d["heads"] for d in dims],
        [d["mlp_width"] for d in dims],
        init_log_alpha,
        mask_hidden,
    )


class MaskedCLIP(nn.Module):
    """An open_clip CLIP (ViT image tower, text transformer) with learnable structured masks.

    ``forward(image, text)`` returns what the wrapped CLIP returns; masks are sampled once per
    forward in train mode and deterministic in eval mode. The wrapped model's weights are
    shared, not copied; the mask parameters are ``*.log_alpha`` (see :meth:`mask_parameters`).
    ``mask_hidden=False``: no hidden-width masks (z_h = 1), heads and MLP channels only.
    """

    def __init__(
        self, model: nn.Module, init_log_alpha: float = 10.0, mask_hidden: bool = True
    ) -> None:
        super().__init__()
        if type(model) is not open_clip.model.CLIP:
            raise TypeError(
                f"MaskedCLIP needs an open_clip.model.CLIP with a ViT image tower and the "
                f"built-in text transformer, got {type(model).__name__}"
            )
        visual = model.visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"MaskedCLIP supports ViT image towers only, got {type(visual).__name__} "
                "(ResNet towers: use manual_inherit)"
            )
        if visual.attn_pool is not None:
            raise ValueError("MaskedCLIP does not support the attentional pooler")
        if visual.output_tokens:
            raise ValueError("MaskedCLIP does not support output_tokens=True")
        self.model, self.mask_hidden = model, mask_hidden
        self.visual_masks = _tower_masks(
            visual.transformer.resblocks,
            visual.conv1.out_channels,
            "vision",
            init_log_alpha,
            mask_hidden,
        )
        self.text_masks = _tower_masks(
            model.transformer.resblocks,
            model.token_embedding.embedding_dim,
            "text",
            init_log_alpha,
            mask_hidden,
        )
        self.mask_seed: int | None = None

    def fix_mask_sample(self, seed: int | None) -> None:
        """Draw train-mode masks from generators seeded with ``seed`` (None: the global RNG,
        a fresh sample every forward). With one seed per step, every forward of that step
        (micro-batches, GradCache's second pass, every DDP rank) uses the same masks, as one
        forward over the whole batch would: accumulation and DDP stay exact."""
        self.mask_seed = seed

    @torch.compiler.disable  # the seed changes every step: no recompile per step under compile
    def _mask_generator(self, tower: int) -> torch.Generator | None:
        if self.mask_seed is None or not self.training:
            return None
        generator = torch.Generator(device=self.model.logit_scale.device)
        return generator.manual_seed((self.mask_seed * 2 + tower) % (2**63))

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        return self.model.logit_bias

    @property
    def output_dict(self) -> bool:
        return self.model.output_dict

    def mask_parameters(self) -> list[nn.Parameter]:
        """The log_alpha parameters of all masks (their own optimizer group, no weight decay)."""
        return [p for name, p in self.named_parameters() if name.endswith("log_alpha")]

    @torch.no_grad()
    def clamp_masks(self) -> None:
        """Clamp every log_alpha to its allowed range (call after each optimizer step)."""
        for tower in (self.visual_masks, self.text_masks):
            for mask in tower.masks():
                mask.clamp_()
            tower.repad()

    def mask_probs(self, full: bool = False) -> list[TowerMaskProbs]:
        """Non-zero probabilities of the image and text towers' masks (see TowerMasks.probs)."""
        return [self.visual_masks.probs(full), self.text_masks.probs(full)]

    def full_prunable_params(self) -> int:
        """Prunable parameters with nothing pruned (exact for pruned students' variable layers)."""
        return round(float(expected_remaining_params(self.mask_probs(full=True))))

    def expected_remaining_params(self) -> torch.Tensor:
        """Expected number of prunable parameters left, both towers together."""
        return expected_remaining_params(self.mask_probs())

    def expected_sparsity(self) -> torch.Tensor:
        """1 - expected remaining / total prunable parameters, jointly over both towers."""
        if not (self.visual_masks.padded or self.text_masks.padded):
            return expected_sparsity(self.mask_probs())
        # sparsity.py counts the total from the mask shapes, which padding inflates.
        return 1 - self.expected_remaining_params() / self.full_prunable_params()

    def _tower_cuts(self, towers: list[int]) -> list[TowerCut]:
        """The cuts of freshly drawn masks of ``towers`` (0: vision, 1: text), one sync."""
        masks = [(self.visual_masks, self.text_masks)[index] for index in towers]
        cuts = cut_towers(
            [
                tower.cut_args(*tower(self._mask_generator(i)))
                for tower, i in zip(masks, towers, strict=True)
            ]
        )
        for cut, index in zip(cuts, towers, strict=True):
            if cut.width == 0:
                name = ("vision", "text")[index]
                raise ValueError(
                    f"MaskedCLIP: every hidden channel of the {name} tower is masked out"
                )
        return cuts

    def _encode_image(self, image: torch.Tensor, cut: TowerCut, normalize: bool) -> torch.Tensor:
        visual = self.model.visual
        pooled = encode_image(visual, fold_visual(visual, cut), cut, image)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def _encode_text(self, text: torch.Tensor, cut: TowerCut, normalize: bool) -> torch.Tensor:
        pooled = encode_text(self.model, fold_text(self.model, cut, False), cut, text)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self._encode_image(image, self._tower_cuts([0])[0], normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self._encode_text(text, self._tower_cuts([1])[0], normalize)

    def forward(
        self, image: torch.Tensor | None = None, text: torch.Tensor | None = None
    ) -> dict[str, Any] | tuple:
        # Both towers' masks are read on the host together: one sync per forward.
        towers = [i for i, given in enumerate((image, text)) if given is not None]
        cuts = dict(zip(towers, self._tower_cuts(towers), strict=True))
        image_features = self._encode_image(image, cuts[0], True) if image is not None else None
        text_features = self._encode_text(text, cuts[1], True) if text is not None else None
        scale = self.model.logit_scale.exp()
        if self.model.output_dict:
            out = {
                "image_features": image_features,
                "text_features": text_features,
                "logit_scale": scale,
            }
            if self.model.logit_bias is not None:
                out["logit_bias"] = self.model.logit_bias
            return out
        if self.model.logit_bias is not None:
            return image_features, text_features, scale, self.model.logit_bias
        return image_features, text_features, scale

    @torch.no_grad()
    def prune(self) -> open_clip.model.CLIP:
        """Compact open_clip CLIP whose eval outputs equal this model's eval outputs.

        The forward's fold (``compact.py``) with the deterministic masks, made permanent:
        channels, heads and hidden dims with mask 0 are dropped, the remaining soft mask
        values are folded into the weights.
        """
        source = self.model
        config, folded = self._cut(source)
        compact = build_student(config).to(device=source.logit_scale.device)
        compact.to(dtype=source.visual.conv1.weight.dtype)
        target = compact.state_dict()
        if folded.keys() != target.keys():
            missing, extra = target.keys() - folded.keys(), folded.keys() - target.keys()
            raise RuntimeError(
                f"prune: folded weights missing {sorted(missing)}, extra {sorted(extra)}"
            )
        for name, value in folded.items():
            target[name].copy_(value)
        compact.train(self.training)
        return compact

    @torch.no_grad()
    def prune_like_weights(
        self, tensors: dict[str, torch.Tensor], mask_power: int = 0
    ) -> dict[str, torch.Tensor]:
        """Cut per-parameter tensors (e.g. AdamW moments) the way :meth:`prune` cuts weights.

        ``tensors`` are keyed by the wrapped model's parameter names and shaped like those
        parameters; missing names count as zeros. The result is keyed by the pruned model's
        parameter names and keeps the same channels and heads; where :meth:`prune` multiplies
        a weight by soft mask values z, the tensor is multiplied by z ** ``mask_power``
        instead: 0 only selects, -1 maps gradients and AdamW's first moment (a folded weight
        z * w has gradient g / z), -2 the second moment. Used to carry the optimizer state
        across pruning, so training goes on instead of starting over.
        """
        shadow = copy.deepcopy(self.model)
        for name, param in shadow.named_parameters():
            value = tensors.get(name)
            param.copy_(value if value is not None else torch.zeros_like(param))
        _, cut = self._cut(shadow, mask_power)
        return {name: value.detach().clone() for name, value in cut.items()}

    def _cut(self, source: nn.Module, mask_power: int = 1) -> tuple[dict[str, Any], dict]:
        """(student_io config of the pruned model, its state by name) cut out of ``source``,
        a model shaped like the wrapped one, the soft mask values entering as z ** mask_power
        (1: weights folded as by :meth:`prune`; zeros stay zeros, they decide the cut)."""
        cuts = []
        for tower, name in ((self.visual_masks, "vision"), (self.text_masks, "text")):
            masks = _deterministic(tower)
            if mask_power != 1:
                masks = tuple(_mask_pow(z, mask_power) for z in masks)
            cut = tower.cut(*masks)
            if cut.width == 0:
                raise ValueError(
                    f"cannot prune: every hidden channel of the {name} tower is masked out"
                )
            cuts.append(cut)
        v_cut, t_cut = cuts
        config = student_config(self.model)
        config["vision_width"] = config["model_cfg"]["vision_cfg"]["width"] = v_cut.width
        config["text_width"] = config["model_cfg"]["text_cfg"]["width"] = t_cut.width
        config["vision_layers"] = _layer_dims(v_cut)
        config["text_layers"] = _layer_dims(t_cut)
        config["open_clip_compatible"] = False
        state = {
            **{"visual." + k: v for k, v in fold_visual(source.visual, v_cut).items()},
            **fold_text(source, t_cut, with_token_table=True),
            "logit_scale": source.logit_scale,
        }
        if source.logit_bias is not None:
            state["logit_bias"] = source.logit_bias
        return config, state


def _deterministic(tower: TowerMasks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z_h, z_head, z_int) of eval mode, padding entries 0."""
    z_head = tower.head.deterministic().masked_fill(~tower.head_valid, 0.0)
    z_int = tower.intermediate.deterministic().masked_fill(~tower.int_valid, 0.0)
    z_h = tower.hidden_ones if tower.hidden is None else tower.hidden.deterministic()
    return z_h, z_head, z_int


def _mask_pow(z: torch.Tensor, power: int) -> torch.Tensor:
    """z ** power on the non-zero entries, 0 elsewhere (power 0: the 0/1 pattern)."""
    nonzero = z != 0
    return torch.where(nonzero, z.masked_fill(~nonzero, 1.0) ** power, 0.0)


def _layer_dims(cut: TowerCut) -> list[dict[str, int]]:
    return [{"heads": layer.heads, "mlp_width": layer.mlp} for layer in cut.layers]
