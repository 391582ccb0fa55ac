"""``Store``, ``open()`` and ``read()``: atomic_store 0.0.1's API plus locked read-modify-write transactions."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar, overload

from . import _options
from ._error import CorruptStoreError, TransactionLockError
from ._formats import resolve
from ._os import read_bytes
from ._owners import Ticket, current_owner, defer_when_collected, run_deferred
from ._target import make_storage, scheme_of
from ._txn import BLOCK, COMMIT, Core, Transaction, release_abandoned

if TYPE_CHECKING:
    from ._holder import Holder
    from ._options import OnCorrupt
    from ._stats_report import LockStats

T = TypeVar("T")

#: Seconds a transaction waits for the lock by default. Finite so that a stuck holder turns into a
#: ``LockTimeout`` that names it instead of a silent hang; a cron job that should queue can pass ``timeout=-1``.
DEFAULT_TIMEOUT: Final = 30.0
#: Longest pause between two attempts on a contended lock, where waiting has to poll: a filelock lock instance
#: passed as ``lock=``, or an OS without a blocking ``flock``. The native sidecar lock waits in the kernel's queue
#: instead (prompt and fair, see ``_waiter.py``).
DEFAULT_POLL_INTERVAL: Final = 0.05


class _Call:
    """Lives as long as one call's frame: what a short-lived ticket refers to, so that it counts as abandoned once
    the call is gone (see ``_owners.Ticket``)."""

    __slots__ = ("__weakref__",)


class Store(Generic[T]):
    """One value kept in one file (or a PostgreSQL row, or a Redis key); see :func:`open`, which takes the same
    arguments.

    Threads may share a Store. Its outermost transaction belongs to one owner (a thread, or an asyncio task) at a
    time: another thread's ``transaction()``, ``commit()`` and ``reload()`` on the same Store wait until it ends,
    and a nested ``transaction()`` of the same owner joins it as a savepoint. ``store.value`` itself is one
    object: read or change it only inside a transaction (or from one thread). A Store inherited through ``fork``
    works in the child, which takes its own lock; a transaction open at the fork belongs to the parent (see
    ``transaction()``).
    """

    value: T

    def __init__(
        self,
        path: str | os.PathLike[str],
        default: T = None,  # type: ignore[assignment]  # T is Any unless a default says otherwise
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
        warn_hold: float | None = None,
        **target_options: Any,
    ) -> None:
        fmt = resolve(format, is_binary=is_binary, load_kwargs=load_kwargs, dump_kwargs=dump_kwargs)
        self.ignore_inner_exits = _options.flag(ignore_inner_exits, "ignore_inner_exits")
        wait = _options.timeout(timeout)
        poll = _options.positive(poll_interval, "poll_interval")
        self.durable = _options.flag(durable, "durable")
        corrupt = _options.on_corrupt(on_corrupt)
        storage = make_storage(path, lock=lock, durable=self.durable, poll_interval=poll, timeout=wait,
                               options=target_options)
        hold_limit = None if warn_hold is None else _options.positive(warn_hold, "warn_hold")
        self._core: Core[T] = Core(self, storage, fmt, default, timeout=wait, poll_interval=poll, on_corrupt=corrupt,
                                   warn_hold=hold_limit)
        self._with_depth: dict[object, int] = {}
        run_deferred()  # what collected Stores left to close (see _owners.DEFERRED)
        defer_when_collected(self, storage.close)
        self.value = self._core.fresh_default()
        try:
            self._load()
        except BaseException:
            storage.close()
            raise

    # ----------------------------------------------------------------- options and introspection
    @property
    def path(self) -> str:
        """The data file's path as given (for a server, its target without the password)."""
        return self._core.storage.target

    @property
    def default(self) -> T:
        return self._core.default

    @property
    def format(self) -> Any:
        """The resolved format (``.name``, ``.encode``, ``.decode``)."""
        return self._core.format

    @property
    def timeout(self) -> float:
        """Seconds a transaction waits for the lock (-1.0: forever)."""
        return self._core.timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._core.timeout = _options.timeout(value)

    @property
    def poll_interval(self) -> float:
        return self._core.poll_interval

    @property
    def on_corrupt(self) -> OnCorrupt:
        return self._core.on_corrupt

    @property
    def lock(self) -> Any:
        """The filelock lock object guarding the file, or None with ``lock=False`` (and for servers).

        For the native sidecar this is a ``filelock.FileLock`` on the same file, made on first access, for code that
        must hold the lock around something else; transactions themselves use a faster path on the same lock file.
        While a thread holds it, that thread's transactions and commits (of any Store on the file) run inside it
        without taking the lock again; taking it inside a transaction raises LockReentryError (it would wait for
        itself).
        """
        storage = self._core.storage
        filelock = getattr(storage, "filelock", None)
        return None if filelock is None else filelock(self._core.timeout)

    @property
    def lock_file(self) -> str | None:
        """The lock file's path (or a server's lock key), or None with ``lock=False``."""
        return self._core.storage.lock_name

    def holder(self) -> Holder | None:
        """Who holds the lock now (a :class:`lockstore.Holder`), or None when it is free or there is no lock.

        Read without taking the lock: on Linux the kernel names the holding process (``/proc/locks``), and the
        lock file's record adds its label and since when; a process holding the lock without lockstore (``flock``,
        a plain ``FileLock``) is named with ``recorded=False``. A record left by a killed holder is never shown.
        """
        return self._core.storage.holder()

    def waiters(self) -> list[Holder]:
        """The processes waiting for the lock now, oldest first where known (Linux: the kernel's flock queue)."""
        return self._core.storage.waiters()

    def stats(self) -> LockStats | None:
        """The lock's statistics, kept in the lock file by every process that uses it (read without the lock):
        acquisitions, timeouts, wait and hold percentiles, the longest hold, a suggested timeout. None when there
        are none yet, or for a lock that keeps none (a filelock instance, a server store)."""
        stats = getattr(self._core.storage, "stats", None)
        return None if stats is None else stats()

    def reset_stats(self) -> None:
        """Start the statistics afresh (under the lock, waiting up to the store's timeout)."""
        reset = getattr(self._core.storage, "reset_stats", None)
        if reset is None:
            raise TypeError(f"{self.path}: this store's lock keeps no statistics")
        reset(current_owner(), timeout=self._core.timeout)

    def __repr__(self) -> str:
        storage = self._core.storage
        lock = "no lock" if storage.lock_name is None else f"lock={storage.lock_name!r}"
        durable = "durable" if self.durable else "not durable"
        return f"<lockstore.Store {self.path!r} format={self._core.format.name} {lock} {durable}>"

    def __reduce__(self) -> Any:
        raise TypeError("a lockstore.Store cannot be pickled: open the store again in the other process")

    def close(self) -> None:
        """Give back the descriptors (and, for servers, connections) this store keeps; reopened when needed.

        Waits while another thread's transaction uses this Store (its descriptors are that transaction's until it
        ends), as :meth:`reload` does."""
        core = self._core
        owner = current_owner()
        if core.mine(owner) is not None:
            core.storage.close()
            return
        release_abandoned()
        ticket = Ticket(owner, _Call())  # abandoned (and taken over) if this frame is dropped without giving it back
        try:
            core.take_guard(ticket, core.timeout)
            core.storage.close()
        finally:
            try:
                core.guard.give(ticket)
            except BaseException:
                core.guard.give(ticket)  # an interrupt cut the first call short
                raise

    # ----------------------------------------------------------------- reading
    def _load(self) -> None:
        core = self._core
        try:
            self.value = core.accept(core.storage.load())
        except CorruptStoreError:
            if core.on_corrupt == "raise" or not core.storage.locked:
                if core.on_corrupt == "raise":
                    raise
                self.value = core.fresh_default()  # nothing to move aside under a lock
                return
            # Moving the file aside is a write: it happens under the lock, in a transaction whose refresh does it.
            with self.transaction(label="lockstore: moving a corrupt value aside"):
                pass

    def reload(self) -> T:
        """Re-read the stored value without taking the lock and return the new ``store.value``.

        A reader always sees a complete old or new value. Waits while another thread's transaction uses this
        Store. Raises CorruptStoreError (``on_corrupt="raise"``) or OSError naming the path.
        """
        core = self._core
        owner = current_owner()
        if core.mine(owner) is not None:
            self._load()
            return self.value
        release_abandoned()
        call = _Call()
        ticket = Ticket(owner, call)  # abandoned (and taken over) if this frame is dropped without giving it back
        corrupt = False
        try:
            core.take_guard(ticket, core.timeout)
            try:
                self.value = core.accept(core.storage.load())
            except CorruptStoreError:
                if core.on_corrupt == "raise":
                    raise
                corrupt = True
        finally:
            try:
                core.guard.give(ticket)
            except BaseException:
                core.guard.give(ticket)  # an interrupt cut the first call short
                raise
        if corrupt:
            self._load()
        return self.value

    # ----------------------------------------------------------------- writing
    def commit(self) -> None:
        """Atomically write ``store.value``; on a locked store, under the lock (last writer wins).

        The value is encoded after the lock is taken, once no other thread's transaction uses this Store. Raises
        SerializationError before anything stored changes, LockTimeout, or OSError naming the path (the data
        file then is untouched and no temp file is left).
        """
        core = self._core
        owner = current_owner()
        txn = core.mine(owner)
        if txn is not None:
            data = core.encode(self.value)
            core.disk, core.version = data, core.storage.save(txn.held, data)
            return
        if not core.storage.locked:
            call = _Call()
            ticket = Ticket(owner, call)
            try:
                core.take_guard(ticket, core.timeout)
                data = core.encode(self.value)
                core.disk, core.version = data, core.storage.put(data)
            finally:
                try:
                    core.guard.give(ticket)
                except BaseException:
                    core.guard.give(ticket)  # an interrupt cut the first call short
                    raise
            return
        with Transaction(core, core.timeout, blocking=True, label=None, kind=COMMIT):
            pass

    # ----------------------------------------------------------------- transactions
    def transaction(
        self, timeout: float | None = None, *, blocking: bool | None = None, label: str | None = None
    ) -> Transaction[T]:
        """``with store.transaction() as s:`` lock, reload, run the block, write atomically if the value changed,
        release.

        ``timeout`` overrides the store's (negative or infinite waits forever, 0 tries once); ``blocking=False``
        tries once. ``label`` is shown to operators by ``holder()`` and ``LockTimeout``. If the block raises,
        nothing is written, ``store.value`` goes back to the stored value, and the exception propagates.

        Nesting: a transaction of the same Store by the same owner (thread, or asyncio task) joins the outer one
        as a savepoint: only the outermost writes, and if the nested block raises, the value goes back exactly to
        what it was when the nested block began (every container restored in place). A transaction of a second
        Store on the same lock, nested by the same owner, raises LockReentryError at once (it would wait for
        itself). Threads: another thread's transaction, ``commit()`` or ``reload()`` on this Store waits until this
        one ends. Fork: a child forked inside the block does not own the transaction: leaving the block there writes
        nothing, releases nothing, raises nothing, and puts the child's value back to what was stored.

        Raises TransactionLockError with ``lock=False``, LockTimeout, LockReentryError, CorruptStoreError,
        SerializationError, OSError naming the path.
        """
        core = self._core
        if not core.storage.locked:
            raise TransactionLockError(core.storage.target)
        wait = core.timeout if timeout is None else _options.timeout(timeout)
        return Transaction(core, wait, blocking=True if blocking is None else _options.flag(blocking, "blocking"),
                           label=_options.label(label), kind=BLOCK)

    def atransaction(
        self, timeout: float | None = None, *, blocking: bool | None = None, label: str | None = None
    ) -> Transaction[T]:
        """``async with store.atransaction() as s:``: :meth:`transaction` without blocking the event loop.

        The same object and rules; the owner is the asyncio task. Waiting for another process happens in a helper
        thread, file I/O in ``asyncio.to_thread``, and server stores use their drivers' asyncio clients.
        """
        return self.transaction(timeout, blocking=blocking, label=label)

    # ----------------------------------------------------------------- atomic_store's context manager
    def __enter__(self) -> Store[T]:
        owner = current_owner()
        self._with_depth[owner] = self._with_depth.get(owner, 0) + 1
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        owner = current_owner()
        depth = self._with_depth.get(owner, 1) - 1
        if depth > 0:
            self._with_depth[owner] = depth
        else:
            self._with_depth.pop(owner, None)
        if exc_type is not None:
            return  # unlike atomic_store 0.0.1, a failing block writes nothing
        if depth == 0 or not self.ignore_inner_exits:
            self.commit()


