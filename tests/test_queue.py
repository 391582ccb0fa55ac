"""The lock's queue for the file store, against real processes waiting for a real lock file: ``store.waiters()``
and ``lockstore holder --json`` list them oldest first with their pids and labels; a non-lockstore waiter is listed
from the kernel; announcements are withdrawn when a wait ends (the raw slots are blank again); a waiter that times
out and exits at once (a cron job) is still counted, by the next process that takes the lock.

Children synchronise on pipes and on what the kernel lists (``/proc/locks``), never on sleeps."""

from __future__ import annotations

import functools
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _children import DEADLINE, HOLDER_SCRIPT, read_line, spawn_script

import lockstore
from lockstore import _proclocks, _queue
from lockstore._stats_report import LabelCount

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs /proc/locks (Linux)")]


_WAITER = """
import sys, lockstore
store = lockstore.open(sys.argv[1], default={"n": 0}, durable=False)
with store.transaction(timeout=float(sys.argv[3]), label=sys.argv[2]) as s:
    s.value["n"] += 1
print("done", flush=True)
"""

_IMPATIENT_THEN_EXIT = """
import sys, lockstore
store = lockstore.open(sys.argv[1], default={"n": 0}, durable=False)
try:
    with store.transaction(timeout=0.2, label="nightly-rollup") as s:
        s.value["n"] += 1
except lockstore.LockTimeout:
    sys.exit(3)
"""

_FOREIGN = """
import fcntl, sys
with open(sys.argv[1], "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    print("locked", flush=True)
"""




def _wait_until(check: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _blocked(lock_file: str) -> list[int]:
    st = os.stat(lock_file)
    return _proclocks.flock_waiters(st.st_dev, st.st_ino) or []


def _is_blocked(lock_file: str, pid: int) -> bool:
    return pid in _blocked(lock_file)


def _raw_slots(lock_file: str) -> bytes:
    with open(lock_file, "rb") as f:
        return f.read()[_queue.FIRST_SLOT:_queue.END]


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "jobs.json")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=DEADLINE)


def _queue_up(data_file: str, procs: list[subprocess.Popen[str]], labels: list[str]) -> list[int]:
    """A holder, then one lockstore waiter per label, each started once the previous one is blocked in the
    kernel (so that the start order is the wait order). Returns the waiters' pids."""
    holder = spawn_script(HOLDER_SCRIPT, data_file)
    procs.append(holder)
    assert read_line(holder.stdout, DEADLINE) == "ready"
    lock_file = data_file + ".lock"
    pids = []
    for label in labels:
        waiter = spawn_script(_WAITER, data_file, label, "120")
        procs.append(waiter)
        pid = waiter.pid
        _wait_until(functools.partial(_is_blocked, lock_file, pid), f"waiter {label} to block")
        pids.append(waiter.pid)
    return pids


def test_holder_and_three_waiters_oldest_first_with_labels(data_file: str,
                                                           procs: list[subprocess.Popen[str]]) -> None:
    pids = _queue_up(data_file, procs, ["w1", "w2", "w3"])
    store = lockstore.open(data_file, default={"n": 0})
    holder = store.holder()
    assert holder is not None and holder.pid == procs[0].pid and holder.label == "holder"
    # Announcements are written just before the blocking call, so they are there once the kernel lists it.
    waiting = store.waiters()
    assert [w.pid for w in waiting] == pids
    assert [w.label for w in waiting] == ["w1", "w2", "w3"]
    since = [w.waiting_since for w in waiting]
    assert all(s is not None for s in since) and since == sorted(since)  # type: ignore[type-var]
    assert all(w.alive and w.host and w.cmdline for w in waiting)

    cli = subprocess.run([sys.executable, "-m", "lockstore", "holder", data_file, "--json"], capture_output=True,
                         text=True, timeout=DEADLINE, check=False)
    assert cli.returncode == 0, cli.stderr
    shown = json.loads(cli.stdout)
    assert shown["held"] and shown["holder"]["pid"] == procs[0].pid and shown["holder"]["label"] == "holder"
    assert [(w["pid"], w["label"]) for w in shown["waiting"]] == list(zip(pids, ["w1", "w2", "w3"], strict=True))

    text = subprocess.run([sys.executable, "-m", "lockstore", "holder", data_file], capture_output=True, text=True,
                          timeout=DEADLINE, check=False)
    assert "waiting: 3 processes, oldest first" in text.stdout
    assert all(str(pid) in text.stdout for pid in pids)

    procs[0].communicate("go\n", timeout=DEADLINE)
    for waiter in procs[1:]:
        out, err = waiter.communicate(timeout=DEADLINE)
        assert waiter.returncode == 0 and out.strip() == "done", err
    assert lockstore.read(data_file) == {"n": 4}
    assert store.waiters() == []
    # Every announcement was withdrawn, not only hidden because its process is gone: the slots are blank.
    assert _raw_slots(data_file + ".lock").strip(b" \0") == b""


