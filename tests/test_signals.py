"""An exception at every point where CPython can run a signal handler, in acquire, release and the write path.

For each operation, k walks over every interrupt point of the operation (``_interrupt.inject``), one run each, until
the operation completes without the exception firing. After each run: the lock is free for another process and
for this one, no descriptor is leaked or closed twice, no temp file is left, no waiter thread is left over, the
data file holds the old or the new value, and the next transaction builds on what is really stored. The real-signal
stress (SIGINT bursts at random moments) is in the stress tier (``reliability/test_signals_stress.py``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _children import Child
from _interrupt import inject

import lockstore
from lockstore import _os, _queue, _txn


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def waiter_threads() -> int:
    return sum(t.name.startswith("lockstore-waiter") for t in threading.enumerate())


def lock_is_free_for_others(lock_file: str) -> bool:
    fd = os.open(lock_file, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also releases our probe
    return True


def check_after(store: lockstore.Store[Any], path: Path, before: int, baseline_fds: int, where: str) -> list[str]:
    """The invariants after one interrupted (or completed) operation; returns the violations."""
    problems: list[str] = []
    gc.collect()
    # One point cannot be covered from inside: the first instruction of __exit__ (the with statement calls it; an
    # exception there never enters its body). Then the dropped transaction is released by this process's next
    # lockstore call, which the check below makes; everywhere else the lock is free before the exception arrives.
    deferred = "__exit__ at the start" in where
    if not deferred and not lock_is_free_for_others(str(path) + ".lock"):
        problems.append(f"{where}: the lock is still held (seen from another open file description)")
    temps = [n for n in os.listdir(path.parent) if n.endswith(".tmp")]
    if temps:
        problems.append(f"{where}: temp files left: {temps}")
    now = lockstore.read(path)["n"]
    if now not in (before, before + 1):
        problems.append(f"{where}: the file holds {now}, expected {before} or {before + 1}")
    try:
        with store.transaction(timeout=0) as s:  # this process's slot is free, and the store sees what is stored
            s.value["n"] += 1
    except BaseException as exc:
        problems.append(f"{where}: the next transaction failed: {exc!r}")
    else:
        if lockstore.read(path)["n"] != now + 1:
            problems.append(f"{where}: the next transaction built on a stale value")
    if not lock_is_free_for_others(str(path) + ".lock"):
        problems.append(f"{where}: the lock is still held after the next lockstore call")
    if fds() != baseline_fds:
        problems.append(f"{where}: {fds() - baseline_fds:+d} descriptors (leaked or closed twice)")
    if waiter_threads() > 1:
        problems.append(f"{where}: {waiter_threads()} waiter threads")
    problems += _slots_left(str(path) + ".lock", where)
    stats = store.stats()
    if stats is None or stats.since != STATS_SINCE.get(str(path), stats.since):
        # Statistics are best effort under interrupts (a count may be missed), but an area left with a wrong
        # checksum would be started afresh: every count kept so far lost.
        problems.append(f"{where}: the statistics were started afresh ({stats!r:.80})")
    return problems


STATS_SINCE: dict[str, float] = {}  # the statistics' start, per walked file


def _slots_left(lock_file: str, where: str) -> list[str]:
    """A waiter slot still holding this process's record, or still claimed, once nothing waits: a wait left
    announced makes every holder hand the lock over to nobody, a claim keeps other processes out of the slot."""
    problems: list[str] = []
    fd = os.open(lock_file, os.O_RDWR)  # an open file description of its own: our claims conflict with it
    try:
        slots = os.pread(fd, _queue.SLOT * _queue.SLOTS, _queue.FIRST_SLOT)
        mine = f'"pid": {os.getpid()},'.encode()
        for index in range(len(slots) // _queue.SLOT):
            chunk = slots[index * _queue.SLOT : (index + 1) * _queue.SLOT]
            if mine in chunk and _queue._MARK not in chunk:  # a timed-out mark stays, for the next holder to count
                problems.append(f"{where}: waiter slot {index} still holds this process's record")
            if _queue._claim(fd, index) is False:
                problems.append(f"{where}: waiter slot {index} is still claimed")
            else:
                _queue._unclaim(fd, index)
    finally:
        os.close(fd)
    return problems


POINTS: dict[str, int] = {}


def walk(path: Path, store: lockstore.Store[Any], operation: Callable[[], object], *,
         make: Callable[[], BaseException] = KeyboardInterrupt, limit: int = 3000, deep: bool = False,
         within: str | None = None) -> tuple[int, list[str]]:
    """Inject at k = 1, 2, ... until the operation completes (only inside ``within``, a function's qualified name,
    when given); return (points, violations)."""
    operation()  # warm up: the store's descriptors (and waiter thread) are open, as in a long-running program
    gc.collect()
    with store.transaction() as s:  # also closes what earlier tests' collected Stores left (see _owners.DEFERRED)
        s.value["n"] += 1
    stats = store.stats()
    assert stats is not None
    STATS_SINCE[str(path)] = stats.since
    baseline_fds = fds()
    problems: list[str] = []
    for k in range(1, limit):
        before = lockstore.read(path)["n"]
        fired, raised, where = inject(k, operation, make, deep=deep, within=within)
        if not fired:
            assert raised is None, raised
            POINTS[os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]] = k - 1
            return k - 1, problems
        problems += check_after(store, path, before, baseline_fds, f"k={k} {where} -> {raised}")
        if len(problems) > 20:
            break
    return -1, problems


# Not durable and lockstore only: the deep walks' points include every point of lockstore's own, so a durable
# walk of lockstore alone would repeat part of the durable deep walk.
@pytest.mark.parametrize(("durable", "deep"), [(False, False), (False, True), (True, True)],
                         ids=["False-lockstore", "False-deep", "True-deep"])
def test_interrupt_anywhere_in_a_transaction(tmp_path: Path, durable: bool, deep: bool) -> None:
    # deep: also at every point of the Python code lockstore calls (atomicwrites, tempfile, json, logging...).
    path = tmp_path / "d.json"
    store = lockstore.open(path, default={"n": 0}, durable=durable)

    def transaction() -> None:
        with store.transaction() as s:
            s.value["n"] += 1

    points, problems = walk(path, store, transaction, deep=deep)
    assert problems == []
    assert points > 50  # the walk really went through acquire, write and release


def test_interrupt_anywhere_in_a_release_that_sets_a_new_longest_hold_keeps_the_statistics(tmp_path: Path) -> None:
    # Every transaction here holds the lock longer than all before it, so each release rewrites the statistics'
    # first part (the longest hold) and its checksum's starting value. An interrupt between remembering that value
    # and remembering the bytes it belongs to must not let the next release combine one with the other (the area
    # would get a wrong checksum, and be started afresh: every count lost). check_after compares the statistics'
    # start before and after.
    path = tmp_path / "d.json"
    store = lockstore.open(path, default={"n": 0}, durable=False)
    held = [0.0]

    def longer_each_time() -> None:
        with store.transaction() as s:
            held[0] += 0.0002
            time.sleep(held[0])
            s.value["n"] += 1

    points, problems = walk(path, store, longer_each_time, within="SidecarLock._let_go")
    assert problems == []
    assert points > 10  # the walk went through the release


def test_interrupt_anywhere_in_a_commit(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    store = lockstore.open(path, default={"n": 0}, durable=False)

    def commit() -> None:
        store.reload()
        store.value["n"] += 1
        store.commit()

    points, problems = walk(path, store, commit)
    assert problems == []
    assert points > 30


def test_interrupt_anywhere_in_a_nested_transaction_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    store = lockstore.open(path, default={"n": 0}, durable=False)

    def nested() -> None:
        with store.transaction() as s:
            s.value["n"] += 1
            try:
                with store.transaction() as inner:
                    inner.value["x"] = 1
                    raise ValueError
            except ValueError:
                pass
            store.reload()  # inside the own transaction: re-reads what is stored (the value so far is dropped)
            s.value["n"] += 1

    points, problems = walk(path, store, nested)
    assert problems == []
    assert points > 50


def test_interrupt_anywhere_while_releasing_a_dropped_transaction(tmp_path: Path) -> None:
    # A transaction dropped without its __exit__ (an interrupt at its very start) is released by the next lockstore
    # call; an interrupt in that release (a burst of signals) must leave the rest to the call after it, whatever
    # that call is, not keep the lock held by nobody until this process happens to take the same lock again.
    path = tmp_path / "d.json"
    store = lockstore.open(path, default={"n": 0}, durable=False)
    elsewhere = lockstore.open(tmp_path / "other.json", default=0)

    def transaction() -> None:
        with store.transaction() as s:
            s.value["n"] += 1

    def drop_one() -> None:
        txn = store.transaction()
        txn.__enter__()
        del txn  # collected at once: its watch queues its release

    transaction()
    gc.collect()
    baseline_fds = fds()
    problems: list[str] = []
    for k in range(1, 2000):
        drop_one()
        before = lockstore.read(path)["n"]
        fired, raised, where = inject(k, transaction)
        if not fired:
            break
        gc.collect()
        elsewhere.reload()  # a lockstore call on another file: it finishes what the interrupted release left
        problems += check_after(store, path, before, baseline_fds, f"k={k} {where} -> {raised}")
        if len(problems) > 20:
            break
    assert problems == []
    assert k > 50  # the walk went through the dropped transaction's release and a whole transaction


class _InterruptExitStart:
    """Raise KeyboardInterrupt once, at the very first instruction of the ``nth`` call of Transaction.__exit__ (where
    CPython may run a signal handler before any of its body: the with statement is left without the transaction's
    end)."""

    def __init__(self, nth: int = 1) -> None:
        self.fired = False
        self.calls = 0
        self.nth = nth

    def _trace(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call" and not self.fired and frame.f_code is _txn.Transaction.__exit__.__code__:
            self.calls += 1
            if self.calls == self.nth:
                self.fired = True
                sys.settrace(None)
                raise KeyboardInterrupt

    def __enter__(self) -> _InterruptExitStart:
        sys.settrace(self._trace)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)


def test_a_transaction_dropped_at_its_exit_is_never_joined_while_its_interrupt_lives(tmp_path: Path) -> None:
    # The "save my state on Ctrl-C" pattern: a transaction in the except block of the interrupt that cut the first
    # one's __exit__ short. The first one's traceback keeps it alive; the save must not join it as a savepoint
    # (its write would never come) but end it and run as a transaction of its own.
    path = tmp_path / "d.json"
    store = lockstore.open(path, default={"n": 0, "saved": False}, durable=False)
    lock_file = str(path) + ".lock"
    try:
        with _InterruptExitStart() as interrupt, store.transaction() as s:
            s.value["n"] += 1
    except KeyboardInterrupt:
        assert interrupt.fired
        with store.transaction() as s:
            s.value["saved"] = True
        assert lock_is_free_for_others(lock_file)  # while the interrupt (and the dropped transaction) still lives
        assert lockstore.read(path) == {"n": 0, "saved": True}  # the interrupted one wrote nothing; the save did

    # A kept exception (sys.last_value in a REPL, a future's result): later transactions are real ones.
    kept: list[BaseException] = []
    try:
        with _InterruptExitStart(), store.transaction() as s:
            s.value["n"] += 100
    except KeyboardInterrupt as exc:
        kept.append(exc)
    for _ in range(3):
        with store.transaction() as s:
            s.value["n"] += 1
        assert lock_is_free_for_others(lock_file)
    store.reload()
    assert lockstore.read(path) == {"n": 3, "saved": True}
    assert kept


def test_the_same_with_statement_entered_again_ends_the_transaction_it_dropped(tmp_path: Path) -> None:
    # The fourth review: a loop runs one with statement for two Stores; the first pass is dropped at its outer
    # __exit__ (the exception kept), the second pass enters the other Store and, inside, the first Store again. That
    # inner transaction is inside a running execution of the very statement that dropped the first one: it must be
    # a real transaction (written, lock freed), not a savepoint of the dropped one.
    index = lockstore.open(tmp_path / "index.json", default={"n": 0}, durable=False)
    data = lockstore.open(tmp_path / "data.json", default={"n": 0}, durable=False)
    kept: list[BaseException] = []
    interrupt = _InterruptExitStart(nth=2)  # the nested index transaction's __exit__ first, then the outer one's
    sys.settrace(interrupt._trace)
    try:
        for store in (index, data):
            try:
                with store.transaction() as s:
                    s.value["n"] += 1
                    with index.transaction() as ix:
                        ix.value["touched"] = ix.value.get("touched", 0) + 1
            except KeyboardInterrupt as exc:
                kept.append(exc)
    finally:
        sys.settrace(None)
    assert interrupt.fired and kept
    assert lockstore.read(tmp_path / "index.json") == {"n": 0, "touched": 1}
    assert lockstore.read(tmp_path / "data.json") == {"n": 1}
    assert lock_is_free_for_others(str(tmp_path / "index.json.lock"))


def test_a_signal_handlers_transaction_inside_the_outer_ones_enter_is_refused(tmp_path: Path) -> None:
    # The fourth review: a handler (SIGUSR1 here; a "save state" SIGTERM handler alike) runs a transaction of the
    # same Store while the main thread is inside that Store's transaction's __enter__. Joining would lose the
    # handler's change to the refresh; taking the outer one for dropped would run its block without the lock. It
    # raises LockReentryError instead: the outer transaction fails cleanly, nothing written, the lock free.
    import signal

    path = tmp_path / "d.json"
    store = lockstore.open(path, default={"n": 0}, durable=False)
    store.commit()

    def handler(signum: int, frame: Any) -> None:
        with store.transaction() as s:
            s.value["signalled"] = True

    storage: Any = store._core.storage
    real_fetch = storage.fetch
    sent: list[bool] = []

    def fetch(*args: Any, **kwargs: Any) -> Any:
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGUSR1)  # runs at the next bytecode boundary, inside the refresh
        return real_fetch(*args, **kwargs)

    previous = signal.signal(signal.SIGUSR1, handler)
    storage.fetch = fetch
    try:
        with pytest.raises(lockstore.LockReentryError, match="being entered or left"), store.transaction() as s:
            s.value["n"] += 1
    finally:
        signal.signal(signal.SIGUSR1, previous)
        del storage.fetch
    assert sent
    assert lockstore.read(path) == {"n": 0}
    assert lock_is_free_for_others(str(path) + ".lock")
    with store.transaction(timeout=0) as s:
        s.value["n"] += 1
    assert lockstore.read(path) == {"n": 1}


def test_a_manually_entered_transaction_dropped_with_its_frame_is_released_without_a_collection(
        tmp_path: Path) -> None:
    # Only a with statement's frame is kept: a transaction entered by hand and referred to by a local of its frame
    # would otherwise make a reference cycle, and a dropped one would keep the lock until the next cyclic garbage
    # collection (a review's stress run: the next transactions raised LockReentryError by the thousand).
    path = tmp_path / "d.json"
    store = lockstore.open(path, default={"n": 0}, durable=False)
    store.commit()

    def drop() -> None:
        txn = store.transaction()
        txn.__enter__()  # and never left: the frame goes, the transaction with it

    gc.collect()
    gc.disable()
    try:
        drop()
        store.reload()  # the next lockstore call releases what the dropped transaction held
        assert lock_is_free_for_others(str(path) + ".lock")
        with store.transaction(timeout=0) as s:
            s.value["n"] += 1
    finally:
        gc.enable()
    assert lockstore.read(path) == {"n": 1}


def test_nested_transactions_still_join_their_running_outer_one(tmp_path: Path) -> None:
    # The negative control of the test above: every way a block can still be running joins it as a savepoint
    # (nested in the block, in a function it calls, inside try/except in it, through a contextmanager generator
    # suspended in it, through ExitStack): the outer one writes once, with the inner changes.
    path = tmp_path / "d.json"
    store = lockstore.open(path, default={"n": 0}, durable=False)
    store.commit()

    def inner() -> None:
        with store.transaction() as s:
            s.value["n"] += 1

    @contextlib.contextmanager
    def wrapped() -> Iterator[lockstore.Store[Any]]:
        with store.transaction() as s:
            yield s

    with store.transaction():
        inner()
        try:
            raise ValueError
        except ValueError:
            inner()
        with store.transaction() as t:
            t.value["n"] += 1
        assert lockstore.read(path) == {"n": 0}  # nothing written yet: all joined the outer one
    with wrapped():
        inner()
        assert lockstore.read(path) == {"n": 3}
    with contextlib.ExitStack() as stack:
        stack.enter_context(store.transaction())
        inner()
        assert lockstore.read(path) == {"n": 4}
    assert lockstore.read(path) == {"n": 5}


def test_interrupt_in_the_cleanup_of_a_failed_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An ordinary error first (the rename fails), then the interrupt anywhere, including in that error's cleanup.
    path = tmp_path / "d.json"
    store = lockstore.open(path, default={"n": 0}, durable=False)
    real_replace = os.replace

    def failing_transaction() -> None:
        def refuse(src: Any, dst: Any) -> None:
            raise OSError(errno.EIO, "injected")

        monkeypatch.setattr(os, "replace", refuse)
        try:
            with store.transaction() as s:
                s.value["n"] += 1
        except OSError:
            pass
        finally:
            monkeypatch.setattr(os, "replace", real_replace)

    points, problems = walk(path, store, failing_transaction)
    assert problems == []
    assert points > 50


def test_interrupt_anywhere_in_a_contended_wait(tmp_path: Path) -> None:
    # Another process holds the lock; the transaction waits through the waiter thread until it is released.
    path = tmp_path / "d.json"
    store = lockstore.open(path, default={"n": 0}, durable=False, timeout=10)
    store.commit()
    with Child("flock_cycles", str(path) + ".lock") as child:
        stdin, stdout = child.proc.stdin, child.proc.stdout
        assert stdin is not None and stdout is not None

        def say(line: str) -> None:
            stdin.write(line + "\n")
            stdin.flush()

        def contended() -> None:
            say("hold")
            assert stdout.readline().strip() == "held"
            try:
                with store.transaction() as s:
                    s.value["n"] += 1
            finally:
                say("release")  # in case the transaction never got to wait
                assert stdout.readline().strip() == "released"

        points, problems = walk(path, store, contended)
    assert problems == []
    assert points > 50


def test_interrupt_anywhere_in_announcing_or_withdrawing_a_wait_leaves_no_announcement(tmp_path: Path) -> None:
    # A wait left announced in the lock file (a record of a live process) makes every holder hand the lock over to
    # nobody, 2 ms per transaction, for as long as this process lives; a slot left claimed keeps other processes
    # out of it. An interrupt anywhere in the announcement or its withdrawal must leave neither.
    path = tmp_path / "d.json"
    store = lockstore.open(path, default={"n": 0}, durable=False, timeout=10)
    store.commit()
    holder = ("import fcntl, sys, time\nf = open(sys.argv[1], 'a')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
              "print('held', flush=True)\ntime.sleep(0.2)\n")

    def contended() -> None:
        with subprocess.Popen([sys.executable, "-c", holder, str(path) + ".lock"], stdout=subprocess.PIPE,
                              text=True) as child:
            assert child.stdout is not None and child.stdout.readline().strip() == "held"
            with store.transaction() as s:
                s.value["n"] += 1

    problems: list[str] = []
    walked = 0
    for within in ("announce", "withdraw"):
        for k in range(1, 200):
            fired, raised, where = inject(k, contended, within=within)
            if not fired:
                walked += k - 1
                break
            problems += _slots_left(str(path) + ".lock", f"k={k} {where} -> {raised}")
    assert problems == []
    assert walked > 10


def test_interrupt_at_every_point_of_the_wait_itself_leaves_no_announcement(tmp_path: Path) -> None:
    # The points of SidecarLock._wait's own frame, each one, in a wait that times out and in one that gets the lock
    # (the walk above counts the points of what it calls too, whose number timing changes, so it can step over one
    # of these). The point right after the announcement is appended lay outside the try whose finally withdraws
    # it: the process's live record stayed, and every holder handed the lock over to nobody while it lived.
    path = tmp_path / "d.json"
    store = lockstore.open(path, default={"n": 0}, durable=False)
    store.commit()
    lock_file = str(path) + ".lock"

    def walk_wait(contended: Callable[[], None], within: str = "SidecarLock._wait") -> tuple[int, list[str]]:
        problems: list[str] = []
        for k in range(1, 100):
            fired, raised, where = inject(k, contended, within=within, own=True)
            problems += _slots_left(lock_file, f"k={k} {where} -> {raised}")
            if not fired:
                return k - 1, problems
        raise AssertionError("the walk did not end")

    holder = ("import fcntl, sys\nf = open(sys.argv[1], 'a')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
              "print('held', flush=True)\nsys.stdin.readline()\n")
    with subprocess.Popen([sys.executable, "-c", holder, lock_file], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as child:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"

        def times_out() -> None:
            with pytest.raises(lockstore.LockTimeout), store.transaction(timeout=0.02):
                pass

        def tries() -> None:
            with pytest.raises(lockstore.LockTimeout), store.transaction(blocking=False):
                pass

        timed_out, problems = walk_wait(times_out)
        marked, more = walk_wait(times_out, "SidecarLock._leave_mark")
        tried, most = walk_wait(tries, "SidecarLock._give_up")
        problems += more + most
        child.communicate("go\n", timeout=60)

    with Child("flock_cycles", lock_file) as cycles:
        stdin, stdout = cycles.proc.stdin, cycles.proc.stdout
        assert stdin is not None and stdout is not None

        def handed_over() -> None:
            stdin.write("hold\n")
            stdin.flush()
            assert stdout.readline().strip() == "held"
            try:
                with store.transaction(timeout=10) as s:
                    s.value["n"] += 1
            finally:
                stdin.write("release\n")  # in case the transaction never got to wait
                stdin.flush()
                assert stdout.readline().strip() == "released"

        got, more = walk_wait(handed_over)
    assert problems + more == []
    assert timed_out >= 4 and marked >= 3 and tried >= 3 and got >= 2


def test_interrupt_in_the_standard_library_while_handing_a_wait_to_the_waiter_thread(tmp_path: Path) -> None:
    # A real signal lands in whatever Python code runs, the standard library's included. An interrupt anywhere in
    # Waiter.wait, down into threading's code, must leave the waiter thread able to serve the next wait: a thread
    # left unwoken lets that wait time out with nobody holding the lock.
    path = tmp_path / "d.json"
    store = lockstore.open(path, default={"n": 0}, durable=False, timeout=5)
    store.commit()
    problems: list[str] = []
    with Child("flock_cycles", str(path) + ".lock") as child:
        stdin, stdout = child.proc.stdin, child.proc.stdout
        assert stdin is not None and stdout is not None

        def say(line: str) -> None:
            stdin.write(line + "\n")
            stdin.flush()

        def contended() -> None:
            say("hold")
            assert stdout.readline().strip() == "held"
            try:
                with store.transaction() as s:
                    s.value["n"] += 1
            finally:
                say("release")
                assert stdout.readline().strip() == "released"

        contended()  # the waiter thread exists, as in a long-running program
        for k in range(1, 500):
            fired, raised, where = inject(k, contended, deep=True, within="Waiter.wait")
            gc.collect()
            store.reload()  # releases a transaction dropped by an interrupt at the start of its __exit__
            try:
                contended()
            except lockstore.LockTimeout as exc:
                problems.append(f"k={k} {where} -> {raised}: the next wait timed out: {exc}")
            if not fired or len(problems) > 3:
                break
    assert problems == []
    assert k > 5  # the walk went through Waiter.wait and what it calls


# The file object closed by the collector says so (a ResourceWarning): the point of the test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("caller", ["read_bytes", "_probe_read"])
def test_two_interrupts_in_a_row_in_a_probes_cleanup_leak_no_descriptor(tmp_path: Path, caller: str) -> None:
    # A LockTimeout describes the holder: it opens the lock file (SidecarLock._probe_read) and reads /proc/locks
    # (_os.read_bytes). An interrupt at the start of their cleanup and a second one at the start of its retry (a
    # burst): the descriptor must still be closed once the interrupted call is gone. A trace function raises the
    # first (CPython then switches tracing off), a profile function the second.
    path = tmp_path / "d.json"
    store = lockstore.open(path, default={"n": 0}, durable=False)
    store.commit()
    cleanup = _os.close_probes.__code__
    state = {"armed": True, "first": False}

    def tracer(frame: Any, event: str, arg: Any) -> None:
        if (event == "call" and frame.f_code is cleanup and frame.f_back.f_code.co_name == caller
                and state["armed"]):
            state["armed"], state["first"] = False, True
            raise KeyboardInterrupt

    def profiler(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is cleanup and state["first"]:
            state["first"] = False
            sys.setprofile(None)
            raise KeyboardInterrupt

    with Child("flock", str(path) + ".lock") as child:
        child.wait_ready()
        with contextlib.suppress(lockstore.LockTimeout), store.transaction(timeout=0):
            pass  # warm up: what a LockTimeout opens once is open
        gc.collect()
        lockstore.read(path)
        before = fds()
        sys.setprofile(profiler)
        sys.settrace(tracer)
        try:
            with store.transaction(timeout=0):
                pass
        except (KeyboardInterrupt, lockstore.LockTimeout):
            pass
        finally:
            sys.settrace(None)
            sys.setprofile(None)
        assert not state["armed"] and not state["first"]  # both interrupts fired
        gc.collect()
        lockstore.read(path)
        assert fds() == before
        child.release()


def test_interrupt_in_a_timed_out_wait(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    store = lockstore.open(path, default={"n": 0}, durable=False)
    store.commit()
    with Child("flock", str(path) + ".lock") as child:
        child.wait_ready()

        def times_out() -> None:
            try:
                with store.transaction(timeout=0.01):
                    pass
            except lockstore.LockTimeout:
                pass

        times_out()  # warm up: the waiter thread and its descriptor exist, as in a long-running program
        gc.collect()
        lockstore.read(path)  # closes what collected Stores left (see _owners.DEFERRED)
        baseline = fds()
        for k in range(1, 2000):
            fired, _, where = inject(k, times_out)
            if fds() != baseline:  # what a collected Store left is closed at the next call (a full collection
                gc.collect()       # at every point would make this walk ten times slower)
                lockstore.read(path)
            assert fds() == baseline, f"k={k} {where}: descriptors {fds() - baseline:+d}"
            if not fired:
                break
        child.release()
    with store.transaction(timeout=0) as s:  # nothing of ours was left holding the slot
        s.value["n"] += 1
    assert lockstore.read(path) == {"n": 1}


def test_negative_control_a_release_that_can_be_cut_short_is_caught(tmp_path: Path) -> None:
    # The walk can fail: a lock released by two steps without protection (state first, unlock later) is caught.
    path = tmp_path / "d.json"
    store = lockstore.open(path, default={"n": 0}, durable=False)
    store.commit()
    lock_file = str(path) + ".lock"

    def fragile() -> None:
        fd = os.open(lock_file, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        json.dumps({})  # an interrupt point between taking and letting go, with no cleanup around it
        os.close(fd)

    fired, _, _ = inject(1, fragile, make=KeyboardInterrupt)
    assert not fired  # the tracer sees only lockstore's frames
    problems: list[str] = []
    fd = os.open(lock_file, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # "interrupted" here: never released
    problems += check_after(store, path, lockstore.read(path)["n"], fds(), "fragile")
    os.close(fd)
    assert any("still held" in p for p in problems)


def test_interrupt_anywhere_in_a_release_that_counts_pending_timeouts_loses_none(tmp_path: Path) -> None:
    # This process's timeouts that left no mark are counted at its next release: an interrupt anywhere in that
    # release (the statistics' update, the write) must leave each counted once, at this release or the next one.
    from lockstore._stats_report import TimedOut

    path = tmp_path / "d.json"
    store = lockstore.open(path, default={"n": 0}, durable=False)
    store.commit()
    with store.transaction():
        pass
    storage: Any = store._core.storage  # white box: the slot of the lock file
    slot = storage._native[str(path) + ".lock"]._box[0]
    added = 0

    def release_with_a_timeout_pending() -> None:
        nonlocal added
        with store.transaction() as s:
            slot.timed_out.add([TimedOut(0.5, 0.5, "pending", os.getpid(), time.time())])
            added += 1
            s.value["n"] += 1

    problems: list[str] = []
    walked = 0
    for k in range(1, 400):
        fired, raised, where = inject(k, release_with_a_timeout_pending, within="SidecarLock._let_go")
        with store.transaction():
            pass  # counts whatever the interrupted release left
        stats = store.stats()
        if stats is None or stats.timeouts != added:
            problems.append(f"k={k} {where} -> {raised}: {added} timeouts, {stats and stats.timeouts} counted")
        if not fired:
            walked = k - 1
            break
    assert problems == []
    assert walked > 20


def test_interrupt_anywhere_in_a_statistics_reset_keeps_or_drops_timeouts_with_it(tmp_path: Path) -> None:
    # A reset drops this process's pending timeouts (they came before it), but only if its fresh area is written:
    # an interrupt that stops the reset before its write must leave them to be counted.
    from lockstore._stats_report import TimedOut

    path = tmp_path / "d.json"
    store = lockstore.open(path, default={"n": 0}, durable=False)
    store.commit()
    with store.transaction():
        pass
    storage: Any = store._core.storage  # white box: the slot of the lock file
    slot = storage._native[str(path) + ".lock"]._box[0]
    problems: list[str] = []
    walked = 0
    expected = 0
    for k in range(1, 400):
        before = store.stats()
        assert before is not None
        slot.timed_out.add([TimedOut(0.5, 0.5, "pending", os.getpid(), time.time())])
        fired, raised, where = inject(k, store.reset_stats, within="SidecarLock._let_go")
        with store.transaction():
            pass  # counts what the reset left
        stats = store.stats()
        assert stats is not None
        expected = 0 if stats.since != before.since else expected + 1
        if stats.timeouts != expected:
            problems.append(f"k={k} {where} -> {raised}: {stats.timeouts} timeouts counted, {expected} expected")
        if not fired:
            walked = k - 1
            break
    assert problems == []
    assert walked > 10
