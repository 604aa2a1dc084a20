"""The run's output: rank-0 lines, metrics records every log_every steps, evaluations kept
out of images/s and recorded once per step, the pruning report, the non-finite message."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from support import make_config

from tinyclip_fast.train.config import StageConfig
from tinyclip_fast.train.run_output import RunOutput
from tinyclip_fast.train.stage import PruneReport


def _output(tmp_path, rank=0, evaluator=None, **overrides):
    config = make_config(tmp_path, [StageConfig(steps=4)], log_every=2, **overrides)
    return RunOutput(config, rank, evaluator), config


def test_only_rank_zero_speaks_and_writes(tmp_path, capsys):
    for rank in (0, 1):
        output, config = _output(tmp_path, rank)
        output.say(f"hello from {rank}")
        with output.open(0, None):
            output.step_done(2, config.stages[0], 0, 2, 0.5, 1e-3, None, None, None)
    assert capsys.readouterr().out == "hello from 0\n"
    lines = (Path(config.out_dir) / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # rank 1 recorded into its history only


def test_records_every_log_every_steps_and_at_the_stage_end(tmp_path):
    output, config = _output(tmp_path)
    stage = StageConfig(steps=3)
    sparsity, penalty = torch.tensor(0.25), torch.tensor(0.125)
    with output.open(0, None):
        for step in (1, 2, 3):
            output.step_done(step, stage, 0, step, 1.0 / step, 0.1, sparsity, penalty, 4)
    assert [r["step"] for r in output.history] == [2, 3]
    first = output.history[0]
    assert set(first) == {
        "step",
        "stage",
        "loss",
        "lr",
        "images_per_s",
        "data_wait_ms",
        "data_wait_share",
        "sparsity",
        "penalty",
        "bad_samples",
    }
    assert (first["loss"], first["sparsity"], first["penalty"], first["bad_samples"]) == (
        0.5,
        0.25,
        0.125,
        4,
    )
    records = (Path(config.out_dir) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in records] == output.history


def test_data_wait_is_the_mean_per_step_and_its_share_of_the_time(tmp_path):
    output, _ = _output(tmp_path)
    stage = StageConfig(steps=4)
    with output.open(0, None):
        output.start_timing()
        for step, wait in zip((1, 2, 3, 4), (0.01, 0.03, 0.0, 0.0), strict=True):
            time.sleep(wait)
            output.data_wait(wait)
            output.step_done(step, stage, 0, step, 1.0, 0.1, None, None, None)
    first, second = output.history
    assert first["data_wait_ms"] == pytest.approx(20.0)
    assert 0.5 < first["data_wait_share"] <= 1.0
    assert second["data_wait_ms"] == 0.0 and second["data_wait_share"] == 0.0


def test_evaluation_is_recorded_once_per_step_and_untimed(tmp_path, capsys):
    calls = []
    output, _ = _output(tmp_path, evaluator=lambda model: calls.append(model) or 0.75)
    with output.open(0, None):
        output.evaluate("model", 0, 4)
        output.evaluate("model", 0, 4)  # the stage ended on an eval step
    assert calls == ["model"]
    assert output.history == [{"step": 4, "stage": 0, "top1": 0.75}]
    assert "step 4 stage 0: zero-shot top-1 0.7500" in capsys.readouterr().out


def test_evaluation_metrics_dict_is_recorded_and_shown(tmp_path, capsys):
    recalls = {"image_retrieval_recall@1": 0.5, "text_retrieval_recall@1": 0.25}
    output, config = _output(tmp_path, evaluator=lambda model: recalls)
    with output.open(0, None):
        output.step_done(4, config.stages[0], 0, 4, 0.5, 1e-3, None, None, None)
        output.evaluate("model", 0, 4)
        output.evaluate("model", 0, 4)
    assert output.history[1:] == [{"step": 4, "stage": 0, **recalls}]
    assert (
        "step 4 stage 0: image_retrieval_recall@1 0.5000, text_retrieval_recall@1 0.2500"
        in capsys.readouterr().out
    )


def test_pruning_report_warns_far_below_the_target(tmp_path, capsys):
    output, _ = _output(tmp_path)
    stage = StageConfig(steps=4, sparsity=0.5)
    reason = "the configured prune step 3"
    with output.open(0, None):
        output.pruned(PruneReport(0.45, 1000, 600, 3, reason), stage, 0, 3)
        output.pruned(PruneReport(0.1, 1000, 900, 3, reason), stage, 0, 3)
    said = capsys.readouterr().out
    assert "stage 0: pruned at step 3: expected sparsity 45.0% of target 50.0%" in said
    assert said.count(f"params 1,000 -> 600 ({reason})\n") == 1
    assert said.count("warning: stage 0 pruned far below its target sparsity") == 1
    assert output.history[0]["event"] == "pruned" and output.history[0]["params_after"] == 600
    assert [r["target_miss"] for r in output.history] == [None, "under"]
    assert {r["prune_reason"] for r in output.history} == {reason}


def test_pruning_report_warns_above_the_target_and_when_the_trigger_gave_up(tmp_path, capsys):
    output, _ = _output(tmp_path)
    stage = StageConfig(steps=60, sparsity=0.25, prune_step="auto", prune_by=40)
    given_up = "the expected sparsity did not hold within 2.0% of its target"
    with output.open(0, None):
        report = PruneReport(0.484, 1000, 500, 40, "auto: the last allowed prune step 40", given_up)
        output.pruned(report, stage, 0, 40)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("(auto: the last allowed prune step 40)")
    assert lines[1] == f"warning: stage 0: {given_up}"
    assert lines[2].startswith("warning: stage 0 pruned above its target sparsity: expected 48.4%")
    assert output.history[0]["target_miss"] == "over"


@pytest.mark.parametrize(
    "checkpoint_step, save_every, expected",
    [
        (None, 5, "No checkpoint was written yet (the first was due at step 5)"),
        (None, 0, "No checkpoint was written yet (save_every is 0)"),
        (4, 2, "The checkpoint of step 4 (ck.pt) is intact"),
    ],
)
def test_non_finite_message_says_how_to_go_on(tmp_path, checkpoint_step, save_every, expected):
    output, _ = _output(tmp_path, save_every=save_every)
    message = output.non_finite_message(float("nan"), 7, 1, checkpoint_step, Path("ck.pt"))
    assert message.startswith("loss is nan at step 7 (stage 1); stopped before updating")
    assert expected in message


def test_each_evaluation_redraws_the_progress_plot(tmp_path):
    output, config = _output(tmp_path, evaluator=lambda model: 0.5)
    with output.open(0, None):
        output.step_done(2, config.stages[0], 0, 2, 0.5, 1e-3, None, None, None)
        output.evaluate(torch.nn.Linear(1, 1), 0, 2)
    plot = Path(config.out_dir) / "progress.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_plot_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    output, config = _output(tmp_path, evaluator=lambda model: 0.5)
    with output.open(0, None):
        for step in (2, 4):
            output.evaluate(torch.nn.Linear(1, 1), 0, step)
    said = capsys.readouterr().out
    assert said.count("no progress.png: matplotlib is not installed") == 1
    assert not (Path(config.out_dir) / "progress.png").exists()
