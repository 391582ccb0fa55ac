"""Where contended throughput goes: timestamps of every hand-over of the lock, from an instrumented run.

Usage: ``python benchmarks/handover.py [--procs 8] [--n 200] [--timeout 30] [--dir DIR]`` (also run by
``benchmarks/run.py --only handover``). Each worker process runs N durable transactions on one counter with
lockstore's defaults, instrumented in that process only (lockstore itself is untouched): the flock calls of the
lock (``_sidecar.flock``) and of the waiter thread (``_waiter.fcntl.flock``), the waiter's wait, the withdrawal of
the wait's announcement (``_queue.withdraw``) and the holder's bookkeeping (``SidecarLock._mark``) are wrapped to
note, with ``time.monotonic()`` (one clock for every process on Linux), when the holder called the unlock, when the
flock was granted (to the caller's own descriptor, or to the waiter thread), and when the block began. Every worker
first runs one transaction (connections, the waiter thread, first imports), then all start together. Merged and
sorted, every acquisition splits into:

- wake-up: the previous holder's unlock call -> the flock granted to the next holder (the unlock, the kernel waking
  a sleeping process and its return from flock); a grant to the process that released (it "barged" back in, no
  wake-up) is counted apart;
- hop: granted -> the block begins. For a waiter-thread grant: waking the caller's thread ("the thread switch",
  to the return of the waiter's wait), then withdrawing the wait's announcement from the lock file; for every grant:
  lockstore's bookkeeping (``_mark``: the pread of the record, statistics and waiters' header, the holder record's
  pwrite) and the refresh (a stat, and a re-read of the file another process just wrote);
- hold: the block begins -> the unlock call (the block, the encode, the atomic write and its fsyncs, the statistics
  and blanking pwrite).

The release is timed just *before* the unlock call: the next grant can only come after it. (Timed after the call
returns, it is often later than the grant on another core, and a grant would be paired with an earlier release.)
Shares are of the busy window, from the first grant to the last unlock, which wake-ups, hops and holds tile.

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
_START_TIMEOUT = 120.0


def note() -> str:
    """The docstring's last paragraph, on one line: how to read the split."""
    return " ".join((__doc__ or "").strip().split("\n\n")[-1].split())


def _instrument(events: list[tuple[float, str]]) -> None:
    """Wrap lockstore's lock calls in this process so that they note their times in ``events``."""
    import fcntl

    from lockstore import _sidecar, _waiter

    real = fcntl.flock
    now = time.monotonic

    def lock_call(fd: int, op: int) -> None:
        if op == fcntl.LOCK_UN:
            events.append((now(), "release"))  # before the call: every grant it causes comes after
            real(fd, op)
            return
        real(fd, op)
        events.append((now(), "grant-caller"))

    class WaiterFcntl:
        LOCK_EX, LOCK_UN = fcntl.LOCK_EX, fcntl.LOCK_UN

        @staticmethod
        def flock(fd: int, op: int) -> None:
            real(fd, op)
            if op == fcntl.LOCK_EX:
                events.append((now(), "grant-thread"))

    if hasattr(_sidecar, "flock"):
        setattr(_sidecar, "flock", lock_call)  # noqa: B010 - a module global the lock calls by name
    else:  # the 0.1.x sidecar, for a "before" run
        import filelock._native._unix as unix  # what 0.1.x's lock_descriptor/unlock_descriptor call

        real_nb, real_un = unix.lock_fd_nonblocking, unix.unlock_fd

        def nb(fd: int, blocking: bool = True) -> bool:
            got: bool = real_nb(fd)
            if got:
                events.append((now(), "grant-caller"))
            return got

        def un(fd: int) -> None:
            events.append((now(), "release"))
            real_un(fd)

        setattr(_sidecar, "lock_descriptor", nb)  # noqa: B010
        setattr(_sidecar, "unlock_descriptor", un)  # noqa: B010
    setattr(_waiter, "fcntl", WaiterFcntl)  # noqa: B010
    real_wait = _waiter.Waiter.wait

    def wait(self: Any, seconds: float) -> bool:
        got = real_wait(self, seconds)
        if got:
            events.append((now(), "resumed"))
        return got

    setattr(_waiter.Waiter, "wait", wait)  # noqa: B010
    queue = getattr(_sidecar, "_queue", None)
    if queue is not None and hasattr(queue, "withdraw"):
        real_withdraw = queue.withdraw

        def withdraw(*args: Any, **kwargs: Any) -> None:
            events.append((now(), "withdraw"))
            real_withdraw(*args, **kwargs)
            events.append((now(), "withdrawn"))

        setattr(queue, "withdraw", withdraw)  # noqa: B010
    real_mark = getattr(_sidecar.SidecarLock, "_mark", None)
    if real_mark is not None:

        def mark(self: Any, slot: Any, label: str | None) -> bool:
            events.append((now(), "mark"))
            stale: bool = real_mark(self, slot, label)
            events.append((now(), "marked"))
            return stale

        setattr(_sidecar.SidecarLock, "_mark", mark)  # noqa: B010


