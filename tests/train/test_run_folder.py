"""The run folder: a new run never writes over another run's files (case 1 of issue 13: a run
without --resume restarted at step 0 over an interrupted run's checkpoint)."""

import pytest

from tinyclip_fast.train.run_folder import CHECKPOINT_NAME, check_run_folder, remove_run_files


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
    found = check_run_folder(tmp_path, overwrite=True)
    names = {p.name for p in found}
    assert names == {CHECKPOINT_NAME, "bad_samples.rank1.jsonl", "metrics.jsonl", "student"}
    remove_run_files(found)
    assert [p.name for p in tmp_path.iterdir()] == ["teacher_cache.safetensors"]
