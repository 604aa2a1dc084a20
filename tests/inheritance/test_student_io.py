"""save_student / load_student: exact round trips, open_clip compatibility, clear errors."""

import json
import os

import open_clip
import pytest
import torch
from safetensors.torch import load_file
from support import TEACHER, TEXT

import tinyclip_fast.inheritance.student_io as student_io
from tinyclip_fast.inheritance.manual import manual_inherit
from tinyclip_fast.inheritance.student_io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_student,
    save_student,
)
from tinyclip_fast.ops.backend import force_backend
from tinyclip_fast.pruning.masked_clip import MaskedCLIP

STUDENT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16},
    "text_cfg": {**TEXT, "width": 32, "heads": 2, "layers": 2},
}


def _randomized(config):
    model = open_clip.model.CLIP(**config)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif t.is_floating_point() and name != "logit_scale":
                t.copy_(torch.randn_like(t) * 0.3)
    return model


def _inputs(image_size=32):
    return torch.randn(2, 3, image_size, image_size), torch.randint(1, 1000, (2, 16))


def _outputs(model, image, text):
    with torch.no_grad():
        return model.eval()(image, text)


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.fixture()
def manual_student():
    return manual_inherit(_randomized(TEACHER), STUDENT)


def test_manual_student_round_trip_and_plain_open_clip(manual_student, tmp_path):
    image, text = _inputs()
    expected = _outputs(manual_student, image, text)
    save_student(manual_student, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    loaded = load_student(tmp_path)
    assert type(loaded) is open_clip.model.CLIP
    _assert_same(_outputs(loaded, image, text), expected)

    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["open_clip_compatible"] is True
    assert config["vision_layers"] == [{"heads": 3, "mlp_width": 192}] * 2
    assert config["text_layers"] == [{"heads": 2, "mlp_width": 128}] * 2
    assert config["vision_width"] == 48 and config["text_width"] == 32
    plain = open_clip.model.CLIP(**config["model_cfg"])
    plain.load_state_dict(load_file(str(tmp_path / WEIGHTS_NAME)))
    _assert_same(_outputs(plain, image, text), expected)
    via_factory = open_clip.create_model(f"local-dir:{tmp_path}")
    _assert_same(_outputs(via_factory, image, text), expected)


def test_weights_only_no_optimizer_state(manual_student, tmp_path):
    save_student(manual_student, tmp_path)
    param_bytes = sum(t.numel() * t.element_size() for t in manual_student.state_dict().values())
    assert os.path.getsize(tmp_path / WEIGHTS_NAME) < param_bytes + 64 * 1024


def test_pruned_student_round_trip(tmp_path):
    masked = MaskedCLIP(_randomized(TEACHER)).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in masked.mask_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 3 + 1)
    with force_backend("torch"):
        compact = masked.prune()
    image, text = _inputs()
    expected = _outputs(compact, image, text)
    save_student(compact, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["open_clip_compatible"] is False
    heads = [b.attn.num_heads for b in compact.visual.transformer.resblocks]
    assert [d["heads"] for d in config["vision_layers"]] == heads
    mlp = [b.mlp.c_fc.out_features for b in compact.transformer.resblocks]
    assert [d["mlp_width"] for d in config["text_layers"]] == mlp
    loaded = load_student(tmp_path)
    assert type(loaded) is open_clip.model.CLIP
    _assert_same(_outputs(loaded, image, text), expected)


def test_resnet_student_round_trip(tmp_path):
    teacher = _randomized(
        {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 16, "head_width": 16},
            "text_cfg": {**TEXT, "width": 32, "heads": 2, "layers": 2},
        }
    )
    student = manual_inherit(
        teacher,
        {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
            "text_cfg": {**TEXT, "width": 32, "heads": 2, "layers": 1},
        },
    )
    image, text = _inputs(64)
    expected = _outputs(student, image, text)
    save_student(student, tmp_path / "rn")
    _assert_same(_outputs(load_student(tmp_path / "rn"), image, text), expected)
    _assert_same(
        _outputs(open_clip.create_model(f"local-dir:{tmp_path / 'rn'}"), image, text), expected
    )


def test_overwrite_is_atomic(manual_student, tmp_path, monkeypatch):
    save_student(manual_student, tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()

    def failing_save(state, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(student_io, "save_file", failing_save)
    with torch.no_grad():
        manual_student.visual.proj.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_student(manual_student, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])


def test_load_from_a_missing_folder_names_the_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_student(tmp_path / "nowhere")


def _truncate_weights(folder):
    weights = folder / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _remove_weights(folder):
    (folder / WEIGHTS_NAME).unlink()


def _truncate_config(folder):
    config = folder / CONFIG_NAME
    config.write_text(config.read_text()[:-20])


def _foreign_config(folder):
    (folder / CONFIG_NAME).write_text(json.dumps({"hello": 1}))


def _config_not_matching_weights(folder):
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["text_layers"][0]["mlp_width"] = 7
    config["open_clip_compatible"] = False
    (folder / CONFIG_NAME).write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (_truncate_weights, ValueError, "corrupt student weights"),
        (_remove_weights, FileNotFoundError, WEIGHTS_NAME),
        (_truncate_config, ValueError, "corrupt student config"),
        (_foreign_config, ValueError, "not a tinyclip_fast student config"),
        (_config_not_matching_weights, ValueError, "do not match"),
    ],
    ids=["truncated-weights", "missing-weights", "truncated-config", "foreign-config", "mismatch"],
)
def test_load_of_a_damaged_student_is_an_error_naming_the_damage(
    manual_student, tmp_path, damage, error, match
):
    save_student(manual_student, tmp_path)
    damage(tmp_path)
    with pytest.raises(error, match=match):
        load_student(tmp_path)


def test_save_rejects_non_clip(tmp_path):
    with pytest.raises(TypeError, match="open_clip.model.CLIP"):
        save_student(torch.nn.Linear(2, 2), tmp_path)


def test_pruned_student_without_zeros_loads_in_open_clip(tmp_path):
    masked = MaskedCLIP(_randomized(STUDENT), init_log_alpha=50.0).eval()
    with force_backend("torch"):
        compact = masked.prune()
    image, text = _inputs()
    expected = _outputs(compact, image, text)
    save_student(compact, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["open_clip_compatible"] is True
    plain = open_clip.model.CLIP(**config["model_cfg"])
    plain.load_state_dict(load_file(str(tmp_path / WEIGHTS_NAME)))
    for a, e in zip(_outputs(plain, image, text), expected, strict=True):
        assert (a - e).norm() <= 1e-5 * e.norm()


def test_hf_format_writes_a_clip_model_folder(tmp_path):
    pytest.importorskip("transformers")
    from tinyclip_fast.inheritance.hf import load_hf_clip

    clip_bpe = {**STUDENT, "text_cfg": {**STUDENT["text_cfg"], "vocab_size": 49408}}
    student = _randomized(clip_bpe).eval()
    assert save_student(student, tmp_path, format="hf") == tmp_path
    assert (tmp_path / "config.json").is_file() and not (tmp_path / CONFIG_NAME).exists()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = student.encode_image(images)
        actual = load_hf_clip(tmp_path).eval().encode_image(images)
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown student format 'onnx'; formats: native, hf"):
        save_student(_randomized(STUDENT), tmp_path, format="onnx")
    assert not any(tmp_path.iterdir())
