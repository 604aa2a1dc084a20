"""Atomic file writes: a crash or a failed write leaves the previous file intact.

Every failure of the operating system while writing (disk full, quota, permissions, I/O
error) surfaces as one :class:`WriteError` naming the file and the errno, whatever layer
noticed it: Python's ``OSError``, torch.save's ``RuntimeError`` from its C++ stream writer,
safetensors' ``SafetensorError`` wrapping a Rust ``IoError``.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

# torch.save's C++ writer ("PytorchStreamWriter failed writing file ...", "[enforce fail at
# inline_container.cc:...] . unexpected pos ...") loses the errno; safetensors keeps it in
# its message ("IoError(Os { code: 28, kind: StorageFull, ... })").
_TORCH_WRITE_FAILURE = re.compile(r"PytorchStreamWriter|inline_container\.cc|file write failed")
_OS_CODE = re.compile(r"Os \{ code: (\d+)")
# Below this many free bytes, a writer failure that lost its errno is taken for a full disk.
_FULL_DISK_BYTES = 1 << 20


class WriteError(OSError):
    """Writing ``filename`` failed with ``errno``; the previous file, if any, is untouched.

    ``str()`` is one line: ``cannot write PATH: ENOSPC (no space left on device)``.
    """

    def __str__(self) -> str:
        name = errno.errorcode.get(self.errno, "error") if self.errno else "error"
        reason = (self.strerror or "").lower() or "unknown error"
        return f"cannot write {self.filename}: {name} ({reason})"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)``, fsync, then ``os.replace`` it onto ``path``.

    The temporary file sits in the same folder, so the rename is atomic (POSIX and Windows);
    on any error it is removed and ``path`` is untouched. An operating-system failure
    (from ``write`` or from the fsync and rename) is raised as :class:`WriteError`. The file
    gets mode 0666 minus the process umask, like any file ``open()`` creates, even when
    ``write`` replaces it (as safetensors does, with 0600): files unreadable by the colleagues
    sharing a cluster folder would be lost work too.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temporary(path)
    except OSError as err:
        raise as_write_error(err, path) from err
    mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0666 & ~umask, read without touching the umask
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        mapped = as_write_error(err, path)
        if mapped is None:
            raise
        raise mapped from err
    return path


def as_write_error(err: BaseException, path: str | os.PathLike) -> WriteError | None:
    """``err`` as a :class:`WriteError` on ``path`` when it is a failure to write (an
    ``OSError``, torch.save's or safetensors' wrapped I/O errors); None for anything else."""
    if isinstance(err, WriteError):
        return err
    if isinstance(err, OSError):
        code = err.errno
    elif (match := _OS_CODE.search(str(err))) is not None:
        code = int(match.group(1))
    elif isinstance(err, RuntimeError) and _TORCH_WRITE_FAILURE.search(str(err)):
        code = errno.ENOSPC if _free_bytes(Path(path).parent) < _FULL_DISK_BYTES else errno.EIO
    else:
        return None
    strerror = os.strerror(code) if code else str(err).splitlines()[0]
    return WriteError(code, strerror, str(path))


def _create_temporary(path: Path) -> tuple[int, str]:
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _free_bytes(folder: Path) -> int:
    try:
        usage = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs on Windows
        return _FULL_DISK_BYTES
    return usage.f_bavail * usage.f_frsize
