"""The single-process cases: lock-free reads, no-change transactions, 10 MB values, the holder record, import and CLI.

Each case times blocks of operations of every variant, interleaved round-robin over the repeats, and keeps the
time per operation of every block; the caller reports medians and ratios.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from time import perf_counter
from typing import Any

from _jobs import Floor, floor_write, make_value, no_record_lock, read_bytes, stats_free_lock_class, stats_off

Samples = dict[str, list[float]]


def interleave(variants: dict[str, Callable[[], float]], repeats: int) -> Samples:
    """Call each variant once per repeat, rotating the order; each call returns seconds per operation."""
    names = list(variants)
    out: Samples = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out[name].append(variants[name]())
    return out


def block(fn: Callable[[], object], n: int) -> Callable[[], float]:
    def run() -> float:
        start = perf_counter()
        for _ in range(n):
            fn()
        return (perf_counter() - start) / n

    return run


def reads(root: str, size: int, n: int, repeats: int) -> Samples:
    """``lockstore.read`` against ``json.load`` of the same file (no lock, no store object)."""
    import lockstore

    path = os.path.join(root, f"read-{size}.json")
    floor_write(path, json.dumps(make_value(size)).encode(), durable=False)

    def plain() -> Any:
        with open(path) as f:
            return json.load(f)

    def plain_bytes() -> Any:
        with open(path, "rb") as f:
            return json.loads(f.read())

    return interleave(
        {
            "json.load": block(plain, n),
            "json.loads(read bytes)": block(plain_bytes, n),
            "lockstore.read": block(lambda: lockstore.read(path), n),
        },
        repeats,
    )


def no_change(root: str, n: int, repeats: int) -> Samples:
    """A transaction that changes nothing against one that increments, durable and not, one process."""
    import lockstore

    stores = {}
    for durable in (True, False):
        path = os.path.join(root, f"nochange-{durable}.json")
        floor_write(path, json.dumps(make_value(100)).encode(), durable=False)
        stores[durable] = lockstore.open(path, durable=durable)

    def change(durable: bool) -> Callable[[], None]:
        def op() -> None:
            with stores[durable].transaction() as s:
                s.value["n"] += 1

        return op

    def same(durable: bool) -> Callable[[], None]:
        def op() -> None:
            with stores[durable].transaction():
                pass

        return op

    return interleave(
        {
            "durable change": block(change(True), n),
            "durable no change": block(same(True), n),
            "durable=False change": block(change(False), n),
            "durable=False no change": block(same(False), n),
        },
        repeats,
    )


def large(root: str, size: int, n: int, repeats: int) -> Samples:
    """A transaction on a ``size``-byte JSON value against json loads + dumps + a durable write of the same bytes."""
    import lockstore

    path = os.path.join(root, f"large-{size}.json")
    data = json.dumps(make_value(size)).encode()
    floor_write(path, data, durable=True)
    store = lockstore.open(path)
    other = os.path.join(root, f"large-{size}-plain.json")
    floor_write(other, data, durable=True)

    def baseline() -> None:
        value = json.loads(read_bytes(other))
        value["n"] += 1
        floor_write(other, json.dumps(value).encode(), durable=True)

    def txn() -> None:
        with store.transaction() as s:
            s.value["n"] += 1

    def txn_nochange() -> None:
        with store.transaction():
            pass

    def txn_after_foreign_write() -> float:
        # Another process replaced the file since this store last saw it: the store must re-read and re-parse.
        total = 0.0
        for _ in range(n):
            current = read_bytes(path)
            floor_write(path, current, durable=False)
            start = perf_counter()
            txn()
            total += perf_counter() - start
        return total / n

    return interleave(
        {
            "json loads+dumps+durable write": block(baseline, n),
            "lockstore txn (file unchanged since own write)": block(txn, n),
            "lockstore txn (file replaced by another)": txn_after_foreign_write,
            "lockstore txn, no change": block(txn_nochange, n),
        },
        repeats,
    )


def holder_record(root: str, n: int, repeats: int, ab_repeats: int) -> tuple[Samples, Samples]:
    """The lock file's bookkeeping per transaction, measured directly on the real lock code (as is, with the
    statistics switched off, and with 0.1.x's bookkeeping), and as an A/B of whole transactions in one process:
    lockstore as is, without the statistics, without any record, and the bare-syscall floor."""
    import lockstore
    from lockstore import _holder, _queue, _sidecar, _stats

    # The real lock code, uncontended, on lock files of their own: SidecarLock as is; the same with its statistics
    # switched off (everything else identical: the difference is what the statistics cost); and the subclass whose
    # _mark does 0.1.x's bookkeeping (pread 1 byte, the record, its blanking; no statistics, no waiters' header).
    owner = threading.get_ident()
    locks = {"now": _sidecar.SidecarLock(os.path.join(root, "holder-now.lock")),
             "no statistics": _sidecar.SidecarLock(os.path.join(root, "holder-nostats.lock")),
             "0.1.x": stats_free_lock_class()(os.path.join(root, "holder-0.1.lock"))}
    locks["no statistics"]._statistics = False
    for lock in (locks["now"], locks["no statistics"]):
        # A lock file as it is once some process has waited: the waiters' slots exist, so the pread gets all it
        # asks for.
        fd = os.open(lock.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        os.ftruncate(fd, _queue.END)
        os.pwrite(fd, b" " * _sidecar.RECORD_MAX, 0)
        os.close(fd)

    def cycle(lock: Any) -> Callable[[], None]:
        def run() -> None:
            held = lock.held(owner, None)
            lock.acquire(held, timeout=-1, poll_interval=0.05, blocking=True, label=None)
            lock.release(held)

        return run

    host = _holder._host_name()
    pid = os.getpid()
    area = _stats.fresh(time.time())
    cold = _stats.add(area, waited=2e-6, held=3e-5, now=time.time(), label=None, pid=pid, host=host)

    def add_only() -> None:
        # As SidecarLock._let_go calls it when the area is the one this process wrote last (the usual case).
        _stats.add(area, waited=2e-6, held=3e-5, now=time.time(), label=None, pid=pid, host=host, cold=cold)

    for lock in locks.values():
        cycle(lock)()  # the statistics area written once: every timed cycle updates a valid one
    direct = interleave(
        {
            "0.1.x: lock acquire + release, 0.1.x's record only (pread 1 B, record, blanking pwrite)":
                block(cycle(locks["0.1.x"]), n),
            "no statistics: the same, statistics switched off (pread 6160 B, record, blanking pwrite)":
                block(cycle(locks["no statistics"]), n),
            "now: lock acquire + release as is (pread 6160 B, record, statistics, pwrite blanks + area)":
                block(cycle(locks["now"]), n),
            "record() alone": block(lambda: _holder.record(None), n),
            "_stats.add() alone": block(add_only, n),
        },
        repeats,
    )
    for lock in locks.values():
        lock.close()

    ops: dict[str, Callable[[], object]] = {}
    closers: list[Callable[[], None]] = []
    for durable in (True, False):
        kind = "durable" if durable else "durable=False"
        for variant, plug in (("as is", None), ("no statistics", stats_off), ("no record", no_record_lock)):
            path = os.path.join(root, f"holder-{durable}-{variant.replace(' ', '-')}.json")
            floor_write(path, json.dumps(make_value(100)).encode(), durable=False)
            store = lockstore.open(path, durable=durable)
            if plug is not None:
                plug(store, path)
            ops[f"{kind}, {variant}"] = _increment(store)
            closers.append(store.close)
        path = os.path.join(root, f"holder-{durable}-floor.json")
        floor_write(path, json.dumps(make_value(100)).encode(), durable=False)
        ops[f"{kind}, floor"], close = Floor(durable=durable).open(path)
        closers.append(close)
    try:
        ab = interleave({name: block(op, max(1, n // 10) if name.startswith("durable,") else max(1, n // 2))
                         for name, op in ops.items()}, ab_repeats)
    finally:
        for close in closers:
            close()
    return direct, ab


def _increment(store: Any) -> Callable[[], None]:
    def op() -> None:
        with store.transaction() as s:
            s.value["n"] += 1

    return op


def _child_import(code: str) -> tuple[float, str]:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(proc.stdout.split()[0]), proc.stdout.split(None, 1)[1].strip() if " " in proc.stdout.strip() else ""


def import_time(repeats: int) -> tuple[Samples, bool]:
    """In-process time of ``import lockstore`` (fresh interpreter each time) against ``import json, filelock``."""
    probe = (
        "import time, sys\nt = time.perf_counter()\nimport {mod}\n"
        "print(time.perf_counter() - t, 'psutil' in sys.modules)"
    )
    psutil_seen = False
    out: Samples = {"import lockstore": [], "import json, filelock": [], "interpreter start + exit": []}
    for r in range(repeats):
        order = list(out)
        for name in order[r % 3 :] + order[: r % 3]:
            if name == "interpreter start + exit":
                start = perf_counter()
                subprocess.run([sys.executable, "-c", "pass"], check=True)
                out[name].append(perf_counter() - start)
                continue
            mod = "lockstore" if name == "import lockstore" else "json, filelock"
            elapsed, flag = _child_import(probe.format(mod=mod))
            out[name].append(elapsed)
            if name == "import lockstore" and flag == "True":
                psutil_seen = True
    return out, psutil_seen


def _lockstore_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "lockstore")
    if os.path.exists(script):
        return [script]
    found = shutil.which("lockstore")
    return [found] if found else [sys.executable, "-m", "lockstore"]


def cli(root: str, repeats: int) -> tuple[Samples | None, str]:
    """Wall time of ``lockstore incr FILE KEY`` against ``python -c "import json, filelock"``; None when absent."""
    path = os.path.join(root, "cli.json")
    floor_write(path, b'{"n": 0}', durable=False)
    command = [*_lockstore_command(), "incr", path, "n"]
    probe = subprocess.run(command, capture_output=True, text=True)
    try:
        after = json.loads(read_bytes(path)).get("n")
    except (OSError, ValueError):
        after = None
    if probe.returncode != 0 or after != 1:
        reason = (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[-1]
        return None, f"skipped: `lockstore incr FILE KEY` is not available yet ({reason[:120]})"

    def wall(cmd: list[str]) -> Callable[[], float]:
        def run() -> float:
            start = perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            return perf_counter() - start

        return run

    samples = interleave(
        {
            "lockstore incr FILE KEY": wall(command),
            'python -c "import json, filelock"': wall([sys.executable, "-c", "import json, filelock"]),
        },
        repeats,
    )
    expected = 1 + repeats
    final = json.loads(read_bytes(path)).get("n")
    return samples, f"final count {final}, expected {expected}: {'ok' if final == expected else 'WRONG'}"


def settle() -> None:
    """A short pause between cases so that one case's writeback does not land in the next one's timing."""
    time.sleep(0.2)
