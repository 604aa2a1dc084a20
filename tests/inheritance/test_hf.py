"""Hugging Face CLIPModel folders: export and import give the same embeddings as the model
they came from (fp32, relative error < 1e-5), students CLIPConfig cannot hold are refused in
one line, and broken folders give clear errors. No network: every model is built here."""

import json

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import get_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from support import TEXT, rel_err

pytest.importorskip("transformers")
from transformers import CLIPConfig, CLIPModel, CLIPProcessor  # noqa: E402

from tinyclip_fast.inheritance.hf import load_hf_clip, load_hf_teacher, save_hf_clip  # noqa: E402
from tinyclip_fast.inheritance.manual import manual_inherit  # noqa: E402
from tinyclip_fast.ops.backend import force_backend  # noqa: E402
from tinyclip_fast.pruning.masked_clip import MaskedCLIP  # noqa: E402

CLIP_VOCAB = 49408  # open_clip's CLIP BPE: the exported tokenizer must match it
STUDENT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": CLIP_VOCAB, "width": 32, "heads": 2},
}
CAPTIONS = ["a photo of a cat.", "Two DOGS, running!", "x", "an émigré's café"]


def _randomized(model):
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and name != "logit_scale":
                tensor.copy_(torch.randn_like(tensor) * 0.1)
    return model.eval()


def _student(quick_gelu=True, **overrides):
    cfg = {**STUDENT, "quick_gelu": quick_gelu}
    cfg["text_cfg"] = {**cfg["text_cfg"], "layers": 2, **overrides}
    return _randomized(open_clip.model.CLIP(**cfg))


def _tokens(context_length=24):
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)(CAPTIONS)


@torch.no_grad()
def _open_clip_features(model, images, tokens):
    return model.encode_image(images), model.encode_text(tokens)


@torch.no_grad()
def _hf_features(model, images, tokens):
    image = model.get_image_features(pixel_values=images).pooler_output
    return image, model.get_text_features(input_ids=tokens).pooler_output


def _hf_model(hidden_act="gelu", eps=1e-6, eos_token_id=2):
    text = {"vocab_size": CLIP_VOCAB, "hidden_size": 32, "intermediate_size": 64}
    text.update(num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=24)
    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2}
    vision.update(num_attention_heads=3, image_size=32, patch_size=8)
    for tower in (text, vision):
        tower.update(hidden_act=hidden_act, layer_norm_eps=eps, projection_dim=16)
    text["eos_token_id"] = eos_token_id
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    return _randomized(CLIPModel(config))


@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quick_gelu", "gelu"])
def test_export_gives_open_clip_embeddings_in_transformers(tmp_path, quick_gelu):
    student = _student(quick_gelu)
    save_hf_clip(student, tmp_path / "hf")
    exported = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    expected_act = "quick_gelu" if quick_gelu else "gelu"
    assert exported.config.vision_config.hidden_act == expected_act
    assert exported.config.text_config.layer_norm_eps == student.ln_final.eps
    images, tokens = torch.randn(3, 3, 32, 32), _tokens()
    expected = _open_clip_features(student, images, tokens)
    for actual, wanted in zip(_hf_features(exported, images, tokens), expected, strict=True):
        assert rel_err(actual, wanted) < 1e-5


def test_manually_inherited_student_exports(tmp_path):
    wide = {**STUDENT, "quick_gelu": True}
    wide["vision_cfg"] = {**STUDENT["vision_cfg"], "width": 64, "layers": 3}
    wide["text_cfg"] = {**STUDENT["text_cfg"], "width": 64, "heads": 4, "layers": 3}
    teacher = _randomized(open_clip.model.CLIP(**wide))
    student = manual_inherit(teacher, {**STUDENT, "text_cfg": {**STUDENT["text_cfg"], "layers": 1}})
    save_hf_clip(student.eval(), tmp_path)
    exported = CLIPModel.from_pretrained(tmp_path).eval()
    images, tokens = torch.randn(2, 3, 32, 32), _tokens()
    expected = _open_clip_features(student, images, tokens)
    for actual, wanted in zip(_hf_features(exported, images, tokens), expected, strict=True):
        assert rel_err(actual, wanted) < 1e-5


