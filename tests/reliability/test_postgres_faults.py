"""The PostgreSQL store under faults: the server killed (kill -9) mid-run, and clients killed inside transactions.

Each test starts its own server (``_servers.postgres_server``). Workers are real processes that acknowledge every
commit on stdout; after each crash the count in the row must lie between the acknowledged commits and those plus the
commits whose reply was lost (reported as "may or may not be stored").
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import _servers
import pytest

import lockstore

from ._harness import add, report

pytest.importorskip("psycopg")

WORKER = r"""
import select, sys, time
import lockstore
target, durable = sys.argv[1], sys.argv[2] == "1"
store = None
def out(word):
    print(word, flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:
    try:
        if store is None:
            store = lockstore.open(target, default={"n": 0}, durable=durable, timeout=10)
        with store.transaction() as s:
            s.value["n"] += 1
        out("ack")
    except ConnectionError as exc:
        out("unknown" if "may or may not be stored" in str(exc) else "down")
        time.sleep(0.02)
out("bye")
"""


class Worker:
    """A worker process and the words it said so far (read by a thread)."""

    def __init__(self, target: str, *, durable: bool) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, target, "1" if durable else "0"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.words: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.words.append(line.strip())

    def count(self, word: str) -> int:
        return self.words.count(word)

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        self.proc.wait(60)
        self.thread.join(60)
        err = self.proc.stderr.read() if self.proc.stderr else ""
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        assert self.words[-1:] == ["bye"], (self.words[-5:], err)


def _until(check: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def server_crashes(tmp_path: Path, crashes: int, *, durable: bool, workers: int = 3) -> list[str]:
    """Kill the server ``crashes`` times under ``workers`` committing processes; return the violations."""
    violations: list[str] = []
    with _servers.postgres_server(tmp_path) as pg:
        target = pg.url + "#counter"
        ws = [Worker(target, durable=durable) for _ in range(workers)]
        add("processes", workers)
        try:
            for _ in range(crashes):
                acked = sum(w.count("ack") for w in ws)
                _until(lambda acked=acked: sum(w.count("ack") for w in ws) >= acked + 30, "commits to flow")
                pg.kill9()
                add("kills")
                _until(lambda: all(w.words[-1:] in (["down"], ["unknown"]) for w in ws), "every worker to notice")
                pg.start()
            acked = sum(w.count("ack") for w in ws)
            _until(lambda: sum(w.count("ack") for w in ws) >= acked + 30, "commits to flow again")
        finally:
            for w in ws:
                w.stop()
        acked = sum(w.count("ack") for w in ws)
        unknown = sum(w.count("unknown") for w in ws)
        final = lockstore.read(target)["n"]
        add("transactions checked", acked)
        if not acked <= final <= acked + unknown:
            violations.append(f"{acked} acknowledged commits (+{unknown} of unknown outcome), the row says {final}")
    return violations


@pytest.mark.timeout(120)
def test_server_kill9_keeps_every_acknowledged_commit(tmp_path: Path) -> None:
    violations = server_crashes(tmp_path, 1, durable=True)
    report(violations)
    assert violations == []


@pytest.mark.stress
@pytest.mark.timeout(240)
def test_server_kill9_many_times(tmp_path: Path) -> None:
    violations = server_crashes(tmp_path, 5, durable=True)
    report(violations)
    assert violations == []


@pytest.mark.timeout(120)
def test_negative_control_asynchronous_commit_loses_acknowledged_commits(tmp_path: Path) -> None:
    # durable=False: sessions commit with synchronous_commit = off, so a server crash may take the last ones.
    for attempt in range(5):
        violations = server_crashes(tmp_path / str(attempt), 1, durable=False, workers=4)
        if violations:
            break
    report(violations, negative=True)
    assert violations, "asynchronous commit lost nothing in 5 crashes: the check would not notice a loss"


HOLD_LOOP = r"""
import sys, lockstore
store = lockstore.open(sys.argv[1], default={"n": 0}, timeout=-1)
while True:
    with store.transaction(label="victim") as s:
        s.value["n"] += 1
    print(s.value["n"], flush=True)
"""


def holder_kills(pg_url: str, kills: int, seed: int) -> list[str]:
    """Kill a transaction loop at random moments: the row is free at once, its value the last acknowledged or the
    next."""
    rng = random.Random(seed)
    target = pg_url + "#victim"
    store = lockstore.open(target, default={"n": 0})
    violations: list[str] = []
    acked = 0
    for _ in range(kills):
        add("processes")
        with subprocess.Popen([sys.executable, "-c", HOLD_LOOP, target], stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None
            for _ in range(rng.randint(1, 4)):
                acked = int(proc.stdout.readline())
            time.sleep(rng.uniform(0, 0.003))  # a random moment in the next transactions (randomness, not a pace)
            proc.kill()
            proc.wait(30)
            rest = [int(line) for line in proc.stdout.read().split()]
        add("kills")
        t0 = time.monotonic()
        try:
            with store.transaction(timeout=10) as s:
                n = s.value["n"]
        except lockstore.LockTimeout as exc:
            violations.append(f"the row stayed locked after kill -9: {exc}")
            continue
        if time.monotonic() - t0 > 3:
            violations.append(f"the row was freed only after {time.monotonic() - t0:.1f} s")
        acked = rest[-1] if rest else acked
        if n not in (acked, acked + 1):
            violations.append(f"after kill -9 the row says {n}; last acknowledged {acked}")
        acked = n
        add("transactions checked", 1)
    return violations


@pytest.mark.timeout(120)
def test_kill9_of_holders_at_random_moments(pg_url: str) -> None:
    violations = holder_kills(pg_url, 10, seed=1)
    report(violations)
    assert violations == []


@pytest.mark.stress
@pytest.mark.timeout(240)
def test_kill9_of_holders_many(pg_url: str) -> None:
    violations = holder_kills(pg_url, 60, seed=int.from_bytes(os.urandom(2), "big"))
    report(violations)
    assert violations == []
