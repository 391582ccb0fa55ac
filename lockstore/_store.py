"""``Store``, ``open()``, ``read()`` and transactions: atomic_store 0.0.1's API plus locked read-modify-write."""

from __future__ import annotations

import builtins
import contextlib
import copy
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, Final, Literal

from . import _atomic, _lock
from ._error import CorruptStoreError, SerializationError, TransactionLockError
from ._formats import Format, resolve
from ._holder import Holder

log = logging.getLogger("lockstore")
_builtin_open = builtins.open  # ``open`` below is the seed's name for opening a store
_O_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)

#: Seconds a transaction waits for the lock by default. Finite so that a stuck holder turns into a
#: ``LockTimeout`` that names it instead of a silent hang; a cron job that should queue can pass ``timeout=-1``.
DEFAULT_TIMEOUT: Final = 30.0
#: Longest pause between two attempts on a contended lock, where waiting has to poll: a filelock lock instance
#: passed as ``lock=``, or an OS without a blocking ``flock``. The native sidecar lock waits in the kernel's queue
#: instead (prompt and fair, see ``_waiter.py``).
DEFAULT_POLL_INTERVAL: Final = 0.05

OnCorrupt = Literal["raise", "backup"]
_Sig = tuple[int, int, int, int, int]


def _sig(st: os.stat_result) -> _Sig:
    # A new atomic replace always makes a new inode, and the descriptor we keep on the last file we read or wrote
    # stops its inode number from being reused; size and times catch a foreign writer editing the file in place.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _Local(threading.local):
    depth = 0
    pid = 0


