"""Run plumbing: metrics cut back on resume (and a record that cannot be written), device and
precision, CPU threads."""

import json
import os

import pytest
import torch

from tinyclip_fast.atomic_io import WriteError
from tinyclip_fast.train.run_folder import cut_jsonl
from tinyclip_fast.train.runtime import MetricsLog, check_device, resolve_precision, set_threads


def test_resume_cuts_metrics_back_to_the_checkpoint(tmp_path):
    # Steps logged after the checkpoint are cut, so a resume logs each step once.
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 7)]
    lines.insert(3, json.dumps({"step": 3, "top1": 0.5}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 7, "lo')  # killed
    log = MetricsLog(tmp_path, enabled=True, resume_step=4)
    log.write({"step": 5, "loss": 0.1})
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2, 3, 3, 4, 5]
    assert records[-1]["loss"] == 0.1
    cut_jsonl(tmp_path / "missing.jsonl", 3)  # nothing to cut


def test_device_and_precision():
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        check_device("gpu")
    check_device("cpu")
    if not torch.cuda.is_available():
        # One line naming the device, not a torch traceback.
        with pytest.raises(ValueError, match="no CUDA GPU is visible.*--device cpu"):
            check_device("cuda")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            check_device(f"cuda:{torch.cuda.device_count()}")
    # fp32 by default on the CPU (bf16 autocast is several times slower there).
    assert resolve_precision(None, torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    if torch.cuda.is_available():
        expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        assert resolve_precision(None, torch.device("cuda")) == expected


def test_threads_as_given_or_shared_among_a_nodes_processes(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert set_threads(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        assert set_threads(None) == 2  # torch's choice stands
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
        assert set_threads(None) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_metrics_record_that_cannot_be_written_is_a_write_error(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()  # something in the way, as a full disk would be
    log = MetricsLog(tmp_path, enabled=True)
    with pytest.raises(WriteError, match=r"cannot write .*metrics.jsonl: EISDIR"):
        log.write({"step": 1, "loss": 0.5})
    log.close()