def _worker(path: str, n: int, timeout: float, out: str, barrier: Any) -> None:
    import lockstore

    events: list[tuple[float, str]] = []
    _instrument(events)
    store = lockstore.open(path, default={"n": 0}, timeout=timeout)
    with store.transaction() as s:  # first-time costs (lock file, waiter thread, imports), outside the split
        s.value["n"] += 1
    barrier.wait(_START_TIMEOUT)
    events.clear()
    for _ in range(n):
        before = time.monotonic()
        with store.transaction() as s:
            events.append((time.monotonic(), "block"))
            s.value["n"] += 1
        events.append((before, "want"))
    with open(out, "w") as f:
        json.dump({"pid": os.getpid(), "events": events}, f)


def run(procs: int, n: int, timeout: float, directory: str) -> dict[str, Any]:
    """Run the instrumented contended case; return the split of the time (medians in us, shares of the window)."""
    work = tempfile.mkdtemp(dir=directory)
    try:
        path = os.path.join(work, "counter.json")
        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(procs + 1)
        outs = [os.path.join(work, f"events-{i}.json") for i in range(procs)]
        workers = [ctx.Process(target=_worker, args=(path, n, timeout, out, barrier)) for out in outs]
        for w in workers:
            w.start()
        try:
            barrier.wait(_START_TIMEOUT)  # every worker opened its store and ran its first transaction
        except BaseException:
            for w in workers:
                w.kill()
            raise
        t0 = time.monotonic()
        for w in workers:
            w.join()
        wall = time.monotonic() - t0
        failed = [w.exitcode for w in workers if w.exitcode != 0]
        if failed:
            raise RuntimeError(f"handover: {len(failed)} worker(s) failed (exit codes {failed})")
        merged: list[tuple[float, int, str]] = []
        for out in outs:
            with open(out) as f:
                data = json.load(f)
            merged += [(t, data["pid"], kind) for t, kind in data["events"]]
        with open(path) as f:
            final = json.load(f)["n"] - procs  # the warm-up transactions
        return _split(sorted(merged), wall, final, procs * n)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _split(events: list[tuple[float, int, str]], wall: float, final: int, expected: int) -> dict[str, Any]:
    wake: list[float] = []
    retake: list[float] = []
    thread_switch: list[float] = []
    withdrawing: list[float] = []
    marking: list[float] = []
    hop_thread: list[float] = []
    hop_caller: list[float] = []
    hold: list[float] = []
    last_release: tuple[float, int] | None = None
    granted: dict[int, tuple[float, str]] = {}
    began: dict[int, float] = {}
    pending: dict[int, float] = {}  # a withdrawal or _mark under way: its start
    spent: dict[int, list[float]] = {}  # per pid since its grant: [withdrawing, marking]
    first_grant = last_unlock = None
    for t, pid, kind in events:
        if kind.startswith("grant"):
            granted[pid] = (t, kind)
            spent[pid] = [0.0, 0.0]
            first_grant = t if first_grant is None else first_grant
            if last_release is not None:
                (retake if last_release[1] == pid else wake).append(t - last_release[0])
                last_release = None
        elif kind == "resumed" and pid in granted and granted[pid][1] == "grant-thread":
            thread_switch.append(t - granted[pid][0])
        elif kind in ("withdraw", "mark"):
            pending[pid] = t
        elif kind in ("withdrawn", "marked") and pid in pending and pid in spent:
            spent[pid][kind == "marked"] += t - pending.pop(pid)
        elif kind == "block" and pid in granted:
            g, how = granted[pid]
            (hop_thread if how == "grant-thread" else hop_caller).append(t - g)
            if how == "grant-thread":
                withdrawing.append(spent[pid][0])
            marking.append(spent[pid][1])
            began[pid] = t
        elif kind == "release":
            if pid in began:
                hold.append(t - began.pop(pid))
            last_release = (t, pid)
            last_unlock = t
    window = (last_unlock - first_grant) if first_grant is not None and last_unlock is not None else wall

    def p50(xs: list[float]) -> float:
        return statistics.median(xs) * 1e6 if xs else 0.0

    return {
        "transactions": expected, "final_count": final, "wall_s": wall, "window_s": window,
        "hand-overs to another process": len(wake), "taken straight back by the releaser": len(retake),
        "wake-up p50 us": p50(wake),
        "hop via waiter thread p50 us": p50(hop_thread),
        "  of which the thread switch p50 us": p50(thread_switch),
        "  of which withdrawing the announcement p50 us": p50(withdrawing),
        "  of which withdrawing the announcement mean us": 1e6 * sum(withdrawing) / len(withdrawing) if withdrawing
        else 0.0,
        "hop in the caller p50 us": p50(hop_caller),
        "_mark (pread, record pwrite) p50 us": p50(marking),
        "hold p50 us": p50(hold),
        "share idle (wake-ups)": sum(wake) / window,
        "share idle (taken back by the releaser)": sum(retake) / window,
        "share held before the block (hops)": (sum(hop_thread) + sum(hop_caller)) / window,
        "  of which withdrawing announcements": sum(withdrawing) / window,
        "share held in the block and its write": sum(hold) / window,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--procs", type=int, default=8)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--dir", default=os.path.join(_DIR, "results"),
                        help="where the counter file goes (on disk, never tmpfs)")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    result = run(args.procs, args.n, args.timeout, args.dir)
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print("\n" + note())
    return 0 if result["final_count"] == result["transactions"] else 1


if __name__ == "__main__":
    sys.exit(main())
