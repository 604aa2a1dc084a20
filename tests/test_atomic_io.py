"""Atomic writes: the previous file survives a failed write; new files get the umask's mode."""

import os
import stat

import pytest

from tinyclip_fast.atomic_io import atomic_write


def write_safetensors(tmp):
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp)  # replaces the file, with mode 0600


def write_bytes(data):
    def write(tmp):
        with open(tmp, "wb") as handle:
            handle.write(data)

    return write


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_process_umask(tmp_path, umask, mode):
    # Case 4: checkpoints and students came out 0600 (mkstemp's mode), unreadable by colleagues.
    previous = os.umask(umask)
    try:
        path = atomic_write(tmp_path / "sub" / "file.bin", write_bytes(b"new"))
        atomic_write(path, write_bytes(b"newer"))  # replacing keeps the rule
        tensors = atomic_write(tmp_path / "file.safetensors", write_safetensors)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode == stat.S_IMODE(tensors.stat().st_mode)
    assert path.read_bytes() == b"newer"


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = atomic_write(tmp_path / "file.bin", write_bytes(b"old"))

    def crash(tmp):
        write_bytes(b"partial")(tmp)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, crash)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]
