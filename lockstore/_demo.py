"""The shared-counter demo: several worker processes increment one counter file, without and with transactions."""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from typing import Any

import lockstore


def _worker(path: str, increments: int, use_transaction: bool, start: Any) -> None:
    store = lockstore.open(path, default={"n": 0})
    start.wait()
    for _ in range(increments):
        if use_transaction:
            with store.transaction() as s:
                s.value["n"] += 1
        else:
            store.reload()  # read-modify-write without a transaction: the read is not under the lock
            store.value["n"] += 1
            store.commit()


def run_round(path: str, workers: int, increments: int, *, use_transaction: bool) -> tuple[int, float]:
    """Start ``workers`` processes that each increment the counter in ``path``; return (final count, seconds)."""
    for leftover in (path, path + ".lock"):
        if os.path.exists(leftover):
            os.unlink(leftover)
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_worker, args=(path, increments, use_transaction, start)) for _ in range(workers)]
    for p in procs:
        p.start()
    t0 = time.perf_counter()
    start.set()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a demo worker failed with exit code {p.exitcode}")
    elapsed = time.perf_counter() - t0
    return lockstore.read(path)["n"], elapsed


def main(workers: int = 8, increments: int = 200, directory: str | None = None) -> int:
    """Run both rounds and print the counts; return 0 when the transaction round is exact."""
    expected = workers * increments
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = os.path.join(tmp, "counter.json")
        print(f"{workers} worker processes each add 1 to {{'n': ...}} in one file, {increments} times "
              f"(expected final count: {expected})")
        n, secs = run_round(path, workers, increments, use_transaction=False)
        print(f"  reload() + commit():      n = {n:5d}  ({expected - n} updates lost, {secs:.2f} s)")
        n2, secs2 = run_round(path, workers, increments, use_transaction=True)
        verdict = "exact" if n2 == expected else f"{expected - n2} LOST"
        print(f"  with store.transaction(): n = {n2:5d}  ({verdict}, {secs2:.2f} s)")
    return 0 if n2 == expected else 1
