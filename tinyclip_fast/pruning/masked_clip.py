"""Automatic weight inheritance: an open_clip CLIP under learned structured masks (SPEC 3b).

Each tower (ViT image tower, text transformer) gets three hard-concrete masks: a hidden mask
z_h [width] shared by every layer, a head mask z_head [layers, heads] and an intermediate
mask z_int [layers, mlp_width]. They enter the forward pass as

    x0 = embeddings * z_h
    LN_z(x) = LN over the channels with z_h != 0, 0 elsewhere (no scaling by z_h)
    attn = out_proj(concat_h softmax(q_h k_h^T / sqrt(d)) v_h * z_head[l, h]) * z_h
    mlp = c_proj(GELU(c_fc(x)) * z_int[l]) * z_h
    features = LN_z(x) * z_h @ proj

Every linear runs through ``masked_linear``, so channels and heads whose mask is exactly 0
cost nothing. :meth:`MaskedCLIP.prune` folds the deterministic masks into the weights and
returns a compact open_clip CLIP with a different head count and MLP width in every layer.
"""

from __future__ import annotations

import copy
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import (
    LayerNormFp32,
    LayerScale,
    ResidualAttentionBlock,
    VisionTransformer,
    text_global_pool,
)
from torch import nn

from tinyclip_fast.inheritance.student_io import (
    CompactResidualBlock,
    block_dims,
    build_student,
    student_config,
)
from tinyclip_fast.ops.masked_linear import (
    UNMASKED,
    channel_indices,
    channel_selection,
    masked_linear_selected,
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
    ) -> None:
        super().__init__()
        self.width, self.head_width = width, head_width
        self.layer_heads, self.layer_mlp = list(layer_heads), list(layer_mlp)
        self.heads, self.mlp_width = max(max(layer_heads), 1), max(max(layer_mlp), 1)
        layers = len(layer_heads)
        self.hidden = HardConcreteMask((width,), init_log_alpha=init_log_alpha)
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
        return self.hidden(generator), z_head, z_int

    def probs(self, full: bool = False) -> TowerMaskProbs:
        """Non-zero probabilities (all ones on the real entries with ``full``) for sparsity.py.

        sparsity.py charges (4 w^2 + 4 w) / (H w) per (hidden channel, head) pair, which is
        4 hd (w + 1) / w for an inner attention width H hd = w. Pruned students' inner width
        differs from w, so p_head is rescaled by H hd / w to keep that per-pair cost.
        """
        if full:
            p_h = torch.ones_like(self.hidden.log_alpha)
            p_head = self.head_valid.to(p_h.dtype)
            p_int = self.int_valid.to(p_h.dtype)
        else:
            p_h = self.hidden.prob_nonzero()
            p_head = self.head.prob_nonzero() * self.head_valid
            p_int = self.intermediate.prob_nonzero() * self.int_valid
        inner_ratio = self.heads * self.head_width / self.width
        if inner_ratio != 1:
            p_head = p_head * inner_ratio
        return TowerMaskProbs(
            p_h=p_h, p_head=p_head, p_int=p_int, width=self.width, heads=self.heads
        )


