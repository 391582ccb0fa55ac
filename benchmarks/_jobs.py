"""The competitors: each does the same job, read-modify-write increments of one shared counter.

A competitor prepares the shared state (``init``), opens it once per process (``open``, outside the timed loop,
as a long-running worker would), runs one increment per call of the returned ``op`` and says how long that
increment waited for its lock (0 for those without one), and reads the final count (``count``) to check that no
update was lost. Everything here runs in the worker processes too, so it must be importable on its own.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import sqlite3
import time
from collections.abc import Callable
from time import perf_counter
from typing import Any

Op = Callable[[], float]
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def make_value(size: int) -> dict[str, Any]:
    """A JSON object of about ``size`` encoded bytes: the counter ``n`` plus records that pad it out."""
    value: dict[str, Any] = {"n": 0, "items": []}
    base = len(json.dumps(value))
    if size <= 200:
        value["pad"] = "x" * max(0, size - base - 10)
        return value
    item = {"id": 0, "name": "item-000000", "score": 0.5, "tags": ["a", "b"]}
    per = len(json.dumps(item)) + 2
    value["items"] = [
        {"id": i, "name": f"item-{i:06d}", "score": i / 7, "tags": ["a", "b"]} for i in range((size - base) // per)
    ]
    return value


def read_bytes(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        chunks = []
        while chunk := os.read(fd, max(size + 1, 65536)):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def floor_write(path: str, data: bytes, *, durable: bool) -> None:
    """The atomic replace as bare system calls: temp O_EXCL, write, fsync, rename, fsync the directory."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o666)
    try:
        write_all(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    if durable:
        dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class Competitor:
    """One way of doing the job; subclasses override ``open`` (and ``init``/``count`` when not a JSON file)."""

    name = ""
    label = ""
    #: False for those that lose updates by design (no lock): a wrong count is expected, not a bug.
    locks = True
    #: Only the file-based competitors take a large value.
    any_size = True

    def init(self, path: str, value: dict[str, Any]) -> None:
        floor_write(path, json.dumps(value).encode(), durable=False)

    def open(self, path: str) -> tuple[Op, Callable[[], None]]:
        raise NotImplementedError

    def count(self, path: str) -> int:
        return int(json.loads(read_bytes(path))["n"])


class Floor(Competitor):
    def __init__(self, *, durable: bool) -> None:
        self.durable = durable
        self.name = "floor" if durable else "floor-nd"
        self.label = "floor: bare syscalls" + ("" if durable else " (no fsync)")

    def open(self, path: str) -> tuple[Op, Callable[[], None]]:
        lfd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | _O_CLOEXEC, 0o666)
        durable = self.durable

        def op() -> float:
            start = perf_counter()
            fcntl.flock(lfd, fcntl.LOCK_EX)
            waited = perf_counter() - start
            try:
                value = json.loads(read_bytes(path))
                value["n"] += 1
                floor_write(path, json.dumps(value).encode(), durable=durable)
            finally:
                fcntl.flock(lfd, fcntl.LOCK_UN)
            return waited

        return op, lambda: os.close(lfd)


class Recipe(Competitor):
    """The hand-written recipe: filelock.FileLock (its defaults) + json + atomicwrites.atomic_write."""

    def __init__(self, *, durable: bool) -> None:
        self.durable = durable
        self.name = "recipe" if durable else "recipe-nd"
        self.label = "filelock+json+atomicwrites" + ("" if durable else " (no fsync)")

    def open(self, path: str) -> tuple[Op, Callable[[], None]]:
        import atomicwrites
        import filelock

        lock = filelock.FileLock(path + ".lock")
        writer: type[Any] = atomicwrites.AtomicWriter
        if not self.durable:

            class NoSync(atomicwrites.AtomicWriter):  # type: ignore[misc]
                def sync(self, f: Any) -> None:
                    f.flush()

                def commit(self, f: Any) -> None:
                    os.replace(f.name, self._path)

            writer = NoSync

        def op() -> float:
            start = perf_counter()
            with lock:
                waited = perf_counter() - start
                with open(path) as f:
                    value = json.load(f)
                value["n"] += 1
                with atomicwrites.atomic_write(path, writer_cls=writer, overwrite=True) as f:
                    json.dump(value, f)
            return waited

        return op, lambda: None


