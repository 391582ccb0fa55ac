"""The PostgreSQL store against a real server: ``lockstore.open("postgresql://...#KEY")`` keeps every guarantee.

Every test gets its own database (``pg_url``) on the session's server; tests that reconfigure a server start their
own. Children are real processes (``sys.executable``) synchronised through their pipes and the server's own view
(``waiters()``), never through sleeps. Each guarantee test has a negative control that must fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _servers
import psycopg  # the test extra; without it, test_import_and_missing_driver's subprocesses show the error users get
import pytest
from _children import read_line
from _hosts import hosts

import lockstore
from lockstore import _pg_io, _postgres

pytestmark = pytest.mark.timeout(60)

DEADLINE = 30.0
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CHILD = r"""
import json, os, sys, time
import lockstore

def out(*words):
    print(*words, flush=True)

def value(n):
    return {"n": n, "echo": f"n={n}"}

cmd, target, *args = sys.argv[1:]
if cmd == "hold":  # hold the lock (label args[0]) until a line comes; "incr" adds one before leaving
    store = lockstore.open(target, default=value(0))
    with store.transaction(label=args[0]) as s:
        out("ready", os.getpid())
        if sys.stdin.readline().strip() == "incr":
            s.value = value(s.value["n"] + 1)
    out("done")
elif cmd == "wait":  # wait for the lock forever (label args[0]), add one; with "interruptible", survive Ctrl-C
    store = lockstore.open(target, default=value(0))
    out("ready", os.getpid())
    try:
        with store.transaction(timeout=-1, label=args[0]) as s:
            s.value = value(s.value["n"] + 1)
        out("got")
    except KeyboardInterrupt:
        h = store.holder()
        out("interrupted", None if h is None else h.pid)
        sys.stdin.readline()
        with store.transaction(timeout=10) as s:
            s.value = value(s.value["n"] + 1)
        out("ok", s.value["n"])
elif cmd == "incr":  # args[0] transactions, each acknowledged on stdout once committed
    store = lockstore.open(target, default=value(0), timeout=-1)
    for _ in range(int(args[0])):
        with store.transaction() as s:
            s.value = value(s.value["n"] + 1)
        out(s.value["n"])
elif cmd == "racy":  # the negative control: read, wait until told (every racer has read), add one, commit
    store = lockstore.open(target, default=value(0))
    store.reload()
    out("read")
    sys.stdin.readline()
    store.value = value(store.value["n"] + 1)
    store.commit()
    out("done")
elif cmd == "read":  # lock-free reads until a line comes: whole values, never going back; prints reads, problems
    import select
    store = lockstore.open(target, default=value(0))
    last, reads, bad = -1, 0, []
    while not select.select([sys.stdin], [], [], 0)[0]:
        v = store.reload() if reads % 2 else lockstore.read(target, default=value(0))
        if v.get("echo") != f"n={v.get('n')}":
            bad.append(f"torn {v!r}")
        elif v["n"] < last:
            bad.append(f"went back from {last} to {v['n']}")
        last = max(last, v["n"])
        reads += 1
    out(json.dumps({"reads": reads, "bad": bad[:5]}))
elif cmd == "holder":  # who holds the lock and who waits, as seen from here; then one try, for its LockTimeout
    store = lockstore.open(target, default=value(0))
    def show(h):
        return None if h is None else {"pid": h.pid, "host": h.host, "label": h.label, "alive": h.alive}
    seen = {"holder": show(store.holder()), "waiting": [show(w) for w in store.waiters()]}
    try:
        with store.transaction(timeout=float(args[0]) if args else 0.2):
            pass
    except lockstore.LockTimeout as exc:
        seen["timeout"] = {"holder": show(exc.holder), "text": str(exc)}
    out(json.dumps(seen))
elif cmd == "create":  # open a store on a new table and write once, all at the same moment
    store = lockstore.open(target, default=value(0), table=args[0])
    out("ready")
    sys.stdin.readline()
    with store.transaction(timeout=-1) as s:
        s.value = value(s.value["n"] + 1)
    out("done")
elif cmd == "bare-create":  # the control: plain CREATE TABLE IF NOT EXISTS, all at the same moment
    import psycopg
    url = target.partition("#")[0]
    with psycopg.connect(url, autocommit=True) as conn:
        out("ready")
        sys.stdin.readline()
        try:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {args[0]} (key text PRIMARY KEY, value bytea)")
            out("done")
        except psycopg.Error as exc:
            out("failed", exc.sqlstate)
