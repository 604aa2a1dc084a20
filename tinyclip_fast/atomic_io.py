"""Atomic file writes: a crash mid-write leaves the previous file intact."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)``, fsync, then ``os.replace`` it onto ``path``.

    The temporary file sits in the same folder, so the rename is atomic (POSIX and Windows);
    on any error it is removed and ``path`` is untouched. The file gets mode 0666 minus the
    process umask, like any file ``open()`` creates, even when ``write`` replaces it (as
    safetensors does, with 0600): files unreadable by the colleagues sharing a cluster folder
    would be lost work too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0666 & ~umask, read without touching the umask
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