class AtomicStoreNoLock(Competitor):
    name = "atomic_store"
    label = "atomic_store 0.0.1 (no lock)"
    locks = False

    def open(self, path: str) -> tuple[Op, Callable[[], None]]:
        import atomic_store

        def op() -> float:
            with atomic_store.open(path, default=None) as store:
                store.value["n"] += 1
            return 0.0

        return op, lambda: None


class Sqlite(Competitor):
    any_size = False

    def __init__(self, journal: str, synchronous: str) -> None:
        self.journal = journal
        self.synchronous = synchronous
        self.name = f"sqlite-{journal.lower()}-{synchronous.lower()}"
        self.label = f"sqlite3 {journal} synchronous={synchronous}"

    def _connect(self, path: str) -> sqlite3.Connection:
        con = sqlite3.connect(path, timeout=120, isolation_level=None)
        con.execute(f"PRAGMA journal_mode={self.journal}")
        con.execute(f"PRAGMA synchronous={self.synchronous}")
        return con

    def init(self, path: str, value: dict[str, Any]) -> None:
        con = self._connect(path)
        con.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v INTEGER)")
        con.execute("INSERT INTO kv VALUES ('n', ?)", (value["n"],))
        con.close()

    def open(self, path: str) -> tuple[Op, Callable[[], None]]:
        con = self._connect(path)

        def op() -> float:
            start = perf_counter()
            con.execute("BEGIN IMMEDIATE")
            waited = perf_counter() - start
            try:
                (n,) = con.execute("SELECT v FROM kv WHERE k = 'n'").fetchone()
                con.execute("UPDATE kv SET v = ? WHERE k = 'n'", (n + 1,))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            return waited

        return op, con.close

    def count(self, path: str) -> int:
        con = sqlite3.connect(path)
        try:
            return int(con.execute("SELECT v FROM kv WHERE k = 'n'").fetchone()[0])
        finally:
            con.close()


class DiskCache(Competitor):
    name = "diskcache"
    label = "diskcache Cache.incr (WAL, synchronous=NORMAL)"
    any_size = False

    def init(self, path: str, value: dict[str, Any]) -> None:
        import diskcache

        with diskcache.Cache(path + ".dc") as cache:
            cache.set("n", value["n"])

    def open(self, path: str) -> tuple[Op, Callable[[], None]]:
        import diskcache

        cache = diskcache.Cache(path + ".dc")

        def op() -> float:
            cache.incr("n")
            return 0.0

        return op, cache.close

    def count(self, path: str) -> int:
        import diskcache

        with diskcache.Cache(path + ".dc") as cache:
            return int(cache.get("n"))


def _plug(store: Any, path: str, lock: Any) -> None:
    """Make ``lock`` (a SidecarLock subclass on ``<path>.lock``) the lock of ``store``, the file store of ``path``."""
    storage = store._core.storage
    storage.native = False
    storage._fixed = lock(path + ".lock", data_path=path)


def no_record_lock(store: Any, path: str) -> None:
    """Switch the holder record off in ``store`` (a SidecarLock subclass that writes none; lockstore is untouched):
    the store's lock becomes a fixed sidecar ``<path>.lock`` whose ``_mark`` writes nothing (so nothing is blanked)."""
    from lockstore import _sidecar

    class NoRecordLock(_sidecar.SidecarLock):
        def _mark(self, slot: Any, label: str | None) -> bool:
            return False

    _plug(store, path, NoRecordLock)


_stats_free: Any = None