def test_control_a_killed_waiter_leaves_its_announcement_but_is_not_listed(
        data_file: str, procs: list[subprocess.Popen[str]]) -> None:
    """The negative control of the blank-slots check above: a waiter that cannot withdraw (kill -9) leaves
    bytes in its slot, which the check would see; waiters() leaves the dead process out."""
    [pid] = _queue_up(data_file, procs, ["doomed"])
    os.kill(pid, signal.SIGKILL)
    procs[1].communicate(timeout=DEADLINE)
    slots = _raw_slots(data_file + ".lock")
    assert b'"doomed"' in slots and slots.strip(b" \0") != b""
    assert lockstore.open(data_file, default={"n": 0}).waiters() == []
    procs[0].communicate("go\n", timeout=DEADLINE)
    assert lockstore.read(data_file) == {"n": 1}


def test_a_waiter_that_is_not_lockstore_is_listed_from_the_kernel(data_file: str,
                                                                 procs: list[subprocess.Popen[str]]) -> None:
    holder = spawn_script(HOLDER_SCRIPT, data_file)
    procs.append(holder)
    assert read_line(holder.stdout, DEADLINE) == "ready"
    lock_file = data_file + ".lock"
    foreign = spawn_script(_FOREIGN, lock_file)
    procs.append(foreign)
    _wait_until(lambda: foreign.pid in _blocked(lock_file), "the foreign waiter to block")
    [waiter] = lockstore.open(data_file, default={"n": 0}).waiters()
    assert waiter.pid == foreign.pid and waiter.label is None and not waiter.recorded
    assert waiter.alive and any("fcntl" in part for part in waiter.cmdline)
    holder.communicate("go\n", timeout=DEADLINE)
    assert read_line(foreign.stdout, DEADLINE) == "locked"


def test_a_timed_out_waiter_that_exits_at_once_is_counted_by_the_next_holder(
        data_file: str, procs: list[subprocess.Popen[str]]) -> None:
    """The cron case: the waiter times out and exits, never holding the lock; its timeout still reaches the
    statistics, collected by whichever process takes the lock next."""
    holder = spawn_script(HOLDER_SCRIPT, data_file)
    procs.append(holder)
    assert read_line(holder.stdout, DEADLINE) == "ready"
    impatient = spawn_script(_IMPATIENT_THEN_EXIT, data_file)
    procs.append(impatient)
    impatient.communicate(timeout=DEADLINE)
    assert impatient.returncode == 3
    holder.communicate("go\n", timeout=DEADLINE)
    store = lockstore.open(data_file, default={"n": 0}, durable=False)
    before = store.stats()
    assert before is not None and before.timeouts == 0  # the holder took the lock before the timeout
    with store.transaction() as s:  # another process (this one) takes the lock next
        s.value["n"] += 1
    stats = store.stats()
    assert stats is not None and stats.timeouts == 1
    assert [(t.label, t.pid) for t in stats.recent_timeouts] == [("nightly-rollup", impatient.pid)]
    assert stats.recent_timeouts[0].waited >= 0.2 and stats.timeout_max == 0.2
    # Collected once: the mark is gone, a further transaction does not count it again.
    with store.transaction() as s:
        s.value["n"] += 1
    again = store.stats()
    assert again is not None and again.timeouts == 1 and again.acquisitions == stats.acquisitions + 1


