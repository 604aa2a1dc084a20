"""The masked CLIP of docs/method.md §3b run as a compact CLIP: masks folded into the weights.

One mask sample serves the whole batch, so (docs/method.md §8) the masked model equals a dense
model of the kept size whose weights carry the mask values:

- channels with z_h = 0 are zero in the residual stream at every layer, so the stream holds
  the kept channels only, and LayerNorm under z_h is the plain LayerNorm of the kept width;
- heads with z_head = 0 leave q/k/v and attention, MLP channels with z_int = 0 leave fc1/fc2;
- the kept mask values scale the gathered weights: out_proj columns by z_head, fc2 columns by
  z_int, out_proj/fc2 rows and biases, the embeddings and the projection rows by z_h.

:func:`fold_visual` / :func:`fold_text` build those weights, differentiably (gradients reach
the weights and the masks through the gather-and-scale: O(parameters) per step, against
O(tokens x parameters) for the matmuls); :func:`encode_image` / :func:`encode_text` run the
compact model on them (cuBLAS on CUDA). ``MaskedCLIP`` folds with every sampled mask,
``MaskedCLIP.prune`` folds once with the deterministic masks and keeps the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNormFp32, LayerScale, text_global_pool
from torch import nn

from tinyclip_fast.ops.masked_linear import channel_indices


@dataclass
class LayerCut:
    """What one mask sample keeps of one layer: index vectors (None: all kept) and mask values."""

    heads: int  # kept heads
    mlp: int  # kept MLP channels
    qkv_rows: torch.Tensor | None  # in_proj rows of the kept heads (q, k and v)
    head_cols: torch.Tensor | None  # out_proj columns of the kept heads
    mlp_kept: torch.Tensor | None  # kept MLP channels
    z_head_cols: torch.Tensor  # z_head of every kept out_proj column [heads * head_width]
    z_mlp: torch.Tensor  # z_int of every kept MLP channel [mlp]


@dataclass
class TowerCut:
    """What one mask sample keeps of a tower: the hidden channels and every layer's cut."""

    head_width: int
    hidden: torch.Tensor | None  # kept hidden channels (None: all)
    z_hidden: torch.Tensor  # z_h on the kept hidden channels [width]
    layers: list[LayerCut]

    @property
    def width(self) -> int:
        return self.z_hidden.numel()


def cut_tower(
    z_h: torch.Tensor,
    z_head: torch.Tensor,
    z_int: torch.Tensor,
    layer_heads: list[int],
    layer_mlp: list[int],
    head_width: int,
) -> TowerCut:
    """The TowerCut of masks z_h [width], z_head [layers, >= heads], z_int [layers, >= mlp].

    Row l of z_head / z_int covers the layer's own layer_heads[l] / layer_mlp[l] entries
    (the rest is padding). One host sync; :func:`cut_towers` cuts several towers with one.
    """
    return cut_towers([(z_h, z_head, z_int, layer_heads, layer_mlp, head_width)])[0]


def cut_towers(towers: list[tuple]) -> list[TowerCut]:
    """The TowerCuts of several towers' (z_h, z_head, z_int, layer_heads, layer_mlp,
    head_width), as :func:`cut_tower` gives them one by one.

    Which entries are zero decides every shape, so the host reads them: one transfer for
    all the towers together (one sync per step for image and text), and one copy of all
    index vectors back.
    """
    masks = [z for tower in towers for z in tower[:3]]
    nonzero = torch.cat([z.detach().flatten() != 0 for z in masks]).cpu()
    on = nonzero.split([z.numel() for z in masks])
    flags, shapes = [], []
    for tower, hidden_on, head_on, int_on in zip(towers, on[0::3], on[1::3], on[2::3], strict=True):
        _, z_head, z_int, layer_heads, layer_mlp, head_width = tower
        head_on, int_on = head_on.view(z_head.shape), int_on.view(z_int.shape)
        flags.append(hidden_on)
        for layer, (heads, mlp) in enumerate(zip(layer_heads, layer_mlp, strict=True)):
            head_cols = head_on[layer, :heads].repeat_interleave(head_width)
            flags += [head_cols.repeat(3), head_cols, int_on[layer, :mlp]]
        shapes.append((head_on, int_on))
    indices = iter(
        None if pair is None else pair[0] for pair in channel_indices(flags, masks[0].device)
    )
    return [
        _tower_cut(tower, on_masks, indices) for tower, on_masks in zip(towers, shapes, strict=True)
    ]


