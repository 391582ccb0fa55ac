"""The starvation threshold's trade-off: contended throughput against the longest wait, for several thresholds.

Usage: ``python benchmarks/starvation.py [--procs 8] [--n 200] [--repeats 3] [--dir DIR]``. A releaser may take the
lock straight back while no waiter has waited longer than ``_queue.STARVE_AFTER`` (lockstore's default: 2 ms); past
it, the releaser lets the oldest waiter take the lock. Each worker process sets that threshold in its own copy of
lockstore (the module attribute, read at every release) and runs N durable increments with the default settings;
``inf`` never hands over (pure barging, like a bare blocking flock), a tiny threshold nearly always does. The
threshold is also the bound of the releaser's pause while it lets the waiter in.

For each threshold, interleaved over the repeats: the aggregate throughput of P processes against one process
running N transactions alone (same repeat), and the longest time to acquire against the ideal, P x the median
transaction of the process alone. Medians over the repeats. No timing is asserted anywhere; this only measures.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

_DIR = os.path.dirname(os.path.abspath(__file__))
THRESHOLDS = (0.0005, 0.002, 0.01, 0.05, math.inf)


def _worker(path: str, n: int, threshold: float, barrier: Any, out: Any) -> None:
    import lockstore
    from lockstore import _queue

    _queue.STARVE_AFTER = threshold  # type: ignore[misc]  # a Final, changed on purpose in this process only
    store = lockstore.open(path, default={"n": 0})
    with store.transaction() as s:  # the lock file, the waiter thread's first use, imports
        s.value["n"] += 0
    barrier.wait(120)
    waits, whole = [], []
    t_start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        with store.transaction() as s:
            t1 = time.perf_counter()
            s.value["n"] += 1
        whole.append(time.perf_counter() - t0)
        waits.append((t0, t1))
    out.put((t_start, time.perf_counter(), waits, whole))


def _round(directory: str, procs: int, n: int, threshold: float) -> tuple[float, float]:
    """(throughput of P processes / of one, longest wait / (P x median solo transaction))."""
    ctx = mp.get_context("spawn")
    work = tempfile.mkdtemp(dir=directory)
    try:
        results = []
        for count in (1, procs):
            path = os.path.join(work, f"c{count}.json")
            barrier, out = ctx.Barrier(count), ctx.Queue()
            workers = [ctx.Process(target=_worker, args=(path, n, threshold, barrier, out)) for _ in range(count)]
            for w in workers:
                w.start()
            got = [out.get(timeout=600) for _ in workers]
            for w in workers:
                w.join(60)
            import lockstore

            assert lockstore.read(path)["n"] == count * n, "lost updates"
            results.append(got)
        (solo,), many = results[0], results[1]
        solo_tps = n / (solo[1] - solo[0])
        many_tps = procs * n / (max(g[1] for g in many) - min(g[0] for g in many))
        # Waits that ended while every process still contended (the first to finish then exits).
        done = min(g[1] for g in many)
        longest = max(t1 - t0 for g in many for t0, t1 in g[2] if t1 <= done)
        return many_tps / solo_tps, longest / (procs * statistics.median(solo[3]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(directory: str, procs: int, n: int, repeats: int) -> list[tuple[float, float, float]]:
    """(threshold, median throughput ratio, median longest-wait ratio) per threshold."""
    found: dict[float, list[tuple[float, float]]] = {t: [] for t in THRESHOLDS}
    for r in range(repeats):
        order = THRESHOLDS[r % len(THRESHOLDS):] + THRESHOLDS[: r % len(THRESHOLDS)]
        for threshold in order:
            found[threshold].append(_round(directory, procs, n, threshold))
    return [(t, statistics.median(x for x, _ in v), statistics.median(y for _, y in v)) for t, v in found.items()]


def table(rows: list[tuple[float, float, float]], procs: int) -> str:
    lines = [f"| threshold | {procs} processes / 1 process | longest wait / ideal |", "| --- | --- | --- |"]
    for threshold, tps, wait in rows:
        name = "never (barging)" if math.isinf(threshold) else f"{threshold * 1000:g} ms"
        if threshold == 0.002:
            name += " (default)"
        lines.append(f"| {name} | {tps:.2f}x | {wait:.1f}x |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--procs", type=int, default=8)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=os.path.join(_DIR, "results"))
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    print(table(run(args.dir, args.procs, args.n, args.repeats), args.procs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