@pytest.mark.parametrize("label", ["timed_out", '"timed_out": [', 'x "timed_out"'])
def test_a_waiter_whose_label_reads_like_a_mark_is_listed_and_never_collected(
        data_file: str, procs: list[subprocess.Popen[str]], label: str) -> None:
    """Marks were recognised by the bytes '"timed_out"' anywhere in a slot, so a live waiter labelled "timed_out"
    was missing from waiters() and its announcement was blanked by the next holder that collected marks. Control:
    a waiter that did time out is collected (and counted) by the same holder."""
    pids = _queue_up(data_file, procs, [label])
    impatient = spawn_script(_IMPATIENT_THEN_EXIT, data_file)
    procs.append(impatient)
    impatient.communicate(timeout=DEADLINE)
    assert impatient.returncode == 3  # its mark is in its slot now
    store = lockstore.open(data_file, default={"n": 0})
    assert [(w.pid, w.label) for w in store.waiters()] == [(pids[0], label)]
    with open(data_file + ".lock", "r+b") as f:
        # What the next holder does first (the holder child is busy): collect the marks.
        marks = _queue.collect_timed_out(f.fileno())
    assert [(m[2], m[3]) for m in marks] == [("nightly-rollup", impatient.pid)]
    assert [(w.pid, w.label) for w in store.waiters()] == [(pids[0], label)]  # still announced
    procs[0].communicate("go\n", timeout=DEADLINE)
    assert read_line(procs[1].stdout, DEADLINE) == "done"


def test_two_waiters_never_share_a_slot_so_a_timeout_mark_is_never_blanked_by_the_other(tmp_path: Path) -> None:
    """Announcing needs no lock: two waiters that read the slots at once could pick the same free one, and the one
    that got the lock then blanked the other's timed-out mark (a lost timeout). Here the two waits come from two
    open file descriptions of this process, whose own earlier record counts as free: the race, made certain.
    Each slot is claimed with a byte-range lock of the open file description before it is written."""
    lock_file = str(tmp_path / "d.json.lock")
    first = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    second = os.open(lock_file, os.O_RDWR)
    try:
        a = _queue.announce(first, "a", 1.0)
        b = _queue.announce(second, "b", 1.0)
        assert a is not None and b is not None
        assert a.index != b.index
        _queue.withdraw(a, b'{"pid": 1, "timeout": 1.0, "timed_out": [1.0, 2.0]}')  # a timed out
        _queue.withdraw(b)  # b got the lock
        marks = _queue.collect_timed_out(first)
        assert [(waited, timeout) for waited, timeout, *_ in marks] == [(1.0, 1.0)]
    finally:
        os.close(first)
        os.close(second)


def test_a_dead_waiters_timeout_mark_is_not_taken_over_before_it_is_counted(tmp_path: Path) -> None:
    """A mark outlives its process on purpose (the cron case): its slot is not free until a holder counted it."""
    lock_file = str(tmp_path / "d.json.lock")
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        gone = subprocess.run([sys.executable, "-c", "import sys; from lockstore import _holder; "
                               "sys.stdout.write(_holder.waiter_record('x', 1.0, 0.5, waited=0.5).decode())"],
                              capture_output=True, text=True, check=True)  # its process has exited
        mark = gone.stdout.encode()
        for index in range(_queue.SLOTS):
            os.pwrite(fd, mark.ljust(_queue.SLOT), _queue.FIRST_SLOT + index * _queue.SLOT)
        assert _queue.announce(fd, "late", 1.0) is None  # every slot holds an uncounted mark: not announced
        assert len(_queue.collect_timed_out(fd)) == _queue.SLOTS
        assert _queue.announce(fd, "late", 1.0) is not None
    finally:
        os.close(fd)