class Store:
    """One value kept in one file; see :func:`open`.

    Threads may share a Store: transactions of different threads are serialised by the lock, and a nested
    ``transaction()`` joins the outer one of the same thread. ``store.value`` itself is one shared object, so
    threads must touch it only inside transactions: a ``reload()`` or an edit by one thread while another is inside
    a transaction changes that transaction's value under it. A Store inherited through ``fork`` works in the child
    (the child takes its own lock); a transaction open at the fork is not inherited.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        default: Any = None,
        fmt: Format | None = None,
        *,
        ignore_inner_exits: bool = False,
        lock: object = True,
        timeout: float = DEFAULT_TIMEOUT,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        durable: bool = True,
        on_corrupt: OnCorrupt = "raise",
    ) -> None:
        self.path = os.fspath(path)
        if on_corrupt not in ("raise", "backup"):
            raise ValueError(f"on_corrupt must be 'raise' or 'backup', not {on_corrupt!r}")
        self.default = default
        self.format = fmt or resolve(None)
        self.ignore_inner_exits = ignore_inner_exits
        self.timeout = float(timeout)
        self.poll_interval = float(poll_interval)
        self.durable = durable
        self.on_corrupt: OnCorrupt = on_corrupt
        self._lock = _lock.build(lock, self.path)
        self._user_lock = lock if self._lock is not None and not isinstance(lock, (bool, str, os.PathLike)) else None
        self._filelock: Any = None
        self._local = _Local()
        self._with_depth = 0
        self._ref_fd: int | None = None
        self._ref_sig: _Sig | None = None
        self._disk: bytes | None = None
        self._swept = False
        self.value: Any = None
        self._load()

    # ----------------------------------------------------------------- introspection
    @property
    def lock(self) -> Any:
        """The filelock lock object guarding the file, or None with ``lock=False``.

        For the native sidecar this is a ``filelock.FileLock`` on the same file, made on first access, for code that
        must hold the lock around something else; transactions themselves use a faster path on the same lock file.
        While a thread holds it, that thread's transactions and commits (of any Store on the file) run inside it
        without taking the lock again.
        """
        if self._lock is None:
            return None
        if self._user_lock is not None:
            return self._user_lock
        if self._filelock is None:
            assert isinstance(self._lock, _lock.SidecarLock)
            self._filelock = self._lock.filelock(self.timeout)
        return self._filelock

    @property
    def lock_file(self) -> str | None:
        """The lock file's path, or None with ``lock=False``."""
        return None if self._lock is None else self._lock.lock_file

    def holder(self) -> Holder | None:
        """Who holds the lock now (a :class:`lockstore.Holder`), or None when it is free or there is no lock."""
        return None if self._lock is None else self._lock.holder()

    def __repr__(self) -> str:
        lock = "no lock" if self._lock is None else f"lock={self._lock.lock_file!r}"
        durable = "durable" if self.durable else "not durable"
        return f"<lockstore.Store {self.path!r} format={self.format.name} {lock} {durable}>"

    def close(self) -> None:
        """Release the descriptor this store keeps on the data file (reopened when needed)."""
        self._forget()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._forget()

    # ----------------------------------------------------------------- reading
    def _forget(self) -> None:
        if self._ref_fd is not None:
            fd, self._ref_fd = self._ref_fd, None
            with contextlib.suppress(OSError):  # it only pinned an inode number
                os.close(fd)
        self._ref_sig = None

    def _remember(self, fd: int | None, st: os.stat_result | None, data: bytes | None) -> None:
        old = self._ref_fd
        self._ref_fd = fd
        self._ref_sig = None if st is None else _sig(st)
        self._disk = data
        if old is not None:
            # Runs after a successful write too: a failing close of the old reference must not report that write
            # as failed (the descriptor only pinned an inode number).
            with contextlib.suppress(OSError):
                os.close(old)

    def _decode(self, data: bytes) -> Any:
        try:
            return self.format.decode(data)
        except Exception as exc:
            raise CorruptStoreError(self.path, f"cannot be decoded as {self.format.name}: {exc}") from exc

    def _read_file(self, *, backup: bool = False) -> tuple[Any, os.stat_result | None]:
        """Read and decode the file; return (value, its stat or None when missing).

        A corrupt file raises CorruptStoreError, or with ``backup`` is moved aside (the caller holds the lock).
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | _O_CLOEXEC)
        except FileNotFoundError:
            self._remember(None, None, None)
            return copy.deepcopy(self.default), None
        except OSError as exc:
            raise _atomic.with_path(exc, self.path) from None
        try:
            st = os.fstat(fd)
            chunks = []
            while chunk := os.read(fd, max(st.st_size + 1, 65536)):
                chunks.append(chunk)
            data = b"".join(chunks)
            value = self._decode(data)
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, OSError):
                raise _atomic.with_path(exc, self.path) from None
            if not (backup and isinstance(exc, CorruptStoreError)):
                raise
            self._back_up()
            self._remember(None, None, None)
            return copy.deepcopy(self.default), None
        self._remember(fd, st, data)
        return value, st

    def _read_value(self) -> tuple[Any, os.stat_result | None]:
        """``_read_file`` with ``on_corrupt`` applied; a backup happens under the lock, like every write."""
        try:
            return self._read_file()
        except CorruptStoreError:
            if self.on_corrupt == "raise":
                raise
        if self._lock is None or self._in_transaction():
            return self._read_file(backup=True)
        with self._locked(self.timeout, blocking=True, label="lockstore: moving a corrupt file aside"):
            return self._read_file(backup=True)

    def _back_up(self) -> None:
        target = _atomic.resolve_target(self.path)  # through a symlink: move the file, and the link stays a link
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = f"{target}.corrupt-{stamp}"
        n = 0
        while os.path.lexists(aside):
            n += 1
            aside = f"{target}.corrupt-{stamp}-{n}"
        os.rename(target, aside)
        log.warning("lockstore: %s could not be decoded; moved it aside to %s and started from the default",
                    self.path, aside)

    def _load(self) -> None:
        self.value = self._read_value()[0]

    def reload(self) -> Any:
        """Re-read the file without taking the lock and return the new ``store.value``.

        Atomic replace means a reader always sees a complete old or new file. Raises CorruptStoreError
        (``on_corrupt="raise"``) or OSError naming the path.
        """
        self.value = self._read_value()[0]
        return self.value

    def _refresh(self) -> os.stat_result | None:
        """Under the lock: make ``value`` the value on disk, re-parsing only when the file changed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise _atomic.with_path(exc, self.path) from None
        if st is not None and self._ref_sig == _sig(st) and self._disk is not None:
            # The file is the very one we last read or wrote. Re-parse only if the caller changed the value since.
            if self._encoded(self.value) != self._disk:  # None (unencodable) counts as changed
                self.value = self._decode(self._disk)
            return st
        self.value, st = self._read_value()
        return st

    # ----------------------------------------------------------------- writing
    def _encode(self) -> bytes:
        try:
            return self.format.encode(self.value)
        except Exception as exc:
            raise SerializationError(self.path, f"cannot encode {type(self.value).__name__} as "
                                                f"{self.format.name}: {exc}") from exc

    def _write(self, data: bytes, like: os.stat_result | None) -> None:
        fd = _atomic.write(self.path, data, durable=self.durable, like=like)
        try:
            st = os.fstat(fd)
        except OSError:
            # The new value is in place: without its stat the store just cannot recognise the file next time, so
            # forget it (the next transaction re-reads) instead of reporting the completed write as failed.
            with contextlib.suppress(OSError):
                os.close(fd)
            self._remember(None, None, None)
            return
        except BaseException:
            os.close(fd)
            raise
        self._remember(fd, st, data)

    def _like(self) -> os.stat_result | None:
        try:
            return os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _atomic.with_path(exc, self.path) from None

    def commit(self) -> None:
        """Atomically write ``store.value``; on a locked store, under the lock (last writer wins).

        Raises SerializationError before anything on disk changes, LockTimeout, or OSError naming the path (the
        data file then is untouched and no temp file is left).
        """
        data = self._encode()
        if self._lock is None or self._in_transaction():
            self._write(data, self._like())
            return
        with self._locked(self.timeout, blocking=True, label=None):
            self._write(data, self._like())

    # ----------------------------------------------------------------- locking
    def _in_transaction(self) -> bool:
        local = self._local
        return local.depth > 0 and local.pid == os.getpid()

    @contextlib.contextmanager
    def _locked(self, timeout: float, *, blocking: bool, label: str | None) -> Iterator[None]:
        lock = self._lock
        assert lock is not None
        if lock.held_by_filelock_here():
            # This thread already holds the OS lock through ``store.lock``: work inside it.
            self._sweep(False)
            yield
            return
        stale = lock.acquire(self, timeout=timeout, poll_interval=self.poll_interval, blocking=blocking,
                             label=label)
        try:
            self._sweep(stale)
            yield
        finally:
            lock.release()

    # The steps below run while the lock is held; transaction() and the asyncio API (_aio.py, in a worker thread)
    # share them so that the two can never drift apart.
    def _sweep(self, stale: bool) -> None:
        """Remove temp files left by a killed writer: once per Store, and whenever a stale holder record says so."""
        if stale or not self._swept:
            removed = _atomic.sweep(self.path)
            self._swept = True
            if removed:
                log.debug("lockstore: removed %d temp file(s) left by a killed writer of %s", len(removed), self.path)

    def _finish(self, like: os.stat_result | None) -> None:
        """Encode once; write only if the value changed (a missing file still holding ``default`` is unchanged)."""
        data = self._encode()
        if data != (self._disk if self._disk is not None else self._encoded(self.default)):
            self._write(data, like)

    def _savepoint(self) -> bytes | None:
        return self._encoded(self.value)  # None (unencodable now): a rollback falls back to the value on disk

    def _rollback(self, savepoint: bytes | None) -> None:
        if savepoint is None:
            self._reset()
        else:
            self._restore(self.format.decode(savepoint))

    def _restore(self, value: Any) -> None:
        """Make ``value`` the store's value, in place for a dict or list, so that references the caller took to
        ``store.value`` before a failed nested transaction still reach the value that will be written."""
        current = self.value
        if type(current) is dict and type(value) is dict:
            current.clear()
            current.update(value)
        elif type(current) is list and type(value) is list:
            current[:] = value
        else:
            self.value = value

    @contextlib.contextmanager
    def transaction(
        self, timeout: float | None = None, *, blocking: bool | None = None, label: str | None = None
    ) -> Iterator[Store]:
        """Lock, reload, run the block, write atomically if the value changed, release.

        ``timeout`` overrides the store's (negative waits forever, 0 tries once); ``blocking=False`` tries once.
        ``label`` is shown to operators by ``holder()`` and ``LockTimeout``. If the block raises, nothing is written,
        ``store.value`` goes back to the value on disk, and the exception propagates. A nested transaction of the
        same store in the same thread joins the outer one (only the outermost writes) as a savepoint: if it raises,
        the value goes back to what it was when the nested block began; a transaction of a second
        Store on the same file, nested in the same thread, raises LockReentryError at once (it would deadlock).
        Raises TransactionLockError with ``lock=False``, LockTimeout, CorruptStoreError, SerializationError, OSError.
        """
        if self._lock is None:
            raise TransactionLockError(self.path)
        local = self._local
        if self._in_transaction():
            # A nested transaction is a savepoint: if it raises, the value goes back to what it was at its start,
            # and the outer block decides (by catching or not) whether the rest is written.
            savepoint = self._savepoint()
            local.depth += 1
            try:
                yield self
            except BaseException:
                self._rollback(savepoint)
                raise
            finally:
                local.depth -= 1
            return
        wait = self.timeout if timeout is None else float(timeout)
        with self._locked(wait, blocking=True if blocking is None else blocking, label=label):
            local.depth, local.pid = 1, os.getpid()
            try:
                like = self._refresh()
                try:
                    yield self
                except BaseException:
                    self._reset()
                    raise
                self._finish(like)
            finally:
                local.depth = 0

    def atransaction(
        self, timeout: float | None = None, *, blocking: bool | None = None, label: str | None = None
    ) -> contextlib.AbstractAsyncContextManager[Store]:
        """``async with store.atransaction() as s:``: :meth:`transaction` without blocking the event loop."""
        from ._aio import atransaction

        return atransaction(self, timeout, blocking=blocking, label=label)

    def _encoded(self, value: Any) -> bytes | None:
        """``value`` encoded, or None when it cannot be (then it never compares equal to bytes on disk)."""
        try:
            return self.format.encode(value)
        except Exception:
            return None

    def _reset(self) -> None:
        self._restore(copy.deepcopy(self.default) if self._disk is None else self._decode(self._disk))

    # ----------------------------------------------------------------- atomic_store's context manager
    def __enter__(self) -> Store:
        self._with_depth += 1
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._with_depth -= 1
        if exc_type is not None:
            return  # unlike atomic_store 0.0.1, a failing block writes nothing
        if self._with_depth == 0 or not self.ignore_inner_exits:
            self.commit()


