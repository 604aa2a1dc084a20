"""Manual weight inheritance: every student tensor is the right slice of the right teacher layer."""

import open_clip
import pytest
import torch
from support import TEACHER, TEXT

from tinyclip_fast.inheritance.manual import manual_inherit, select_layers
from tinyclip_fast.inheritance.presets import PRESETS, preset_config
from tinyclip_fast.ops.backend import force_backend
from tinyclip_fast.pruning.masked_clip import MaskedCLIP

STUDENT = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16},
    "text_cfg": {**TEXT, "width": 32, "heads": 2, "layers": 3},
}


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    # open_clip leaves biases / LayerNorms at constants: make every entry distinct.
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn_like(t))
    return model


@pytest.fixture(scope="module")
def vit_teacher():
    torch.manual_seed(1)
    return _randomize(open_clip.model.CLIP(**TEACHER)).eval()


def _block(model, tower, i):
    blocks = (
        model.visual.transformer.resblocks if tower == "visual" else model.transformer.resblocks
    )
    return blocks[i]


def test_select_layers_rules():
    assert select_layers(12, 6, "every_k") == [0, 2, 4, 6, 8, 10]
    assert select_layers(12, 9, "every_k") == list(range(9))
    assert select_layers(12, 12, "every_k") == list(range(12))
    assert select_layers(12, 6, "even") == [0, 2, 4, 7, 9, 11]
    assert select_layers(12, 3, "even") == [0, 6, 11]
    assert select_layers(5, 1, "even") == [0]
    with pytest.raises(ValueError, match="layer_selection"):
        select_layers(12, 6, "random")
    with pytest.raises(ValueError, match="depth"):
        select_layers(4, 5, "every_k")


def test_vit_slices_every_k(vit_teacher):
    student = manual_inherit(vit_teacher, STUDENT)
    assert type(student) is open_clip.model.CLIP
    t, s = vit_teacher, student
    w, tw = 48, 64
    assert torch.equal(s.visual.conv1.weight, t.visual.conv1.weight[:w])
    assert torch.equal(s.visual.class_embedding, t.visual.class_embedding[:w])
    assert torch.equal(s.visual.positional_embedding, t.visual.positional_embedding[:, :w])
    assert torch.equal(s.visual.ln_pre.weight, t.visual.ln_pre.weight[:w])
    assert torch.equal(s.visual.ln_post.bias, t.visual.ln_post.bias[:w])
    assert torch.equal(s.visual.proj, t.visual.proj[:w, :24])
    assert torch.equal(s.logit_scale, t.logit_scale)
    # vision: 4 -> 2 layers, step 2: student layer 1 <- teacher layer 2
    for i, ti in ((0, 0), (1, 2)):
        sb, tb = _block(s, "visual", i), _block(t, "visual", ti)
        for block in range(3):  # q, k, v: first 3 heads of 4 (head width 16), first 48 inputs
            rows = slice(block * tw, block * tw + w)
            assert torch.equal(
                sb.attn.in_proj_weight[block * w : (block + 1) * w],
                tb.attn.in_proj_weight[rows, :w],
            )
            assert torch.equal(
                sb.attn.in_proj_bias[block * w : (block + 1) * w], tb.attn.in_proj_bias[rows]
            )
        # the k block's third head: teacher rows 64 + 32 .. 64 + 48
        assert torch.equal(
            sb.attn.in_proj_weight[w + 32 : w + 48], tb.attn.in_proj_weight[96:112, :w]
        )
        assert torch.equal(sb.attn.out_proj.weight, tb.attn.out_proj.weight[:w, :w])
        assert torch.equal(sb.attn.out_proj.bias, tb.attn.out_proj.bias[:w])
        assert torch.equal(sb.mlp.c_fc.weight, tb.mlp.c_fc.weight[: 4 * w, :w])
        assert torch.equal(sb.mlp.c_fc.bias, tb.mlp.c_fc.bias[: 4 * w])
        assert torch.equal(sb.mlp.c_proj.weight, tb.mlp.c_proj.weight[:w, : 4 * w])
        assert torch.equal(sb.ln_1.weight, tb.ln_1.weight[:w])
        assert torch.equal(sb.ln_2.bias, tb.ln_2.bias[:w])
    # text: width 64 -> 32 (2 heads of 4), 4 -> 3 layers with step 1
    assert torch.equal(s.token_embedding.weight, t.token_embedding.weight[:, :32])
    assert torch.equal(s.positional_embedding, t.positional_embedding[:, :32])
    assert torch.equal(s.ln_final.weight, t.ln_final.weight[:32])
    assert torch.equal(s.text_projection, t.text_projection[:32, :24])
    for i in range(3):
        sb, tb = _block(s, "text", i), _block(t, "text", i)
        q, k, v = sb.attn.in_proj_weight.split(32)
        tq, tk, tv = tb.attn.in_proj_weight.split(64)
        assert torch.equal(q, tq[:32, :32]) and torch.equal(k, tk[:32, :32])
        assert torch.equal(v, tv[:32, :32])
        assert torch.equal(sb.mlp.c_proj.weight, tb.mlp.c_proj.weight[:32, :128])
    features = s.encode_image(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 24) and torch.isfinite(features).all()


