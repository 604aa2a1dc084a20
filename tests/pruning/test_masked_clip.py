"""MaskedCLIP against a float64 reference of the masked forward of docs/method.md §3b, and
prune() equivalence."""

import copy
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from support import binary_masks, rel_err

from tinyclip_fast.pruning.masked_clip import MaskedCLIP

CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 4, "layers": 3},
}


def _model(config=CONFIG, seed=0):
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**config)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            # open_clip starts LayerNorms / biases at constants: randomise everything.
            if t.is_floating_point() and name != "logit_scale":
                t.copy_(torch.randn_like(t) * 0.3)
    return model


def _inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, 32, 32, generator=g)
    text = torch.randint(1, 999, (batch, 16), generator=g)
    text[torch.arange(batch), torch.tensor([5, 15, 9])[:batch]] = 999  # argmax pooling token
    return image, text


def _set_masks(masked: MaskedCLIP, seed=2, empty_layers=True):
    """Spread log_alpha so the deterministic masks have exact zeros and soft values; with
    ``empty_layers`` also a text layer without heads and a vision layer without MLP channels."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tower in (masked.visual_masks, masked.text_masks):
            for mask in tower.masks():
                mask.log_alpha.copy_(torch.randn(mask.log_alpha.shape, generator=g) * 3 + 1)
        if empty_layers:
            masked.text_masks.head.log_alpha[1] = -10.0
            masked.visual_masks.intermediate.log_alpha[2] = -10.0


def _logits(features):
    image, text, scale = features[:3]
    return scale * image @ text.T


# ---- float64 reference: docs/method.md §3b with plain multiplies at full width ----------


def _ref_ln(x, norm, z_h):
    keep = z_h != 0
    xs = x[..., keep]
    mu = xs.mean(-1, keepdim=True)
    var = ((xs - mu) ** 2).mean(-1, keepdim=True)
    out = torch.zeros_like(x)
    out[..., keep] = (xs - mu) / torch.sqrt(var + norm.eps) * norm.weight[keep] + norm.bias[keep]
    return out


def _ref_scale(x, ls):
    return x * ls.gamma if hasattr(ls, "gamma") else x


def _ref_blocks(x, blocks, z_h, z_head, z_int, attn_mask):
    """Every head and channel computed, then multiplied by its mask (rows of a pruned
    student's padded masks cover that layer's own heads / channels)."""
    batch, tokens, width = x.shape
    for layer, block in enumerate(blocks):
        attn = block.attn
        heads, head_width = attn.num_heads, getattr(attn, "head_width", None) or attn.head_dim
        h = _ref_ln(x, block.ln_1, z_h)
        qkv = h @ attn.in_proj_weight.T + attn.in_proj_bias
        q, k, v = qkv.view(batch, tokens, 3, heads, head_width).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if attn_mask is not None:
            scores = scores + attn_mask
        o = scores.softmax(-1) @ v * z_head[layer, :heads].view(1, -1, 1, 1)
        o = o.transpose(1, 2).reshape(batch, tokens, -1)
        a = (o @ attn.out_proj.weight.T + attn.out_proj.bias) * z_h
        x = x + _ref_scale(a, block.ls_1)
        h = _ref_ln(x, block.ln_2, z_h)
        fc, proj = block.mlp.c_fc, block.mlp.c_proj
        m = block.mlp.gelu(h @ fc.weight.T + fc.bias) * z_int[layer, : fc.out_features]
        x = x + _ref_scale((m @ proj.weight.T + proj.bias) * z_h, block.ls_2)
    return x


def _ref_masks(masked, tower, seed):
    """The masks a MaskedCLIP draws: train-mode samples from its seeded generator."""
    masks = masked.visual_masks if tower == 0 else masked.text_masks
    if not masked.training:
        return masks()
    return masks(torch.Generator().manual_seed(seed * 2 + tower))


def _ref_encode(masked, image, text, seed=None):
    v = masked.model.visual
    z_h, z_head, z_int = _ref_masks(masked, 0, seed)
    patch = v.conv1.kernel_size[0]
    x = F.conv2d(image, v.conv1.weight, stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
    x = _ref_ln(x * z_h, v.ln_pre, z_h)
    x = _ref_blocks(x, v.transformer.resblocks, z_h, z_head, z_int, None)
    image_features = (_ref_ln(x, v.ln_post, z_h)[:, 0] * z_h) @ v.proj

    m = masked.model
    z_h, z_head, z_int = _ref_masks(masked, 1, seed)
    tokens = text.shape[1]
    causal = torch.full((tokens, tokens), float("-inf"), dtype=x.dtype).triu(1)
    x = (m.token_embedding(text) + m.positional_embedding) * z_h
    x = _ref_blocks(x, m.transformer.resblocks, z_h, z_head, z_int, causal)
    x = _ref_ln(x, m.ln_final, z_h)[torch.arange(text.shape[0]), text.argmax(-1)]
    return image_features, (x * z_h) @ m.text_projection


# ---- tests ------------------------------------------------------------------------------------

VARIANT = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": dict(
        CONFIG["vision_cfg"], pool_type="avg", final_ln_after_pool=True, ls_init_value=0.5
    ),
    "text_cfg": dict(CONFIG["text_cfg"], no_causal_mask=True, proj_bias=True, pool_type="last"),
}


@pytest.mark.parametrize("config", [CONFIG, VARIANT], ids=["default", "variant"])
def test_all_ones_masks_equal_original_model(config):
    model = _model(config).eval()
    masked = MaskedCLIP(model, init_log_alpha=50.0).eval()  # soft value sigmoid(60) == 1.0
    image, text = _inputs()
    with torch.no_grad():
        expected, actual = model(image, text), masked(image, text)
        assert len(actual) == 3
        for a, e in zip(actual, expected, strict=True):
            assert rel_err(a, e) < 1e-5
        assert rel_err(_logits(actual), _logits(expected)) < 1e-5
        model.output_dict = True
        out = masked(image, text)
        assert set(out) == {"image_features", "text_features", "logit_scale"}
        assert rel_err(out["text_features"], expected[1]) < 1e-5


def _pruned_student():
    """A first-stage prune: per-layer head counts and MLP widths, a text layer without heads
    and a vision layer without MLP channels (the second stage of docs/method.md §4 masks this)."""
    first = MaskedCLIP(_model()).eval()
    _set_masks(first)
    with torch.no_grad():
        return first.prune()


@pytest.mark.parametrize("stage", ["teacher", "pruned_student"])
def test_train_mode_forward_and_every_gradient_match_float64_reference(stage):
    model = _model() if stage == "teacher" else _pruned_student()
    masked = MaskedCLIP(model).double().train()
    _set_masks(masked, seed=4)
    if stage == "pruned_student":
        masked.clamp_masks()  # puts the padding entries back to exactly-zero masks
    masked.fix_mask_sample(11)
    reference = copy.deepcopy(masked)
    image, text = _inputs()
    image = image.double()
    g = torch.Generator().manual_seed(3)
    w_img, w_txt = (torch.randn(3, 32, generator=g, dtype=torch.float64) for _ in range(2))

    img, txt, scale = masked(image, text)
    ref_img, ref_txt = _ref_encode(reference, image, text, seed=11)
    ref_img, ref_txt = F.normalize(ref_img, dim=-1), F.normalize(ref_txt, dim=-1)
    assert rel_err(img, ref_img) < 1e-10 and rel_err(txt, ref_txt) < 1e-10
    # The sample matters: soft values, exact zeros, a text layer without heads (teacher).
    z_h, z_head, _ = reference.text_masks(torch.Generator().manual_seed(23))
    assert ((z_h > 0) & (z_h < 1)).any() and (z_h == 0).any()
    ((img * w_img).sum() + (txt * w_txt).sum() + scale).backward()
    (
        (ref_img * w_img).sum() + (ref_txt * w_txt).sum() + reference.model.logit_scale.exp()
    ).backward()

    ref_named = dict(reference.named_parameters())
    for name, p in masked.named_parameters():
        ref_grad = ref_named[name].grad
        # Every weight gets a gradient (DDP needs one), zeros for what this sample cut.
        assert p.grad is not None, name
        expected = ref_grad if ref_grad is not None else torch.zeros_like(p)
        if not expected.any():  # cut this step (or empty: a layer pruned away before)
            assert not p.grad.any(), name
        else:
            assert rel_err(p.grad, expected) < 1e-9, name
    for tower in (masked.visual_masks, masked.text_masks):
        for mask in (tower.hidden, tower.head, tower.intermediate):
            assert mask.log_alpha.grad.abs().sum() > 0
    if stage == "teacher":
        z_head = reference.text_masks(torch.Generator().manual_seed(23))[1]
        assert (z_head[1] == 0).all()  # a layer without heads in this sample
        z_int = reference.visual_masks(torch.Generator().manual_seed(22))[2]
        assert (z_int[2] == 0).all()  # and one without MLP channels


@pytest.mark.parametrize("config", [CONFIG, VARIANT], ids=["default", "variant"])
def test_pruned_model_equals_masked_model(config):
    masked = MaskedCLIP(_model(config)).eval()
    _set_masks(masked)
    image, text = _inputs()
    with torch.no_grad():
        expected = masked(image, text)
        compact = masked.prune().eval()
        actual = compact(image, text)
    assert type(compact) is open_clip.model.CLIP
    for a, e in zip(actual, expected, strict=True):
        assert rel_err(a, e) < 1e-5
    assert rel_err(_logits(actual), _logits(expected)) < 1e-5
    z_head = masked.text_masks.head.deterministic()
    heads = [block.attn.num_heads for block in compact.transformer.resblocks]
    assert heads == (z_head != 0).sum(1).tolist() and heads[1] == 0
    mlp = [block.mlp.c_fc.out_features for block in compact.visual.transformer.resblocks]
    assert mlp == (masked.visual_masks.intermediate.deterministic() != 0).sum(1).tolist()
    assert mlp[2] == 0
    kept = int((masked.visual_masks.hidden.deterministic() != 0).sum())
    assert compact.visual.conv1.weight.shape[0] == kept < 64
    n_compact = sum(p.numel() for p in compact.parameters())
    assert n_compact < sum(p.numel() for p in masked.model.parameters())


def test_without_hidden_masks_only_heads_and_mlp_channels_are_learned():
    masked = MaskedCLIP(_model(), mask_hidden=False).train()
    names = [name for name, _ in masked.named_parameters() if name.endswith("log_alpha")]
    assert names == [
        f"{tower}_masks.{kind}.log_alpha"
        for tower in ("visual", "text")
        for kind in ("head", "intermediate")
    ]
    assert len(masked.mask_parameters()) == 4
    for tower in (masked.visual_masks, masked.text_masks):
        assert tower.masks() == [tower.head, tower.intermediate]
        assert torch.equal(tower(torch.Generator().manual_seed(0))[0], torch.ones(64))
        assert torch.equal(tower.probs().p_h, torch.ones(64))
    # The clamp leaves the missing hidden masks alone.
    masked.clamp_masks()


def test_without_hidden_masks_the_train_forward_matches_float64_reference():
    masked = MaskedCLIP(_model(), mask_hidden=False).double().train()
    _set_masks(masked, seed=4)
    masked.fix_mask_sample(11)
    reference = copy.deepcopy(masked)
    image, text = _inputs()
    img, txt, scale = masked(image.double(), text)
    ref_img, ref_txt = _ref_encode(reference, image.double(), text, seed=11)
    assert rel_err(img, F.normalize(ref_img, dim=-1)) < 1e-10
    assert rel_err(txt, F.normalize(ref_txt, dim=-1)) < 1e-10
    (img.sum() + txt.sum() + scale).backward()
    assert all(p.grad.abs().sum() > 0 for p in masked.mask_parameters())


@pytest.mark.parametrize("config", [CONFIG, VARIANT], ids=["default", "variant"])
def test_without_hidden_masks_the_pruned_model_equals_the_masked_model_at_full_width(config):
    masked = MaskedCLIP(_model(config), mask_hidden=False).eval()
    _set_masks(masked)
    image, text = _inputs()
    with torch.no_grad():
        expected = masked(image, text)
        compact = masked.prune().eval()
        actual = compact(image, text)
    for a, e in zip(actual, expected, strict=True):
        assert rel_err(a, e) < 1e-5
    assert compact.visual.conv1.weight.shape[0] == 64
    assert compact.token_embedding.embedding_dim == 64
    heads = [block.attn.num_heads for block in compact.transformer.resblocks]
    assert heads == (masked.text_masks.head.deterministic() != 0).sum(1).tolist()
    assert sum(p.numel() for p in compact.parameters()) < sum(
        p.numel() for p in masked.model.parameters()
    )


def test_without_hidden_masks_the_expected_sparsity_counts_every_channel_kept():
    # The sparsity of hidden masks that keep every channel for sure (p_h = 1).
    without = MaskedCLIP(_model(), mask_hidden=False)
    _set_masks(without, empty_layers=False)
    with_hidden = MaskedCLIP(_model())
    with_hidden.load_state_dict(without.state_dict(), strict=False)
    with torch.no_grad():
        for tower in (with_hidden.visual_masks, with_hidden.text_masks):
            tower.hidden.log_alpha.fill_(50.0)
            assert torch.equal(tower.hidden.prob_nonzero(), torch.ones(64))
    expected = float(with_hidden.expected_sparsity().detach())
    assert 0.05 < expected < 0.95
    assert float(without.expected_sparsity().detach()) == pytest.approx(expected, rel=1e-6)
    assert without.full_prunable_params() == with_hidden.full_prunable_params()


def test_train_mode_samples_masks_and_reaches_log_alpha():
    masked = MaskedCLIP(_model(), init_log_alpha=0.5).train()
    image, text = _inputs()
    first = masked(image, text)
    second = masked(image, text)
    assert rel_err(first[0], second[0]) > 1e-4  # a fresh sample per forward
    loss = _logits(first).logsumexp(1).sum() + (first[1] * torch.randn(3, 32)).sum()
    loss.backward()
    for name, p in masked.named_parameters():
        if name.endswith("log_alpha"):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    assert len(masked.mask_parameters()) == 6
    assert masked.model.visual.conv1.weight.grad.abs().sum() > 0


def test_expected_sparsity_and_remaining_params():
    model = _model()
    masked = MaskedCLIP(model)
    assert float(masked.expected_sparsity().detach()) < 1e-3
    prunable = 0
    for block in [*model.visual.transformer.resblocks, *model.transformer.resblocks]:
        attn, mlp = block.attn, block.mlp
        prunable += attn.in_proj_weight.numel() + attn.in_proj_bias.numel()
        prunable += attn.out_proj.weight.numel() + attn.out_proj.bias.numel()
        prunable += mlp.c_fc.weight.numel() + mlp.c_proj.weight.numel()
    with torch.no_grad():
        for p in masked.mask_parameters():
            p.fill_(0.3)
    # Every mask entry is non-zero with probability p; both factors of each block carry one p.
    p = torch.sigmoid(torch.tensor(0.3) - 2 / 3 * math.log(0.1 / 1.1))
    remaining = float(masked.expected_remaining_params().detach())
    assert abs(remaining - float(p**2) * prunable) < 1e-3 * prunable
    assert abs(float(masked.expected_sparsity().detach()) - float(1 - p**2)) < 1e-5
    masked.expected_sparsity().backward()
    assert all(q.grad is not None for q in masked.mask_parameters())
    with torch.no_grad():
        masked.text_masks.head.log_alpha.fill_(50.0)
    masked.clamp_masks()
    assert float(masked.text_masks.head.log_alpha.detach().max()) == pytest.approx(math.log(100))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {"vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8}},
            "ViT image towers only",
        ),
        ({"vision_cfg": dict(CONFIG["vision_cfg"], attentional_pool=True)}, "attentional pooler"),
        ({"text_cfg": dict(CONFIG["text_cfg"], qk_norm=True)}, "unsupported text block"),
    ],
    ids=["resnet-tower", "attentional-pooler", "qk-norm-text-block"],
)
def test_unsupported_towers_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        MaskedCLIP(open_clip.model.CLIP(**dict(CONFIG, **change)))


def test_a_module_that_is_not_a_clip_is_refused():
    with pytest.raises(TypeError, match="open_clip.model.CLIP"):
        MaskedCLIP(torch.nn.Linear(2, 2))


def test_pruning_every_hidden_channel_is_refused():
    masked = MaskedCLIP(_model())
    with torch.no_grad():
        masked.visual_masks.hidden.log_alpha.fill_(-20.0)
    with pytest.raises(ValueError, match="every hidden channel"):
        masked.prune()


def test_bf16_autocast_close_to_fp32():
    masked = MaskedCLIP(_model()).eval()
    _set_masks(masked)
    image, text = _inputs()
    expected = masked(image, text)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = masked(image, text)
    assert actual[0].dtype == torch.bfloat16
    for a, e in zip(actual[:2], expected[:2], strict=True):
        assert rel_err(a, e) < 2e-2
    (actual[0].float().sum() + (actual[1].float() * torch.randn(3, 32)).sum()).backward()
    for p in masked.mask_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_second_stage_masks_a_pruned_student():
    """The multi-stage auto recipe of docs/method.md §4: masks on a pruned student whose layers
    differ."""
    first = MaskedCLIP(_model()).eval()
    _set_masks(first)
    image, text = _inputs()
    with torch.no_grad():
        compact = first.prune().eval()
        expected = compact(image, text)
        second = MaskedCLIP(compact, init_log_alpha=50.0).eval()
        for a, e in zip(second(image, text), expected, strict=True):
            assert rel_err(a, e) < 1e-5
    assert second.text_masks.layer_heads[1] == 0 and second.visual_masks.layer_mlp[2] == 0
    prunable = 0
    for block in [*compact.visual.transformer.resblocks, *compact.transformer.resblocks]:
        attn, mlp = block.attn, block.mlp
        prunable += attn.in_proj_weight.numel() + attn.in_proj_bias.numel()
        prunable += attn.out_proj.weight.numel() + attn.out_proj.bias.numel()
        prunable += mlp.c_fc.weight.numel() + mlp.c_proj.weight.numel()
    # Exact up to how the output-projection biases are spread over heads.
    assert abs(second.full_prunable_params() - prunable) < 0.01 * prunable
    assert float(second.expected_sparsity().detach()) < 1e-3

    _set_masks(second, seed=5, empty_layers=False)
    second.clamp_masks()  # also puts the padding entries back to exactly-zero masks
    with torch.no_grad():
        masked_out = second(image, text)
        third = second.prune().eval()
        for a, e in zip(third(image, text), masked_out, strict=True):
            assert rel_err(a, e) < 1e-5
    assert sum(p.numel() for p in third.parameters()) < sum(p.numel() for p in compact.parameters())
    second.train()
    out = second(image, text)
    (_logits(out).logsumexp(1).sum() + (out[1] * torch.randn(3, 32)).sum()).backward()
    head_grad = second.text_masks.head.log_alpha.grad
    assert head_grad[~second.text_masks.head_valid].abs().sum() == 0
    assert head_grad[second.text_masks.head_valid].abs().sum() > 0


def test_prune_like_weights_selects_what_prune_keeps():
    masked = MaskedCLIP(_model()).eval()
    _set_masks(masked)
    params = dict(masked.model.named_parameters())
    compact = dict(masked.prune().named_parameters())
    # Soft mask values scale the pruned weights but not the cut tensors: ones stay ones.
    ones = masked.prune_like_weights({n: torch.ones_like(p) for n, p in params.items()})
    assert ones.keys() == compact.keys()
    for name, param in compact.items():
        assert torch.equal(ones[name], torch.ones_like(param)), name
    zeros = masked.prune_like_weights({})  # missing names count as zeros
    assert all(not t.any() for t in zeros.values())

    # With 0/1 masks pruning only selects: the cut weights are the pruned weights.
    binary_masks(masked)
    compact = dict(masked.prune().named_parameters())
    cut = masked.prune_like_weights({n: p.detach() for n, p in params.items()})
    assert cut.keys() == compact.keys()
    for name, param in compact.items():
        assert torch.equal(cut[name], param.detach()), name
    assert sum(p.numel() for p in compact.values()) < sum(p.numel() for p in params.values())


def test_forward_reads_both_towers_zero_patterns_at_once(monkeypatch):
    # The zero patterns set the compact shapes, so the host must read them: once per forward
    # for both towers together, never once per tower, layer or linear (a sync each, ~100 per
    # step at ViT-B sizes).
    import tinyclip_fast.pruning.compact as compact

    reads = []
    read_once = compact.channel_indices
    monkeypatch.setattr(compact, "channel_indices", lambda *a: reads.append(1) or read_once(*a))
    transfers = []
    to_host = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t: transfers.append(1) or to_host(t))
    masked = MaskedCLIP(_model()).train()
    _set_masks(masked)
    image_f, text_f, scale = masked(*_inputs())
    (image_f.sum() + text_f.sum() * scale).backward()
    assert len(reads) == 1 and len(transfers) == 1
    assert masked.visual_masks.head.log_alpha.grad.abs().sum() > 0
    assert masked.text_masks.head.log_alpha.grad.abs().sum() > 0


def test_prune_like_weights_maps_gradients_with_soft_masks():
    # A folded weight z * w has gradient g / z: cutting the masked model's gradients with
    # mask_power=-1 must give the pruned model's gradients (float64, soft masks, eval mode).
    masked = MaskedCLIP(_model()).double().eval()
    _set_masks(masked)
    image, text = _inputs()
    image = image.double()
    weights = torch.randn(2, 3, 32, dtype=torch.float64)

    def grads(model):
        image_f, text_f, scale = model(image, text)[:3]
        model.zero_grad()
        ((image_f * weights[0]).sum() + (text_f * weights[1]).sum() + scale).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    compact = masked.prune().eval()
    expected = grads(compact)
    masked_grads = grads(masked)
    source = {n[len("model.") :]: g for n, g in masked_grads.items() if n.startswith("model.")}
    cut = masked.prune_like_weights(source, mask_power=-1)
    cut_sq = masked.prune_like_weights({n: g * g for n, g in source.items()}, mask_power=-2)
    assert expected.keys() <= cut.keys()  # (layers left without heads get no gradient)
    softly_scaled = 0
    for name, grad in expected.items():
        if grad.numel() == 0:  # a layer left without MLP channels
            continue
        # masked_linear applies mask values rounded to fp32 (its kernels' scale type).
        tol = 1e-6 * float(grad.abs().max()) + 1e-15
        assert (cut[name] - grad).abs().max() <= tol, name
        assert (cut_sq[name] - grad * grad).abs().max() <= 2 * tol * float(grad.abs().max()), name
        selected = masked.prune_like_weights({name: source[name]})[name]
        softly_scaled += not torch.allclose(selected, grad)
    assert softly_scaled > 5  # soft values really rescale many of them
