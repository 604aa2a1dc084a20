"""Resumable training state: atomic writes, clear errors, exact student round trips."""

import os

import open_clip
import pytest
import torch

from tinyclip_fast.inheritance.architecture import CompactResidualBlock
from tinyclip_fast.ops.backend import force_backend
from tinyclip_fast.pruning.masked_clip import MaskedCLIP
from tinyclip_fast.train import checkpoint
from tinyclip_fast.train.checkpoint import (
    load_training_state,
    pack_student,
    save_training_state,
    unpack_student,
)

CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 2, "head_width": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 4, "layers": 2},
}


def test_save_load_round_trip(tmp_path):
    state = {"step": 7, "weights": {"w": torch.randn(3, 4)}, "history": [{"loss": 1.5}]}
    path = save_training_state(tmp_path / "sub" / "checkpoint.pt", state)
    loaded = load_training_state(path)
    assert loaded["step"] == 7 and loaded["history"] == [{"loss": 1.5}]
    assert torch.equal(loaded["weights"]["w"], state["weights"]["w"])
    assert os.listdir(tmp_path / "sub") == ["checkpoint.pt"]  # no temporary file left


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_training_state(path, {"step": 1})

    def crash_mid_write(obj, target):
        with open(target, "wb") as handle:
            handle.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_training_state(path, {"step": 2})
    monkeypatch.undo()
    assert load_training_state(path)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training checkpoint at .*missing.pt"):
        load_training_state(tmp_path / "missing.pt")
    good = save_training_state(tmp_path / "good.pt", {"step": 3, "x": torch.randn(100)})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt training checkpoint .*truncated.pt"):
        load_training_state(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt training checkpoint"):
        load_training_state(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(ValueError, match="not a tinyclip_fast training checkpoint"):
        load_training_state(foreign)


def _prunable_masked(mask_hidden: bool = True) -> MaskedCLIP:
    masked = MaskedCLIP(open_clip.model.CLIP(**CFG), mask_hidden=mask_hidden)
    with torch.no_grad():
        # Different log_alpha per entry: layers keep different numbers of heads/channels.
        for p in masked.mask_parameters():
            p.copy_(torch.empty_like(p).uniform_(-3.0, 4.0))
    return masked


@pytest.mark.parametrize("kind", ["clip", "masked", "masked_heads_and_mlp", "pruned"])
def test_student_pack_unpack_is_exact(tmp_path, kind):
    masked = _prunable_masked(mask_hidden=kind != "masked_heads_and_mlp")
    model = {"clip": masked.model, "pruned": masked.prune()}.get(kind, masked)
    if kind == "pruned":
        widths = {b.mlp.c_fc.out_features for b in model.transformer.resblocks}
        assert isinstance(model.transformer.resblocks[0], CompactResidualBlock)
        assert len(widths) > 1, "the test needs layers of different widths"
    path = save_training_state(tmp_path / "c.pt", {"student": pack_student(model)})
    rebuilt = unpack_student(load_training_state(path)["student"])  # weights_only load
    assert type(rebuilt) is type(model)
    if kind.startswith("masked"):
        assert rebuilt.mask_hidden == (kind == "masked")
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in model.modules()]
    for (name, a), (_, b) in zip(
        model.state_dict().items(), rebuilt.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    model.eval()
    rebuilt.eval()
    images, texts = torch.randn(3, 3, 16, 16), torch.randint(1, 99, (3, 8))
    with torch.no_grad(), force_backend("torch"):
        for a, b in zip(model(images, texts), rebuilt(images, texts), strict=True):
            assert torch.equal(a, b)


def test_training_state_is_a_plain_dict_on_disk_without_absent_parts(tmp_path):
    state = checkpoint.TrainingState(
        stage=1,
        stage_step=3,
        step=9,
        student={"config": "{}", "masked": False, "state": {"w": torch.ones(2)}},
        scaler={"scale": 1.0},
        rng=[[torch.arange(4, dtype=torch.uint8)]],
        history=[{"step": 9, "loss": 0.5}],
        stage_params=[100],
        config='{"seed": 0}',
        optimizer={"state": {}, "param_groups": []},
    )
    path = state.save(tmp_path / "checkpoint.pt")
    on_disk = load_training_state(path)
    assert set(on_disk) == {
        "format",
        "stage",
        "stage_step",
        "step",
        "student",
        "scaler",
        "rng",
        "history",
        "stage_params",
        "config",
        "optimizer",
    }
    loaded = checkpoint.TrainingState.load(path)
    assert (loaded.stage, loaded.stage_step, loaded.step) == (1, 3, 9)
    assert loaded.history == state.history and loaded.config == state.config
    assert torch.equal(loaded.student["state"]["w"], torch.ones(2))
    assert loaded.bad_samples is None and loaded.controller is None