class _TowerState:
    """One forward pass's masks of a tower, with the zero patterns read once.

    Which entries are exactly zero decides tensor shapes, so the host needs it: one transfer
    per tower and one copy of every index vector back, however many layers; every linear
    then gets its channel selections from here (``masked_linear_selected``, no sync per call).
    Per-layer lists cover each layer's own heads / MLP channels; None stands for "nothing
    pruned here" and skips the index work.
    """

    def __init__(self, tower: TowerMasks, generator: torch.Generator | None = None) -> None:
        z_h, z_head, z_int = tower(generator)
        device = z_h.device
        nonzero = torch.cat([z.detach().flatten() != 0 for z in (z_h, z_head, z_int)]).cpu()
        hidden_on, head_on, int_on = nonzero.split([z_h.numel(), z_head.numel(), z_int.numel()])
        heads, mlp, width = tower.layer_heads, tower.layer_mlp, tower.head_width
        head_on = [row[:n] for row, n in zip(head_on.view(z_head.shape), heads, strict=True)]
        int_on = [row[:n] for row, n in zip(int_on.view(z_int.shape), mlp, strict=True)]
        self.z_h = z_h
        self.z_head = [row[:n] for row, n in zip(z_head, heads, strict=True)]
        self.z_int = [row[:n] for row, n in zip(z_int, mlp, strict=True)]
        self.head_width = width

        # Host flags -> device indices in one copy: hidden channels, then per layer the kept
        # heads, their q/k/v rows, their out_proj columns, and the MLP channels.
        layers = len(heads)
        flags = [hidden_on]
        for row, mlp_row in zip(head_on, int_on, strict=True):
            head_channels = row.repeat_interleave(width)
            flags += [row, head_channels.repeat(3), head_channels, mlp_row]
        indices = channel_indices(flags, device)
        hidden = indices[0]
        per_layer = [indices[1 + 4 * i : 5 + 4 * i] for i in range(layers)]

        self.kept_hidden = None if hidden is None else hidden[0]
        # Binary masks of the zero patterns: they skip pruned channels without scaling the rest.
        self.hidden_on = None if hidden is None else (z_h != 0).to(z_h.dtype)
        self.kept_heads = [None if h is None else h[0] for h, _, _, _ in per_layer]
        self.qkv_on = [
            None if qkv is None else (z != 0).to(z.dtype).repeat(3)
            for z, (_, qkv, _, _) in zip(self.z_head, per_layer, strict=True)
        ]
        self.int_on = [
            None if m is None else (z != 0).to(z.dtype)
            for z, (_, _, _, m) in zip(self.z_int, per_layer, strict=True)
        ]
        self.sel_z_h = channel_selection(z_h, z_h.numel(), hidden)
        self.sel_hidden_on = (
            UNMASKED if hidden is None else channel_selection(self.hidden_on, z_h.numel(), hidden)
        )
        self.sel_qkv_on, self.sel_z_head, self.sel_int_on, self.sel_z_int = [], [], [], []
        for layer, (_, qkv, out_cols, m) in enumerate(per_layer):
            n_heads, n_mlp = heads[layer], mlp[layer]
            on = self.qkv_on[layer]
            self.sel_qkv_on.append(
                UNMASKED if on is None else channel_selection(on, 3 * n_heads * width, qkv)
            )
            z = self.z_head[layer]
            self.sel_z_head.append(
                channel_selection(z, n_heads * width, out_cols) if n_heads else UNMASKED
            )
            on = self.int_on[layer]
            self.sel_int_on.append(UNMASKED if on is None else channel_selection(on, n_mlp, m))
            z = self.z_int[layer]
            self.sel_z_int.append(channel_selection(z, n_mlp, m) if n_mlp else UNMASKED)

    def linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        in_hidden: bool = False,
        out_hidden: bool = False,
    ) -> torch.Tensor:
        """A linear from or to the residual width (patch embedding, output projection),
        those channels masked by z_h."""
        return masked_linear_selected(
            x,
            weight,
            bias,
            self.z_h if in_hidden else None,
            self.z_h if out_hidden else None,
            self.sel_z_h if in_hidden else UNMASKED,
            self.sel_z_h if out_hidden else UNMASKED,
        )


def masked_layer_norm(x: torch.Tensor, norm: nn.Module, kept: torch.Tensor | None) -> torch.Tensor:
    """LayerNorm over the ``kept`` channels only (all when None); 0 on the other channels."""
    if isinstance(norm, nn.Identity):
        return x
    if not isinstance(norm, nn.LayerNorm):
        raise ValueError(f"unsupported norm layer {type(norm).__name__}")
    dtype = x.dtype
    if isinstance(norm, LayerNormFp32):
        x = x.float()
    if kept is None:
        y = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        return y.to(dtype)
    weight = norm.weight.index_select(0, kept) if norm.weight is not None else None
    bias = norm.bias.index_select(0, kept) if norm.bias is not None else None
    y = F.layer_norm(x.index_select(-1, kept), (kept.numel(),), weight, bias, norm.eps)
    return x.new_zeros(x.shape).index_copy(-1, kept, y).to(dtype)


