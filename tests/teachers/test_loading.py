"""Teachers of a run: timm-tower teachers forward only, ensembles that must read the same
inputs, teacher biases for the sigmoid loss."""

import json
import sys

import open_clip
import pytest
import torch
from support import TEACHER_CFG, TEXT, write_hf_clip

from tinyclip_fast.teachers.loading import (
    build_teacher,
    build_teachers,
    own_logit_bias,
    teacher_biases,
    teacher_embeddings,
)
from tinyclip_fast.train.config import TeacherConfig

# A sigmoid-trained-style teacher with a timm ConvNeXt image tower (timm's tiny test model,
# no weights) and open_clip's custom text tower: what ViT-B-16-SigLIP looks like to us.
TIMM_CFG = {
    "embed_dim": 32,
    "init_logit_bias": -7.5,
    "custom_text": True,
    "vision_cfg": {
        "image_size": 32,
        "timm_model_name": "test_convnext",
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        "timm_proj": "linear",
    },
    "text_cfg": {**TEXT, "width": 32, "heads": 2, "layers": 1},
}


def write_teacher(folder, name, model_cfg, seed=0):
    """An open_clip model-config JSON and a checkpoint of it: a TeacherConfig for them."""
    path = folder / f"{name}.json"
    path.write_text(json.dumps(model_cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    weights = folder / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    return TeacherConfig(model=str(path), pretrained=str(weights))


def test_timm_tower_teacher_runs_forward_only(tmp_path):
    config = write_teacher(tmp_path, "tiny-timm-convnext", TIMM_CFG)
    teacher, _, _, _ = build_teacher(config)
    assert type(teacher.visual).__name__ == "TimmModel"
    assert not hasattr(teacher.visual, "transformer")  # no open_clip VisionTransformer
    assert own_logit_bias(teacher) == -7.5
    teacher.eval()
    images = torch.randn(5, 3, 32, 32)
    texts = torch.randint(1, TEXT["vocab_size"], (5, TEXT["context_length"]))
    image_t, text_t = teacher_embeddings(teacher, images, texts, 2, _no_autocast)
    with torch.no_grad():
        expected_image, expected_text, *_ = teacher(images, texts)
    assert image_t.shape == text_t.shape == (5, 32)
    assert torch.allclose(image_t, expected_image, atol=1e-5)
    assert torch.allclose(text_t, expected_text, atol=1e-5)
    assert not image_t.requires_grad


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def test_ensemble_shares_the_first_teachers_inputs(tmp_path):
    native = write_teacher(tmp_path, "tiny-native", TEACHER_CFG, seed=1)
    timm = write_teacher(tmp_path, "tiny-timm-convnext", TIMM_CFG, seed=2)
    teachers, tokenizer, train_tf, eval_tf = build_teachers([native, timm])
    assert [type(t).__name__ for t in teachers] == ["CLIP", "CustomTextCLIP"]
    assert tokenizer(["a cat"]).shape == (1, TEXT["context_length"])

    bigger = {**TEACHER_CFG, "vision_cfg": {**TEACHER_CFG["vision_cfg"], "image_size": 64}}
    wide = write_teacher(tmp_path, "tiny-64px", bigger)
    with pytest.raises(
        ValueError, match=r"teacher 1 .*tiny-64px.*image size \(32, 32\) != \(64, 64\)"
    ):
        build_teachers([native, wide])
    shorter = {**TEACHER_CFG, "text_cfg": {**TEACHER_CFG["text_cfg"], "context_length": 12}}
    short = write_teacher(tmp_path, "tiny-12-tokens", shorter)
    with pytest.raises(ValueError, match="tokenizers differ.*context 16 vs 12"):
        build_teachers([native, short])
    with pytest.raises(ValueError, match="5 teachers given; give 1 to 4"):
        build_teachers([native] * 5)


def test_teacher_biases_own_given_or_refused():
    said = []
    configs = [TeacherConfig(model="a"), TeacherConfig(model="b", logit_bias=-4.0)]
    assert teacher_biases(configs, [-7.5, None], said.append) == [-7.5, -4.0]
    assert said == []
    configs[0].logit_bias = -3.0
    assert teacher_biases(configs, [-7.5, None], said.append) == [-3.0, -4.0]
    assert said == ["teacher 0 (a): logit bias -3 given, not its own -7.5"]
    with pytest.raises(ValueError, match=r"teacher 1 \(c\) has no logit_bias.*teacher.logit_bias"):
        teacher_biases([TeacherConfig(model="a"), TeacherConfig(model="c")], [1.0, None], print)
    # Teachers passed to distill() without one config entry each: their own biases only.
    assert teacher_biases([TeacherConfig()], [1.0, 2.0], print) == [1.0, 2.0]
    with pytest.raises(ValueError, match="give one entry per teacher"):
        teacher_biases([TeacherConfig(logit_bias=1.0)], [1.0, 2.0], print)


def test_hf_folder_teacher_has_the_folders_weights_tokens_and_preprocessing(tmp_path):
    pytest.importorskip("transformers")
    from tinyclip_fast.inheritance.hf import load_hf_teacher

    folder, model = write_hf_clip(tmp_path / "hf")
    teacher, tokenizer, train_tf, eval_tf = build_teacher(TeacherConfig(model=f"hf:{folder}"))
    _, want_tokenizer, want_train, want_eval = load_hf_teacher(folder)
    images = torch.randn(2, 3, 32, 32)
    tokens = tokenizer(["a photo of a cat.", "two dogs"])
    assert torch.equal(tokens, want_tokenizer(["a photo of a cat.", "two dogs"]))
    assert (repr(train_tf), repr(eval_tf)) == (repr(want_train), repr(want_eval))
    with torch.no_grad():
        assert torch.allclose(teacher.encode_image(images), model.encode_image(images), atol=1e-5)
        assert torch.allclose(teacher.encode_text(tokens), model.encode_text(tokens), atol=1e-5)


@pytest.mark.parametrize(
    "model, pretrained, message",
    [
        pytest.param("hf:", None, "teacher 'hf:': name the folder", id="no-folder"),
        pytest.param(
            "hf:x", "w.pt", "teacher hf:x holds its own weights: give it no pretrained", id="pt"
        ),
    ],
)
def test_hf_teacher_mistakes(model, pretrained, message):
    with pytest.raises(ValueError, match=message):
        build_teacher(TeacherConfig(model=model, pretrained=pretrained))


def test_hf_teacher_without_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "tinyclip_fast.inheritance.hf", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'tinyclip-fast\[hf\]'"):
        build_teacher(TeacherConfig(model="hf:some/folder"))