@overload
def open(
    path: str | os.PathLike[str], default: None = None, format: object = None, is_binary: bool | None = None,
    load_kwargs: Mapping[str, Any] | None = None, dump_kwargs: Mapping[str, Any] | None = None,
    ignore_inner_exits: bool = False, *, lock: object = True, timeout: float = DEFAULT_TIMEOUT,
    poll_interval: float = DEFAULT_POLL_INTERVAL, durable: bool = True, on_corrupt: OnCorrupt = "raise",
    warn_hold: float | None = None, **target_options: Any,
) -> Store[Any]: ...


@overload
def open(
    path: str | os.PathLike[str], default: T, format: object = None, is_binary: bool | None = None,
    load_kwargs: Mapping[str, Any] | None = None, dump_kwargs: Mapping[str, Any] | None = None,
    ignore_inner_exits: bool = False, *, lock: object = True, timeout: float = DEFAULT_TIMEOUT,
    poll_interval: float = DEFAULT_POLL_INTERVAL, durable: bool = True, on_corrupt: OnCorrupt = "raise",
    warn_hold: float | None = None, **target_options: Any,
) -> Store[T]: ...


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
    warn_hold: float | None = None,
    **target_options: Any,
) -> Store[Any]:
    """Open the store kept in ``path`` and load its value once (no lock: a reader always sees a whole file).

    - ``path``: a file path, or a server target: ``postgresql://USER@HOST:PORT/DB#KEY``,
      ``redis://HOST:PORT/DB#KEY`` (see the README's "Beyond one machine").
    - ``default``: the value when nothing is stored yet (a fresh deep copy each time, never mutated).
    - ``format``: None/"json" (UTF-8 text, standard JSON only), "pickle" (never for untrusted files), "bson"
      (extra ``lockstore[bson]``), or any object with ``dumps``/``loads`` or ``dump``/``load``; ``is_binary``,
      ``load_kwargs`` and ``dump_kwargs`` as in atomic_store.
    - ``ignore_inner_exits``: nested ``with store:`` blocks commit only at the outermost exit.
    - ``lock``: True for the sidecar ``<path>.lock``; a path for another lock file; a filelock lock instance
      (e.g. ``filelock.SoftFileLock``); False for no lock (atomic_store's behaviour, no transactions).
    - ``timeout``: seconds to wait for the lock (default 30; negative or ``inf`` waits forever, 0 tries once).
    - ``poll_interval``: the longest pause between attempts on a contended lock, where waiting polls.
    - ``durable``: make each write survive a power loss before it returns (files: fsync the temp file and the
      directory; servers: refuse one that does not sync its commits) (default True).
    - ``on_corrupt``: "raise" (CorruptStoreError, the value is never overwritten) or "backup" (move it aside to
      ``<path>.corrupt-<timestamp>``, log a warning, start from ``default``).
    - ``warn_hold``: log a WARNING (logger ``lockstore``) naming the label and pid when a transaction held the lock
      longer than this many seconds (default: never). Every transaction is logged at DEBUG with its wait and hold.
    - server targets also take ``table=`` (PostgreSQL) and ``lease=`` (Redis).

    Raises TypeError/ValueError for bad options (NaN timeouts included), CorruptStoreError, OSError naming the
    path.
    """
    return Store(path, default, format, is_binary, load_kwargs, dump_kwargs, ignore_inner_exits, lock=lock,
                 timeout=timeout, poll_interval=poll_interval, durable=durable, on_corrupt=on_corrupt,
                 warn_hold=warn_hold, **target_options)