def test_exported_tokenizer_gives_open_clip_ids_and_embeddings(tmp_path):
    student = _student()
    save_hf_clip(student, tmp_path)
    tokenizer = CLIPProcessor.from_pretrained(tmp_path).tokenizer
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=24, return_tensors="pt").input_ids
    expected = _tokens()
    eot = expected.argmax(dim=-1)
    for row, end in enumerate(eot.tolist()):
        assert ids[row, : end + 1].tolist() == expected[row, : end + 1].tolist()
    exported = CLIPModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        actual = exported.get_text_features(input_ids=ids).pooler_output
    assert rel_err(actual, student.encode_text(expected).detach()) < 1e-5


def test_exported_image_processor_matches_open_clip_preprocessing(tmp_path):
    student = _student()
    save_hf_clip(student, tmp_path)
    processor = CLIPProcessor.from_pretrained(tmp_path).image_processor
    preprocess = image_transform_v2(
        PreprocessCfg(**get_model_preprocess_cfg(student)), is_train=False
    )
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(45, 70, 3), dtype=np.uint8))
    actual = processor(images=image, return_tensors="pt").pixel_values[0]
    expected = preprocess(image)
    assert actual.shape == expected.shape
    # The two resizers round to uint8 differently: at most one pixel level apart.
    one_level = 1 / 255 / min(processor.image_std)
    assert (actual - expected).abs().max() <= one_level + 1e-6


@pytest.mark.parametrize(
    "hidden_act,eps,eos_token_id",
    [("gelu", 1e-6, 2), ("quick_gelu", 1e-5, CLIP_VOCAB - 1), ("gelu", 1e-5, 7)],
    ids=["gelu-eps1e-6-legacy-eos", "quick_gelu-eot-eos", "gelu-custom-eos"],
)
def test_import_gives_transformers_embeddings_in_open_clip(tmp_path, hidden_act, eps, eos_token_id):
    reference = _hf_model(hidden_act, eps, eos_token_id)
    reference.save_pretrained(tmp_path)
    imported = load_hf_clip(tmp_path).eval()
    assert type(imported) is open_clip.model.CLIP
    assert imported.visual.ln_pre.eps == eps and imported.ln_final.eps == eps
    images, tokens = torch.randn(3, 3, 32, 32), _tokens()
    if eos_token_id == 7:
        tokens[:, 5] = 7  # the first eos token is pooled, not the largest id
    expected = _hf_features(reference, images, tokens)
    for actual, wanted in zip(_open_clip_features(imported, images, tokens), expected, strict=True):
        assert rel_err(actual, wanted) < 1e-5


def test_import_reads_the_folder_preprocessing(tmp_path):
    student = _student()
    open_clip.model.set_model_preprocess_cfg(
        student,
        {"size": 32, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "interpolation": "bilinear"},
    )
    save_hf_clip(student, tmp_path)
    cfg = get_model_preprocess_cfg(load_hf_clip(tmp_path))
    assert cfg["size"] == 32 and cfg["interpolation"] == "bilinear"
    assert cfg["mean"] == pytest.approx((0.5, 0.4, 0.3))
    assert cfg["std"] == pytest.approx((0.2, 0.25, 0.3))


def test_teacher_from_a_folder_tokenizes_and_preprocesses_as_the_student(tmp_path):
    student = _student()
    save_hf_clip(student, tmp_path)
    model, tokenizer, train_tf, eval_tf = load_hf_teacher(tmp_path)
    ids, expected = tokenizer(CAPTIONS), _tokens()
    assert ids.shape == expected.shape
    for row, end in enumerate(expected.argmax(dim=-1).tolist()):
        assert ids[row, : end + 1].tolist() == expected[row, : end + 1].tolist()
    with torch.no_grad():
        assert rel_err(model.eval().encode_text(ids), student.encode_text(expected)) < 1e-5
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), np.uint8))
    cfg = PreprocessCfg(**get_model_preprocess_cfg(student))
    assert torch.equal(eval_tf(image), image_transform_v2(cfg, is_train=False)(image))
    assert train_tf(image).shape == (3, 32, 32)