def _masked_attention(
    attn: nn.MultiheadAttention,
    x: torch.Tensor,
    masks: _TowerState,
    layer: int,
    attn_mask: torch.Tensor | None,
) -> torch.Tensor:
    """out_proj(heads * z_head[layer]) * z_h with q, k, v computed for the kept heads only."""
    batch, tokens, _ = x.shape
    heads, head_width = attn.num_heads, masks.head_width
    if heads == 0:
        # A pruned student's layer without heads: only the output bias remains.
        return (attn.out_proj.bias * masks.z_h).to(x.dtype).expand_as(x)
    kept_heads = masks.kept_heads[layer]
    # One mask entry per (q|k|v, head): masked_linear skips the rows of pruned heads.
    qkv = masked_linear_selected(
        x,
        attn.in_proj_weight,
        attn.in_proj_bias,
        masks.hidden_on,
        masks.qkv_on[layer],
        masks.sel_hidden_on,
        masks.sel_qkv_on[layer],
    )
    qkv = qkv.view(batch, tokens, 3, heads, head_width)
    if attn_mask is not None:
        attn_mask = attn_mask.to(qkv.dtype)
    if kept_heads is None:
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    else:
        # Attention runs on the kept heads only; pruned heads read as zeros downstream.
        context = qkv.new_zeros(batch, heads, tokens, head_width)
        if kept_heads.numel() > 0:
            q, k, v = qkv.index_select(3, kept_heads).permute(2, 0, 3, 1, 4)
            kept = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            context = context.index_copy(1, kept_heads, kept)
    context = context.transpose(1, 2).reshape(batch, tokens, heads * head_width)
    return masked_linear_selected(
        context,
        attn.out_proj.weight,
        attn.out_proj.bias,
        masks.z_head[layer],
        masks.z_h,
        masks.sel_z_head[layer],
        masks.sel_z_h,
    )


def _masked_block(
    block: ResidualAttentionBlock,
    x: torch.Tensor,
    masks: _TowerState,
    layer: int,
    attn_mask: torch.Tensor | None,
) -> torch.Tensor:
    h = masked_layer_norm(x, block.ln_1, masks.kept_hidden)
    x = x + block.ls_1(_masked_attention(block.attn, h, masks, layer, attn_mask))
    h = masked_layer_norm(x, block.ln_2, masks.kept_hidden)
    fc, act, proj = block.mlp.c_fc, block.mlp.gelu, block.mlp.c_proj
    if fc.out_features == 0:
        return x + block.ls_2((proj.bias * masks.z_h).to(x.dtype))
    # z_int multiplies after the activation (fc2's input); fc1 only skips the pruned channels.
    h = masked_linear_selected(
        h,
        fc.weight,
        fc.bias,
        masks.hidden_on,
        masks.int_on[layer],
        masks.sel_hidden_on,
        masks.sel_int_on[layer],
    )
    h = masked_linear_selected(
        act(h),
        proj.weight,
        proj.bias,
        masks.z_int[layer],
        masks.z_h,
        masks.sel_z_int[layer],
        masks.sel_z_h,
    )
    return x + block.ls_2(h)


def _tower_masks(
    blocks: nn.ModuleList, width: int, tower: str, init_log_alpha: float
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
    )


