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
import time
from collections.abc import Callable
from time import perf_counter
from typing import Any

from _jobs import floor_write, make_value, no_record_lock, read_bytes

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


def holder_record(root: str, n: int, repeats: int) -> tuple[Samples, Samples]:
    """The holder record's cost: direct (the syscalls and the record) and as an A/B of whole transactions."""
    import lockstore
    from lockstore import _holder

    lock_path = os.path.join(root, "holder.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)

    def record_cycle() -> None:
        # What SidecarLock does per transaction: check for a stale record, write ours, blank it at release.
        os.pread(fd, 1, 0)
        record = _holder.record(None)
        os.pwrite(fd, record, 0)
        os.pwrite(fd, b" " * len(record), 0)

    def record_only() -> None:
        _holder.record(None)

    direct = interleave(
        {
            "record() + pread + 2 pwrite": block(record_cycle, n),
            "record() alone": block(record_only, n),
        },
        repeats,
    )
    os.close(fd)

    stores = {}
    for durable in (True, False):
        for record in (True, False):
            path = os.path.join(root, f"holder-{durable}-{record}.json")
            floor_write(path, json.dumps(make_value(100)).encode(), durable=False)
            store = lockstore.open(path, durable=durable)
            if not record:
                no_record_lock(store, path)
            stores[durable, record] = store

    def txn(durable: bool, record: bool) -> Callable[[], None]:
        store = stores[durable, record]

        def op() -> None:
            with store.transaction() as s:
                s.value["n"] += 1

        return op

    ab = interleave(
        {
            "durable, record": block(txn(True, True), max(1, n // 10)),
            "durable, no record": block(txn(True, False), max(1, n // 10)),
            "durable=False, record": block(txn(False, True), n // 2),
            "durable=False, no record": block(txn(False, False), n // 2),
        },
        repeats,
    )
    return direct, ab


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