def stats_free_lock_class() -> Any:
    """A SidecarLock subclass (lockstore is untouched) whose ``_mark`` does what 0.1.x did: read 1 byte (a stale
    record?), write the record, and leave ``slot.head`` None, so the release blanks only the record (one pwrite of
    ``record_len`` blanks) and updates no statistics (and reads no waiters' header)."""
    global _stats_free
    if _stats_free is not None:
        return _stats_free
    from lockstore import _holder, _sidecar

    class NoStatsLock(_sidecar.SidecarLock):
        def _mark(self, slot: Any, label: str | None) -> bool:
            slot.acquired_at = time.monotonic()
            slot.head = None
            slot.oldest_wait = 0.0
            if not slot.writable:
                return True
            fd = slot.fds[0]
            try:
                stale = os.pread(fd, 1, 0) not in (b"", b" ")
            except OSError:
                return True
            try:
                record = _holder.record(label)
                if stale:  # cover a stale record whole, as lockstore does
                    record = record.ljust(_sidecar.RECORD_MAX)
                os.pwrite(fd, record, 0)
                slot.record_len = len(record)
            except OSError:
                pass
            return stale

    _stats_free = NoStatsLock
    return NoStatsLock


def stats_off(store: Any, path: str) -> None:
    """Switch the statistics off in ``store`` and nothing else (its native lock, as is, with ``_statistics`` False):
    the holder record, the waiters' header and the path resolution stay as they are."""
    with store.transaction():
        pass  # the native lock of the file exists once a transaction has run
    for lock in store._core.storage._native.values():
        lock._statistics = False


class Lockstore(Competitor):
    def __init__(self, *, durable: bool, record: bool = True, timeout: float | None = None) -> None:
        self.durable = durable
        self.record = record
        self.timeout = timeout
        self.name = ("lockstore" if durable else "lockstore-nd") + ("" if record else "-norecord")
        self.label = "lockstore" + ("" if durable else " durable=False") + ("" if record else " (no holder record)")
        if timeout is not None:
            self.name += f"-timeout{timeout:g}"
            self.label += f" timeout={timeout:g}"

    def open(self, path: str) -> tuple[Op, Callable[[], None]]:
        import lockstore

        store = lockstore.open(path, durable=self.durable)
        if self.timeout is not None:
            store.timeout = self.timeout
        if not self.record:
            no_record_lock(store, path)

        def op() -> float:
            start = perf_counter()
            with store.transaction() as s:
                waited = perf_counter() - start
                s.value["n"] += 1
            return waited

        def close() -> None:
            store.close()
            # The run's directory is never used again: let go of lockstore's per-process descriptor of its lock
            # file (private state, so a worker does not collect hundreds of them over a full run).
            from lockstore import _lock

            registry = getattr(_lock, "_REGISTRY", {})
            shared = registry.pop(os.path.normcase(os.path.abspath(path + ".lock")), None)
            if shared is not None and shared.fd is not None:
                os.close(shared.fd)

        return op, close

    def count(self, path: str) -> int:
        import lockstore

        return int(lockstore.read(path)["n"])


COUNTER: list[Competitor] = [
    Floor(durable=True),
    Floor(durable=False),
    Recipe(durable=True),
    Recipe(durable=False),
    AtomicStoreNoLock(),
    Sqlite("WAL", "FULL"),
    Sqlite("DELETE", "FULL"),
    Sqlite("WAL", "NORMAL"),
    DiskCache(),
    Lockstore(durable=True),
    Lockstore(durable=False),
]
EXTRA: list[Competitor] = [
    Lockstore(durable=True, record=False),
    Lockstore(durable=False, record=False),
    Lockstore(durable=True, timeout=-1),
]
BY_NAME: dict[str, Competitor] = {c.name: c for c in COUNTER + EXTRA}


_RUNS = itertools.count()


def fresh_dir(root: str, tag: str) -> str:
    """A new empty directory for one run, never a name used before in this benchmark.

    Never the same path twice: lockstore keeps its lock file open for the life of the process (one descriptor per
    lock file), so a worker that saw a deleted and re-created lock file at the same path would lock the old inode.
    """
    path = os.path.join(root, f"{tag}-{next(_RUNS)}")
    os.makedirs(path)
    return path