_TRY_OFTEN = """
import sys, lockstore
store = lockstore.open(sys.argv[1], default={"n": 0}, durable=False)
ok = timed_out = 0
for i in range(int(sys.argv[2])):
    try:
        with store.transaction(timeout=0 if i % 3 == 0 else None) as s:
            s.value["n"] += 1
        ok += 1
    except lockstore.LockTimeout:
        timed_out += 1
print(ok, timed_out)
"""


def test_every_timeout_of_racing_waiters_is_counted_exactly(data_file: str) -> None:
    """Three processes, every third attempt with timeout=0 (tried once): every LockTimeout they saw is in the
    statistics once another process took the lock (two waiters announcing at once used to share a slot, and one
    blanked the other's mark)."""
    workers = [spawn_script(_TRY_OFTEN, data_file, "700") for _ in range(3)]
    results = []
    for proc in workers:
        out, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 0, err
        results.append(tuple(int(x) for x in out.split()))
    store = lockstore.open(data_file, default={"n": 0}, durable=False)
    with store.transaction():  # the next holder counts the marks left after the workers' last acquisitions
        pass
    ok, timed_out = (sum(r[i] for r in results) for i in (0, 1))
    stats = store.stats()
    assert stats is not None
    assert timed_out > 50  # they did race
    assert (stats.acquisitions, stats.timeouts) == (ok + 1, timed_out)
    assert lockstore.read(data_file) == {"n": ok}


def test_a_holder_that_cannot_count_timeouts_leaves_their_marks_for_one_that_can(tmp_path: Path) -> None:
    """A newer lockstore's statistics area is left alone by this version, so this version must not take the
    timed-out marks either: they are the newer version's to count."""
    from lockstore import _stats

    store = lockstore.open(tmp_path / "d.json", default=0, durable=False)
    with store.transaction():
        pass
    lock_file = str(tmp_path / "d.json.lock")
    fd = os.open(lock_file, os.O_RDWR)
    try:
        area = bytearray(os.pread(fd, _stats.SIZE, _stats.OFFSET))
        area[8:10] = (_stats.VERSION + 1).to_bytes(2, "little")  # the same layout, a later version
        area[_stats.SIZE - 4 :] = zlib.crc32(bytes(area[: _stats.SIZE - 4])).to_bytes(4, "little")
        os.pwrite(fd, bytes(area), _stats.OFFSET)
        assert _stats.newer(area)
        announcement = _queue.announce(fd, "impatient", 0.1)
        assert announcement is not None
        _queue.withdraw(announcement, b'{"pid": 1, "timeout": 0.1, "timed_out": [0.1, 2.0]}')
        with store.transaction() as s:
            s.value += 1
        assert len(_queue.collect_timed_out(fd)) == 1  # still there for the newer version
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------- waiters that cannot take the lock
#: Announces a wait in the lock file (claiming its slot, as a waiting lockstore process does) without ever asking
#: the kernel for the lock: a waiter that cannot take it (stopped, in a debugger, a frozen cgroup).
_STUCK = """
import os, sys
from lockstore import _queue
fd = os.open(sys.argv[1], os.O_RDWR)
print("ready" if _queue.announce(fd, sys.argv[2], 60.0) is not None else "failed", flush=True)
sys.stdin.readline()
"""


