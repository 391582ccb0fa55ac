"""``lockstore/_lock.py``: building locks, the native sidecar lock across threads and processes, soft locks."""

from __future__ import annotations

import json
import os
import pwd
import stat
import threading
import time
from pathlib import Path

import filelock
import pytest
from _children import DEADLINE, holding, run

import lockstore
from lockstore import _lock


def test_build(tmp_path: Path) -> None:
    p = str(tmp_path / "d.json")
    assert _lock.build(False, p) is None
    assert _lock.build(None, p) is None
    native = lockstore.open(p, lock=True)  # lock=True: the sidecar beside the file, chosen per transaction
    assert native.lock_file == p + ".lock"
    other = _lock.build(tmp_path / "o.lock", p)
    assert isinstance(other, _lock.SidecarLock)
    assert other.lock_file == str(tmp_path / "o.lock")
    soft = filelock.SoftFileLock(str(tmp_path / "s.lock"))
    adapter = _lock.build(soft, p)
    assert isinstance(adapter, _lock.FileLockAdapter)
    assert adapter.lock is soft
    with pytest.raises(TypeError, match="lock="):
        _lock.build(1, p)


def test_lock_file_created_on_first_lock_and_kept(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, default=0, durable=False)
    with store.transaction() as s:
        s.value = 1
        st = os.stat(str(p) + ".lock")
        assert st.st_size > 0  # the holder record
    after = os.stat(str(p) + ".lock")
    assert after.st_ino == st.st_ino  # never deleted or replaced
    assert not Path(str(p) + ".lock").read_bytes()[:4096].strip()  # the record is blanked before release
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(after.st_mode) == 0o666 & ~umask


def test_threads_exclude_each_other(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    a = lockstore.open(p, default=0, durable=False)
    b = lockstore.open(p, default=0, durable=False)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with a.transaction(label="thread-a") as s:
            s.value = 1
            held.set()
            release.wait(DEADLINE)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(DEADLINE)
        for kwargs in ({"timeout": 0.05}, {"blocking": False}, {"timeout": 0}):
            with pytest.raises(lockstore.LockTimeout) as info, b.transaction(**kwargs):
                pass
            assert info.value.holder is not None
            assert info.value.holder.pid == os.getpid()
            assert info.value.holder.label == "thread-a"
        h = b.holder()
        assert h is not None and h.label == "thread-a"
    finally:
        release.set()
        t.join(DEADLINE)
    with b.transaction(blocking=False) as s:
        assert s.value == 1


def test_negative_timeout_waits_for_the_holder(tmp_path: Path) -> None:
    p = str(tmp_path / "d.json")
    store = lockstore.open(p, default=0, durable=False, timeout=-1)
    seen: list[object] = []
    with holding(p) as child:
        t = threading.Thread(target=lambda: seen.append(_read_in_transaction(store)))
        t.start()
        child.release()  # the child writes 1 when it leaves its transaction
        t.join(DEADLINE)
    assert not t.is_alive()
    assert seen == [1]  # the waiter entered only after the holder's write


def _read_in_transaction(store: lockstore.Store[int]) -> object:
    with store.transaction() as s:
        return s.value


def test_timed_out_waiter_does_not_keep_the_lock(tmp_path: Path) -> None:
    p = str(tmp_path / "d.json")
    store = lockstore.open(p, default=0, durable=False)
    with holding(p), pytest.raises(lockstore.LockTimeout), store.transaction(0.05):
        pass
    # the holder has gone; another process must get the lock at once, whatever this one left waiting
    assert run("try", p, "10") == {"ok": True}
    assert store.holder() is None
    with store.transaction(timeout=10) as s:
        assert s.value == 1
        s.value = 2
    assert run("try", p, "10") == {"ok": True}
    assert lockstore.read(p) == 2


def test_many_timeouts_then_contended_use(tmp_path: Path) -> None:
    p = str(tmp_path / "d.json")
    store = lockstore.open(p, default=0, durable=False)
    with holding(p):
        for _ in range(5):
            with pytest.raises(lockstore.LockTimeout), store.transaction(0.01):
                pass
    for _ in range(20):
        with store.transaction(timeout=10) as s:
            s.value += 1
    assert lockstore.read(p) == 21


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_read_only_lock_file_still_locks(tmp_path: Path) -> None:
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o777)  # nobody may write data files here
    lock_file = d / "d.json.lock"
    lock_file.touch()
    os.chmod(lock_file, 0o644)  # but not the lock file
    out = run("commit_as_nobody", str(d), "d.json", json.dumps({"v": 1}))
    assert out == {"ok": True}
    assert lockstore.read(d / "d.json") == {"v": 1}
    assert lock_file.read_bytes() == b""  # no record could be written
    assert os.stat(d / "d.json").st_uid == pwd.getpwnam("nobody").pw_uid