def test_even_layer_selection(vit_teacher):
    config = {**STUDENT, "vision_cfg": {**STUDENT["vision_cfg"], "layers": 3}}
    student = manual_inherit(vit_teacher, config, layer_selection="even")
    # 4 -> 3 evenly: round(linspace(0, 3, 3)) = 0, 2, 3 (round half to even)
    for i, ti in enumerate([0, 2, 3]):
        assert torch.equal(
            _block(student, "visual", i).mlp.c_fc.weight,
            _block(vit_teacher, "visual", ti).mlp.c_fc.weight[:192, :48],
        )
        assert torch.equal(
            _block(student, "text", i).attn.out_proj.weight,
            _block(vit_teacher, "text", ti).attn.out_proj.weight[:32, :32],
        )


def test_same_size_student_is_a_copy(vit_teacher):
    student = manual_inherit(vit_teacher, TEACHER).eval()
    image, text = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2, 16))
    for a, b in zip(student(image, text)[:2], vit_teacher(image, text)[:2], strict=True):
        assert torch.equal(a, b)


def test_resnet_inheritance():
    torch.manual_seed(2)
    teacher_cfg = {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 16, "head_width": 16},
        "text_cfg": {**TEXT, "width": 32, "heads": 2, "layers": 2},
    }
    student_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
        "text_cfg": {**TEXT, "width": 32, "heads": 2, "layers": 1},
    }
    teacher = _randomize(open_clip.model.CLIP(**teacher_cfg))
    student = manual_inherit(teacher, student_cfg)
    tv, sv = teacher.visual, student.visual
    assert torch.equal(sv.conv1.weight, tv.conv1.weight[:4])
    assert torch.equal(sv.conv3.weight, tv.conv3.weight[:8, :4])
    assert torch.equal(sv.bn3.running_var, tv.bn3.running_var[:8])
    assert torch.equal(sv.layer2[0].conv2.weight, tv.layer2[0].conv2.weight[:16, :16])
    down_s, down_t = getattr(sv.layer2[0].downsample, "0"), getattr(tv.layer2[0].downsample, "0")
    assert torch.equal(down_s.weight, down_t.weight[:64, :32])
    assert torch.equal(sv.layer4[0].bn3.bias, tv.layer4[0].bn3.bias[:256])
    assert torch.equal(sv.attnpool.q_proj.weight, tv.attnpool.q_proj.weight[:256, :256])
    assert torch.equal(sv.attnpool.positional_embedding, tv.attnpool.positional_embedding[:, :256])
    assert torch.equal(sv.attnpool.c_proj.weight, tv.attnpool.c_proj.weight[:32, :256])
    assert sv.attnpool.num_heads == 16 and tv.attnpool.num_heads == 32
    out = student.eval().encode_image(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"vision_cfg": {"width": 80}}, "bigger than the teacher"),
        ({"text_cfg": {"heads": 4}}, "head width differs"),
        # Another patch size is another token grid, never a "bigger student".
        ({"vision_cfg": {"patch_size": 16}}, "patch size, image size and kernel sizes cannot"),
        ({"vision_cfg": {"patch_size": 4}}, "patch size, image size and kernel sizes cannot"),
        ({"vision_cfg": {"layers": 5}}, "more than the teacher"),
        ({"embed_dim": 40}, "bigger than the teacher"),
        ({"vision_cfg": {"layers": [1, 1, 1, 1], "width": 8}}, "vision tower type differs"),
    ],
)
def test_errors(vit_teacher, change, match):
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in STUDENT.items()}
    for key, value in change.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    with pytest.raises(ValueError, match=match):
        manual_inherit(vit_teacher, config)


