"""Trust at the edges: threads sharing a Store, retargeted symlinks, fork inside a transaction, shared filelock
instances, exact savepoints, a symlinked lock path, waiting for itself, timeouts, leaks, and API details.

Each test names the defect it guards against; each failed on the code before the fix (see the CHANGELOG).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import filelock
import pytest
from _children import DEADLINE, Child

import lockstore


# ----------------------------------------------------------------------------------- 1. threads sharing a Store
def test_commit_of_another_thread_never_writes_an_uncommitted_value(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, default={"n": 0}, durable=False)
    store.commit()
    inside, go = threading.Event(), threading.Event()

    def transaction_that_fails() -> None:
        try:
            with store.transaction() as s:
                s.value["n"] = 999  # never committed: the block raises
                inside.set()
                go.wait(DEADLINE)
                raise RuntimeError("rolled back")
        except RuntimeError:
            pass

    t = threading.Thread(target=transaction_that_fails)
    t.start()
    assert inside.wait(DEADLINE)
    committer = threading.Thread(target=store.commit)
    committer.start()
    time.sleep(0.05)  # give a wrong implementation the chance to encode the value now (not a pace: a window)
    go.set()
    t.join(DEADLINE)
    committer.join(DEADLINE)
    assert lockstore.read(p) == {"n": 0}, "a commit wrote another thread's rolled-back value"


def test_negative_control_commit_encoding_before_the_lock_writes_it(tmp_path: Path) -> None:
    # The check above can fail: a commit that encodes store.value before waiting (the old order) writes 999.
    p = tmp_path / "d.json"
    store = lockstore.open(p, default={"n": 0}, durable=False)
    store.commit()
    with store.transaction() as s:
        s.value["n"] = 999
        early = json.dumps(s.value)  # what an encode-then-lock commit would have taken
    p.write_text(early)
    assert lockstore.read(p) == {"n": 999}


def test_reload_of_another_thread_waits_for_the_transaction(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, default={"n": 0}, durable=False)
    inside, go = threading.Event(), threading.Event()

    def increment() -> None:
        with store.transaction() as s:
            s.value["n"] += 1
            inside.set()
            go.wait(DEADLINE)

    t = threading.Thread(target=increment)
    t.start()
    assert inside.wait(DEADLINE)
    reloaded: list[Any] = []
    r = threading.Thread(target=lambda: reloaded.append(store.reload()))
    r.start()
    r.join(0.2)
    assert r.is_alive(), "reload() did not wait for the other thread's transaction"
    go.set()
    t.join(DEADLINE)
    r.join(DEADLINE)
    assert lockstore.read(p) == {"n": 1}  # the increment was not reset under the transaction
    assert reloaded == [{"n": 1}]


def test_threads_sharing_one_store_commit_and_transact_exactly(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, default={"n": 0, "c": 0}, durable=False)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(400):
                with store.transaction() as s:
                    s.value["n"] += 1
                if i == 0:
                    store.reload()
                    store.commit()  # rewrites whatever is committed; must never write an open transaction's value
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads switch often: the races this guards against show in every run
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE)
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    assert lockstore.read(p)["n"] == 1600


def test_threads_making_a_fresh_store_s_lock_at_once_share_one(tmp_path: Path) -> None:
    """Two threads' first transactions on a fresh Store both found no lock object for the lock file and each made
    one; the second replaced the first in the Store's table, so the thread holding the first let go after taking
    it (an acquisition counted for nothing) and took the lock again (with a short timeout: a LockTimeout with the
    lock free). Forced here: thread A is held right after finding no lock object, until thread B holds its own
    and is about to check it is still the Store's."""
    import linecache

    step = 10.0  # each forced step comes within milliseconds; longer only when a code change removed one

    p = tmp_path / "d.json"
    store = lockstore.open(p, default={"n": 0}, durable=False)
    a_looked, b_checks, a_done = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def line_of(frame: Any) -> str:
        return linecache.getline(frame.f_code.co_filename, frame.f_lineno)

    def tracer_a(frame: Any, event: str, arg: object) -> Any:
        if frame.f_code.co_name == "_sidecar":
            if event == "line" and "if lock is None" in line_of(frame) and not a_looked.is_set():
                a_looked.set()  # A found no lock object: let B make its own and take it
                b_checks.wait(step)
            elif event == "return" and a_looked.is_set():
                a_done.set()
        return tracer_a

    def tracer_b(frame: Any, event: str, arg: object) -> Any:
        if (frame.f_code.co_name == "settle" and event == "line" and "is not lock" in line_of(frame)
                and not b_checks.is_set()):
            b_checks.set()  # B holds the lock it made: let A finish making its own
            a_done.wait(step)
        return tracer_b

    def run(tracer: Any, before: threading.Event | None) -> None:
        try:
            if before is not None:
                before.wait(step)
            sys.settrace(tracer)
            try:
                with store.transaction() as s:
                    s.value["n"] += 1
            finally:
                sys.settrace(None)
        except BaseException as exc:
            errors.append(exc)

    a = threading.Thread(target=run, args=(tracer_a, None))
    b = threading.Thread(target=run, args=(tracer_b, a_looked))
    a.start()
    b.start()
    a.join(DEADLINE)
    b.join(DEADLINE)
    assert a_looked.is_set() and b_checks.is_set() and a_done.is_set()  # the interleaving happened
    assert not errors
    stats = store.stats()
    store.close()
    assert lockstore.read(p)["n"] == 2
    assert stats is not None and stats.acquisitions == 2  # one per transaction


