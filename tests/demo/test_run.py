"""The demo run: summaries of accuracy curves and a miniature end-to-end demo."""

import json

import pytest
import torch

from tinyclip_fast.demo import run as demo
from tinyclip_fast.demo import teacher as demo_teacher
from tinyclip_fast.demo.data import (
    load_demo_split,
)


def test_first_step_reaching_and_curve():
    history = [
        {"step": 5, "loss": 1.0},
        {"step": 5, "top1": 0.2},
        {"step": 10, "top1": 0.5},
        {"step": 10, "top1": 0.5},
        {"step": 15, "top1": 0.4},
    ]
    curve = demo.accuracy_curve(history)
    assert curve == [(5, 0.2), (10, 0.5), (15, 0.4)]
    assert demo.first_step_reaching(curve, 0.45) == 10
    assert demo.first_step_reaching(curve, 0.6) is None


def history(curve, pruned_at=None):
    """An engine history with these evaluations (and a pruned record)."""
    records = [{"step": step, "stage": 0, "top1": top1} for step, top1 in curve]
    if pruned_at is not None:
        reason = f"the configured prune step {pruned_at}"
        records.append({"step": pruned_at, "event": "pruned", "prune_reason": reason})
    return records


def test_an_oversized_auto_student_gets_no_speed_up():
    # A student over the size budget (here 99% of the teacher) learning as fast as the others
    # is credited with no speed-up: the table says why instead of a step.
    settings = demo.DemoSettings(student_steps=30)
    curve = [(10, 0.9), (20, 0.95), (30, 0.96)]
    students = {
        "manual": {"params": 50, "history": history(curve)},
        "auto": {"params": 99, "history": history(curve, pruned_at=5)},
        "scratch": {"params": 50, "history": history([(10, 0.5), (20, 0.8), (30, 0.9)])},
    }
    summary = demo.summarise(100, 0.97, students, settings)
    auto, manual = summary["students"]["auto"], summary["students"]["manual"]
    assert not auto["within_budget"] and auto["steps_to_scratch_top1"] is None
    assert manual["within_budget"] and manual["steps_to_scratch_top1"] == 10
    table = demo.format_table(summary)
    assert "too big: n/a" in table.splitlines()[3]
    assert "auto: more than 60% of the teacher's parameters" in table
    assert "too big" not in table.splitlines()[2]


def test_the_auto_student_counts_from_the_step_its_history_says_it_pruned():
    settings = demo.DemoSettings(student_steps=30)
    students = {
        "manual": {"params": 50, "history": history([(10, 0.9), (20, 0.95), (30, 0.96)])},
        "auto": {"params": 50, "history": history([(10, 0.95), (20, 0.95), (30, 0.96)], 12)},
        "scratch": {"params": 50, "history": history([(10, 0.5), (20, 0.8), (30, 0.9)])},
    }
    auto = demo.summarise(100, 0.97, students, settings)["students"]["auto"]
    assert auto["prune_step"] == 12 and auto["prune_reason"] == "the configured prune step 12"
    assert auto["steps_to_scratch_top1"] == 20


@pytest.mark.slow
def test_miniature_demo_end_to_end(tmp_path, monkeypatch):
    tiny = demo.DemoSettings(
        teacher_steps=4,
        student_steps=4,
        batch_size=32,
        eval_points=2,
        max_train_samples=96,
        max_test_samples=40,
    )
    monkeypatch.setattr(demo.DemoSettings, "quick", classmethod(lambda cls: tiny))
    out = tmp_path / "run"
    args = ["--out", str(out), "--quick", "--data", "digits", "--no-progress", "--device", "cpu"]
    assert demo.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["students"]) == {"manual", "auto", "scratch"}
    teacher = summary["teacher"]
    assert teacher["params"] > 0 and 0.0 <= teacher["top1"] <= 1.0 and not teacher["reused"]
    for kind, entry in summary["students"].items():
        assert 0.0 <= entry["top1"] <= 1.0
        assert 0 < entry["params"] <= teacher["params"]
        assert [step for step, _ in entry["curve"]] == [2, 4]
        if kind == "scratch":
            assert entry["steps"] == 4
        else:
            reach = entry["steps_to_scratch_top1"]
            assert reach is None or reach in (2, 4)
            assert entry["within_budget"] == (entry["params"] <= 0.6 * teacher["params"])
    manual, scratch = summary["students"]["manual"], summary["students"]["scratch"]
    assert manual["params"] == scratch["params"] <= 0.6 * teacher["params"]
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "teacher" / demo_teacher.TEACHER_META).is_file()
    # A second demo run replaces its own run folders (the students' runs are the demo's).
    assert demo.main(args) == 0

    # The saved teacher is reused for the same set-up, and the engine can load it by name.
    train = load_demo_split("digits", "train", max_samples=tiny.max_train_samples)
    test = load_demo_split("digits", "test", max_samples=tiny.max_test_samples)
    evaluator = test.evaluator()
    reloaded, top1, reused = demo.load_or_train_teacher(
        out / "teacher",
        train,
        evaluator,
        tiny,
        seed=0,
        device=torch.device("cpu"),
        progress=False,
    )
    assert reused and top1 == teacher["top1"] == evaluator(reloaded)
    model, tokenizer, preprocess, _ = demo_teacher.build_demo_teacher(str(out / "teacher"))
    assert sum(p.numel() for p in model.parameters()) == teacher["params"]
    assert tokenizer.vocab_size == model.vocab_size
    assert torch.equal(tokenizer(["the digit two."]), train.tokenizer(["the digit two."]))
