"""Where contended throughput goes: timestamps of every hand-over of the lock, from an instrumented run.

Usage: ``python benchmarks/handover.py [--procs 8] [--n 200] [--timeout 30] [--dir DIR]`` (also run by
``benchmarks/run.py --only handover``). Each worker process runs N durable transactions on one counter with
lockstore's defaults, instrumented in that process only (lockstore itself is untouched): the flock calls of the
lock (``_sidecar.flock``) and of the waiter thread (``_waiter.fcntl.flock``) are wrapped to note, with
``time.monotonic()`` (one clock for every process on Linux), when the flock was released, when it was granted (to
the caller's own descriptor, or to the waiter thread), and when the block began. Merged and sorted, every
acquisition after a release by another process splits into:

- wake-up: release -> the flock granted to the next holder (the kernel waking a sleeping process; or a process
  that was not waiting taking it, a "barge" that costs no wake-up);
- hop: granted -> the block begins (for a waiter-thread grant: waking the caller's thread, "the thread switch",
  measured to the return of the waiter's wait; then lockstore's work before the block: the holder record, the
  statistics read, the refresh, which re-reads the file another process just wrote);
- hold: the block begins -> the release (the block, the encode, the atomic write and its fsyncs, the statistics
  write, the unlock).

The lock is idle during wake-ups; hops and holds are time the lock is held. Aggregate throughput against one process
follows from their sum: ``(hop + hold) / (wake + hop + hold)`` of the time is the lock doing useful work, and one
process alone has no wake-ups and no waiter-thread hops.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

_DIR = os.path.dirname(os.path.abspath(__file__))


def _worker(path: str, n: int, timeout: float, out: str, start: Any) -> None:
    import fcntl

    import lockstore
    from lockstore import _sidecar, _waiter

    events: list[tuple[float, str]] = []
    real = fcntl.flock

    def lock_call(fd: int, op: int) -> None:
        real(fd, op)
        if op == fcntl.LOCK_UN:
            events.append((time.monotonic(), "release"))
        else:
            events.append((time.monotonic(), "grant-caller"))

    class WaiterFcntl:
        LOCK_EX, LOCK_UN = fcntl.LOCK_EX, fcntl.LOCK_UN

        @staticmethod
        def flock(fd: int, op: int) -> None:
            real(fd, op)
            if op == fcntl.LOCK_EX:
                events.append((time.monotonic(), "grant-thread"))

    if hasattr(_sidecar, "flock"):
        _sidecar.flock = lock_call  # type: ignore[assignment]
    else:  # the 0.1.x sidecar, for a "before" run
        def old_lock_call(fd: int, op: int) -> None:
            lock_call(fd, op)

        import filelock._native._unix as unix  # what 0.1.x's lock_descriptor/unlock_descriptor call

        real_nb, real_un = unix.lock_fd_nonblocking, unix.unlock_fd

        def nb(fd: int) -> bool:
            got = real_nb(fd)
            if got:
                events.append((time.monotonic(), "grant-caller"))
            return got

        def un(fd: int) -> None:
            real_un(fd)
            events.append((time.monotonic(), "release"))

        _sidecar.lock_descriptor = lambda fd, blocking=True: nb(fd)  # type: ignore[attr-defined]
        _sidecar.unlock_descriptor = un  # type: ignore[attr-defined]
    _waiter.fcntl = WaiterFcntl  # type: ignore[assignment]
    real_wait = _waiter.Waiter.wait

    def wait(self: Any, seconds: float) -> bool:
        got = real_wait(self, seconds)
        if got:
            events.append((time.monotonic(), "resumed"))
        return got

    _waiter.Waiter.wait = wait  # type: ignore[method-assign]
    store = lockstore.open(path, default={"n": 0}, timeout=timeout)
    start.wait()
    for _ in range(n):
        before = time.monotonic()
        with store.transaction() as s:
            events.append((time.monotonic(), "block"))
            s.value["n"] += 1
        events.append((before, "want"))
    with open(out, "w") as f:
        json.dump({"pid": os.getpid(), "events": events}, f)


def run(procs: int, n: int, timeout: float, directory: str) -> dict[str, Any]:
    """Run the instrumented contended case; return the split of the time (medians and totals, seconds)."""
    work = tempfile.mkdtemp(dir=directory)
    try:
        path = os.path.join(work, "counter.json")
        ctx = mp.get_context("spawn")
        start = ctx.Event()
        outs = [os.path.join(work, f"events-{i}.json") for i in range(procs)]
        workers = [ctx.Process(target=_worker, args=(path, n, timeout, out, start)) for out in outs]
        for w in workers:
            w.start()
        time.sleep(1.0)  # every worker imported lockstore and opened its store
        t0 = time.monotonic()
        start.set()
        for w in workers:
            w.join()
        wall = time.monotonic() - t0
        merged: list[tuple[float, int, str]] = []
        for out in outs:
            with open(out) as f:
                data = json.load(f)
            merged += [(t, data["pid"], kind) for t, kind in data["events"]]
        with open(path) as f:
            final = json.load(f)["n"]
        return _split(sorted(merged), wall, final, procs * n)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _split(events: list[tuple[float, int, str]], wall: float, final: int, expected: int) -> dict[str, Any]:
    wake: list[float] = []
    thread_switch: list[float] = []
    hop_thread: list[float] = []
    hop_caller: list[float] = []
    hold: list[float] = []
    barges = handovers = 0
    last_release: tuple[float, int] | None = None
    granted: dict[int, tuple[float, str]] = {}
    began: dict[int, float] = {}
    for t, pid, kind in events:
        if kind.startswith("grant"):
            granted[pid] = (t, kind)
            if last_release is not None:
                if last_release[1] == pid:
                    barges += 1  # the releaser took it straight back
                else:
                    handovers += 1
                    wake.append(t - last_release[0])
        elif kind == "resumed" and pid in granted and granted[pid][1] == "grant-thread":
            thread_switch.append(t - granted[pid][0])
        elif kind == "block" and pid in granted:
            g, how = granted[pid]
            (hop_thread if how == "grant-thread" else hop_caller).append(t - g)
            began[pid] = t
        elif kind == "release":
            if pid in began:
                hold.append(t - began.pop(pid))
            last_release = (t, pid)
    total_wake = sum(wake)
    total_hop = sum(hop_thread) + sum(hop_caller)
    total_hold = sum(hold)
    med = statistics.median
    return {
        "transactions": expected, "final_count": final, "wall_s": wall,
        "hand-overs to another process": handovers, "taken straight back by the releaser": barges,
        "wake-up p50 us": med(wake) * 1e6 if wake else 0.0,
        "hop via waiter thread p50 us": med(hop_thread) * 1e6 if hop_thread else 0.0,
        "  of which the thread switch p50 us": med(thread_switch) * 1e6 if thread_switch else 0.0,
        "hop in the caller p50 us": med(hop_caller) * 1e6 if hop_caller else 0.0,
        "hold p50 us": med(hold) * 1e6 if hold else 0.0,
        "share idle (wake-ups)": total_wake / wall,
        "share held before the block (hops)": total_hop / wall,
        "share held in the block and its write": total_hold / wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=8)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--dir", default=os.path.join(_DIR, "results"))
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    result = run(args.procs, args.n, args.timeout, args.dir)
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return 0 if result["final_count"] == result["transactions"] else 1


if __name__ == "__main__":
    sys.exit(main())
