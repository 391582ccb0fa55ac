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

from _jobs import Floor, floor_write, make_value, no_record_lock, no_stats_lock, read_bytes

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
    """The lock file's bookkeeping per transaction, measured directly (the cycle lockstore does now against the one
    of 0.1.x, and their parts), and as an A/B of whole transactions in one process: lockstore as is, without the
    statistics (a SidecarLock subclass doing 0.1.x's record only), without any record, and the bare-syscall floor."""
    import lockstore
    from lockstore import _holder, _queue, _sidecar, _stats

    old_fd = os.open(os.path.join(root, "holder-0.1.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    new_fd = os.open(os.path.join(root, "holder-0.2.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    # A lock file as it is once some process has waited: the waiters' slots exist, so the pread gets all it asks for.
    os.ftruncate(new_fd, _queue.END)
    os.pwrite(new_fd, b" " * _sidecar.RECORD_MAX, 0)
    head_size = _sidecar._HEAD  # record + statistics + the waiters' header: [0, 6160)
    blanks = b" " * _sidecar.RECORD_MAX
    host = _holder._host_name()
    pid = os.getpid()

    def cycle_old() -> None:
        # 0.1.x, per transaction: is a stale record there (1 byte)?, write ours, blank it at release.
        _ = os.pread(old_fd, 1, 0) not in (b"", b" ")  # the check is part of the cost
        record = _holder.record(None)
        os.pwrite(old_fd, record, 0)
        os.pwrite(old_fd, b" " * len(record), 0)

    def cycle_new() -> None:
        # SidecarLock._mark and _let_go now, uncontended: one pread of [0, 6160), the record, then at release the
        # statistics updated and written with the blanked record region in one pwrite.
        begun = time.monotonic()  # the acquisition's start (Held.start)
        acquired = time.monotonic()
        head = os.pread(new_fd, head_size, 0)
        _ = head[:1] not in (b"", b" ")
        area = bytearray(head[_stats.OFFSET : _stats.OFFSET + _stats.SIZE])
        oldest = _queue.oldest(head[_queue.HEADER :])
        _queue.timeouts_marked(head[_queue.HEADER :])
        os.pwrite(new_fd, _holder.record(None), 0)
        now = time.monotonic()
        _stats.add(area, waited=acquired - begun, held=now - acquired, now=time.time(), label=None, pid=pid,
                   host=host, timeouts=[])
        os.pwrite(new_fd, blanks + area, 0)
        _ = bool(oldest) and time.time() - oldest > _queue.STARVE_AFTER  # the hand-over decision

    area = _stats.fresh(time.time())

    def add_only() -> None:
        _stats.add(area, waited=2e-6, held=3e-5, now=time.time(), label=None, pid=pid, host=host, timeouts=[])

    cycle_new()  # the statistics area written once: every timed cycle updates a valid one
    direct = interleave(
        {
            "0.1.x: pread 1 B + record() + pwrite + blanking pwrite": block(cycle_old, n),
            "now: pread 6160 B + record() + pwrite + _stats.add() + pwrite 4096 blanks + area": block(cycle_new, n),
            "record() alone": block(lambda: _holder.record(None), n),
            "_stats.add() alone": block(add_only, n),
        },
        repeats,
    )
    os.close(old_fd)
    os.close(new_fd)

    ops: dict[str, Callable[[], object]] = {}
    closers: list[Callable[[], None]] = []
    for durable in (True, False):
        kind = "durable" if durable else "durable=False"
        for variant, plug in (("as is", None), ("no statistics", no_stats_lock), ("no record", no_record_lock)):
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