def open(
    path: str | os.PathLike[str],
    default: Any = None,
    format: object = None,
    is_binary: bool | None = None,
    load_kwargs: Mapping[str, Any] | None = None,
    dump_kwargs: Mapping[str, Any] | None = None,
    ignore_inner_exits: bool = False,
    *,
    lock: object = True,
    timeout: float = DEFAULT_TIMEOUT,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    durable: bool = True,
    on_corrupt: OnCorrupt = "raise",
) -> Store:
    """Open the store kept in ``path`` and load its value once (no lock: a reader always sees a whole file).

    - ``default``: the value when the file does not exist (a fresh deep copy each time, never mutated).
    - ``format``: None/"json" (UTF-8 text, standard JSON only), "pickle" (never for untrusted files), "bson"
      (extra ``lockstore[bson]``), or any object with ``dumps``/``loads`` or ``dump``/``load``; ``is_binary``,
      ``load_kwargs`` and ``dump_kwargs`` as in atomic_store.
    - ``ignore_inner_exits``: nested ``with store:`` blocks commit only at the outermost exit.
    - ``lock``: True for the sidecar ``<path>.lock``; a path for another lock file; a filelock lock instance
      (e.g. ``filelock.SoftFileLock`` on NFS); False for no lock (atomic_store's behaviour, no transactions).
    - ``timeout``: seconds to wait for the lock (default 30; negative waits forever, 0 tries once).
    - ``poll_interval``: the longest pause between attempts on a contended lock (default 0.05 s).
    - ``durable``: fsync the temp file before the rename and the directory after it (default True).
    - ``on_corrupt``: "raise" (CorruptStoreError, the file is never overwritten) or "backup" (move it aside to
      ``<path>.corrupt-<timestamp>``, log a warning, start from ``default``).
    """
    fmt = resolve(format, is_binary=is_binary, load_kwargs=load_kwargs, dump_kwargs=dump_kwargs)
    return Store(path, default, fmt, ignore_inner_exits=ignore_inner_exits, lock=lock, timeout=timeout,
                 poll_interval=poll_interval, durable=durable, on_corrupt=on_corrupt)


_JSON: Final = resolve(None)


def read(
    path: str | os.PathLike[str],
    default: Any = None,
    format: object = None,
    is_binary: bool | None = None,
    load_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Read the value in ``path`` without any lock; ``default`` (a deep copy) when the file does not exist.

    Raises CorruptStoreError when the file cannot be decoded, OSError naming the path for other failures.
    """
    fmt = _JSON if format is None and is_binary is None and not load_kwargs else resolve(
        format, is_binary=is_binary, load_kwargs=load_kwargs)
    p = os.fspath(path)
    try:
        with _builtin_open(p, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return copy.deepcopy(default)
    try:
        return fmt.decode(data)
    except Exception as exc:
        raise CorruptStoreError(p, f"cannot be decoded as {fmt.name}: {exc}") from exc


__all__ = ["DEFAULT_POLL_INTERVAL", "DEFAULT_TIMEOUT", "Store", "open", "read"]
