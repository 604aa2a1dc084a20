"""The demo's registrations: "demo" as a teacher, a data kind and an eval kind."""

import pytest

from tinyclip_fast.data.datasets import build_dataset
from tinyclip_fast.demo.plugins import register_demo
from tinyclip_fast.teachers.loading import build_teacher
from tinyclip_fast.train.config import EvalConfig, TeacherConfig
from tinyclip_fast.train.evaluation import build_evaluator


def test_demo_kinds_after_registration(tmp_path):
    register_demo()
    data = build_dataset(
        {"kind": "demo", "source": "digits", "split": "test"}, preprocess=None, tokenizer=None
    )
    assert data.images.shape[1:] == (3, 32, 32)
    evaluator = build_evaluator(
        EvalConfig(kind="demo", path="digits"), tokenizer=None, preprocess=None, device="cpu"
    )
    assert len(evaluator.class_names) == 10
    with pytest.raises(FileNotFoundError, match="run `python -m tinyclip_fast demo` first"):
        build_teacher(TeacherConfig(model="demo", pretrained=str(tmp_path / "none")))
