"""The student a stage starts from when it names ``init``, and the student's Hugging Face
export at the end of a run."""

import open_clip
import pytest
import torch
from open_clip.model import set_model_preprocess_cfg
from support import HF_TEACHER_CFG, write_hf_clip

from tinyclip_fast.inheritance.student_io import save_student
from tinyclip_fast.train.config import StageConfig
from tinyclip_fast.train.students import export_hf, load_init, stage_student

pytest.importorskip("transformers")

STUDENT_CFG = {
    **HF_TEACHER_CFG,
    "vision_cfg": {**HF_TEACHER_CFG["vision_cfg"], "width": 32, "layers": 1},
    "text_cfg": {**HF_TEACHER_CFG["text_cfg"], "width": 32, "heads": 1, "layers": 1},
}


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return open_clip.model.CLIP(**cfg).eval()


@pytest.mark.parametrize("kind", ["hf", "student"])
def test_a_continue_stage_starts_from_its_init(tmp_path, kind):
    saved = _model(STUDENT_CFG, seed=4)
    if kind == "hf":
        folder, _ = write_hf_clip(tmp_path / "init", STUDENT_CFG, seed=4)
        init = f"hf:{folder}"
    else:
        init = str(save_student(saved, tmp_path / "init"))
    stage = StageConfig(steps=1, init=init)
    previous = _model(HF_TEACHER_CFG, seed=1)  # replaced by the init
    student = stage_student(stage, _model(HF_TEACHER_CFG, seed=2), previous, seed=0)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            student.eval().encode_image(images), saved.encode_image(images), atol=1e-5
        )


def test_init_must_read_the_teachers_inputs(tmp_path):
    short = {**STUDENT_CFG, "text_cfg": {**STUDENT_CFG["text_cfg"], "context_length": 8}}
    init = str(save_student(_model(short), tmp_path / "init"))
    with pytest.raises(ValueError, match="has context_length 8, the teacher 16"):
        load_init(init, _model(HF_TEACHER_CFG))


def test_hf_export_carries_the_teachers_preprocessing(tmp_path):
    teacher = _model(HF_TEACHER_CFG)
    cfg = {"size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    set_model_preprocess_cfg(teacher, {**cfg, "interpolation": "bilinear"})
    line = export_hf(_model(STUDENT_CFG), tmp_path / "student-hf", None, teacher)
    assert line == f"student as a transformers CLIPModel in {tmp_path / 'student-hf'}"
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(tmp_path / "student-hf")
    assert list(processor.image_mean) == [0.5] * 3 and list(processor.image_std) == [0.25] * 3
    assert int(processor.resample) == 2  # bilinear


def test_hf_export_of_a_student_clip_config_cannot_hold_is_one_line(tmp_path):
    student = _model({**STUDENT_CFG, "init_logit_bias": -10.0})
    line = export_hf(student, tmp_path / "student-hf", None, _model(HF_TEACHER_CFG))
    assert line.startswith("no student-hf/ export: cannot export to Hugging Face CLIPModel: ")
    assert "\n" not in line and "logit bias" in line
    assert not (tmp_path / "student-hf").exists()