_JSON: Final = resolve(None)


def read(
    path: str | os.PathLike[str],
    default: Any = None,
    format: object = None,
    is_binary: bool | None = None,
    load_kwargs: Mapping[str, Any] | None = None,
    **target_options: Any,
) -> Any:
    """Read the value in ``path`` without any lock; ``default`` (a deep copy) when nothing is stored.

    ``path`` may be a server target, with its options (``table=`` for PostgreSQL). Raises CorruptStoreError when
    the value cannot be decoded, OSError naming the path for other failures.
    """
    fmt = _JSON if format is None and is_binary is None and not load_kwargs else resolve(
        format, is_binary=is_binary, load_kwargs=load_kwargs)
    target = os.fspath(path)
    run_deferred()  # what collected Stores left to close (see _owners.DEFERRED)
    if scheme_of(target) is not None or target_options:
        return _read_server(target, default, fmt, target_options)
    try:
        data = read_bytes(target)
    except FileNotFoundError:
        return copy.deepcopy(default)
    try:
        return fmt.decode(data)
    except Exception as exc:
        raise CorruptStoreError(target, f"cannot be decoded as {fmt.name}: {exc}") from exc


def _read_server(target: str, default: Any, fmt: Any, options: dict[str, Any]) -> Any:
    storage = make_storage(target, lock=True, durable=False, poll_interval=DEFAULT_POLL_INTERVAL,
                           timeout=DEFAULT_TIMEOUT, options=options)
    try:
        data = storage.load().data
    finally:
        storage.close()
    if data is None:
        return copy.deepcopy(default)
    try:
        return fmt.decode(data)
    except Exception as exc:
        raise CorruptStoreError(storage.target, f"cannot be decoded as {fmt.name}: {exc}") from exc


__all__ = ["DEFAULT_POLL_INTERVAL", "DEFAULT_TIMEOUT", "Store", "open", "read"]