def _tower_cut(tower: tuple, on_masks: tuple, indices) -> TowerCut:
    """One tower's TowerCut from its host-side flags and the next of the index vectors."""
    z_h, z_head, z_int, layer_heads, layer_mlp, head_width = tower
    head_on, int_on = on_masks
    hidden = next(indices)
    layers = []
    for layer, (heads, mlp) in enumerate(zip(layer_heads, layer_mlp, strict=True)):
        qkv_rows, head_cols, mlp_kept = next(indices), next(indices), next(indices)
        z_cols = z_head[layer, :heads].repeat_interleave(head_width)
        z_mlp = z_int[layer, :mlp]
        layers.append(
            LayerCut(
                heads=int(head_on[layer, :heads].sum()),
                mlp=int(int_on[layer, :mlp].sum()),
                qkv_rows=qkv_rows,
                head_cols=head_cols,
                mlp_kept=mlp_kept,
                z_head_cols=_gather(z_cols, head_cols),
                z_mlp=_gather(z_mlp, mlp_kept),
            )
        )
    return TowerCut(head_width, hidden, _gather(z_h, hidden), layers)


def _gather(v: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor | None:
    return v if v is None or index is None else v.index_select(0, index)


class _FoldWeight(torch.autograd.Function):
    """weight[rows][:, cols] * row_scale[:, None] * col_scale[None, :], with a backward that
    scatters the weight's gradient by rows or through flat indices (index_copy along a column
    dimension is slow on the CPU) and reduces the scales' gradients by matrix-vector products."""

    @staticmethod
    def forward(ctx, weight, rows, cols, row_scale, col_scale):
        kept = weight if rows is None else weight.index_select(0, rows)
        kept = kept if cols is None else kept.index_select(1, cols)
        rs = None if row_scale is None else row_scale.to(weight.dtype)
        cs = None if col_scale is None else col_scale.to(weight.dtype)
        scale = None
        if rs is not None and cs is not None:
            scale = torch.outer(rs, cs)  # one pass over the weight, not two
        elif rs is not None or cs is not None:
            scale = rs[:, None] if rs is not None else cs[None, :]
        # The gathered weight is needed for the scales' gradients only.
        ctx.save_for_backward(
            kept if scale is not None else None, rows, cols, row_scale, col_scale, scale
        )
        ctx.full_shape = weight.shape
        return kept if scale is None else kept * scale

    @staticmethod
    def backward(ctx, grad):
        kept, rows, cols, row_scale, col_scale, scale = ctx.saved_tensors
        d_weight = d_rows = d_cols = None
        if ctx.needs_input_grad[0]:
            d_kept = grad if scale is None else grad * scale
            d_weight = _scatter(d_kept, rows, cols, ctx.full_shape)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            product = (grad * kept).to(torch.promote_types(grad.dtype, torch.float32))
            if ctx.needs_input_grad[3]:
                d_rows = product.sum(1) if col_scale is None else product @ col_scale.to(product)
                d_rows = d_rows.to(row_scale.dtype)
            if ctx.needs_input_grad[4]:
                d_cols = product.sum(0) if row_scale is None else row_scale.to(product) @ product
                d_cols = d_cols.to(col_scale.dtype)
        return d_weight, None, None, d_rows, d_cols


def _scatter(values, rows, cols, shape) -> torch.Tensor:
    """A zero tensor of ``shape`` holding ``values`` at rows x cols (None: all)."""
    if rows is None and cols is None:
        return values
    if cols is None:
        return values.new_zeros(shape).index_copy_(0, rows, values)
    n, k = shape
    rows = torch.arange(n, device=values.device) if rows is None else rows
    flat = (rows[:, None] * k + cols[None, :]).flatten()
    return values.new_zeros(n * k).index_copy_(0, flat, values.flatten()).view(n, k)


def fold_weight(
    weight: torch.Tensor,
    rows: torch.Tensor | None,
    cols: torch.Tensor | None,
    row_scale: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """weight[rows][:, cols] * row_scale[:, None] * col_scale[None, :] (None: all / no scale).

    weight [n, k] (a 1-D weight is a column); the scales enter in the weight's dtype, their
    gradients come back in their own; the weight's gradient is full-size, 0 where cut.
    """
    if rows is None and cols is None and row_scale is None and col_scale is None:
        return weight
    if weight.dim() == 1:
        return _FoldWeight.apply(weight[:, None], rows, None, row_scale, None).view(-1)
    return _FoldWeight.apply(weight, rows, cols, row_scale, col_scale)


def _fold_vector(v: torch.Tensor, index: torch.Tensor | None, scale: torch.Tensor | None = None):
    return fold_weight(v, index, None, scale)


def _fold_norm(prefix: str, norm: nn.Module, cut: TowerCut) -> dict[str, torch.Tensor]:
    """LayerNorm over the kept channels = the LayerNorm of the kept width: gather its affine."""
    if isinstance(norm, nn.Identity):
        return {}
    if not isinstance(norm, nn.LayerNorm):
        raise ValueError(f"unsupported norm layer {type(norm).__name__}")
    out = {}
    for name in ("weight", "bias"):
        if getattr(norm, name) is not None:
            out[prefix + name] = _fold_vector(getattr(norm, name), cut.hidden)
    return out


def _fold_block(prefix: str, block: nn.Module, cut: TowerCut, layer: LayerCut) -> dict:
    """Compact weights of one residual block (open_clip's or a pruned student's compact one)."""
    attn, mlp = block.attn, block.mlp
    kept, z_h = cut.hidden, cut.z_hidden
    out = {
        "attn.in_proj_weight": fold_weight(attn.in_proj_weight, layer.qkv_rows, kept),
        "attn.in_proj_bias": _fold_vector(attn.in_proj_bias, layer.qkv_rows),
        "attn.out_proj.weight": fold_weight(
            attn.out_proj.weight, kept, layer.head_cols, z_h, layer.z_head_cols
        ),
        "attn.out_proj.bias": _fold_vector(attn.out_proj.bias, kept, z_h),
        "mlp.c_fc.weight": fold_weight(mlp.c_fc.weight, layer.mlp_kept, kept),
        "mlp.c_fc.bias": _fold_vector(mlp.c_fc.bias, layer.mlp_kept),
        "mlp.c_proj.weight": fold_weight(mlp.c_proj.weight, kept, layer.mlp_kept, z_h, layer.z_mlp),
        "mlp.c_proj.bias": _fold_vector(mlp.c_proj.bias, kept, z_h),
        **_fold_norm("ln_1.", block.ln_1, cut),
        **_fold_norm("ln_2.", block.ln_2, cut),
    }
    for ls in ("ls_1", "ls_2"):
        if isinstance(getattr(block, ls), LayerScale):
            out[ls + ".gamma"] = _fold_vector(getattr(block, ls).gamma, kept)
    return {prefix + k: v for k, v in out.items()}


def _fold_blocks(blocks: nn.ModuleList, cut: TowerCut) -> dict[str, torch.Tensor]:
    out = {}
    for i, (block, layer) in enumerate(zip(blocks, cut.layers, strict=True)):
        out.update(_fold_block(f"transformer.resblocks.{i}.", block, cut, layer))
    return out


def fold_visual(visual: nn.Module, cut: TowerCut) -> dict[str, torch.Tensor]:
    """The compact ViT's weights, by their names in the compact ``visual`` module."""
    kept, z_h = cut.hidden, cut.z_hidden
    conv = visual.conv1.weight
    out = {
        "conv1.weight": fold_weight(conv.flatten(1), kept, None, z_h).view(-1, *conv.shape[1:]),
        "class_embedding": _fold_vector(visual.class_embedding, kept, z_h),
        "positional_embedding": fold_weight(visual.positional_embedding, None, kept, None, z_h),
        **_fold_norm("ln_pre.", visual.ln_pre, cut),
        **_fold_norm("ln_post.", visual.ln_post, cut),
        **_fold_blocks(visual.transformer.resblocks, cut),
    }
    if visual.proj is not None:
        out["proj"] = fold_weight(visual.proj, kept, None, z_h)
    return out


def fold_text(model: nn.Module, cut: TowerCut, with_token_table: bool) -> dict[str, torch.Tensor]:
    """The compact text tower's weights, by their names in the compact CLIP.

    The token table (vocab x width) is folded only ``with_token_table`` (pruning); a forward
    folds the rows it looks up instead (:func:`embed_tokens`), which is far less work.
    """
    kept, z_h = cut.hidden, cut.z_hidden
    out = {
        "positional_embedding": fold_weight(model.positional_embedding, None, kept, None, z_h),
        **_fold_norm("ln_final.", model.ln_final, cut),
        **_fold_blocks(model.transformer.resblocks, cut),
    }
    if with_token_table:
        out["token_embedding.weight"] = fold_weight(
            model.token_embedding.weight, None, kept, None, z_h
        )
    projection = model.text_projection
    if isinstance(projection, nn.Linear):
        out["text_projection.weight"] = fold_weight(projection.weight, None, kept, None, z_h)
        out["text_projection.bias"] = projection.bias
    elif projection is not None:
        out["text_projection"] = fold_weight(projection, kept, None, z_h)
    return out


def embed_tokens(table: torch.Tensor, text: torch.Tensor, cut: TowerCut) -> torch.Tensor:
    """Rows of the folded token table for ``text``: table[text][..., kept] * z_h[kept]."""
    rows = F.embedding(text, table)
    return fold_weight(rows.flatten(0, -2), None, cut.hidden, None, cut.z_hidden).view(
        *text.shape, -1
    )


# ---------------------------------------------------------------------------- compact forward


def _norm(x: torch.Tensor, norm: nn.Module, w: dict, prefix: str) -> torch.Tensor:
    """open_clip's LayerNorm / LayerNormFp32 (result in x's dtype) with the folded affine."""
    if isinstance(norm, nn.Identity):
        return x
    dtype = x.dtype
    if isinstance(norm, LayerNormFp32):
        x = x.float()
    y = F.layer_norm(x, (x.shape[-1],), w.get(prefix + "weight"), w.get(prefix + "bias"), norm.eps)
    return y.to(dtype)


def _layer_scale(x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
    gamma = w.get(name)
    return x if gamma is None else x * gamma


def _block(
    x: torch.Tensor,
    block: nn.Module,
    w: dict,
    prefix: str,
    layer: LayerCut,
    head_width: int,
    attn_mask: torch.Tensor | None,
) -> torch.Tensor:
    """A pre-norm residual block of the kept width with ``layer.heads`` heads (SDPA)."""
    batch, tokens, _ = x.shape
    h = _norm(x, block.ln_1, w, prefix + "ln_1.")
    qkv = F.linear(h, w[prefix + "attn.in_proj_weight"], w[prefix + "attn.in_proj_bias"])
    if layer.heads:
        q, k, v = qkv.view(batch, tokens, 3, layer.heads, head_width).permute(2, 0, 3, 1, 4)
        mask = attn_mask.to(q.dtype) if attn_mask is not None else None
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        context = context.transpose(1, 2).reshape(batch, tokens, layer.heads * head_width)
    else:
        # No head left: qkv is [batch, tokens, 0] and the projection returns its bias alone
        # (every weight stays in the graph: DDP expects a gradient for each, zeros here).
        context = qkv
    a = F.linear(context, w[prefix + "attn.out_proj.weight"], w[prefix + "attn.out_proj.bias"])
    x = x + _layer_scale(a, w, prefix + "ls_1.gamma")
    h = _norm(x, block.ln_2, w, prefix + "ln_2.")
    h = block.mlp.gelu(F.linear(h, w[prefix + "mlp.c_fc.weight"], w[prefix + "mlp.c_fc.bias"]))
    m = F.linear(h, w[prefix + "mlp.c_proj.weight"], w[prefix + "mlp.c_proj.bias"])
    return x + _layer_scale(m, w, prefix + "ls_2.gamma")


def _blocks(x, blocks, w, cut: TowerCut, attn_mask) -> torch.Tensor:
    for i, (block, layer) in enumerate(zip(blocks, cut.layers, strict=True)):
        x = _block(x, block, w, f"transformer.resblocks.{i}.", layer, cut.head_width, attn_mask)
    return x


def encode_image(visual: nn.Module, w: dict, cut: TowerCut, image: torch.Tensor) -> torch.Tensor:
    """open_clip's VisionTransformer forward on the folded weights ``w`` (unnormalised)."""
    conv = visual.conv1
    x = F.conv2d(image, w["conv1.weight"], None, conv.stride, conv.padding)
    x = x.flatten(2).transpose(1, 2)
    cls = w["class_embedding"].to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + w["positional_embedding"].to(x.dtype)
    x = visual.patch_dropout(x)
    x = _norm(x, visual.ln_pre, w, "ln_pre.")
    x = _blocks(x, visual.transformer.resblocks, w, cut, None)
    if visual.final_ln_after_pool:
        pooled, _ = visual._global_pool(x)
        pooled = _norm(pooled, visual.ln_post, w, "ln_post.")
    else:
        pooled, _ = visual._global_pool(_norm(x, visual.ln_post, w, "ln_post."))
    return pooled @ w["proj"] if "proj" in w else pooled


def encode_text(model: nn.Module, w: dict, cut: TowerCut, text: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text on the folded weights ``w`` (unnormalised)."""
    cast_dtype = model.transformer.get_cast_dtype()
    x = embed_tokens(model.token_embedding.weight, text, cut).to(cast_dtype)
    x = x + w["positional_embedding"].to(cast_dtype)
    x = _blocks(x, model.transformer.resblocks, w, cut, model.attn_mask)
    x = _norm(x, model.ln_final, w, "ln_final.")
    x = text_global_pool(
        x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None)
    )
    if "text_projection.weight" in w:
        return F.linear(x, w["text_projection.weight"], w["text_projection.bias"])
    return x @ w["text_projection"] if "text_projection" in w else x