def test_filelock_adapter_reentry_and_release(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    soft = filelock.SoftFileLock(str(tmp_path / "s.lock"))
    a = lockstore.open(p, default=0, lock=soft, durable=False)
    with a.transaction() as s:
        s.value = 1
        assert soft.is_locked
    assert not soft.is_locked
    assert a.holder() is None
    with pytest.raises(RuntimeError), a.transaction():
        raise RuntimeError
    assert not soft.is_locked


def test_deleted_lock_file_is_noticed_and_the_current_one_is_locked(tmp_path: Path) -> None:
    import fcntl

    path = str(tmp_path / "d.json")
    store = lockstore.open(path, default=0, durable=False)
    with store.transaction():
        pass  # the store's process now keeps a descriptor of the lock file open
    old = os.open(path + ".lock", os.O_RDONLY)
    try:
        os.unlink(path + ".lock")  # what an operator must never do
        with holding(path):  # another process locks the new lock file at that path
            # Negative control: the orphaned inode is not locked by the holder, so a descriptor kept on it would
            # let this process in beside the holder.
            fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(old, fcntl.LOCK_UN)
            with pytest.raises(lockstore.LockTimeout), store.transaction(timeout=0.2):
                pass
    finally:
        os.close(old)
    with store.transaction() as s:
        s.value += 1
    assert lockstore.read(path) == 2


def test_a_deleted_lock_file_held_by_a_stuck_process_does_not_block_the_path_s_lock_file(tmp_path: Path) -> None:
    # An operator deletes the lock file that a stuck process holds (which must never be done, and is done): a
    # long-running process that used the old file must lock the file now at the path, which is free, not wait for
    # the stuck holder of the deleted one (forever, with timeout=-1).
    import fcntl
    import subprocess
    import sys

    path = str(tmp_path / "d.json")
    store = lockstore.open(path, default=0, durable=False)
    with store.transaction() as s:
        s.value += 1  # the store's process now keeps a descriptor of the lock file open
    stuck = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys\n"
        f"fd = os.open({path + '.lock'!r}, os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "sys.stdin.readline()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert stuck.stdout is not None and stuck.stdout.readline().strip() == "held"
        with pytest.raises(lockstore.LockTimeout), store.transaction(timeout=0.1):
            pass  # the control: the stuck process holds the lock file the path names
        os.unlink(path + ".lock")
        outcome: list[object] = []

        def forever() -> None:
            try:
                with store.transaction(timeout=-1) as s:
                    s.value += 1
                outcome.append("done")
            except BaseException as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=forever, daemon=True)
        waiter.start()
        waiter.join(10)
        assert outcome == ["done"], f"still waiting for the deleted file's holder: {outcome}"
        with store.transaction(timeout=1) as s:
            s.value += 1
        assert lockstore.read(path) == 3
        # The new lock file is the one locked now: a probe on it is refused while a transaction holds it.
        with store.transaction():
            fd = os.open(path + ".lock", os.O_RDONLY)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
    finally:
        assert stuck.stdin is not None and stuck.stdout is not None
        stuck.stdin.close()
        stuck.wait(DEADLINE)
        stuck.stdout.close()


