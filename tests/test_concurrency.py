"""Guarantee 1, no lost updates: real processes and threads incrementing one counter through transactions."""

from __future__ import annotations

import multiprocessing
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from _children import DEADLINE, increment, increment_inherited, racy_increment

import lockstore

N_PROCS = 4
M_INCREMENTS = 50


def start_all(procs: list[multiprocessing.process.BaseProcess]) -> None:
    for p in procs:
        p.start()
    for p in procs:
        p.join(DEADLINE)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * len(procs)


def run_threads(targets: list[Callable[[], None]]) -> None:
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def inner() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)

        return inner

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_processes_no_lost_updates(tmp_path: Path, method: str) -> None:
    p = str(tmp_path / "counter.json")
    ctx = multiprocessing.get_context("fork") if method == "fork" else multiprocessing.get_context("spawn")
    start_all([ctx.Process(target=increment, args=(p, M_INCREMENTS)) for _ in range(N_PROCS)])
    assert lockstore.read(p) == N_PROCS * M_INCREMENTS


def test_processes_no_lost_updates_durable(tmp_path: Path) -> None:
    p = str(tmp_path / "counter.json")
    ctx = multiprocessing.get_context("fork")
    start_all([ctx.Process(target=increment, args=(p, 10, True)) for _ in range(3)])
    assert lockstore.read(p) == 30


def test_negative_control_reload_commit_loses_updates(tmp_path: Path) -> None:
    # Without a transaction, two processes that read before either writes lose one update, every time.
    p = str(tmp_path / "counter.json")
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    start_all([ctx.Process(target=racy_increment, args=(p, barrier)) for _ in range(2)])
    assert lockstore.read(p) == 1  # not 2: the counting above detects a lost update


def test_store_created_before_fork(tmp_path: Path) -> None:
    p = str(tmp_path / "counter.json")
    store = lockstore.open(p, default=0, durable=False, timeout=-1)
    with store.transaction() as s:  # the parent's lock descriptor is open when it forks
        s.value = 0
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=increment_inherited, args=(store, M_INCREMENTS)) for _ in range(N_PROCS)]
    for proc in procs:
        proc.start()
    increment_inherited(store, M_INCREMENTS)  # the parent goes on using it meanwhile
    for proc in procs:
        proc.join(DEADLINE)
    assert [proc.exitcode for proc in procs] == [0] * N_PROCS
    assert lockstore.read(p) == (N_PROCS + 1) * M_INCREMENTS


def _child_tries(store: lockstore.Store[int], result: multiprocessing.queues.Queue[str]) -> None:
    try:
        with store.transaction(blocking=False):
            result.put("acquired")
    except lockstore.LockTimeout:
        result.put("timeout")


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_transaction_open_at_fork_is_not_inherited(tmp_path: Path) -> None:
    p = str(tmp_path / "counter.json")
    store = lockstore.open(p, default=0, durable=False)
    ctx = multiprocessing.get_context("fork")
    result: multiprocessing.queues.Queue[str] = ctx.Queue()
    with store.transaction() as s:
        s.value = 1
        child = ctx.Process(target=_child_tries, args=(store, result))
        child.start()
        child.join(DEADLINE)
        outcome = result.get(timeout=DEADLINE)
    assert child.exitcode == 0
    assert outcome == "timeout"  # the child does not share, nor join, the parent's transaction
    assert lockstore.read(p) == 1


def test_threads_sharing_one_store(tmp_path: Path) -> None:
    p = str(tmp_path / "counter.json")
    store = lockstore.open(p, default=0, durable=False, timeout=-1)

    def work() -> None:
        for _ in range(100):
            with store.transaction() as s:
                s.value += 1

    run_threads([work] * 4)
    assert lockstore.read(p) == 400


def test_two_store_objects_same_path_threads(tmp_path: Path) -> None:
    p = str(tmp_path / "counter.json")
    stores = [lockstore.open(p, default=0, durable=False, timeout=-1) for _ in range(2)]

    def work(store: lockstore.Store[int]) -> Callable[[], None]:
        def inner() -> None:
            for _ in range(100):
                with store.transaction() as s:
                    s.value += 1

        return inner

    run_threads([work(stores[0]), work(stores[1]), work(stores[0]), work(stores[1])])
    assert lockstore.read(p) == 400


def test_threads_and_processes_together(tmp_path: Path) -> None:
    p = str(tmp_path / "counter.json")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=increment, args=(p, M_INCREMENTS)) for _ in range(2)]
    for proc in procs:
        proc.start()
    store = lockstore.open(p, default=0, durable=False, timeout=-1)

    def work() -> None:
        increment_inherited(store, M_INCREMENTS)

    run_threads([work, work])
    for proc in procs:
        proc.join(DEADLINE)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert lockstore.read(p) == 4 * M_INCREMENTS


def test_nested_transaction_of_second_store_raises_reentry(tmp_path: Path) -> None:
    p = tmp_path / "counter.json"
    a = lockstore.open(p, default=0, durable=False)
    b = lockstore.open(p, default=0, durable=False)
    outcome: list[BaseException | str] = []

    def nest() -> None:
        try:
            with a.transaction() as s:
                s.value = 1
                with b.transaction(timeout=-1):  # would wait for itself forever
                    outcome.append("entered")
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=nest, daemon=True)
    t.start()
    t.join(DEADLINE)
    assert not t.is_alive(), "a nested transaction of a second store hung"
    assert len(outcome) == 1
    exc = outcome[0]
    assert isinstance(exc, lockstore.LockReentryError)
    assert isinstance(exc, lockstore.LockstoreError)
    assert str(p) + ".lock" in str(exc)
    assert not p.exists()  # the outer transaction wrote nothing
    assert a.holder() is None  # and released
    with b.transaction(blocking=False) as s:
        s.value = 2
    assert lockstore.read(p) == 2


def test_nested_commit_of_second_store_raises_reentry(tmp_path: Path) -> None:
    p = tmp_path / "counter.json"
    a = lockstore.open(p, default=0, durable=False)
    b = lockstore.open(p, default=0, durable=False, timeout=-1)
    with pytest.raises(lockstore.LockReentryError), a.transaction():
        b.value = 5
        b.commit()
    assert not p.exists()