def test_close_from_another_thread_waits_for_the_running_transaction(tmp_path: Path) -> None:
    """``store.close()`` closed the descriptors a running transaction of another thread was writing through: the
    transaction raised IndexError after its write had landed (a retry counts twice), and a descriptor number freed
    under the writer and given to another file sent the JSON there and renamed an empty temp file over the data.
    Forced here: the transaction is held inside its write while another thread calls close()."""
    import linecache

    step = 10.0
    p = tmp_path / "d.json"
    store = lockstore.open(p, default={"n": 0}, durable=False)
    in_write, go, closed = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def tracer(frame: Any, event: str, arg: object) -> Any:
        if (frame.f_code.co_name == "_write" and event == "line" and not in_write.is_set()
                and "fd = self._next[0]" in linecache.getline(frame.f_code.co_filename, frame.f_lineno)):
            in_write.set()
            go.wait(step)
        return tracer

    def transact() -> None:
        sys.settrace(tracer)
        try:
            with store.transaction() as s:
                s.value["n"] += 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            sys.settrace(None)

    def close() -> None:
        store.close()
        closed.set()

    t = threading.Thread(target=transact)
    t.start()
    assert in_write.wait(step)
    c = threading.Thread(target=close)
    c.start()
    closed_early = closed.wait(0.3)
    go.set()
    t.join(DEADLINE)
    c.join(DEADLINE)
    assert not errors
    assert not closed_early  # close() waited for the transaction
    assert closed.is_set()
    assert lockstore.read(p) == {"n": 1}


def test_threads_whose_symlink_is_switched_twice_do_not_give_back_one_lock_twice(tmp_path: Path) -> None:
    """Two threads of one Store, each holding another target's lock when the symlink moved on, both gave back the
    same earlier lock file's lock object: the second raised KeyError from its transaction. Forced here: both are
    held at the same give-back, then let go together."""
    import linecache

    step = 10.0
    for name in ("T1", "T2", "T3"):
        (tmp_path / f"{name}.json").write_text('{"n": 0}')
    link = tmp_path / "cur.json"

    def point(name: str) -> None:
        tmp = tmp_path / "cur.tmp"
        os.symlink(f"{name}.json", tmp)
        os.replace(tmp, link)

    point("T1")
    store = lockstore.open(link, default={"n": 0}, durable=False)
    with store.transaction() as s:  # the Store now keeps T1's lock
        s.value["n"] += 1
    point("T2")
    b_has_t1, go_b, b_in_settle, go_b2, a_in_settle2, go_a = (threading.Event() for _ in range(6))
    at_give_back = threading.Barrier(2, timeout=step)
    errors: list[BaseException] = []

    def at_pop(frame: Any) -> bool:
        return ".pop(lock_file" in linecache.getline(frame.f_code.co_filename, frame.f_lineno)

    def meet() -> None:
        try:
            at_give_back.wait()
        except threading.BrokenBarrierError:
            pass

    def tracer_b(frame: Any, event: str, arg: object) -> Any:
        name = frame.f_code.co_name
        if event == "call" and name == "acquire" and frame.f_code.co_filename.endswith("_sidecar.py") \
                and not b_has_t1.is_set():
            b_has_t1.set()  # B has T1's lock object, not the lock yet
            go_b.wait(step)
        if event == "call" and name == "settle" and not b_in_settle.is_set():
            b_in_settle.set()
            go_b2.wait(step)
        if name == "_forget_other_targets" and event == "line" and at_pop(frame):
            meet()
        return tracer_b

    settles = [0]

    def tracer_a(frame: Any, event: str, arg: object) -> Any:
        name = frame.f_code.co_name
        if event == "call" and name == "settle":
            settles[0] += 1
            if settles[0] == 2:  # A let T1's lock go on seeing T2, and now holds T2's
                a_in_settle2.set()
                go_a.wait(step)
        if name == "_forget_other_targets" and event == "line" and at_pop(frame) and settles[0] == 2:
            meet()
        return tracer_a

    def run(tracer: Any) -> None:
        sys.settrace(tracer)
        try:
            with store.transaction(timeout=5) as s:
                s.value["n"] += 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            sys.settrace(None)

    b = threading.Thread(target=run, args=(tracer_b,))
    b.start()
    assert b_has_t1.wait(step)
    a = threading.Thread(target=run, args=(tracer_a,))
    a.start()
    assert a_in_settle2.wait(step)
    go_b.set()
    assert b_in_settle.wait(step)  # B holds T1's flock, A holds T2's: both check which target is current
    point("T3")
    go_a.set()
    go_b2.set()
    a.join(DEADLINE)
    b.join(DEADLINE)
    store.close()
    assert not errors
    total = sum(json.loads((tmp_path / f"{name}.json").read_text())["n"] for name in ("T1", "T2", "T3"))
    assert total == 3