"""


# ----------------------------------------------------------------------------------------------- helpers
def tgt(pg_url: str, key: str = "k") -> str:
    return f"{pg_url}#{key}"


def sql(pg_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """One statement on a new autocommit connection (a client that is not lockstore, like psql)."""
    with psycopg.connect(pg_url, autocommit=True, connect_timeout=10) as conn:
        cur = conn.execute(query, params or None)
        return list(cur.fetchall()) if cur.description is not None else []


def value(n: int) -> dict[str, Any]:
    return {"n": n, "echo": f"n={n}"}


class Child:
    """A child process running one ``CHILD`` command; talks over its pipes."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None) -> None:
        self.proc = subprocess.Popen([*(prefix or []), sys.executable, "-c", CHILD, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.pid = self.proc.pid

    def line(self, timeout: float = DEADLINE) -> str:
        line = read_line(self.proc.stdout, timeout)
        if not line and self.proc.poll() is not None:
            raise AssertionError(f"child exited ({self.proc.returncode}): {self.proc.communicate()[1]}")
        return line

    def expect(self, word: str) -> list[str]:
        parts = self.line().split()
        assert parts and parts[0] == word, (parts, word)
        return parts[1:]

    def send(self, text: str = "go") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def finish(self, text: str | None = "go") -> str:
        out, err = self.proc.communicate(None if text is None else text + "\n", timeout=DEADLINE)
        assert self.proc.returncode == 0, err
        return out

    def kill(self) -> None:
        self.proc.kill()
        self.proc.communicate(timeout=DEADLINE)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.communicate(timeout=DEADLINE)


@contextlib.contextmanager
def holding(target: str, label: str = "pg-test-holder") -> Iterator[Child]:
    with Child("hold", target, label) as child:
        child.expect("ready")
        yield child


def until(check: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Poll ``check`` (a question to the server, never a guess at speed) until it is true."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def waiting_pids(store: lockstore.Store[Any]) -> list[int]:
    return [w.pid for w in store.waiters()]


def book(**counts: int) -> None:
    """Count into the reliability scorecard (printed when the reliability suite runs in the same session)."""
    try:
        from reliability._harness import add
    except ImportError:  # pragma: no cover
        return
    for key, n in counts.items():
        add(key.replace("_", " ").replace("lock free", "lock-free"), n)


# ----------------------------------------------------------------------------------------------- basics
def test_round_trip_missing_row_and_masked_target(pg_url: str) -> None:
    target = tgt(pg_url)
    store = lockstore.open(target, default={"n": 0})
    assert store.value == {"n": 0} and store.path == target
    assert lockstore.read(target, default="none") == "none"
    assert sql(pg_url, "SELECT to_regclass('lockstore')") == [(None,)]  # reading created nothing
    with store.transaction():
        pass
    # A transaction that changes nothing leaves no row (the placeholder it locked is rolled back).
    assert sql(pg_url, "SELECT count(*) FROM lockstore") == [(0,)]
    with store.transaction(label="first") as s:
        s.value["n"] += 1
        h = store.holder()  # on the Store's second connection: its first one is in the transaction
        assert h is not None and (h.pid, h.label, h.alive) == (os.getpid(), "first", True)
        assert lockstore.read(target, default="missing") == "missing"  # the placeholder row is not visible
    assert lockstore.read(target) == {"n": 1} == store.value
    rows = sql(pg_url, "SELECT key, convert_from(value, 'UTF8'), version FROM lockstore")
    assert rows == [("k", '{"n": 1}', 1)]  # JSON reads as text in psql
    assert repr(store) == f"<lockstore.Store {target!r} format=json lock=\"row 'k' of table lockstore\" durable>"
    assert store.lock_file == "row 'k' of table lockstore" and store.holder() is None and store.waiters() == []
    with store:  # atomic_store's context manager commits on exit
        store.value["n"] = 5
    assert lockstore.read(target) == {"n": 5}
    store.close()
    with store.transaction() as s:  # reconnects after close()
        s.value["n"] += 1
    assert lockstore.read(target) == {"n": 6}


def test_no_change_writes_nothing_and_keeps_the_version(pg_url: str) -> None:
    target = tgt(pg_url)
    store = lockstore.open(target, default={"n": 0})
    with store.transaction() as s:
        s.value["n"] = 1
    before = sql(pg_url, "SELECT version, xmin::text, updated_at FROM lockstore")
    for _ in range(3):
        with store.transaction() as s:
            s.value["n"] = 1  # same value: nothing written
    assert sql(pg_url, "SELECT version, xmin::text, updated_at FROM lockstore") == before
    with store.transaction() as s:  # control: a change bumps the version
        s.value["n"] = 2
    after = sql(pg_url, "SELECT version, xmin::text FROM lockstore")
    assert after[0][0] == before[0][0] + 1 and after[0][1] != before[0][1]


def test_savepoints_failures_and_formats(pg_url: str) -> None:
    target = tgt(pg_url)
    store: lockstore.Store[dict[str, Any]] = lockstore.open(target, default={"done": []})
    with pytest.raises(RuntimeError), store.transaction() as s:
        s.value["done"].append("x")
        raise RuntimeError("step failed")
    assert store.value == {"done": []} and lockstore.read(target, default=None) is None
    with store.transaction() as s:
        s.value["done"].append("fetch")
        with contextlib.suppress(ValueError), store.transaction() as inner:
            inner.value["done"].append("lost")
            raise ValueError
        with store.transaction() as inner:
            inner.value["done"].append("parse")
    assert lockstore.read(target) == {"done": ["fetch", "parse"]}
    with pytest.raises(lockstore.SerializationError), store.transaction() as s:
        s.value["bad"] = {"a set": {1, 2}}
    assert lockstore.read(target) == {"done": ["fetch", "parse"]}
    # Any bytes: pickle, and a value of a few hundred kilobytes.
    big = os.urandom(300_000)
    pickled: lockstore.Store[dict[str, Any]] = lockstore.open(tgt(pg_url, "pickled"), default={}, format="pickle")
    with pickled.transaction() as s:
        s.value["x"] = {1, 2}
        s.value["big"] = big
    assert lockstore.read(tgt(pg_url, "pickled"), format="pickle") == {"x": {1, 2}, "big": big}
    other: lockstore.Store[dict[str, Any]] = lockstore.open(tgt(pg_url, "pickled"), default={}, format="pickle")
    with other.transaction() as s:
        s.value["y"] = 1
    with pickled.transaction() as s:  # re-read: another Store wrote
        assert s.value["y"] == 1 and s.value["big"] == big


def test_commit_inside_a_transaction_and_a_write_in_between(pg_url: str) -> None:
    target = tgt(pg_url)
    store = lockstore.open(target, default=value(0))
    with store.transaction() as s:
        s.value = value(1)
        s.commit()  # commits now (the row is let go), the transaction goes on
        s.value = value(2)
    assert lockstore.read(target) == value(2)
    assert sql(pg_url, "SELECT version FROM lockstore") == [(2,)]  # two commits
    # Control: another process writes between the two commits; the second one must not overwrite it.
    with pytest.raises(lockstore.LockLost), store.transaction() as s:
        s.value = value(3)
        s.commit()
        with Child("incr", target, "1") as child:
            assert child.expect("4") == []
            child.finish(None)
        s.value = value(10)
    assert lockstore.read(target) == value(4)


def test_options_and_errors(pg_url: str) -> None:
    target = tgt(pg_url)
    with pytest.raises(ValueError, match="#KEY"):
        lockstore.open(pg_url)
    with pytest.raises(TypeError, match="lease"):
        lockstore.open(target, lease=5)
    with pytest.raises(ValueError, match="lock= must be True"):
        lockstore.open(target, lock=False)
    for bad in ("1abc", "a b", "x;drop table y", "a.b.c", "", "x" * 64):
        with pytest.raises(ValueError, match="table must be"):
            lockstore.open(target, table=bad)
    with pytest.raises(TypeError, match="table must be a string"):
        lockstore.open(target, table=3)
    sql(pg_url, "CREATE SCHEMA app")
    for table in ("app_state", "app.State$1"):
        store = lockstore.open(target, default=0, table=table)
        with store.transaction() as s:
            s.value += 1
        assert store.value == 1
    assert sql(pg_url, 'SELECT count(*) FROM app."State$1"') == [(1,)]
    assert sql(pg_url, "SELECT count(*) FROM app_state") == [(1,)]
    # A key with quotes, backslashes, a '%' and non-ASCII text is one row like any other.
    odd = tgt(pg_url, "it's a \\ 100% ключ")
    store = lockstore.open(odd, default=0)
    with store.transaction() as s:
        s.value += 1
    assert lockstore.read(odd) == 1
    assert sql(pg_url, "SELECT key FROM lockstore") == [("it's a \\ 100% ключ",)]
    with pytest.raises(ValueError, match="NUL"):
        lockstore.open(tgt(pg_url, "a\0b"))


def test_second_store_of_the_same_row_in_one_thread_is_reentry(pg_url: str) -> None:
    target = tgt(pg_url)
    first = lockstore.open(target, default=0)
    second = lockstore.open(target, default=0, timeout=5)
    t0 = time.monotonic()
    with first.transaction(), pytest.raises(lockstore.LockReentryError), second.transaction():
        pass
    assert time.monotonic() - t0 < 2  # at once, not after the timeout
    with second.transaction() as s:  # the row is free again
        s.value += 1


def test_labels_are_cut_to_fit_application_name() -> None:
    name = _postgres.application_name("x" * 200)
    assert len(name.encode()) == 63 and name.endswith("...") and name.startswith(f"lockstore {os.getpid()}@")
    assert _postgres.application_name("nightly ünïcode") .endswith(" nightly ?n?code")
    assert _postgres.application_name(None) == f"lockstore {os.getpid()}@{os.uname().nodename}"


# ----------------------------------------------------------------------------------------------- exact counts
def test_processes_threads_and_lock_free_readers_are_exact(pg_url: str) -> None:
    target = tgt(pg_url)
    lockstore.open(target, default=value(0)).commit()  # the row exists: readers see a whole value from the start
    procs, per = 8, 40
    readers = [Child("read", target) for _ in range(2)]
    writers = [Child("incr", target, str(per)) for _ in range(procs)]
    # Threads sharing one Store, at the same time as the processes.
    store = lockstore.open(target, default=value(0), timeout=-1)
    errors: list[BaseException] = []

    def thread() -> None:
        try:
            for _ in range(per):
                with store.transaction() as s:
                    s.value = value(s.value["n"] + 1)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=thread) for _ in range(4)]
    for t in threads:
        t.start()
    for w in writers:
        acks = w.finish(None).split()
        assert len(acks) == per
    for t in threads:
        t.join(DEADLINE)
    assert not errors
    reports = [json.loads(r.finish("stop")) for r in readers]
    assert lockstore.read(target) == value(procs * per + 4 * per)
    assert all(not r["bad"] for r in reports), reports
    assert all(r["reads"] > 0 for r in reports)
    book(processes=procs + 2, transactions_checked=procs * per + 4 * per,
         lock_free_reads_checked=sum(r["reads"] for r in reports))


def test_negative_control_read_then_commit_loses_updates(pg_url: str) -> None:
    target = tgt(pg_url)
    racers = [Child("racy", target) for _ in range(4)]
    try:
        for r in racers:
            r.expect("read")
        for r in racers:
            r.send()
        for r in racers:
            r.finish(None)
    finally:
        for r in racers:
            r.__exit__()
    assert lockstore.read(target) == value(1)  # four increments, three lost: what transaction() prevents
    book(negative_controls_failed_as_they_should=1)


def test_asyncio_tasks_and_a_process_are_exact(pg_url: str) -> None:
    target = tgt(pg_url)
    store = lockstore.open(target, default=value(0))

    async def one() -> None:
        async with store.atransaction(timeout=30, label="web worker") as s:
            s.value = value(s.value["n"] + 1)

    async def main() -> None:
        await asyncio.gather(*(one() for _ in range(100)))

    with Child("incr", target, "30") as child:
        asyncio.run(main())
        child.finish(None)
    assert lockstore.read(target) == value(130)
    # Two loops in two threads, and a second run of a loop: one connection per loop; tasks of other threads wait
    # for this process's row slot in helper threads.
    threads = [threading.Thread(target=asyncio.run, args=(main(),)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert lockstore.read(target) == value(330)
    store.close()


def test_asyncio_cancelled_wait_leaves_nothing_held(pg_url: str) -> None:
    target = tgt(pg_url)
    store = lockstore.open(target, default=value(0))

    async def waiter() -> None:
        async with store.atransaction(timeout=-1) as s:
            s.value = value(99)

    async def main(holder: Child) -> None:
        task = asyncio.create_task(waiter())
        while os.getpid() not in waiting_pids(store):
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert os.getpid() not in waiting_pids(store)
        holder.send("incr")
        holder.expect("done")
        async with store.atransaction(timeout=5) as s:  # this Store still works
            s.value = value(s.value["n"] + 1)

    with holding(target) as holder:
        asyncio.run(main(holder))
    assert lockstore.read(target) == value(2)


# ----------------------------------------------------------------------------------------------- who holds
def test_lock_timeout_names_the_holder(pg_url: str) -> None:
    target = tgt(pg_url)
    store = lockstore.open(target, default=value(0))
    with holding(target, "nightly-rollup") as holder:
        for timeout, blocking in ((0.5, True), (0.0, True), (30.0, False)):
            t0 = time.monotonic()
            with pytest.raises(lockstore.LockTimeout) as info, store.transaction(timeout=timeout, blocking=blocking):
                pass
            took = time.monotonic() - t0
            assert timeout <= took < timeout + 3 if blocking else took < 3
            exc = info.value
            h = exc.holder
            assert h is not None and h.pid == holder.pid and h.label == "nightly-rollup", h
            assert h.host == os.uname().nodename and h.alive is True and h.recorded and h.held_for is not None
            assert exc.path == target and exc.lock_file == store.lock_file
            assert "nightly-rollup" in str(exc) and f"pid {holder.pid}" in str(exc)
        assert lockstore.read(target, default="missing") == "missing"  # lock-free reads never wait
        assert store.reload() == value(0)
        holder.send("incr")
        holder.expect("done")
    assert lockstore.read(target) == value(1)
    # Control: a session that is not lockstore's (psql) holding the row is named by its backend, without a label.
    with psycopg.connect(pg_url, connect_timeout=10) as conn:
        (backend,) = conn.execute("SELECT pg_backend_pid()").fetchall()[0]
        conn.execute("SELECT 1 FROM lockstore WHERE key = 'k' FOR UPDATE")
        with pytest.raises(lockstore.LockTimeout) as info, store.transaction(timeout=0.2):
            pass
        h = info.value.holder
        assert h is not None and h.pid == backend and not h.recorded and h.label is None


def _queued_wait(pg_url: str, timeout: float) -> float:
    """How long a transaction with ``timeout`` waits when it queues behind another waiter, and the row passes from
    the holder to that waiter in the middle of its wait (so it waits for two locks in one statement)."""
    target = tgt(pg_url)
    store = lockstore.open(target, default=value(0))
    store.commit()  # the row exists: waiters queue for its tuple lock (waiters for a first insert do not queue)
    waited: list[float] = []

    def patient() -> None:
        t0 = time.monotonic()
        with contextlib.suppress(lockstore.LockTimeout), lockstore.open(target).transaction(timeout=timeout):
            pass
        waited.append(time.monotonic() - t0)

    with holding(target, "a") as a, Child("hold", target, "b") as b:
        until(lambda: waiting_pids(store) == [b.pid], "b to wait")
        thread = threading.Thread(target=patient)
        started = time.monotonic()
        thread.start()
        until(lambda: waiting_pids(store) == [b.pid, os.getpid()], "this process to wait behind b")
        until(lambda: time.monotonic() - started >= timeout / 2, "half the timeout")
        a.send()
        b.expect("ready")  # b holds the row now; this process goes on waiting, for b
        thread.join(DEADLINE)
    return waited[0]


def test_a_queued_waiter_still_gives_up_in_time(pg_url: str) -> None:
    waited = _queued_wait(pg_url, 1.0)
    assert 1.0 <= waited < 1.0 + 0.3, waited


def test_negative_control_lock_timeout_alone_lets_a_queued_waiter_wait_longer(pg_url: str,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real = _postgres.PgStorage._lock_query

    def without_statement_timeout(self: _postgres.PgStorage, *args: Any, **kw: Any) -> Any:
        # The bug: lock_timeout alone (the statement's own limit, the second of the timeouts set, stays off).
        return [(name, (params[0], b"0", *params[2:]) if name.startswith(b"lockstore_timeouts") else params, fmt)
                for name, params, fmt in real(self, *args, **kw)]

    monkeypatch.setattr(_postgres.PgStorage, "_lock_query", without_statement_timeout)
    waited = _queued_wait(pg_url, 1.0)
    assert waited >= 1.0 + 0.3, waited  # each of its two lock waits had the whole lock_timeout
    book(negative_controls_failed_as_they_should=1)


def test_holder_and_waiters_from_another_process(pg_url: str) -> None:
    target = tgt(pg_url)
    store = lockstore.open(target, default=value(0))
    with holding(target, "holder-a") as a, Child("wait", target, "waiter-b") as b:
        b.expect("ready")
        until(lambda: waiting_pids(store) == [b.pid], "b to wait")
        c = Child("wait", target, "w-c")  # only now: it must queue behind b
        c.expect("ready")
        until(lambda: waiting_pids(store) == [b.pid, c.pid], "c to wait behind b")
        t0 = time.monotonic()
        h = store.holder()
        assert time.monotonic() - t0 < 2  # no waiting, no lock taken
        assert h is not None and (h.pid, h.label, h.host, h.alive) == (a.pid, "holder-a", os.uname().nodename, True)
        assert h.acquired_at is not None and h.acquired_at <= time.time()
        waiters = store.waiters()
        assert [(w.pid, w.label) for w in waiters] == [(b.pid, "waiter-b"), (c.pid, "w-c")]
        assert all(w.waiting_since is not None for w in waiters)
        assert waiters[0].waiting_since <= waiters[1].waiting_since  # type: ignore[operator]
        # The CLI shows the same, from yet another process.
        out = subprocess.run([sys.executable, "-m", "lockstore", "holder", target, "--json"], capture_output=True,
                             text=True, timeout=DEADLINE, check=True).stdout
        shown = json.loads(out)
        assert shown["held"] and shown["holder"]["pid"] == a.pid and shown["holder"]["label"] == "holder-a"
        assert [w["pid"] for w in shown["waiting"]] == [b.pid, c.pid]
        a.send()
        a.expect("done")
        b.expect("got")
        with c:
            c.expect("got")
    assert store.holder() is None and store.waiters() == []
    assert lockstore.read(target) == value(2)


def test_kill9_of_a_holder_frees_the_row_at_once(pg_url: str) -> None:
    target = tgt(pg_url)
    store = lockstore.open(target, default=value(0))
    with store.transaction() as s:
        s.value = value(7)
    with holding(target) as holder:
        # Control: a holder that is stopped (not dead) keeps the row.
        os.kill(holder.pid, signal.SIGSTOP)
        with pytest.raises(lockstore.LockTimeout), store.transaction(timeout=0.3):
            pass
        holder.kill()
    t0 = time.monotonic()
    with store.transaction(timeout=10) as s:
        assert s.value == value(7)  # the last committed value
        s.value = value(8)
    assert time.monotonic() - t0 < 2
    book(kills=1, negative_controls_failed_as_they_should=1)


def test_ctrl_c_while_waiting_leaves_the_session_usable_and_nothing_held(pg_url: str) -> None:
    target = tgt(pg_url)
    store = lockstore.open(target, default=value(0))
    with holding(target) as holder, Child("wait", target, "impatient") as child:
        child.expect("ready")
        until(lambda: child.pid in waiting_pids(store), "the child to wait")
        os.kill(child.pid, signal.SIGINT)
        assert child.expect("interrupted") == [str(holder.pid)]
        until(lambda: child.pid not in waiting_pids(store), "the wait to be cancelled on the server")
        holder.send("incr")
        holder.expect("done")
        child.send()
        assert child.expect("ok") == ["2"]  # its Store carried on, on the same or a new connection
    assert lockstore.read(target) == value(2)


# ----------------------------------------------------------------------------------------------- the CLI
def test_cli_commands_with_a_url(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from lockstore import cli

    target = tgt(pg_url)
    loops = [subprocess.Popen([sys.executable, "-c", "import subprocess, sys\n"
                               "for _ in range(4):\n"
                               "    subprocess.run([sys.executable, '-m', 'lockstore', 'incr', sys.argv[1], 'runs'],"
                               " check=True, stdout=subprocess.DEVNULL)", target]) for _ in range(3)]
    for p in loops:
        assert p.wait(DEADLINE) == 0
    assert lockstore.read(target) == {"runs": 12}
    assert cli.main(["set", target, "jobs.0.state", "done"]) == 0
    assert cli.main(["append", target, "log", '{"ok": true}']) == 0
    assert cli.main(["incr", target, "bytes.sent", "--by", "4096", "--label", "cli"]) == 0
    assert cli.main(["delete", target, "runs"]) == 0
    capsys.readouterr()
    assert cli.main(["get", target, "jobs.0.state", "--raw"]) == 0
    assert capsys.readouterr().out == "done\n"
    assert cli.main(["get", target]) == 0
    assert json.loads(capsys.readouterr().out) == {"jobs": [{"state": "done"}], "log": [{"ok": True}],
                                                   "bytes": {"sent": 4096}}
    assert cli.main(["holder", target]) == 0
    assert capsys.readouterr().out == "row 'k' of table lockstore: free\n"
    assert cli.main(["delete", target, "nope"]) == 3
    with holding(target, "cli-holder") as holder:
        assert cli.main(["incr", target, "x", "-w", "0.2"]) == 1
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert cli.main(["incr", target, "x", "-n", "-E", "75"]) == 75
        assert cli.main(["holder", target]) == 0
        shown = capsys.readouterr().out
        assert "held" in shown and str(holder.pid) in shown and "cli-holder" in shown
    sql(pg_url, "UPDATE lockstore SET value = 'garbage'::bytea")
    assert cli.main(["get", target]) == 4
    assert cli.main(["incr", target, "x"]) == 4
    refused = f"postgresql://postgres@127.0.0.1:{_servers.free_port()}/x#k"
    assert cli.main(["incr", refused, "x"]) == 5
    assert "cannot reach the PostgreSQL server" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- corruption
def test_garbage_in_the_row_is_never_overwritten(pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    target = tgt(pg_url)
    store = lockstore.open(target, default=value(0))
    with store.transaction() as s:
        s.value = value(1)
    sql(pg_url, "UPDATE lockstore SET value = '{not json'::bytea")  # behind lockstore's back; version unchanged
    with pytest.raises(lockstore.CorruptStoreError) as info, store.transaction() as s:
        s.value = value(2)
    assert info.value.path == target and isinstance(info.value.__cause__, ValueError)
    with pytest.raises(lockstore.CorruptStoreError):
        lockstore.open(target, default=value(0))
    with pytest.raises(lockstore.CorruptStoreError):
        lockstore.read(target)
    assert sql(pg_url, "SELECT value FROM lockstore") == [(b"{not json",)]
    # on_corrupt="backup": moved aside to KEY.corrupt-<time> (in the same transaction), then the default.
    with caplog.at_level(logging.WARNING, logger="lockstore"):
        backup = lockstore.open(target, default=value(0), on_corrupt="backup")
    assert backup.value == value(0)
    rows = sql(pg_url, "SELECT key, value FROM lockstore ORDER BY key")
    assert len(rows) == 1 and rows[0][0].startswith("k.corrupt-") and rows[0][1] == b"{not json"
    assert any(rows[0][0] in r.getMessage() for r in caplog.records)
    with backup.transaction() as s:
        s.value = value(5)
    assert lockstore.read(target) == value(5)


def test_negative_control_a_version_number_alone_misses_a_foreign_write(pg_url: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    target = tgt(pg_url)
    store = lockstore.open(target, default=value(0))
    with store.transaction() as s:
        s.value = value(1)
    sql(pg_url, "UPDATE lockstore SET value = '{not json'::bytea")
    real = _postgres.PgStorage._fetched

    def version_only(self: _postgres.PgStorage, held: _postgres.PgHeld, known: object) -> Any:
        if held.row is not None and isinstance(known, tuple) and held.row[1] == known[0]:
            return None, False  # the bug: compare the version column only
        return real(self, held, known)

    monkeypatch.setattr(_postgres.PgStorage, "_fetched", version_only)
    with store.transaction() as s:
        s.value = value(2)
    assert sql(pg_url, "SELECT convert_from(value, 'UTF8') FROM lockstore") == [(json.dumps(value(2)),)]
    book(negative_controls_failed_as_they_should=1)


# ----------------------------------------------------------------------------------------------- secrets, errors
def test_wrong_password_and_unreachable_servers(pg_server: _servers.PgServer, pg_url: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    role = f"app_{os.urandom(3).hex()}"
    secret = "s3cr:t@pw-" + os.urandom(4).hex()
    pg_server.create_role(role, secret)
    db = pg_url.rsplit("/", 1)[1]
    pg_server.psql(f"GRANT CREATE ON SCHEMA public TO {role}", db=db)
    good = pg_server.url_for(db, user=role, password=secret) + "#k"
    bad = pg_server.url_for(db, user=role, password=secret[::-1]) + "#k"
    quoted = good.split("@")[0].split(":")[-1]  # the password as the URL spells it
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG):
        store = lockstore.open(good, default=0, timeout=0.3)
        with store.transaction(label="secretive") as s:
            s.value += 1
            seen += [repr(store), store.path, str(store.lock_file), repr(store.holder())]
            timeouts: list[BaseException] = []

            def other() -> None:  # a LockTimeout names the target and the holder
                try:
                    with lockstore.open(good, default=0).transaction(timeout=0.3):
                        pass
                except lockstore.LockTimeout as exc:
                    timeouts.append(exc)

            thread = threading.Thread(target=other)
            thread.start()
            thread.join(DEADLINE)
            assert len(timeouts) == 1 and "secretive" in str(timeouts[0])
            seen += [str(timeouts[0]), repr(timeouts[0])]
        seen.append(str(sql(pg_url, "SELECT application_name FROM pg_stat_activity")))
        t0 = time.monotonic()
        with pytest.raises(PermissionError) as denied:
            lockstore.open(bad)
        assert time.monotonic() - t0 < 10
        assert "password authentication failed" in str(denied.value) and "***" in str(denied.value)
        seen += [str(denied.value), repr(denied.value), "".join(traceback.format_exception(denied.value))]
        refused = f"postgresql://{role}:{quoted}@127.0.0.1:{_servers.free_port()}/{db}#k"
        t0 = time.monotonic()
        with pytest.raises(ConnectionError) as unreachable:
            lockstore.open(refused)
        assert time.monotonic() - t0 < 10
        seen += [str(unreachable.value), "".join(traceback.format_exception(unreachable.value))]
        # Nothing answers at all (a silent drop or no route): the URL's connect_timeout bounds the wait.
        silent = f"postgresql://{role}:{quoted}@10.255.255.1:5432/{db}?connect_timeout=2#k"
        t0 = time.monotonic()
        with pytest.raises(ConnectionError) as silently:
            lockstore.open(silent)
        assert time.monotonic() - t0 < 2 + 4
        seen += [str(silently.value), "".join(traceback.format_exception(silently.value))]
        with pytest.raises(FileNotFoundError):
            lockstore.open(pg_server.url_for("no_such_db", user=role, password=secret) + "#k")
        seen += [r.getMessage() for r in caplog.records]
    assert f"{role}:***@" in str(unreachable.value)
    assert all(secret not in text and quoted not in text for text in seen), [t for t in seen if secret in t]
    assert lockstore.read(good) == 1


def test_durability_settings_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    if reason := _servers.why_no_postgres():
        pytest.skip(reason)
    with _servers.postgres_server(tmp_path, settings={"fsync": "off"}) as pg:
        target = pg.url + "#k"
        with pytest.raises(lockstore.NotDurableError, match="fsync = off") as info:
            lockstore.open(target)
        assert info.value.target == target and "durable=False" in str(info.value)
        store = lockstore.open(target, default=0, durable=False)
        with store.transaction() as s:
            s.value += 1
        assert pg.psql("SELECT convert_from(value, 'UTF8') FROM lockstore") == "1"
        pg.set_config("fsync", True)
        assert lockstore.open(target, default=0).value == 1  # control: the same server, durable, is accepted
        pg.set_config("synchronous_commit", "off")
        with pytest.raises(lockstore.NotDurableError, match="synchronous_commit = off"):
            lockstore.open(target)
        fixed = pg.url + "?options=-csynchronous_commit%3Don#k"  # the per-session fix the error suggests
        with lockstore.open(fixed, default=0) as store:
            store.value += 1
        assert lockstore.read(fixed) == 2
        # Settings that cannot be read: one warning, then on.
        monkeypatch.setattr(_postgres.PgStorage, "_setup_query", lambda self: "SELECT NULL, NULL")
        with caplog.at_level(logging.WARNING, logger="lockstore"):
            lockstore.open(fixed, default=0)
            lockstore.open(fixed, default=0)
        warnings = [r for r in caplog.records if r.name == "lockstore" and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "durable" in warnings[0].getMessage()


def test_import_and_missing_driver() -> None:
    code = "import sys, lockstore; print('psycopg' in sys.modules, 'asyncio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE,
                         check=True).stdout
    assert out.split() == ["False", "False"]
    code = ("import sys; sys.modules['psycopg'] = None\n"
            "import lockstore\n"
            "try:\n"
            "    lockstore.open('postgresql://u@h/db#k')\n"
            "except ImportError as exc:\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE,
                         check=True).stdout
    assert 'pip install "lockstore[postgres]"' in out
    code = "import sys; sys.modules['psycopg'] = None\nfrom lockstore import cli\nsys.exit(cli.main(sys.argv[1:]))"
    res = subprocess.run([sys.executable, "-c", code, "incr", "postgresql://u@h/db#k", "n"], capture_output=True,
                         text=True, timeout=DEADLINE)
    assert res.returncode == 6 and "lockstore[postgres]" in res.stderr


# ----------------------------------------------------------------------------------------------- fork
FORK = r"""
import os, sys, psycopg, lockstore
from lockstore import _postgres
target, mode = sys.argv[1], sys.argv[2]
store = lockstore.open(target, default=0)
with store.transaction() as s:
    s.value += 1
conn = store._core.storage._conn
backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
naive = psycopg.connect(target.partition("#")[0], autocommit=True)  # a plain psycopg connection, for the control
pid = os.fork()
if pid == 0:
    if mode == "control":
        naive.close()  # what psycopg does when a child closes (or collects) its copy of a parent's connection
        os._exit(0)
    for _ in range(5):
        with store.transaction() as s:
            s.value += 1
    if mode == "exit":
        store.close()
        del store
        sys.exit(0)
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert status == 0, status
if mode == "control":
    try:
        naive.execute("SELECT 1")
        print("control: parent connection survived")
    except psycopg.OperationalError:
        print("control: parent connection killed")
    sys.exit(0)
with store.transaction() as s:
    s.value += 1
assert store._core.storage._conn is conn, "reconnected"
assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == backend
print("value", s.value)
"""


@pytest.mark.parametrize("mode", ["exit", "_exit"])
def test_fork_child_never_touches_the_parents_session(pg_url: str, mode: str) -> None:
    out = subprocess.run([sys.executable, "-c", FORK, tgt(pg_url), mode], capture_output=True, text=True,
                         timeout=DEADLINE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["value", "7"]


def test_negative_control_a_child_closing_an_inherited_connection_kills_the_parents(pg_url: str) -> None:
    out = subprocess.run([sys.executable, "-c", FORK, tgt(pg_url), "control"], capture_output=True, text=True,
                         timeout=DEADLINE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "control: parent connection killed"
    book(negative_controls_failed_as_they_should=1)


# ----------------------------------------------------------------------------------------------- the table
def test_concurrent_creators_of_the_table_never_fail(pg_url: str) -> None:
    creators = [Child("create", tgt(pg_url), "fresh_table") for _ in range(6)]
    try:
        for c in creators:
            c.expect("ready")
        for c in creators:
            c.send()
        for c in creators:
            assert c.finish(None).split() == ["done"]
    finally:
        for c in creators:
            c.__exit__()
    assert sql(pg_url, "SELECT convert_from(value, 'UTF8') FROM fresh_table") == [(json.dumps(value(6)),)]


# ----------------------------------------------------------------------------------------------- several hosts
@pytest.mark.root
@pytest.mark.timeout(120)
def test_three_hosts_exact_counts_and_a_holder_named_across_hosts(tmp_path: Path) -> None:
    if reason := _servers.why_no_postgres():
        pytest.skip(reason)
    with hosts(3) as (h0, h1, h2), _servers.postgres_server(tmp_path, bind=[h0.addr], prefix=h0.prefix) as pg:
        target = pg.url_for(host=h0.addr) + "#k"
        here = pg.socket_url + "#k"  # this process reaches the server through its Unix socket
        per = 40
        workers = [Child("incr", target, str(per), prefix=h.prefix) for h in (h1, h1, h2, h2)]
        for w in workers:
            with w:
                assert len(w.finish(None).split()) == per
        assert lockstore.read(here) == value(4 * per)
        watcher = lockstore.open(here, default=value(0))
        with Child("hold", target, "on-h2", prefix=h2.prefix) as holder:
            pid = int(holder.expect("ready")[0])
            waiter = Child("wait", target, "waits-on-h1", prefix=h1.prefix)
            waiter_pid = int(waiter.expect("ready")[0])
            until(lambda: waiting_pids(watcher) == [waiter_pid], "the h1 waiter")
            seen = json.loads(Child("holder", target, "0.5", prefix=h1.prefix).finish(None))
            assert seen["holder"] == {"pid": pid, "host": h2.name, "label": "on-h2", "alive": None}
            assert seen["waiting"] == [{"pid": waiter_pid, "host": h1.name, "label": "waits-on-h1", "alive": True}]
            assert seen["timeout"]["holder"] == seen["holder"]
            assert f"pid {pid} on host {h2.name}" in seen["timeout"]["text"]
            holder.send("incr")
            holder.expect("done")
            with waiter:
                waiter.expect("got")
        assert lockstore.read(here) == value(4 * per + 2)
        book(processes=7, transactions_checked=4 * per + 2)


def test_negative_control_bare_concurrent_create_table_fails(pg_url: str) -> None:
    # Made certain: this session creates the table and keeps its transaction open while another session's plain
    # CREATE TABLE IF NOT EXISTS runs; it does not see the uncommitted table, waits on the catalog's unique index,
    # and fails when this one commits. (lockstore's creators queue on an advisory lock first.)
    with psycopg.connect(pg_url, connect_timeout=10) as conn, Child("bare-create", tgt(pg_url), "bare") as other:
        conn.execute("CREATE TABLE IF NOT EXISTS bare (key text PRIMARY KEY, value bytea)")
        other.expect("ready")
        other.send()
        waiting = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE "
                   "'CREATE TABLE IF NOT EXISTS bare%'")
        until(lambda: sql(pg_url, waiting) == [(1,)], "the other creator to wait")
        conn.commit()
        assert other.line().split() == ["failed", "23505"]  # unique violation in the catalog
    book(negative_controls_failed_as_they_should=1)


def test_without_libpq_pipeline_mode(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where libpq has no pipeline mode (before 14) the same statements go one round trip each."""
    monkeypatch.setattr(_pg_io, "_PIPELINE", False)
    target = tgt(pg_url)
    store = lockstore.open(target, default=value(0))
    with store.transaction():
        pass
    for _ in range(3):
        with store.transaction() as s:
            s.value = value(s.value["n"] + 1)
    with holding(target) as holder:
        with pytest.raises(lockstore.LockTimeout) as info, store.transaction(timeout=0.2):
            pass
        assert info.value.holder is not None and info.value.holder.pid == holder.pid
        holder.send("incr")
        holder.expect("done")
    with store.transaction() as s:
        assert s.value == value(4)
    assert sql(pg_url, "SELECT version FROM lockstore") == [(4,)]