def test_teacher_with_attentional_pooler_is_refused():
    pooled = {**TEACHER, "vision_cfg": {**TEACHER["vision_cfg"], "attentional_pool": True}}
    with pytest.raises(ValueError, match="attentional pooler"):
        manual_inherit(open_clip.model.CLIP(**pooled), STUDENT)


def test_teacher_that_is_not_a_clip_is_refused():
    with pytest.raises(ValueError, match="supported"):
        manual_inherit(torch.nn.Linear(2, 2), STUDENT)


def test_unknown_layer_selection_is_refused(vit_teacher):
    with pytest.raises(ValueError, match="layer_selection"):
        manual_inherit(vit_teacher, STUDENT, layer_selection="last")


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("ViT-1M")


# Published image + text parameters (millions) and what the presets count. Text is counted
# without the token embedding table, as TinyCLIP's model zoo does.
PUBLISHED = {
    "ViT-61M-32-Text-29M": (61, 29),
    "ViT-40M-32-Text-19M": (40, 19),
    "ViT-39M-16-Text-19M": (39, 19),
    "ViT-8M-16-Text-3M": (8, 3),
    "ResNet-30M-Text-29M": (30, 29),
    "ResNet-19M-Text-19M": (19, 19),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts(name):
    config = preset_config(name)
    with torch.device("meta"):
        model = open_clip.model.CLIP(**config)
    image = sum(p.numel() for p in model.visual.parameters())
    text = sum(p.numel() for p in model.parameters()) - image
    text -= model.token_embedding.weight.numel() + model.logit_scale.numel()
    pub_image, pub_text = PUBLISHED[name]
    # The zoo names round to whole millions (Text-3M is 2.5M: rounded up).
    assert abs(image / 1e6 - pub_image) <= 0.5
    assert abs(text / 1e6 - pub_text) <= 0.5
    if "ViT" in name:
        heads = config["vision_cfg"]["width"] // 64
        assert model.visual.transformer.resblocks[0].attn.num_heads == heads
    assert model.transformer.resblocks[0].attn.head_dim == 64


def test_vit_b32_to_vit_40m_smoke():
    teacher = open_clip.create_model("ViT-B-32", pretrained=None)
    student = manual_inherit(teacher, preset_config("ViT-40M-32-Text-19M"))
    assert student.visual.conv1.weight.shape == (512, 3, 32, 32)
    assert len(student.visual.transformer.resblocks) == 12
    assert len(student.transformer.resblocks) == 6
    assert student.visual.transformer.resblocks[0].attn.num_heads == 8
    tb, sb = teacher.visual.transformer.resblocks[11], student.visual.transformer.resblocks[11]
    assert torch.equal(sb.attn.in_proj_weight[512:1024], tb.attn.in_proj_weight[768:1280, :512])
    assert torch.equal(
        student.transformer.resblocks[5].mlp.c_fc.weight,
        teacher.transformer.resblocks[10].mlp.c_fc.weight,
    )
    assert torch.equal(student.visual.proj, teacher.visual.proj[:512])


def test_pruned_student_can_be_a_teacher(vit_teacher):
    with force_backend("torch"):
        compact = MaskedCLIP(vit_teacher, init_log_alpha=50.0).eval().prune()
    assert type(compact.transformer.resblocks[0]).__name__ == "CompactResidualBlock"
    from_compact = manual_inherit(compact, STUDENT).state_dict()
    for name, value in manual_inherit(vit_teacher, STUDENT).state_dict().items():
        assert torch.equal(from_compact[name], value), name