def test_a_lock_given_back_while_another_thread_acquires_through_it_closes_nothing_in_use(tmp_path: Path) -> None:
    """A lock object given back (an earlier symlink target's, by another thread of the Store) let its slot go: the
    check that nobody used the slot and the close of its descriptors were two steps, and a thread that had the
    slot in hand took it in between, locked through the descriptor being closed and lost it under its feet
    (IndexError, or a flock dropped while held). Forced here: the closing thread is held between its check and its
    close while the other thread takes the slot."""
    import linecache

    from lockstore import _sidecar

    step = 10.0
    lock = _sidecar.SidecarLock(str(tmp_path / "d.json.lock"))
    warm = lock.held(threading.get_ident(), None)
    lock.acquire(warm, timeout=5.0, poll_interval=0.01, blocking=True, label=None)  # the slot and its descriptor
    lock.release(warm)
    has_slot, go, at_mark, go_on, decided, close_now = (threading.Event() for _ in range(6))
    errors: list[BaseException] = []

    def line_of(frame: Any) -> str:
        return linecache.getline(frame.f_code.co_filename, frame.f_lineno)

    def tracer_t(frame: Any, event: str, arg: object) -> Any:
        name = frame.f_code.co_name
        if (name == "_acquire" and event == "line" and not has_slot.is_set()
                and "held_by_filelock_here" in line_of(frame)):
            has_slot.set()  # the slot in hand, not taken yet
            go.wait(step)
        if name == "_mark" and event == "call" and not at_mark.is_set():
            at_mark.set()
            go_on.wait(step)
        return tracer_t

    def tracer_c(frame: Any, event: str, arg: object) -> Any:
        if (frame.f_code.co_name == "drop_if_unused" and event == "line" and not decided.is_set()
                and "slot.close_files()" in line_of(frame)):
            decided.set()  # nobody used the slot when it looked
            close_now.wait(step)
        return tracer_c

    def acquire_and_release() -> None:
        held = lock.held(threading.get_ident(), None)
        sys.settrace(tracer_t)
        try:
            lock.acquire(held, timeout=5.0, poll_interval=0.01, blocking=True, label=None)
            lock.release(held)
        except BaseException as exc:
            errors.append(exc)
        finally:
            sys.settrace(None)

    def give_back() -> None:
        sys.settrace(tracer_c)
        try:
            lock.close()
        finally:
            sys.settrace(None)

    t = threading.Thread(target=acquire_and_release)
    t.start()
    assert has_slot.wait(step)
    c = threading.Thread(target=give_back)
    c.start()
    assert decided.wait(step)
    go.set()
    assert at_mark.wait(step)  # the thread holds the lock
    close_now.set()
    c.join(DEADLINE)
    go_on.set()
    t.join(DEADLINE)
    lock.close()
    assert not errors
    # Nobody holds the lock file now: another descriptor takes it at once.
    fd = os.open(lock.lock_file, os.O_RDWR)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


class _SlowLoads:
    """JSON whose decoding takes ``delay`` seconds while ``slow`` is set (a large value's reload, made long)."""

    def __init__(self) -> None:
        self.slow = threading.Event()
        self.started = threading.Event()
        self.delay = 0.3

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value).encode()

    def loads(self, data: bytes) -> Any:
        if self.slow.is_set() and threading.current_thread() is not threading.main_thread():
            self.started.set()
            time.sleep(self.delay)
        return json.loads(data)


def _reload_in_a_thread(store: lockstore.Store[Any], fmt: _SlowLoads) -> threading.Thread:
    with lockstore.open(store.path, default={"n": 0}).transaction() as o:  # changed behind the store's back: the
        o.value["n"] += 0                                                    # reload decodes it again
        o.value["other"] = True
    fmt.slow.set()
    thread = threading.Thread(target=store.reload)
    thread.start()
    assert fmt.started.wait(DEADLINE)  # the other thread is inside reload(): it has the Store's turn
    return thread


def test_a_transaction_that_got_the_lock_waits_for_another_threads_reload_even_with_timeout_0(
        tmp_path: Path) -> None:
    """timeout=0 means "do not wait for another holder of the lock". Another thread's reload() holds no lock, only
    the Store's turn for a moment: a transaction that got the lock waits for that moment instead of failing with a
    LockTimeout that blamed a holder "not visible from here (another host or PID namespace)"."""
    p = tmp_path / "d.json"
    fmt = _SlowLoads()
    store = lockstore.open(p, default={"n": 0}, format=fmt, durable=False)
    thread = _reload_in_a_thread(store, fmt)
    try:
        with store.transaction(timeout=0) as s:
            s.value["n"] += 1
    finally:
        thread.join(DEADLINE)
    assert lockstore.read(p) == {"n": 1, "other": True}
    stats = store.stats()
    assert stats is not None and stats.acquisitions == 2 and stats.timeouts == 0


