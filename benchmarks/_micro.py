"""The single-process cases: lock-free reads, no-change transactions, 10 MB values, the holder record, import and CLI.

Each case times blocks of operations of every variant, interleaved round-robin over the repeats, and keeps the
time per operation of every block; the caller reports medians and ratios.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
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


def holder_record(root: str, n: int, repeats: int, ab_repeats: int) -> tuple[
        Samples, Samples, dict[str, tuple[float, float]] | None]:
    """The lock file's bookkeeping per transaction, measured directly on the real lock code (as is, with the
    statistics switched off, and with 0.1.x's bookkeeping), and as an A/B of whole transactions in one process:
    lockstore as is, without the statistics, without any record, and the bare-syscall floor; and the disk writes of
    each durable variant (see disk_writes)."""
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
        writes = disk_writes(root, {name: op for name, op in ops.items() if name.startswith("durable,")}, 200)
    finally:
        for close in closers:
            close()
    return direct, ab, writes


def disk_writes(root: str, ops: dict[str, Callable[[], object]], n: int) -> dict[str, tuple[float, float]] | None:
    """Write requests and 512-byte sectors the disk under ``root`` completed per operation (from /proc/diskstats,
    over ``n`` operations after a sync), for each op in turn; None when ``root`` is on no block device listed there.
    Other writers on the same disk add to the counts: a quiet machine gives the same whole numbers every run."""
    st = os.stat(root)
    key = (os.major(st.st_dev), os.minor(st.st_dev))

    def read() -> tuple[int, int] | None:
        with open("/proc/diskstats") as f:
            for line in f:
                fields = line.split()
                if (int(fields[0]), int(fields[1])) == key:
                    return int(fields[7]), int(fields[9])
        return None

    if read() is None:
        return None
    out: dict[str, tuple[float, float]] = {}
    for name, op in ops.items():
        op()
        os.sync()
        before = read()
        for _ in range(n):
            op()
        after = read()
        assert before is not None and after is not None
        out[name] = ((after[0] - before[0]) / n, (after[1] - before[1]) / n)
    return out


def stats_steps(root: str, n: int, repeats: int) -> Samples:
    """The statistics' steps at a release, each timed where the release runs it: between a pread of the lock file's
    head and the pwrite that follows, which leave the processor's caches and predictors as a real release finds
    them (a step timed in a tight loop of its own looks two to three times cheaper on a VM). Every variant does the
    same pread and pwrite; what it adds to "none" is the step's cost. The last one is no step lockstore takes: the
    fewest operations any exact count into a checksummed area needs (three counters bumped in their low byte and the
    checksum of the part they lie in), a lower bound for a leaner area format."""
    import zlib

    from lockstore import _sidecar, _stats

    path = os.path.join(root, "steps.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    area = _stats.fresh(time.time())
    cold = _stats.add(area, waited=2e-6, held=3.0, now=time.time(), label=None, pid=os.getpid(), host="bench")
    out = bytearray(_sidecar._BLANKS) + area
    os.pwrite(fd, out, 0)
    os.pwrite(fd, b" " * (6160 - len(out)), len(out))
    view = memoryview(out)
    mine, hot = view[_stats.OFFSET :], view[_sidecar._HOT_IN_OUT]
    pending = _stats.Pending()
    head = os.pread(fd, 6160, 0)
    crc_at = _stats.OFFSET + _stats.SIZE - 4
    hot_at, wait_at, hold_at = _stats.OFFSET + _stats.HOT.start, _stats.OFFSET + 792, _stats.OFFSET + 920
    pack_crc, crc32 = struct.Struct("<I").pack_into, zlib.crc32

    def bump(at: int) -> None:
        if out[at] < 255:
            out[at] += 1
        else:  # the carry, as _stats does it
            _stats._bump(out, at, at)

    def lower_bound() -> None:
        bump(hot_at)
        bump(wait_at + 4 * min(int(2e-6 * 1e5).bit_length(), 31))
        bump(hold_at + 4 * min(int(3e-5 * 1e5).bit_length(), 31))
        pack_crc(out, crc_at, crc32(hot, cold))

    steps: dict[str, Callable[[], object]] = {
        "none (the pread of 6160 B and the pwrite of 5152 B alone)": lambda: None,
        "_stats.count(), as the usual release calls it": lambda: _stats.count(mine, 2e-6, 3e-5, cold, hot),
        "the area compared with the bytes written last (bytes.startswith)": lambda: head.startswith(mine, 4096),
        "the check for pending timeouts (bool(Pending))": lambda: not pending,
        "the clock read for the hold (time.monotonic)": time.monotonic,
        "reference, no lockstore step: 3 counters bumped + the CRC of their part": lower_bound,
    }
    pread, pwrite = os.pread, os.pwrite

    def in_place(step: Callable[[], object], data: bytes | bytearray) -> Callable[[], float]:
        def run() -> float:
            start = perf_counter()
            for _ in range(n):
                pread(fd, 6160, 0)
                step()
                pwrite(fd, data, 0)
            return (perf_counter() - start) / n

        return run

    variants = {name: in_place(step, out) for name, step in steps.items()}
    # The statistics switched off write only the record's blanks at release: the larger pwrite is a step too.
    variants["the larger pwrite (5152 B instead of a 60-byte record's blanks)"] = in_place(lambda: None, out[:60])
    try:
        return interleave(variants, repeats)
    finally:
        os.close(fd)


def in_transactions(root: str, n: int, *, durable: bool) -> tuple[Samples, Samples]:
    """The statistics' cost where users pay it: inside whole transactions (one process, 100 B value), one transaction
    of each variant after another, the order rotating, ``n`` rounds; (wall time, thread CPU time) of every single
    transaction. Alternating single transactions pairs the variants within a millisecond, so the disk's and the
    machine's drift (which moves blocks of transactions by 10-30% on a shared VM) falls on all of them alike.

    Variants: lockstore as is; its statistics switched off; two references that no lockstore release runs, to bound
    what any count could save: the count skipped (the area written back unchanged) and the count reduced to its
    fewest operations (three counters bumped in their low byte and the CRC: no maxima, no sums); the floor."""
    import zlib

    import lockstore
    from lockstore import _stats

    real = _stats.count
    pack_crc, crc32 = struct.Struct("<I").pack_into, zlib.crc32
    wait_at, hold_at, hot_at, crc_at = 792, 920, _stats.HOT.start, _stats.SIZE - 4

    def skipped(area: Any, waited: float, held: float, cold: int, hot: Any = None) -> int:
        return cold if hot is not None else real(area, waited, held, cold)

    def fewest(area: Any, waited: float, held: float, cold: int, hot: Any = None) -> int:
        if hot is None or not (0.0 <= waited < 1e9 and 0.0 <= held < 1e9):
            return real(area, waited, held, cold, hot)
        for at in (wait_at + 4 * min(int(waited * 1e5).bit_length(), 31),
                   hold_at + 4 * min(int(held * 1e5).bit_length(), 31), hot_at):
            if area[at] == 255:
                return real(area, waited, held, cold, hot)
            area[at] += 1
        pack_crc(area, crc_at, crc32(hot, cold))
        return cold

    ops: dict[str, Callable[[], object]] = {}
    closers: list[Callable[[], None]] = []
    for variant, plug, count in (("as is", None, real), ("statistics off", stats_off, real),
                                 ("reference: count skipped", None, skipped),
                                 ("reference: count of fewest operations", None, fewest)):
        path = os.path.join(root, f"in-txn-{durable}-{len(ops)}.json")
        floor_write(path, json.dumps(make_value(100)).encode(), durable=False)
        store = lockstore.open(path, durable=durable)
        if plug is not None:
            plug(store, path)
        closers.append(store.close)

        def op(store: Any = store, count: Any = count) -> None:
            _stats.count = count
            with store.transaction() as s:
                s.value["n"] += 1

        ops[variant] = op
    path = os.path.join(root, f"in-txn-{durable}-floor.json")
    floor_write(path, json.dumps(make_value(100)).encode(), durable=False)
    ops["floor"], close = Floor(durable=durable).open(path)
    closers.append(close)
    names = list(ops)
    wall: Samples = {name: [] for name in names}
    cpu: Samples = {name: [] for name in names}
    clock, thread_time = perf_counter, time.thread_time
    try:
        for name in names:
            ops[name]()
        for r in range(n):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                run = ops[name]
                c0 = thread_time()
                t0 = clock()
                run()
                wall[name].append(clock() - t0)
                cpu[name].append(thread_time() - c0)
    finally:
        _stats.count = real
        for close in closers:
            close()
    return wall, cpu


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
