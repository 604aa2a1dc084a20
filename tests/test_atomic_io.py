"""Atomic writes: the previous file survives a failed write; new files get the umask's mode."""

import errno
import os
import stat

import pytest

from tinyclip_fast.atomic_io import WriteError, atomic_write


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
    # Files others sharing the folder can read: the umask decides, not mkstemp's 0600.
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


def raise_error(error):
    def write(tmp):
        write_bytes(b"partial")(tmp)
        raise error

    return write


NO_SPACE = "cannot write {}: ENOSPC (no space left on device)"


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
        RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
        RuntimeError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
            'space left on device" })'
        ),
    ],
    ids=["oserror", "torch-enforce", "torch-stream-writer", "safetensors"],
)
def test_a_full_disk_is_one_line_naming_the_file_and_errno(tmp_path, monkeypatch, error):
    path = atomic_write(tmp_path / "checkpoint.pt", write_bytes(b"old"))
    full = os.statvfs_result((4096, 4096, 100, 0, 0, 100, 0, 0, 0, 255))
    monkeypatch.setattr(os, "statvfs", lambda folder: full)
    with pytest.raises(WriteError) as caught:
        atomic_write(path, raise_error(error))
    assert str(caught.value) == NO_SPACE.format(path)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_torch_write_failure_with_free_space_is_an_io_error(tmp_path):
    error = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    with pytest.raises(WriteError, match=r"cannot write .*file.pt: EIO \(input/output error\)$"):
        atomic_write(tmp_path / "file.pt", raise_error(error))
    assert os.listdir(tmp_path) == []


def test_a_failing_fsync_keeps_the_previous_file(tmp_path, monkeypatch):
    path = atomic_write(tmp_path / "file.bin", write_bytes(b"old"))

    def fsync(fd):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(WriteError, match=r"file.bin: EDQUOT \(disk quota exceeded\)$"):
        atomic_write(path, write_bytes(b"new"))
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_a_folder_that_cannot_be_created_is_named(tmp_path):
    (tmp_path / "blocker").write_text("a file, not a folder")
    with pytest.raises(WriteError, match=r"cannot write .*blocker/file.bin: E"):
        atomic_write(tmp_path / "blocker" / "file.bin", write_bytes(b"x"))


def test_errors_that_are_not_about_writing_pass_through(tmp_path):
    with pytest.raises(ValueError, match="bad state"):
        atomic_write(tmp_path / "file.bin", raise_error(ValueError("bad state")))
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "file.bin", raise_error(KeyboardInterrupt()))
    assert os.listdir(tmp_path) == []