def test_teacher_folder_without_tokenizer_uses_the_clip_bpe(tmp_path):
    _hf_model().save_pretrained(tmp_path)
    _, tokenizer, _, _ = load_hf_teacher(tmp_path)
    assert torch.equal(tokenizer(CAPTIONS), _tokens())


def test_round_trip_is_exact(tmp_path):
    student = _student()
    save_hf_clip(student, tmp_path)
    loaded = load_hf_clip(tmp_path).eval()
    assert loaded.state_dict().keys() == student.state_dict().keys()
    for name, tensor in student.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_imported_model_exports_back_to_the_same_transformers_weights(tmp_path):
    reference = _hf_model(hidden_act="quick_gelu", eps=1e-5, eos_token_id=CLIP_VOCAB - 1)
    reference.save_pretrained(tmp_path / "in")
    save_hf_clip(load_hf_clip(tmp_path / "in"), tmp_path / "out")
    again = CLIPModel.from_pretrained(tmp_path / "out")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def _pruned_student():
    masked = MaskedCLIP(_student()).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in masked.mask_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 3 + 1)
    with force_backend("torch"):
        return masked.prune()


def test_per_layer_widths_are_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="per-layer") as info:
        save_hf_clip(_pruned_student(), tmp_path)
    message = str(info.value)
    assert "\n" not in message and "save_student" in message
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize(
    "build,reason",
    [
        (lambda: _student(pool_type="last"), "text pooling 'last'"),
        (lambda: _student(no_causal_mask=True), "causal mask"),
        (
            lambda: _randomized(open_clip.model.CLIP(**STUDENT, init_logit_bias=-10.0)),
            "logit bias",
        ),
        (
            lambda: _randomized(
                open_clip.model.CLIP(
                    embed_dim=16,
                    vision_cfg={"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
                    text_cfg={**TEXT, "width": 32, "heads": 2, "layers": 1},
                )
            ),
            "ModifiedResNet",
        ),
    ],
    ids=["last-token-pooling", "no-causal-mask", "siglip-logit-bias", "resnet"],
)
def test_towers_clip_config_cannot_hold_are_refused(tmp_path, build, reason):
    with pytest.raises(ValueError, match=reason) as info:
        save_hf_clip(build(), tmp_path)
    assert "\n" not in str(info.value)


def test_tokenizer_vocabulary_must_match_the_model(tmp_path):
    student = _randomized(
        open_clip.model.CLIP(**{**STUDENT, "text_cfg": {**TEXT, "width": 32, "heads": 2}})
    )
    with pytest.raises(ValueError, match="vocabulary"):
        save_hf_clip(student, tmp_path)


@pytest.fixture()
def hf_folder(tmp_path):
    _hf_model().save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_clip(tmp_path / "nowhere")


def test_folder_without_config(hf_folder):
    (hf_folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_clip(hf_folder)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""], ids=["garbage", "list", "empty"])
def test_corrupt_config(hf_folder, text):
    (hf_folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match="corrupt transformers config"):
        load_hf_clip(hf_folder)


def test_config_of_another_model_type(hf_folder):
    config = json.loads((hf_folder / "config.json").read_text())
    (hf_folder / "config.json").write_text(json.dumps({**config, "model_type": "siglip"}))
    with pytest.raises(ValueError, match="not a CLIPModel"):
        load_hf_clip(hf_folder)


def test_missing_weights(hf_folder):
    (hf_folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="cannot read the CLIPModel weights"):
        load_hf_clip(hf_folder)


def test_truncated_weights(hf_folder):
    weights = hf_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read the CLIPModel weights"):
        load_hf_clip(hf_folder)


def test_weights_that_do_not_match_the_config(hf_folder):
    config = json.loads((hf_folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    (hf_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match config.json"):
        load_hf_clip(hf_folder)