def test_lock_file_replaced_while_waiting_is_noticed(tmp_path: Path) -> None:
    # A process waiting for the lock is granted the OLD inode after an operator replaced the lock file and another
    # process took the new one: it must notice and wait for the new file instead of entering beside that process.
    import threading

    from lockstore import _proclocks

    path = str(tmp_path / "d.json")
    store = lockstore.open(path, default=0, durable=False)
    store.commit()
    outcome: list[str] = []
    with holding(path, "old-file holder") as first:
        st = os.stat(path + ".lock")

        def wait() -> None:
            try:
                with store.transaction(timeout=3):
                    outcome.append("entered")
            except lockstore.LockTimeout:
                outcome.append("timed out")

        waiter = threading.Thread(target=wait)
        waiter.start()
        deadline = time.monotonic() + DEADLINE
        while not _proclocks.flock_waiters(st.st_dev, st.st_ino):  # our waiter is in the kernel's queue
            assert time.monotonic() < deadline
            time.sleep(0.001)
        os.unlink(path + ".lock")  # what an operator must never do
        with holding(path, "new-file holder"):  # another process locks the new lock file at that path
            first.release()  # the old inode's lock is handed to our waiter
            waiter.join(DEADLINE)
    assert outcome == ["timed out"], "a replaced lock file was not noticed: two processes held the lock at once"


def test_withdrawn_waits_never_hand_out_a_lock_nobody_holds(tmp_path: Path) -> None:
    # Regression: a caller that timed out used to unlock the shared descriptor just after the waiter thread had
    # taken the flock on it, and the next caller was then "granted" a lock no one held (21 of 63,088 lost).
    import multiprocessing as mp

    from _children import impatient_and_patient

    path = str(tmp_path / "d.json")
    ctx = mp.get_context("spawn")
    start, result = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=impatient_and_patient, args=(path, 4.0, start, result)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    acknowledged = result.get(timeout=DEADLINE) + result.get(timeout=DEADLINE)
    for p in procs:
        p.join(DEADLINE)
        assert p.exitcode == 0
    assert acknowledged > 100
    assert lockstore.read(path)["n"] == acknowledged


def test_a_lock_that_timed_out_holds_nothing_even_before_its_cleanup(tmp_path: Path) -> None:
    """SidecarLock.acquire gives back what it took when it times out (the caller's release() comes after): a wait
    for this process's turn that times out, and a wait for another process's flock that times out after this
    process's turn was taken, both leave the lock free for the next request at once."""
    data = str(tmp_path / "x.json")
    lock = _lock.build(data + ".lock", data)
    assert isinstance(lock, _lock.SidecarLock)

    def acquire(owner: str, timeout: float) -> BaseException | None:
        try:
            lock.acquire(lock.held(owner, None), timeout=timeout, poll_interval=0.05, blocking=timeout != 0,
                         label=None)
        except BaseException as exc:
            return exc
        return None

    first = lock.held("first", None)
    lock.acquire(first, timeout=-1, poll_interval=0.05, blocking=True, label=None)
    errors: list[BaseException | None] = []
    thread = threading.Thread(target=lambda: errors.append(acquire("late", 0.05)))  # this process's turn
    thread.start()
    thread.join(DEADLINE)
    assert [type(e) for e in errors] == [lockstore.LockTimeout]
    lock.release(first)
    with holding(data):  # another process holds the flock: the turn is taken, the flock wait times out
        assert isinstance(acquire("waiting", 0.05), lockstore.LockTimeout)
    third = lock.held("third", None)  # the lock is free for the next one at once
    lock.acquire(third, timeout=0, poll_interval=0.05, blocking=False, label=None)
    lock.release(third)
    lock.close()
