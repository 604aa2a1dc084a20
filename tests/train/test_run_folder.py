"""The run folder: a new run never writes over another run's files (a run without --resume
would restart at step 0 over an interrupted run's checkpoint); its config.json."""

import json

import pytest

from tinyclip_fast.train.config import DistillConfig, load_config
from tinyclip_fast.train.run_folder import (
    CHECKPOINT_NAME,
    check_run_folder,
    remove_run_files,
    write_run_config,
)


def test_run_folder_of_another_run_needs_resume_or_overwrite(tmp_path):
    assert check_run_folder(tmp_path / "new", overwrite=False) == []  # nothing there
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="no checkpoint to resume: replace them with --overwrite"):
        check_run_folder(tmp_path, overwrite=False)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"state")
    (tmp_path / "student").mkdir()
    (tmp_path / "teacher_cache.safetensors").write_bytes(b"keep me")
    with pytest.raises(ValueError, match="holds another run .*--resume.*--overwrite"):
        check_run_folder(tmp_path, overwrite=False)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == b"state"
    (tmp_path / "bad_samples.rank1.jsonl").write_text("")
    (tmp_path / "progress.png").write_bytes(b"png")
    (tmp_path / "run.lock").write_text("{}")  # the lock is the lock's business
    found = check_run_folder(tmp_path, overwrite=True)
    names = {p.name for p in found}
    run_names = {CHECKPOINT_NAME, "bad_samples.rank1.jsonl", "metrics.jsonl", "student"}
    assert names == run_names | {"progress.png"}
    (tmp_path / "run.lock").unlink()
    remove_run_files(found)
    assert [p.name for p in tmp_path.iterdir()] == ["teacher_cache.safetensors"]


def test_config_json_is_the_resolved_config_and_loads_back(tmp_path):
    config = DistillConfig(batch_size=32)
    path = write_run_config(tmp_path / "run", config.to_dict())
    assert json.loads(path.read_text())["batch_size"] == 32
    assert load_config(path) == config
    # A start that failed after writing it leaves nothing a new run must not replace.
    assert check_run_folder(tmp_path / "run", overwrite=False) == []
