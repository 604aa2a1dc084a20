"""One process owns a run folder at a time: the lock file ``<out_dir>/run.lock``.

The file is created with O_CREAT | O_EXCL (so of two processes exactly one creates it) and
holds JSON ``{"pid", "host", "since", "command", "token"}``. It is held for the run's life and
removed on any exit that unwinds the stack (normal end, exception, Ctrl-C, and SIGTERM where
the run turns it into an exception or a flag, as the engine does). After ``kill -9`` or a power
cut the file stays: a lock whose process is gone from this host is stale and taken over with
one line saying so. A lock from another host cannot be checked from here and is refused with
the way to clear it. Under torchrun, rank 0 holds the lock for the job.
"""

from __future__ import annotations

import calendar
import json
import os
import secrets
import shlex
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

LOCK_NAME = "run.lock"
_COMMAND_SHOWN = 120  # characters of the holder's command line in a refusal
_READ_TRIES = 20  # a lock being written is empty for microseconds; ~1 s of retries
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_CLOCK_SLACK_S = 2.0  # the lock's time has whole seconds; /proc's start time, clock ticks


class RunFolderLocked(ValueError):
    """The run folder is owned by another process (the message names it and the way out)."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run folder: process id, host name, start time (UTC, ISO 8601), command."""

    pid: int
    host: str
    since: str
    command: str
    token: str

    @classmethod
    def this_process(cls) -> LockHolder:
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            since=time.strftime(_TIME_FORMAT, time.gmtime()),
            command=shlex.join(sys.argv),
            token=secrets.token_hex(8),
        )

    def describe(self) -> str:
        """``pid 123 on host since 2026-01-01T00:00:00Z``."""
        return f"pid {self.pid} on {self.host} since {self.since}"

    def is_running(self) -> bool | None:
        """Whether the holding process still runs; None when it is on another host. A process
        that started after the lock was taken has a reused pid (after a reboot, say): the
        holder is gone."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process has that pid
            pass
        started = process_start_time(self.pid)
        try:
            taken = calendar.timegm(time.strptime(self.since, _TIME_FORMAT))
        except ValueError:  # a hand-edited time: the process may be the holder
            return True
        return started is None or started <= taken + _CLOCK_SLACK_S


class RunLock:
    """Context manager owning ``out_dir`` (created if missing) for the ``with`` block.

    ``report`` receives the one line said when a stale lock is taken over (default: stderr).
    """

    def __init__(self, out_dir: str | Path, report: Callable[[str], None] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.report = report if report is not None else _to_stderr
        self.holder: LockHolder | None = None
        self.made_folder = False  # a folder this lock created is removed again when left empty

    def acquire(self) -> RunLock:
        """Create the lock file or raise :class:`RunFolderLocked` naming its holder."""
        if self.holder is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.made_folder = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        mine = LockHolder.this_process()
        while not self._create(mine):
            other = read_lock(self.path)
            if other is None:  # removed between our attempt and the read: try again
                continue
            if other.is_running() is not False:
                raise RunFolderLocked(_refusal(self.out_dir, other))
            if self._remove_if(other):
                self.report(
                    f"taking over {self.path}: the run that held it ({other.describe()}) is no "
                    "longer running"
                )
        self.holder = mine
        return self

    def release(self) -> None:
        """Remove the lock file if it is still this lock's (idempotent)."""
        if self.holder is not None:
            self._remove_if(self.holder)
            self.holder = None
            if self.made_folder and not any(self.out_dir.iterdir()):
                self.out_dir.rmdir()  # a start that failed leaves no empty run folder behind

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def _create(self, holder: LockHolder) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, (json.dumps(asdict(holder)) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _remove_if(self, holder: LockHolder) -> bool:
        """Remove the lock file when it holds ``holder``. It is moved aside first, so that of
        two processes taking over the same stale lock only one removes it; a lock that turns out
        to be another's (created in between) is put back."""
        aside = self.path.with_name(f".{LOCK_NAME}.{secrets.token_hex(6)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        if read_lock(aside) == holder:
            aside.unlink()
            return True
        try:
            os.link(aside, self.path)  # put back, unless yet another lock appeared meanwhile
        except FileExistsError:
            pass
        aside.unlink()
        return False


def check_unlocked(out_dir: str | Path) -> None:
    """:class:`RunFolderLocked` naming the holder when a running process (or one on another
    host) owns ``out_dir``; the quick look a command line takes before loading anything. It
    takes nothing: :class:`RunLock` is what owns the folder."""
    out_dir = Path(out_dir)
    holder = read_lock(out_dir / LOCK_NAME)
    if holder is not None and holder.is_running() is not False:
        raise RunFolderLocked(_refusal(out_dir, holder))


def _refusal(out_dir: Path, holder: LockHolder) -> str:
    if holder.is_running() is None:
        return (
            f"{out_dir} is locked by a run on another host ({holder.describe()}, "
            f"{_shorten(holder.command)}); if that run has ended, delete {out_dir / LOCK_NAME}"
        )
    return (
        f"{out_dir} is in use by another run ({holder.describe()}, "
        f"{_shorten(holder.command)}): wait for it to end or choose another --out-dir"
    )


def read_lock(path: Path) -> LockHolder | None:
    """The holder recorded in the lock file at ``path``; None when there is none. A file that
    stays unreadable (not a lock this library wrote) is a :class:`RunFolderLocked` saying so."""
    for _ in range(_READ_TRIES):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return LockHolder(**json.loads(text))
        except (ValueError, TypeError):
            time.sleep(0.05)  # created, not yet written
    raise RunFolderLocked(
        f"{path} is not a lock file this library can read ({text[:40]!r}); if no run uses "
        f"{path.parent}, delete it"
    )


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc; None where there
    is no /proc (macOS, Windows) or the process is gone."""
    try:
        stat_fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    # Field 22 of stat is the start time in clock ticks after boot; the name (field 2) is cut.
    return boot + int(stat_fields[19]) / os.sysconf("SC_CLK_TCK")


def _shorten(command: str) -> str:
    return command if len(command) <= _COMMAND_SHOWN else command[: _COMMAND_SHOWN - 3] + "..."


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