class MaskedCLIP(nn.Module):
    """An open_clip CLIP (ViT image tower, text transformer) with learnable structured masks.

    ``forward(image, text)`` returns what the wrapped CLIP returns; masks are sampled once per
    forward in train mode and deterministic in eval mode. The wrapped model's weights are
    shared, not copied; the mask parameters are ``*.log_alpha`` (see :meth:`mask_parameters`).
    """

    def __init__(self, model: nn.Module, init_log_alpha: float = 10.0) -> None:
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
        self.model = model
        self.visual_masks = _tower_masks(
            visual.transformer.resblocks, visual.conv1.out_channels, "vision", init_log_alpha
        )
        self.text_masks = _tower_masks(
            model.transformer.resblocks, model.token_embedding.embedding_dim, "text", init_log_alpha
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
            for mask in (tower.hidden, tower.head, tower.intermediate):
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

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        visual = self.model.visual
        masks = _TowerState(self.visual_masks, self._mask_generator(0))
        # Patch embedding as a masked linear over flattened patches (conv1 has no bias).
        weight = visual.conv1.weight
        patches = F.unfold(image.to(weight.dtype), visual.patch_size, stride=visual.patch_size)
        x = masks.linear(patches.transpose(1, 2), weight.flatten(1), None, out_hidden=True)
        cls = (visual.class_embedding * masks.z_h).to(x.dtype).view(1, 1, -1)
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + (visual.positional_embedding * masks.z_h).to(x.dtype)
        x = visual.patch_dropout(x)
        x = masked_layer_norm(x, visual.ln_pre, masks.kept_hidden)
        for layer, block in enumerate(visual.transformer.resblocks):
            x = _masked_block(block, x, masks, layer, None)
        if visual.final_ln_after_pool:
            pooled, _ = visual._global_pool(x)
            pooled = masked_layer_norm(pooled, visual.ln_post, masks.kept_hidden)
        else:
            x = masked_layer_norm(x, visual.ln_post, masks.kept_hidden)
            pooled, _ = visual._global_pool(x)
        if visual.proj is not None:
            pooled = masks.linear(pooled, visual.proj.t(), None, in_hidden=True)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        model = self.model
        masks = _TowerState(self.text_masks, self._mask_generator(1))
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(text).to(cast_dtype) + model.positional_embedding.to(cast_dtype)
        x = x * masks.z_h.to(cast_dtype)
        for layer, block in enumerate(model.transformer.resblocks):
            x = _masked_block(block, x, masks, layer, model.attn_mask)
        x = masked_layer_norm(x, model.ln_final, masks.kept_hidden)
        pooled = text_global_pool(x, text, model.text_pool_type, eos_token_id=model.text_eos_id)
        projection = model.text_projection
        if isinstance(projection, nn.Linear):
            pooled = masks.linear(pooled, projection.weight, projection.bias, in_hidden=True)
        elif projection is not None:
            pooled = masks.linear(pooled, projection.t(), None, in_hidden=True)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def forward(
        self, image: torch.Tensor | None = None, text: torch.Tensor | None = None
    ) -> dict[str, Any] | tuple:
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
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

        Channels, heads and hidden dims with deterministic mask 0 are dropped; the remaining
        soft mask values are folded into the weights (see :func:`_fold_block`).
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
        v_masks = _deterministic(self.visual_masks)
        t_masks = _deterministic(self.text_masks)
        if mask_power != 1:
            v_masks = tuple(_mask_pow(z, mask_power) for z in v_masks)
            t_masks = tuple(_mask_pow(z, mask_power) for z in t_masks)
        config = student_config(self.model)
        v_kept, t_kept = _kept(v_masks[0], "vision"), _kept(t_masks[0], "text")
        config["vision_width"] = config["model_cfg"]["vision_cfg"]["width"] = v_kept.numel()
        config["text_width"] = config["model_cfg"]["text_cfg"]["width"] = t_kept.numel()
        config["vision_layers"] = _layer_dims(v_masks)
        config["text_layers"] = _layer_dims(t_masks)
        config["open_clip_compatible"] = False
        cut = {
            **{"visual." + k: v for k, v in _fold_visual(source.visual, v_masks, v_kept).items()},
            **_fold_text(source, t_masks, t_kept),
            "logit_scale": source.logit_scale,
        }
        if source.logit_bias is not None:
            cut["logit_bias"] = source.logit_bias
        return config, cut


def _deterministic(tower: TowerMasks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z_h, z_head, z_int) of eval mode, padding entries 0."""
    z_head = tower.head.deterministic().masked_fill(~tower.head_valid, 0.0)
    z_int = tower.intermediate.deterministic().masked_fill(~tower.int_valid, 0.0)
    return tower.hidden.deterministic(), z_head, z_int


def _mask_pow(z: torch.Tensor, power: int) -> torch.Tensor:
    """z ** power on the non-zero entries, 0 elsewhere (power 0: the 0/1 pattern)."""
    nonzero = z != 0
    return torch.where(nonzero, z.masked_fill(~nonzero, 1.0) ** power, 0.0)


def _kept(z_h: torch.Tensor, tower: str) -> torch.Tensor:
    kept = (z_h != 0).nonzero().flatten()
    if kept.numel() == 0:
        raise ValueError(f"cannot prune: every hidden channel of the {tower} tower is masked out")
    return kept


def _layer_dims(masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> list[dict[str, int]]:
    _, z_head, z_int = masks
    heads = (z_head != 0).sum(1).tolist()
    mlp = (z_int != 0).sum(1).tolist()
    return [{"heads": h, "mlp_width": m} for h, m in zip(heads, mlp, strict=True)]


def _fold_norm(prefix: str, norm: nn.Module, kept: torch.Tensor) -> dict[str, torch.Tensor]:
    """The masked LN over kept channels is a plain LN on the compact width: slice its affine."""
    if isinstance(norm, nn.Identity):
        return {}
    out = {}
    if norm.weight is not None:
        out[prefix + "weight"] = norm.weight[kept]
    if norm.bias is not None:
        out[prefix + "bias"] = norm.bias[kept]
    return out


def _fold_block(
    prefix: str,
    block: ResidualAttentionBlock | CompactResidualBlock,
    z_h: torch.Tensor,
    kept: torch.Tensor,
    z_head: torch.Tensor,
    z_int: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Compact weights of one block.

    The residual stream keeps only the ``kept`` channels and already carries z_h; branch outputs
    are scaled by z_h (rows of out_proj / c_proj and their biases), head outputs by z_head
    (out_proj columns), MLP activations by z_int (c_proj columns). q, k, v and c_fc only drop
    the pruned heads / channels: their masks in the masked model are 0/1.
    """
    attn = block.attn
    dims = block_dims(block)
    heads, head_width = dims["heads"], dims["head_width"]
    z_head, z_int = z_head[:heads], z_int[: dims["mlp_width"]]
    kept_heads = (z_head != 0).nonzero().flatten()
    kept_int = (z_int != 0).nonzero().flatten()
    zk = z_h[kept]
    width = z_h.numel()
    in_w = attn.in_proj_weight.view(3, heads, head_width, width)[:, kept_heads][..., kept]
    in_b = attn.in_proj_bias.view(3, heads, head_width)[:, kept_heads]
    out_w = attn.out_proj.weight.view(width, heads, head_width)[kept][:, kept_heads]
    out_w = out_w * z_head[kept_heads].view(1, -1, 1) * zk.view(-1, 1, 1)
    fc_w = block.mlp.c_fc.weight[kept_int][:, kept]
    proj_w = block.mlp.c_proj.weight[kept][:, kept_int] * z_int[kept_int] * zk[:, None]
    out = {
        "attn.in_proj_weight": in_w.reshape(-1, kept.numel()),
        "attn.in_proj_bias": in_b.reshape(-1),
        "attn.out_proj.weight": out_w.reshape(kept.numel(), -1),
        "attn.out_proj.bias": attn.out_proj.bias[kept] * zk,
        "mlp.c_fc.weight": fc_w,
        "mlp.c_fc.bias": block.mlp.c_fc.bias[kept_int],
        "mlp.c_proj.weight": proj_w,
        "mlp.c_proj.bias": block.mlp.c_proj.bias[kept] * zk,
        **_fold_norm("ln_1.", block.ln_1, kept),
        **_fold_norm("ln_2.", block.ln_2, kept),
    }
    for ls in ("ls_1", "ls_2"):
        if isinstance(getattr(block, ls), LayerScale):
            out[ls + ".gamma"] = getattr(block, ls).gamma[kept]
    return {prefix + k: v for k, v in out.items()}


def _fold_blocks(prefix: str, blocks: nn.ModuleList, masks: tuple, kept: torch.Tensor) -> dict:
    z_h, z_head, z_int = masks
    out = {}
    for i, block in enumerate(blocks):
        out.update(_fold_block(f"{prefix}{i}.", block, z_h, kept, z_head[i], z_int[i]))
    return out


def _fold_visual(visual: VisionTransformer, masks: tuple, kept: torch.Tensor) -> dict:
    z_h = masks[0]
    zk = z_h[kept]
    out = {
        "conv1.weight": visual.conv1.weight[kept] * zk.view(-1, 1, 1, 1),
        "class_embedding": visual.class_embedding[kept] * zk,
        "positional_embedding": visual.positional_embedding[:, kept] * zk,
        **_fold_norm("ln_pre.", visual.ln_pre, kept),
        **_fold_norm("ln_post.", visual.ln_post, kept),
    }
    if visual.proj is not None:
        out["proj"] = visual.proj[kept] * zk[:, None]
    out.update(_fold_blocks("transformer.resblocks.", visual.transformer.resblocks, masks, kept))
    return out


def _fold_text(model: nn.Module, masks: tuple, kept: torch.Tensor) -> dict:
    zk = masks[0][kept]
    out = {
        "token_embedding.weight": model.token_embedding.weight[:, kept] * zk,
        "positional_embedding": model.positional_embedding[:, kept] * zk,
        **_fold_norm("ln_final.", model.ln_final, kept),
    }
    projection = model.text_projection
    if isinstance(projection, nn.Linear):
        out["text_projection.weight"] = projection.weight[:, kept] * zk
        out["text_projection.bias"] = projection.bias
    elif projection is not None:
        out["text_projection"] = projection[kept] * zk[:, None]
    out.update(_fold_blocks("transformer.resblocks.", model.transformer.resblocks, masks, kept))
    return out