def _stuck_waiter(store: lockstore.Store[Any], procs: list[subprocess.Popen[str]], label: str,
                  *wrapper: str) -> subprocess.Popen[str]:
    with store.transaction():
        pass  # the lock file exists
    lock_file = store.lock_file
    assert lock_file is not None
    stuck = subprocess.Popen([*wrapper, sys.executable, "-c", _STUCK, lock_file, label], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(stuck)
    assert read_line(stuck.stdout, DEADLINE) == "ready"
    time.sleep(2 * _queue.STARVE_AFTER)  # a minimum age, not a synchronisation: its wait is long enough to starve
    return stuck


def _hand_overs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from lockstore._sidecar import SidecarLock

    calls: list[int] = []
    real = SidecarLock._hand_over

    def counted(slot: Any) -> None:
        calls.append(1)
        real(slot)

    monkeypatch.setattr(SidecarLock, "_hand_over", staticmethod(counted))
    return calls


def test_a_waiter_that_never_takes_the_lock_is_handed_it_once_not_at_every_release(
        data_file: str, procs: list[subprocess.Popen[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A live waiter whose wait is long enough to be handed the lock, but which cannot take it (stopped): each
    release handed over to it and each next acquisition waited STARVE_AFTER for nobody, as long as it was stopped.
    Now a wait handed over to in vain is remembered. Control: forgetting that makes every acquisition wait."""
    store = lockstore.open(data_file, default={"n": 0}, durable=False)
    _stuck_waiter(store, procs, "stopped")
    calls = _hand_overs(monkeypatch)
    for _ in range(30):
        with store.transaction() as s:
            s.value["n"] += 1
    assert len(calls) == 1
    assert [w.label for w in store.waiters()] == ["stopped"]  # alive and waiting: still listed
    slot: Any = store._core.storage._native[store.lock_file]._box[0]  # type: ignore[attr-defined]
    since = store.waiters()[0].waiting_since
    assert since is not None
    calls.clear()
    for _ in range(10):
        # Forgotten, and the header naming it again (as the repair that left it out is undone by a withdrawal):
        # every other acquisition hands over to nobody.
        slot.handed_to_nobody = []
        with open(str(store.lock_file), "r+b") as f:
            f.seek(_queue.HEADER + 8)
            f.write(struct.pack("<d", since))
        with store.transaction() as s:
            s.value["n"] += 1
    assert len(calls) >= 4


def _dead_waiter_is_gone(store: lockstore.Store[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    assert store.waiters() == []
    calls = _hand_overs(monkeypatch)
    for _ in range(30):
        with store.transaction() as s:
            s.value["n"] += 1
    assert len(calls) <= 1


def test_a_killed_waiter_not_yet_reaped_is_not_listed_and_not_handed_the_lock(
        data_file: str, procs: list[subprocess.Popen[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A waiter killed while its parent has not reaped it yet (a zombie) still has its pid and start time, so it
    looked alive: listed by waiters(), and its wait handed the lock at every release. Control: listed while alive."""
    import psutil

    store = lockstore.open(data_file, default={"n": 0}, durable=False)
    stuck = _stuck_waiter(store, procs, "zombie")
    assert [w.label for w in store.waiters()] == ["zombie"]
    os.kill(stuck.pid, signal.SIGKILL)
    _wait_until(lambda: psutil.Process(stuck.pid).status() == psutil.STATUS_ZOMBIE, "the waiter to be a zombie")
    _dead_waiter_is_gone(store, monkeypatch)


@pytest.mark.skipif(os.geteuid() != 0, reason="a PID namespace needs root")
def test_a_killed_waiter_of_another_pid_namespace_is_not_listed_and_not_handed_the_lock(
        data_file: str, procs: list[subprocess.Popen[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A waiter in another PID namespace (a container sharing the volume) cannot be checked by its pid: killed, its
    announcement stayed listed and handed the lock, forever. Its slot's claim (an OFD lock, gone with its process)
    tells. Control: listed while alive."""
    store = lockstore.open(data_file, default={"n": 0}, durable=False)
    outer = _stuck_waiter(store, procs, "in-container", "unshare", "--pid", "--fork", "--kill-child")
    listed = store.waiters()
    assert [(w.label, w.alive) for w in listed] == [("in-container", None)]
    inner = subprocess.run(["pgrep", "-P", str(outer.pid)], capture_output=True, text=True, check=True)
    os.kill(int(inner.stdout.split()[0]), signal.SIGKILL)
    outer.communicate(timeout=DEADLINE)
    _dead_waiter_is_gone(store, monkeypatch)


def test_after_a_hand_over_nobody_took_later_waiters_are_still_handed_the_lock(
        data_file: str, procs: list[subprocess.Popen[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The header keeps only the oldest wait: remembering a wait handed the lock in vain must not turn the hand-over
    off for the waiters behind it (they starved while a stopped waiter was announced). Each wait that cannot take
    the lock is tried once; the header is rewritten without them, also after others' withdrawals put one back."""
    from lockstore._sidecar import SidecarLock

    store = lockstore.open(data_file, default={"n": 0}, durable=False)
    _stuck_waiter(store, procs, "stopped-1")
    _stuck_waiter(store, procs, "stopped-2")
    targets: list[float] = []
    real = SidecarLock._hand_over

    def recorded(slot: Any) -> None:
        targets.append(slot.handoff)
        real(slot)

    monkeypatch.setattr(SidecarLock, "_hand_over", staticmethod(recorded))

    def run(n: int) -> None:
        for _ in range(n):
            with store.transaction() as s:
                s.value["n"] += 1

    starts = sorted(w.waiting_since or 0.0 for w in store.waiters())
    run(30)
    assert len(targets) == 2 and all(abs(t - s) < 1e-5 for t, s in zip(targets, starts, strict=True))
    _stuck_waiter(store, procs, "live")  # newest
    newest = max(w.waiting_since or 0.0 for w in store.waiters())
    lock_file = store.lock_file
    assert lock_file is not None
    with open(lock_file, "r+b") as f:  # what a withdrawal does: the oldest live record's start, back in the header
        f.seek(_queue.HEADER + 8)
        f.write(struct.pack("<d", starts[0]))
    end = time.monotonic() + DEADLINE
    while len(targets) < 3 and time.monotonic() < end:
        run(1)
    assert len(targets) == 3 and abs(targets[2] - newest) < 1e-5


def test_a_try_that_finds_the_lock_taken_is_counted_when_its_process_exits_at_once(data_file: str) -> None:
    """``blocking=False`` (``lockstore incr -n`` in a cron job) gives up without waiting: it left no mark, so its
    timeout lived only in its process and died with it. Control: the holder's own transaction is counted."""
    store: lockstore.Store[Any] = lockstore.open(data_file, default={}, durable=False)
    cli = [sys.executable, "-m", "lockstore", "incr", "-n", "-E", "75", data_file, "runs"]
    with store.transaction():
        for _ in range(3):
            assert subprocess.run(cli, capture_output=True, timeout=DEADLINE, check=False).returncode == 75
    with store.transaction():
        pass
    stats = store.stats()
    assert stats is not None and (stats.acquisitions, stats.timeouts) == (2, 3)
    assert stats.timeout_max == 0.0


def test_a_timeout_is_counted_after_every_store_on_the_file_was_closed(
        data_file: str, procs: list[subprocess.Popen[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A timeout that could leave no mark (every waiter slot taken) is this process's to count at its next
    acquisition; closing every Store on the file before that dropped it with the file's slot."""
    holder = spawn_script(HOLDER_SCRIPT, data_file)
    procs.append(holder)
    assert read_line(holder.stdout, DEADLINE) == "ready"
    monkeypatch.setattr(_queue, "announce", lambda *args: None)  # as when all 64 slots are taken
    store: lockstore.Store[Any] = lockstore.open(data_file, default={"n": 0}, durable=False)
    with pytest.raises(lockstore.LockTimeout), store.transaction(timeout=0.05):
        pass
    store.close()
    holder.communicate("go\n", timeout=DEADLINE)
    again: lockstore.Store[Any] = lockstore.open(data_file, default={"n": 0}, durable=False)
    with again.transaction():
        pass
    stats = again.stats()
    assert stats is not None and (stats.acquisitions, stats.timeouts) == (2, 1)


_COUNT_HAND_OVERS = """
import sys, lockstore
from lockstore._sidecar import SidecarLock
calls = []
real = SidecarLock._hand_over
def counted(slot):
    calls.append(1)
    real(slot)
SidecarLock._hand_over = staticmethod(counted)
store = lockstore.open(sys.argv[1], default={"n": 0}, durable=False)
for _ in range(20):
    with store.transaction() as s:
        s.value["n"] += 1
print(len(calls), flush=True)
"""


def test_a_stale_oldest_wait_handed_the_lock_in_vain_is_repaired_for_every_process(data_file: str) -> None:
    """The header names a wait nobody waits for (a racing withdrawal wrote it back): the first process to hand the
    lock over to it in vain rewrites the header, so that other processes do not hand over to nobody too (each
    remembering it only for itself). Control: this process hands over once."""
    store = lockstore.open(data_file, default={"n": 0}, durable=False)
    with store.transaction():
        pass
    with open(str(store.lock_file), "r+b") as f:
        f.seek(_queue.HEADER)
        f.write(_queue._HEAD.pack(_queue._MAGIC, 0, time.time() - 1.0))
    calls = []
    from lockstore._sidecar import SidecarLock

    real = SidecarLock._hand_over

    def counted(slot: Any) -> None:
        calls.append(1)
        real(slot)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SidecarLock, "_hand_over", staticmethod(counted))
        for _ in range(5):
            with store.transaction() as s:
                s.value["n"] += 1
    assert len(calls) == 1
    other = subprocess.run([sys.executable, "-c", _COUNT_HAND_OVERS, data_file], capture_output=True, text=True,
                           timeout=DEADLINE, check=True)
    assert other.stdout.strip() == "0"


_ASYNC_GIVES_UP = """
import asyncio, sys, lockstore
async def main():
    store = lockstore.open(sys.argv[1], default={"n": 0}, durable=False)
    try:
        async with store.atransaction(timeout=0.2, blocking=sys.argv[2] == "wait", label="async"):
            pass
    except lockstore.LockTimeout:
        print("timedout", flush=True)
asyncio.run(main())
"""


def test_asyncio_timeouts_and_tries_are_counted_when_their_process_exits_at_once(
        data_file: str, procs: list[subprocess.Popen[str]]) -> None:
    """An asyncio wait waits in slices, none of which left a mark, and a ``blocking=False`` try left none either:
    their timeouts lived only in their process. Control: the holder's own transaction is counted."""
    holder = spawn_script(HOLDER_SCRIPT, data_file)
    procs.append(holder)
    assert read_line(holder.stdout, DEADLINE) == "ready"
    for mode in ("wait", "try", "wait", "try"):
        out = subprocess.run([sys.executable, "-c", _ASYNC_GIVES_UP, data_file, mode], capture_output=True,
                             text=True, timeout=DEADLINE, check=True).stdout
        assert out.strip() == "timedout"
    holder.communicate("go\\n", timeout=DEADLINE)
    store: lockstore.Store[Any] = lockstore.open(data_file, default={"n": 0}, durable=False)
    with store.transaction():
        pass
    stats = store.stats()
    assert stats is not None and (stats.acquisitions, stats.timeouts) == (2, 4)
    assert stats.timeout_labels == (LabelCount("async", 4),)


_THREAD_GIVES_UP_THEN_EXIT = """
import os, sys, threading, lockstore
store = lockstore.open(sys.argv[1], default={"n": 0}, durable=False)
inside = threading.Event()
def hold():
    with store.transaction():
        inside.set()
        threading.Event().wait()
threading.Thread(target=hold, daemon=True).start()
inside.wait()
try:
    with store.transaction(timeout=0.05, label="thread"):
        pass
except lockstore.LockTimeout:
    print("timedout", flush=True)
os._exit(0)  # the holding thread never releases: nothing of this process counts the timeout
"""


def test_a_wait_behind_another_thread_is_counted_when_its_process_exits_at_once(data_file: str) -> None:
    """A wait that timed out behind another thread of its own process never reached the flock, so it left no mark:
    counted only at that process's next acquisition, never if it exited first."""
    out = subprocess.run([sys.executable, "-c", _THREAD_GIVES_UP_THEN_EXIT, data_file], capture_output=True,
                         text=True, timeout=DEADLINE, check=True).stdout
    assert out.strip() == "timedout"
    store: lockstore.Store[Any] = lockstore.open(data_file, default={"n": 0}, durable=False)
    with store.transaction():
        pass
    stats = store.stats()
    assert stats is not None and stats.timeouts == 1 and stats.timeout_labels == (LabelCount("thread", 1),)


def test_more_waiters_that_never_take_the_lock_than_were_remembered_are_each_handed_it_once(
        data_file: str, procs: list[subprocess.Popen[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory of waits handed the lock in vain kept the last 8: a ninth pushed the first out, the header's
    repair put it back, and the lock was handed to nobody every 20 ms for as long as they waited."""
    store = lockstore.open(data_file, default={"n": 0}, durable=False)
    calls = _hand_overs(monkeypatch)
    for i in range(10):
        _stuck_waiter(store, procs, f"stopped-{i}")
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        with store.transaction() as s:
            s.value["n"] += 1
    assert len(calls) == 10


def test_an_asyncio_timeout_through_a_store_that_never_took_the_lock_is_counted(
        data_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A task of a loop waits for the loop's turn behind another task (on another Store of the same file) and gives
    up; with no mark possible (every waiter slot taken), its timeout is this process's to count, but its Store had
    no slot of the lock file to keep it in, and it was dropped."""
    import asyncio

    first: lockstore.Store[Any] = lockstore.open(data_file, default={"n": 0}, durable=False)
    second: lockstore.Store[Any] = lockstore.open(data_file, default={"n": 0}, durable=False)
    with first.transaction():
        pass  # the lock file exists
    monkeypatch.setattr(_queue, "announce", lambda *args: None)  # as when all 64 slots are taken

    async def main() -> None:
        inside, leave = asyncio.Event(), asyncio.Event()

        async def hold() -> None:
            async with first.atransaction():
                inside.set()
                await leave.wait()

        holder = asyncio.create_task(hold())
        await inside.wait()
        with pytest.raises(lockstore.LockTimeout):
            async with second.atransaction(blocking=False):
                pass
        leave.set()
        await holder

    asyncio.run(main())
    with second.transaction():
        pass
    stats = second.stats()
    assert stats is not None and (stats.acquisitions, stats.timeouts) == (3, 1)


def test_a_timeout_whose_mark_does_not_fit_its_slot_is_still_counted(tmp_path: Path) -> None:
    # A label long enough that the wait's announcement fits its slot but the timed-out mark (a few dozen bytes
    # longer) does not: the mark cannot be left, so this process must count the timeout itself, at its next
    # acquisition, instead of believing it marked.
    from _children import holding

    from lockstore import _holder

    def announcement(n: int, **kw: Any) -> int:
        return len(_holder.waiter_record("\u00e9" * n, time.time(), 0.1, **kw))  # 6 bytes of JSON each

    fits = [n for n in range(0, 200) if announcement(n) <= _queue.SLOT < announcement(n, waited=0.1)]
    assert fits, "no label length between the two: the test would prove nothing"
    label = "\u00e9" * fits[-1]
    path = str(tmp_path / "d.json")
    store = lockstore.open(path, default=0, durable=False)
    store.commit()
    with holding(path), pytest.raises(lockstore.LockTimeout), store.transaction(timeout=0.1, label=label):
        pass
    with store.transaction() as s:
        s.value += 1
    stats = store.stats()
    assert stats is not None and stats.timeouts == 1, stats
