"""The run-folder lock: one owner at a time, released on any exit, stale locks taken over."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from tinyclip_fast.train.run_lock import (
    LOCK_NAME,
    LockHolder,
    RunFolderLocked,
    RunLock,
    check_unlocked,
)


def dead_pid():
    """A pid that no process has: a child that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(folder, **fields):
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": "2026-01-01T00:00:00Z",
        "command": "tinyclip-distill --out-dir runs/a",
        "token": "0" * 16,
        **fields,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(holder))
    return LockHolder(**holder)


def test_the_lock_file_names_this_process_and_goes_away_at_the_end(tmp_path):
    (tmp_path / "run").mkdir()
    with RunLock(tmp_path / "run") as lock:
        holder = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["since"].endswith("Z") and holder["command"]
        assert lock.holder == LockHolder(**holder)
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    assert os.listdir(tmp_path / "run") == []


def test_a_folder_the_lock_made_is_removed_when_left_empty(tmp_path):
    with RunLock(tmp_path / "new"):
        assert (tmp_path / "new").is_dir()
    assert not (tmp_path / "new").exists()
    with RunLock(tmp_path / "kept"):
        (tmp_path / "kept" / "metrics.jsonl").write_text("{}\n")
    assert os.listdir(tmp_path / "kept") == ["metrics.jsonl"]


def test_a_second_lock_on_the_same_folder_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunFolderLocked) as refused:
            RunLock(tmp_path).acquire()
    message = str(refused.value)
    assert "\n" not in message
    assert f"pid {os.getpid()} on {socket.gethostname()} since " in message
    assert "in use by another run" in message
    RunLock(tmp_path).acquire().release()  # free again once the first is released


def test_the_lock_is_released_when_the_run_raises(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with RunLock(tmp_path):
            raise KeyboardInterrupt
    with pytest.raises(ValueError, match="bad batch"):
        with RunLock(tmp_path):
            raise ValueError("bad batch")
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_stale_lock_from_a_dead_process_is_taken_over_with_one_line(tmp_path):
    stale = write_lock(tmp_path, pid=dead_pid())
    said = []
    with RunLock(tmp_path, report=said.append) as lock:
        assert lock.holder.pid == os.getpid()
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert said == [
        f"taking over {tmp_path / LOCK_NAME}: the run that held it ({stale.describe()}) is no "
        "longer running"
    ]
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="start times come from /proc")
def test_a_lock_whose_pid_now_names_a_younger_process_is_stale(tmp_path):
    # After a reboot the pid in a lock may belong to a process that started later.
    stale = write_lock(tmp_path, pid=os.getpid(), since="2000-01-01T00:00:00Z")
    said = []
    with RunLock(tmp_path, report=said.append):
        assert said and stale.describe() in said[0]


def test_a_lock_from_another_host_is_refused_with_how_to_clear_it(tmp_path):
    write_lock(tmp_path, host="node-17", pid=dead_pid())
    with pytest.raises(RunFolderLocked) as refused:
        RunLock(tmp_path).acquire()
    message = str(refused.value)
    assert "another host" in message and "on node-17 since 2026-01-01T00:00:00Z" in message
    assert message.endswith(f"if that run has ended, delete {tmp_path / LOCK_NAME}")
    assert (tmp_path / LOCK_NAME).exists()  # not ours to remove


def test_releasing_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = RunLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).unlink()
    other = write_lock(tmp_path, token="1" * 16)  # e.g. someone cleared ours and started
    lock.release()
    assert LockHolder(**json.loads((tmp_path / LOCK_NAME).read_text())) == other


def test_an_unreadable_lock_file_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr("tinyclip_fast.train.run_lock._READ_TRIES", 2)
    (tmp_path / LOCK_NAME).write_text("not json")
    with pytest.raises(RunFolderLocked, match=f"{tmp_path / LOCK_NAME} is not a lock file"):
        RunLock(tmp_path).acquire()


HOLDER = textwrap.dedent(
    """
    import sys, time
    from tinyclip_fast.train.run_lock import RunLock
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
    """
)


@pytest.mark.slow
def test_a_running_process_holds_the_folder_until_it_is_killed(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(RunFolderLocked, match=f"in use by another run .pid {holder.pid} on"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # no unwinding: the lock file stays behind
        holder.wait()
    assert (tmp_path / LOCK_NAME).exists()
    said = []
    with RunLock(tmp_path, report=said.append):
        assert len(said) == 1 and f"pid {holder.pid}" in said[0]


def test_a_quick_look_refuses_a_held_folder_and_passes_a_free_or_stale_one(tmp_path):
    check_unlocked(tmp_path / "none")  # no folder, no lock
    write_lock(tmp_path, pid=dead_pid())
    check_unlocked(tmp_path)  # stale: the run will take it over
    assert (tmp_path / LOCK_NAME).exists()  # a look takes nothing
    write_lock(tmp_path, since=LockHolder.this_process().since)
    with pytest.raises(RunFolderLocked, match=f"in use by another run .pid {os.getpid()} on"):
        check_unlocked(tmp_path)
