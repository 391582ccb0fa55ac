"""Lost updates when a lock file is deleted under a long-lived process (the case patch 3 fixes).

lockstore keeps one descriptor of the lock file per process for the life of the process. If the file is deleted
(an operator "clearing a stuck lock", a script re-creating the directory), a process that had opened it keeps
locking the old inode while new processes lock a new one: both then run transactions at the same time.

    python benchmarks/patches/repro_deleted_lock_file.py

Before 97988fe (which re-checks the lock file's inode on every acquisition) it printed about "LOST 495 updates".
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
from multiprocessing.synchronize import Event


def worker(path: str, n: int, ready: Event, go: Event) -> None:
    import lockstore

    store = lockstore.open(path, default={"n": 0})
    with store.transaction() as s:  # opens, and keeps, this process's descriptor of the lock file
        s.value["n"] += 1
    ready.set()
    go.wait()
    for _ in range(n):
        with store.transaction() as s:
            s.value["n"] += 1


def main() -> int:
    ctx = mp.get_context("spawn")
    root = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(__file__)), suffix=".tmp")
    path = os.path.join(root, "counter.json")
    n = 500
    try:
        ready_a, ready_b, go = ctx.Event(), ctx.Event(), ctx.Event()
        a = ctx.Process(target=worker, args=(path, n, ready_a, go))
        a.start()
        ready_a.wait()
        os.unlink(path + ".lock")
        b = ctx.Process(target=worker, args=(path, n, ready_b, go))
        b.start()
        ready_b.wait()
        go.set()
        a.join()
        b.join()
        with open(path) as f:
            final = json.load(f)["n"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    expected = 2 * n + 2
    print(f"final {final}, expected {expected}: " + ("OK" if final == expected else f"LOST {expected - final} updates"))
    return 0 if final == expected else 1


if __name__ == "__main__":
    sys.exit(main())