def test_a_reload_longer_than_the_grace_gives_a_timeout_that_names_this_process(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    fmt = _SlowLoads()
    fmt.delay = 1.5
    store = lockstore.open(p, default={"n": 0}, format=fmt, durable=False)
    thread = _reload_in_a_thread(store, fmt)
    try:
        with pytest.raises(lockstore.LockTimeout) as caught, store.transaction(timeout=0):
            pass
    finally:
        thread.join(DEADLINE)
    text = str(caught.value)
    assert "another thread of this process" in text and "another host" not in text, text
    assert lockstore.read(p) == {"n": 0, "other": True}
    with store.transaction(timeout=0) as s:  # nothing left held
        s.value["n"] += 1
    assert lockstore.read(p) == {"n": 1, "other": True}


def test_a_transaction_inside_the_same_threads_reload_is_refused_not_left_waiting(tmp_path: Path) -> None:
    """A signal handler (here: a format hook) running a transaction while its own thread is inside reload(): the
    Store's turn is this very thread's, so waiting for it would wait for itself (forever with timeout=-1)."""
    p = tmp_path / "d.json"
    seen: list[BaseException] = []

    class Reentrant:
        inside = False

        def dumps(self, value: Any) -> bytes:
            return json.dumps(value).encode()

        def loads(self, data: bytes) -> Any:
            if self.inside:
                self.inside = False
                started = time.monotonic()
                try:
                    with store.transaction(timeout=5):
                        pass
                except BaseException as exc:
                    seen.append(exc)
                assert time.monotonic() - started < 2.5
            return json.loads(data)

    fmt = Reentrant()
    store = lockstore.open(p, default={"n": 0}, format=fmt, durable=False)
    with lockstore.open(p, default={"n": 0}).transaction() as o:  # changed: the reload decodes it again
        o.value["n"] = 1
    fmt.inside = True
    store.reload()
    assert len(seen) == 1 and isinstance(seen[0], lockstore.LockReentryError), seen
    with store.transaction(timeout=0) as s:  # nothing left held
        s.value["n"] += 1
    assert lockstore.read(p) == {"n": 2}


def test_a_thread_timing_out_on_the_stores_turn_leaves_the_holders_descriptors_alone(tmp_path: Path) -> None:
    """A thread whose wait for the Store's turn times out must not touch the descriptors the holding thread reads
    and writes through (it used to close the holder's retired pin, and in an unlucky moment the descriptor being
    written: a completed write then raised, and its update went unacknowledged)."""
    p = tmp_path / "d.json"
    store = lockstore.open(p, default={"n": 0}, durable=False)
    with store.transaction() as s:
        s.value["n"] += 1
    storage: Any = store._core.storage  # white box: the descriptors are the storage's private lists
    other = lockstore.open(p, default={"n": 0}, durable=False)
    with other.transaction() as o:  # the file changes behind the store's back: its next transaction re-reads
        o.value["n"] += 1
    timed_out: list[bool] = []

    def impatient() -> None:
        try:
            with store.transaction(timeout=0.01):
                pass
        except lockstore.LockTimeout:
            timed_out.append(True)

    with store.transaction() as s:
        retired = list(storage._retired)
        assert retired  # the pin of the previous read, closed when this transaction lets go of the lock
        thread = threading.Thread(target=impatient)
        thread.start()
        thread.join(DEADLINE)
        assert timed_out == [True]
        assert storage._retired == retired  # untouched by the thread that timed out
        os.fstat(retired[0])  # still open
        s.value["n"] += 1
    assert lockstore.read(p) == {"n": 3}


def test_with_store_depth_is_per_thread(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store: lockstore.Store[Any] = lockstore.open(p, default={}, durable=False, ignore_inner_exits=True)
    inside, go = threading.Event(), threading.Event()

    def outer() -> None:
        with store:
            inside.set()
            go.wait(DEADLINE)

    t = threading.Thread(target=outer)
    t.start()
    assert inside.wait(DEADLINE)
    with store:  # this thread's outermost block: commits at its exit, whatever another thread has open
        store.value["b"] = 1
    assert lockstore.read(p) == {"b": 1}
    go.set()
    t.join(DEADLINE)


def test_async_task_and_thread_share_a_store(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, default={"n": 0}, durable=False)

    async def main() -> None:
        async with store.atransaction() as s:
            s.value["n"] = 999
            done = asyncio.get_running_loop().run_in_executor(None, store.commit)  # another thread: must wait
            await asyncio.sleep(0.05)
            assert not done.done()
            with pytest.raises(lockstore.LockReentryError):
                await asyncio.create_task(_sync_commit(store))  # another task of this loop: would block the loop
            s.value["n"] = 1
        await done

    asyncio.run(main())
    assert lockstore.read(p) == {"n": 1}


async def _sync_commit(store: lockstore.Store[Any]) -> None:
    store.commit()


# ----------------------------------------------------------------------------------- 2. retargeted symlinks
_INCREMENTER = """
import sys, lockstore
store = lockstore.open(sys.argv[1], default={"n": 0}, durable=False, timeout=-1)
pause = int(sys.argv[3]) if len(sys.argv) > 3 else -1
print("ready", flush=True)
sys.stdin.readline()
for i in range(int(sys.argv[2])):
    if i == pause:
        print("paused", flush=True)
        sys.stdin.readline()
    with store.transaction() as s:
        s.value["n"] += 1
"""


def _incrementers(path: Path, k: int, n: int, pause: int = -1) -> list[subprocess.Popen[str]]:
    procs = [subprocess.Popen([sys.executable, "-c", _INCREMENTER, str(path), str(n), str(pause)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(k)]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"  # opened, path resolved
    return procs


def _go(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()


@pytest.mark.parametrize("round_", range(3))  # a stale lock lasts one transaction per process: give it chances
def test_switched_symlink_loses_no_update(tmp_path: Path, round_: int) -> None:
    v1, v2, link = tmp_path / "v1.json", tmp_path / "v2.json", tmp_path / "current"
    v1.write_text('{"n": 0}')
    v2.write_text('{"n": 0}')
    link.symlink_to("v1.json")
    n, k = 150, 4
    old = _incrementers(link, k, n, pause=40)  # Stores opened before the switch, 40 transactions in
    _go(old)
    for proc in old:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "paused"
    tmp = tmp_path / "current.new"
    tmp.symlink_to("v2.json")
    os.replace(tmp, link)  # an atomic switch between two transactions of the old Stores
    new = _incrementers(link, k, n)  # Stores opened after the switch
    _go(old + new)  # the old Stores' first transaction after the switch races the new Stores' first ones
    for proc in old + new:
        proc.communicate(timeout=DEADLINE * 2)
        assert proc.returncode == 0
    total = json.loads(v1.read_text())["n"] + json.loads(v2.read_text())["n"]
    assert json.loads(v1.read_text())["n"] == k * 40
    assert total == 2 * k * n, f"{2 * k * n - total} updates lost across the switch"


def test_a_directory_link_switched_inside_a_transaction_leaves_its_write_in_the_locked_directory(
        tmp_path: Path) -> None:
    # ``current -> r1`` is switched to ``r2`` while a transaction on current/d.json holds r1's lock: its write must
    # land in r1 (the file whose lock it holds, resolved under the lock), not follow the link into r2, whose lock
    # another process may hold at that moment. The next transaction takes r2's lock and builds on r2's value.
    for name in ("r1", "r2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "d.json").write_text('{"n": 10}' if name == "r2" else '{"n": 0}')
    link = tmp_path / "current"
    link.symlink_to("r1")
    store = lockstore.open(link / "d.json", default={"n": 0})
    with store.transaction() as s:
        s.value["n"] += 1
    with store.transaction() as s:
        s.value["n"] += 1
        tmp = tmp_path / "current.new"
        tmp.symlink_to("r2")
        os.replace(tmp, link)
    assert json.loads((tmp_path / "r1" / "d.json").read_text()) == {"n": 2}
    assert json.loads((tmp_path / "r2" / "d.json").read_text()) == {"n": 10}
    with store.transaction() as s:
        s.value["n"] += 1
    assert json.loads((tmp_path / "r2" / "d.json").read_text()) == {"n": 11}
    assert os.path.exists(tmp_path / "r2" / "d.json.lock")


def test_threads_sharing_a_lock_file_that_is_replaced_again_and_again_see_no_closed_descriptor(
        tmp_path: Path) -> None:
    # A thread that finds it holds a replaced lock file lets go and closes the slot's descriptors: it must close them
    # before the slot passes to the next thread, which would otherwise use (fstat, flock) a descriptor being closed,
    # or a number already given to another file.
    path = str(tmp_path / "d.json")
    lock = path + ".lock"
    stores = [lockstore.open(path, default={"n": 0}, durable=False) for _ in range(2)]
    with stores[0].transaction() as s:
        s.value["n"] += 1
    errors: list[str] = []
    done = [0]
    stop = time.monotonic() + 3

    def worker(i: int) -> None:
        while time.monotonic() < stop:
            try:
                with stores[i % 2].transaction(timeout=5) as s:
                    s.value["n"] += 1
                done[0] += 1
            except lockstore.LockTimeout:
                pass
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    def replacer() -> None:
        n = 0
        while time.monotonic() < stop:
            with open(f"{lock}.new{n}", "w"):
                pass
            os.rename(f"{lock}.new{n}", lock)
            n += 1
            time.sleep(0.002)

    before = len(os.listdir("/proc/self/fd"))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch at every chance: the window is a few bytecodes wide
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)] + [threading.Thread(target=replacer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE)
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert errors == [], f"{len(errors)} errors, e.g. {errors[:3]}"
    assert done[0] > 0
    for store in stores:
        store.close()
    assert len(os.listdir("/proc/self/fd")) <= before


# ----------------------------------------------------------------------------------- 3. fork inside a transaction
_FORK_INSIDE = """
import os, sys, lockstore
p = sys.argv[1]
store = lockstore.open(p, default={"n": 0}, durable=False)
store.commit()
with store.transaction() as s:
    s.value["n"] += 10
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)  # the parent stays inside its block until the child left its copy
        assert os.waitstatus_to_exitcode(status) == 0, status
if pid == 0:
    # The child left the inherited block: it wrote nothing, released nothing, and its value is back.
    assert lockstore.read(p) == {"n": 0}, lockstore.read(p)
    assert store.value == {"n": 0}, store.value
    other = lockstore.open(p, default={"n": 0}, durable=False)
    try:
        with other.transaction(blocking=False):
            pass
        sys.exit("the child could take the lock the parent holds")
    except lockstore.LockTimeout:
        pass
    sys.exit(0)
assert lockstore.read(p) == {"n": 10}, lockstore.read(p)
for _ in range(10):  # the parent's lock and store still work
    with store.transaction() as s:
        s.value["n"] += 1
assert lockstore.read(p) == {"n": 20}
print("ok")
"""


def test_child_forked_inside_a_transaction_writes_nothing_and_exits_cleanly(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _FORK_INSIDE, str(tmp_path / "d.json")], capture_output=True,
                         text=True, timeout=DEADLINE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


_FORK_THEN_TRANSACT = """
import os, sys, lockstore
p = sys.argv[1]
store = lockstore.open(p, default={"n": 0}, durable=False)
with store.transaction() as s:
    s.value["n"] += 1
    pid = os.fork()
    if pid == 0:
        # Inside the inherited block, the child's own transaction is a real one (not a savepoint of the parent's).
        with store.transaction(timeout=-1) as c:
            c.value["child"] = True
    else:
        pass
if pid == 0:
    sys.exit(0)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
print(lockstore.read(p))
"""


def test_childs_own_transaction_inside_an_inherited_block_is_written(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _FORK_THEN_TRANSACT, str(tmp_path / "d.json")],
                         capture_output=True, text=True, timeout=DEADLINE)
    assert out.returncode == 0, out.stderr
    final = eval(out.stdout)  # the child waited for the parent's lock, then wrote; the parent wrote first
    assert final == {"n": 1, "child": True}


# ----------------------------------------------------------------------------------- 4. one filelock instance
@pytest.mark.parametrize("kind", [filelock.FileLock, filelock.SoftFileLock])
def test_two_stores_sharing_one_filelock_instance_refuse_nesting(tmp_path: Path, kind: type[Any]) -> None:
    p = tmp_path / "d.json"
    lock = kind(str(tmp_path / "shared.lock"))
    a = lockstore.open(p, default={"n": 0}, durable=False, lock=lock)
    b = lockstore.open(p, default={"n": 0}, durable=False, lock=lock)
    with a.transaction() as sa:
        sa.value["n"] += 1
        with pytest.raises(lockstore.LockReentryError), b.transaction() as sb:
            sb.value["n"] += 1
    assert lockstore.read(p) == {"n": 1}
    with b.transaction() as sb:  # and b works once a is done
        sb.value["n"] += 1
    assert lockstore.read(p) == {"n": 2}


def test_a_filelock_instance_held_by_the_caller_is_joined(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    lock = filelock.FileLock(str(tmp_path / "shared.lock"))
    a = lockstore.open(p, default={"n": 0}, durable=False, lock=lock)
    with lock:  # the caller's own hold: transactions run inside it
        with a.transaction() as s:
            s.value["n"] += 1
        assert lock.is_locked
    assert not lock.is_locked
    assert lockstore.read(p) == {"n": 1}


# ----------------------------------------------------------------------------------- 5. savepoints
def test_failed_savepoint_keeps_nested_references_and_earlier_work(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store: lockstore.Store[Any] = lockstore.open(p, default={"jobs": [], "meta": {"runs": 0}}, durable=False)
    with store.transaction() as s:
        jobs = s.value["jobs"]
        meta = s.value["meta"]
        jobs.append("a")  # earlier work of the outer block
        try:
            with store.transaction() as inner:
                inner.value["jobs"].append("b")
                inner.value["meta"]["runs"] = 99
                inner.value["extra"] = {1, 2}
                raise ValueError
        except ValueError:
            pass
        assert s.value == {"jobs": ["a"], "meta": {"runs": 0}}
        jobs.append("c")  # references taken before the savepoint still reach the value
        meta["runs"] += 1
    assert lockstore.read(p) == {"jobs": ["a", "c"], "meta": {"runs": 1}}


def test_savepoint_of_an_unencodable_value_restores_it_exactly(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store: lockstore.Store[Any] = lockstore.open(p, default={"n": 0}, durable=False)
    with store.transaction() as s:
        s.value["n"] = 5  # earlier work
        s.value["tmp"] = {3, 1}  # not JSON: the savepoint cannot go through the format
        s.value[7] = "int key"
        try:
            with store.transaction() as inner:
                inner.value["n"] = 6
                inner.value["tmp"].add(2)
                raise KeyError
        except KeyError:
            pass
        assert s.value == {"n": 5, "tmp": {1, 3}, 7: "int key"}
        assert 7 in s.value and "7" not in s.value
        del s.value["tmp"]
        del s.value[7]
    assert lockstore.read(p) == {"n": 5}


def test_negative_control_a_round_trip_savepoint_breaks_references() -> None:
    # The checks above can fail: restoring through JSON (the old way) replaces nested containers.
    value: dict[str, Any] = {"jobs": ["a"]}
    jobs = value["jobs"]
    saved = json.dumps(value)
    value["jobs"].append("b")
    restored = json.loads(saved)
    value.clear()
    value.update(restored)
    jobs.append("c")
    assert value == {"jobs": ["a"]}  # the reference no longer reaches the value: the bug the test catches


# ----------------------------------------------------------------------------------- 6. symlink at the lock path
def test_symlink_at_the_lock_path_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    victim = tmp_path / "precious.txt"
    victim.write_bytes(b"Xdo not touch\n")
    before = victim.read_bytes(), victim.stat().st_mtime_ns
    (tmp_path / "d.json.lock").symlink_to(victim)
    store = lockstore.open(p, default=0, durable=False)
    with pytest.raises(OSError) as info, store.transaction():
        pass
    assert info.value.filename == str(p) + ".lock"
    assert "symbolic link" in str(info.value)
    with pytest.raises(OSError):
        store.commit()
    assert (victim.read_bytes(), victim.stat().st_mtime_ns) == before
    assert store.holder() is None
    assert not p.exists()


def test_fifo_at_the_lock_path_is_refused_without_hanging(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    os.mkfifo(str(p) + ".lock")
    store = lockstore.open(p, default=0, durable=False)
    with pytest.raises(OSError, match="not a regular file"), store.transaction():
        pass


# ----------------------------------------------------------------------------------- 9. waiting for itself
def test_store_lock_inside_a_transaction_raises_at_once(tmp_path: Path) -> None:
    store = lockstore.open(tmp_path / "d.json", default=0, durable=False, timeout=-1)
    with store.transaction(), pytest.raises(lockstore.LockReentryError), store.lock:
        pass
    with store.lock, store.transaction() as s:  # the other way round joins the held lock
        s.value += 1
    assert lockstore.read(tmp_path / "d.json") == 1


def test_same_file_through_a_symlinked_directory_raises_at_once(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    a = lockstore.open(real / "d.json", default=0, durable=False, timeout=-1)
    b = lockstore.open(tmp_path / "alias" / "d.json", default=0, durable=False, timeout=-1)
    with a.transaction(), pytest.raises(lockstore.LockReentryError), b.transaction():
        pass
    with b.transaction() as s:
        s.value += 1


def test_atransaction_nested_in_another_stores_transaction_raises_at_once(tmp_path: Path) -> None:
    a = lockstore.open(tmp_path / "d.json", default=0, durable=False, timeout=-1)
    b = lockstore.open(tmp_path / "d.json", default=0, durable=False, timeout=-1)

    async def inner() -> None:
        async with b.atransaction():
            pass

    with a.transaction(), pytest.raises(lockstore.LockReentryError):
        asyncio.run(inner())


def test_atransaction_nested_in_the_same_stores_transaction_joins_it(tmp_path: Path) -> None:
    a = lockstore.open(tmp_path / "d.json", default=0, durable=False, timeout=-1)

    async def inner() -> None:
        async with a.atransaction() as s:
            s.value += 1

    with a.transaction() as s:
        s.value += 1
        asyncio.run(inner())
    assert lockstore.read(tmp_path / "d.json") == 2


# ----------------------------------------------------------------------------------- 10. holder() never locks
_TRY_LOOP = """
import sys, time, lockstore
store = lockstore.open(sys.argv[1], default=0, durable=False)
end = time.monotonic() + float(sys.argv[2])
ok = busy = 0
print("ready", flush=True)
while time.monotonic() < end:
    try:
        with store.transaction(blocking=False) as s:
            s.value += 1
        ok += 1
    except lockstore.LockTimeout:
        busy += 1
print(ok, busy, flush=True)
"""


def test_polling_holder_never_makes_another_process_fail(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, default=0, durable=False)
    store.commit()
    proc = subprocess.Popen([sys.executable, "-c", _TRY_LOOP, str(p), "1.5"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    polls = 0
    while proc.poll() is None:
        store.holder()
        polls += 1
    ok, busy = map(int, proc.communicate()[0].split())
    assert polls > 100 and ok > 100
    assert busy == 0, f"{busy} non-blocking transactions failed while another process polled holder()"


def test_negative_control_a_probing_holder_makes_others_fail(tmp_path: Path) -> None:
    import fcntl

    p = tmp_path / "d.json"
    lockstore.open(p, default=0, durable=False).commit()
    proc = subprocess.Popen([sys.executable, "-c", _TRY_LOOP, str(p), "1.5"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    fd = os.open(str(p) + ".lock", os.O_RDONLY)
    while proc.poll() is None:  # what the old holder() did: take the lock to see whether it is free
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            pass
    os.close(fd)
    _, busy = map(int, proc.communicate()[0].split())
    assert busy > 0


def test_cli_holder_names_a_foreign_holder_and_ignores_a_stale_record(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    lock_file = str(p) + ".lock"
    Path(lock_file).write_text(json.dumps({"pid": 2**22 + 7, "start": 1.0, "host": os.uname().nodename,
                                           "pidns": os.readlink("/proc/self/ns/pid"), "at": 1.0}) + "\n")

    def cli(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "lockstore", *args], capture_output=True, text=True,
                             timeout=DEADLINE, check=True)
        return out.stdout

    free = json.loads(cli("holder", str(p), "--json"))
    assert free["held"] is False and free["holder"] is None  # a stale record is not a holder
    with Child("flock", lock_file) as child:
        child.wait_ready()
        held = json.loads(cli("holder", str(p), "--json"))
        assert held["held"] is True and held["holder"]["pid"] == child.pid
        assert held["holder"]["recorded"] is False and held["holder"]["acquired_at"] is None
        text = cli("holder", str(p))
        assert f"pid:      {child.pid}" in text and "1970" not in text
        child.release()


# ----------------------------------------------------------------------------------- 11. timeouts
@pytest.mark.parametrize("timeout", [math.inf, 1e10, 1e300, -math.inf])
def test_infinite_and_huge_timeouts_wait_forever(tmp_path: Path, timeout: float) -> None:
    store = lockstore.open(tmp_path / "d.json", default=0, durable=False, timeout=timeout)
    assert store.timeout == -1.0
    with store.transaction() as s:
        s.value += 1
    with store.transaction(timeout=timeout) as s:
        s.value += 1
    assert lockstore.read(tmp_path / "d.json") == 2


@pytest.mark.parametrize("bad", [math.nan, "5", None, True])
def test_nan_and_non_numbers_are_rejected(tmp_path: Path, bad: Any) -> None:
    with pytest.raises((ValueError, TypeError), match="timeout"):
        lockstore.open(tmp_path / "d.json", timeout=bad)
    store = lockstore.open(tmp_path / "d.json", default=0)
    if bad is not None:  # None means the store's timeout
        with pytest.raises((ValueError, TypeError), match="timeout"):
            store.transaction(timeout=bad)


def test_cli_accepts_a_huge_wait(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "lockstore", "incr", "-w", "1e300", str(tmp_path / "s.json"), "n"],
                         capture_output=True, text=True, timeout=DEADLINE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


# ----------------------------------------------------------------------------------- 8. leaks
_MANY_FILES = """
import gc, os, resource, sys, threading, lockstore
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
d = sys.argv[1]
for i in range(300):
    store = lockstore.open(os.path.join(d, f"f{i}.json"), default=0, durable=False)
    with store.transaction() as s:
        s.value += 1
    if i % 2:
        store.close()
    del store
gc.collect()
lockstore.read(os.path.join(d, "f0.json"))  # a later lockstore call closes what collected Stores left
fds = len(os.listdir("/proc/self/fd"))
print(fds, sum(t.name.startswith("lockstore-waiter") for t in threading.enumerate()))
"""


def test_closed_and_collected_stores_give_back_their_descriptors(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _MANY_FILES, str(tmp_path)], capture_output=True, text=True,
                         timeout=DEADLINE)
    assert out.returncode == 0, out.stderr
    fds, _ = map(int, out.stdout.split())
    assert fds < 16, f"{fds} descriptors still open after 300 stores were closed or collected"


_CONTENDED_FILES = """
import os, sys, threading, time, lockstore
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    path = os.path.join(d, f"f{i}.json")
    store = lockstore.open(path, default=0, durable=False, timeout=5)
    with open(path + ".ready", "w"):
        pass
    while not os.path.exists(path + ".held"):
        time.sleep(0.001)
    with store.transaction() as s:  # contended: waits through the waiter thread
        s.value += 1
    store.close()
time.sleep(0.2)
print(sum(t.name.startswith("lockstore-waiter") for t in threading.enumerate()), len(os.listdir("/proc/self/fd")))
"""


def test_waiter_threads_end_with_their_stores(tmp_path: Path) -> None:
    import fcntl

    n = 20
    proc = subprocess.Popen([sys.executable, "-c", _CONTENDED_FILES, str(tmp_path), str(n)],
                            stdout=subprocess.PIPE, text=True)
    for i in range(n):
        path = tmp_path / f"f{i}.json"
        deadline = time.monotonic() + DEADLINE
        while not Path(str(path) + ".ready").exists():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        Path(str(path) + ".held").touch()
        time.sleep(0.02)  # the child is now waiting for this lock
        os.close(fd)
    out, _ = proc.communicate(timeout=DEADLINE)
    threads, fds = map(int, out.split())
    assert threads == 0, f"{threads} waiter threads outlived their stores"
    assert fds < 16


# ----------------------------------------------------------------------------------- 12. CLI and API details
def test_readme_cli_sequence_on_a_fresh_file(tmp_path: Path) -> None:
    f = str(tmp_path / "state.json")

    def cli(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "lockstore", *args], capture_output=True, text=True,
                             timeout=DEADLINE)
        assert out.returncode == 0, (args, out.stderr)
        return out.stdout

    cli("set", f, "jobs.0.state", "done")
    cli("append", f, "log", '{"ok": true}')
    assert cli("get", f, "jobs.-1.state", "--raw") == "done\n"
    cli("delete", f, "jobs.0")
    assert lockstore.read(f) == {"jobs": [], "log": [{"ok": True}]}


def test_cli_format_bson_without_pymongo_is_a_clear_error(tmp_path: Path) -> None:
    script = ("import sys; sys.modules['bson'] = None; from lockstore.cli import main; "
              f"sys.exit(main(['incr', '--format', 'bson', {str(tmp_path / 'x.bson')!r}, 'n']))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=DEADLINE)
    assert out.returncode == 6, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    assert "lockstore[bson]" in out.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="drops privileges to nobody")
def test_read_only_directory_without_lock_file_says_permission_denied(tmp_path: Path) -> None:
    d = tmp_path / "ro"
    d.mkdir()
    (d / "s.json").write_text("{}")
    os.chmod(d, 0o555)
    # Imported as root, then run as nobody (a daemon dropping its privileges after start-up).
    # Imported and moved into the directory as root (pytest's temp root is private), then run as nobody.
    script = ("import lockstore, os, pwd, sys\n"
              f"os.chdir({str(d)!r})\n"
              "nobody = pwd.getpwnam('nobody')\n"
              "os.setgroups([]); os.setgid(nobody.pw_gid); os.setuid(nobody.pw_uid)\n"
              "try:\n"
              "    lockstore.open('s.json').commit()\n"
              "except OSError as e:\n"
              "    print(type(e).__name__, e.filename); sys.exit(0)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=DEADLINE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["PermissionError", "s.json.lock"]


def test_store_constructor_takes_what_open_takes(tmp_path: Path) -> None:
    store: lockstore.Store[dict[str, Any]] = lockstore.Store(tmp_path / "s.pickle", {}, "pickle")
    store.value["x"] = {1, 2}
    store.commit()
    assert lockstore.read(tmp_path / "s.pickle", format="pickle") == {"x": {1, 2}}
    assert lockstore.Store(tmp_path / "s.pickle", {}, "pickle").value == {"x": {1, 2}}


def test_lock_file_permissions_unchanged(tmp_path: Path) -> None:
    store = lockstore.open(tmp_path / "d.json", default=0, durable=False)
    store.commit()
    mode = stat.S_IMODE(os.stat(str(tmp_path / "d.json.lock")).st_mode)
    assert mode == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_resource_limit_helper_is_available() -> None:
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 256
    assert signal.SIGINT
