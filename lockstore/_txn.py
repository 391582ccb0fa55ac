"""The transaction logic, once: lock → refresh → the block → write if changed → release, sync and async.

``store.transaction()``, ``store.atransaction()`` and ``store.commit()`` all run a :class:`Transaction`; only
whether its storage steps are awaited differs. The steps themselves (refresh, savepoint, rollback, encode and
compare) are methods of :class:`Core`, the Store's private state, and run the same on both paths.

Rules that hold everywhere (and are tested):

- A Store is used by one transaction at a time: the outermost transaction of an owner (a thread, or an asyncio
  task) holds the Store's own lock (``Core.guard``) from after it took the storage's lock until it released it.
  Another thread's ``commit()`` or ``reload()`` on the same Store waits for it, so no call ever writes or resets
  another thread's uncommitted value. A nested transaction of the same owner joins the outer one as a savepoint.
- Signals: every acquisition is recorded, before it happens, where cleanup finds it (``Ticket`` objects, the
  storage's ``held`` state), and every cleanup is idempotent and retried once if an interrupt cuts it short. A
  transaction whose end never completed (an interrupt at the very start of its ``__exit__``, or its retried end
  cut short again) is released once the object is collected, by the process's next lockstore call
  (:func:`release_abandoned`, itself safe to cut short).
- Fork: a transaction inherited by a forked child is not the child's. Leaving its block in the child writes
  nothing, releases nothing (the lock is the parent's) and raises nothing; the child's value goes back to what was
  stored when the transaction began.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from ._backend import Stored
from ._block import entered_by_with, running
from ._error import CorruptStoreError, DurabilityUnknownError, LockReentryError, LockTimeout, SerializationError
from ._owners import FORKS, OwnerLock, Ticket, at_fork, conflicts, current_owner, generation, run_deferred
from ._savepoint import Savepoint

if TYPE_CHECKING:
    from types import FrameType, TracebackType

    from ._backend import Storage
    from ._formats import Format
    from ._options import OnCorrupt
    from ._store import Store

log = logging.getLogger("lockstore")
T = TypeVar("T")

def _NONE() -> None:
    return None


#: Transactions dropped without their ``__exit__``, waiting to be released by the next lockstore call of this
#: process (see Transaction._arm). A SimpleQueue: its ``put`` is safe inside a weak-reference callback, which may run
#: in the middle of any code, lockstore's own locks held included.
_ABANDONED: queue.SimpleQueue[tuple[Core[Any], object]] = queue.SimpleQueue()


#: Dropped transactions whose release has begun: moved here from _ABANDONED by C code and removed only once
#: released, so that an interrupt in the middle (a burst of signals) leaves the rest to the next call instead of
#: losing it, with the lock held by nobody.
_RELEASING: list[tuple[Core[Any], object]] = []
#: Held by the one thread releasing them (an OwnerLock: a releaser cut short by an interrupt cannot keep it).
_RELEASER = OwnerLock()


def _forget_abandoned() -> None:
    global _ABANDONED
    _ABANDONED = queue.SimpleQueue()  # a child does not release what its parent holds
    _RELEASING.clear()


at_fork(_forget_abandoned)


class _Claim:
    """Lives as long as one release_abandoned() call: what its tickets refer to, so that they count as abandoned
    once the call is gone (see ``_owners.Ticket``)."""

    __slots__ = ("__weakref__",)


def release_abandoned() -> None:
    """Give back what dropped transactions held (nothing is written; the value is left to the next refresh).

    Every step may be cut short by an interrupt: what is not yet released stays in ``_RELEASING`` for the next
    call, each release is idempotent, and the tickets this call takes things over with refer to its claim."""
    if not _RELEASING and _ABANDONED.empty():
        return
    try:
        _RELEASING.extend(iter(_ABANDONED.get_nowait, None))  # moved by C code, none lost in between
    except queue.Empty:
        pass
    claim = _Claim()
    ticket = Ticket(current_owner(), claim)
    try:
        if not _RELEASER.try_take(ticket):
            return  # another thread is releasing them
        while _RELEASING:
            core, held = _RELEASING[0]  # only the releaser removes items; others append at the end
            guard = core.guard.ticket
            if guard is not None and guard.abandoned():
                core.guard.give(guard)
            core.storage.release(held, abandoned=claim)
            del _RELEASING[0]
    finally:
        _RELEASER.give(ticket)


#: The transaction each with statement (its frame and offset) last entered, weakly: when the same statement enters
#: again while the one it entered before is still "in its block", that block was left without its __exit__ (see
#: _block.py), whichever Store it belongs to; one frame runs one statement at a time.
_AT: dict[tuple[int, int], weakref.ref[Transaction[Any]]] = {}


def _entered_here(txn: Transaction[Any], frame: FrameType) -> None:
    key = (id(frame), frame.f_lasti)
    ref = _AT.get(key)
    before = None if ref is None else ref()
    # (A forked child's copy of its parent's transaction is not the child's to end: the generation check.)
    if (before is not None and before is not txn and before.frame is frame and before.entered and before.in_block
            and before.generation == FORKS[0]):
        before.end_dropped()
    _AT[key] = weakref.ref(txn)


def _left_here(txn: Transaction[Any], frame: FrameType) -> None:
    key = (id(frame), txn.entry)
    ref = _AT.get(key)
    if ref is not None and ref() in (txn, None):
        _AT.pop(key, None)


#: What a transaction does: run a block (refresh, write if changed) or write the store's value (``commit()``).
BLOCK: Final = 0
COMMIT: Final = 1
#: The least a transaction holding the lock waits for another thread's step on the same Store (see _guarded).
GUARD_GRACE: Final = 1.0


class Core(Generic[T]):
    """A Store's private state and the steps every transaction path shares."""

    __slots__ = ("_active", "_store", "default", "disk", "format", "guard", "on_corrupt", "poll_interval", "storage",
                 "timeout", "version", "warn_hold", "watches")

    def __init__(self, store: Store[T], storage: Storage, fmt: Format, default: T, *, timeout: float,
                 poll_interval: float, on_corrupt: OnCorrupt, warn_hold: float | None = None) -> None:
        # Weakly: a Store and its Core referring to each other would be a cycle, freed only by the cyclic garbage
        # collector, which would keep every dropped Store's descriptors open until it happens to run.
        self._store = weakref.ref(store)
        self.storage = storage
        self.format = fmt
        self.default = default
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.on_corrupt = on_corrupt
        self.warn_hold = warn_hold  # seconds: a WARNING for a transaction that held the lock longer (None: never)
        self.disk: bytes | None = None  # what is stored, as last read or written by this Store
        self.version: object = None
        self.guard = OwnerLock()
        # The outermost transaction holding the Store now, weakly: a transaction dropped without its __exit__ (an
        # interrupt at its very start) must be collectable, so that its watch gives everything back.
        self._active: Callable[[], Transaction[T] | None] = _NONE
        self.watches: set[weakref.ref[Transaction[T]]] = set()  # see Transaction._arm

    @property
    def store(self) -> Store[T]:
        store = self._store()
        if store is None:  # pragma: no cover - a transaction keeps its Store alive through its caller
            raise ReferenceError("the Store was garbage-collected")
        return store

    # ----------------------------------------------------------------------------------------- values
    def fresh_default(self) -> T:
        return copy.deepcopy(self.default)

    def decode(self, data: bytes) -> Any:
        try:
            return self.format.decode(data)
        except Exception as exc:
            raise CorruptStoreError(self.storage.target, f"cannot be decoded as {self.format.name}: {exc}") from exc

    def encode(self, value: Any) -> bytes:
        try:
            return self.format.encode(value)
        except Exception as exc:
            raise SerializationError(self.storage.target, f"cannot encode {type(value).__name__} as "
                                                          f"{self.format.name}: {exc}") from exc

    def encoded(self, value: Any) -> bytes | None:
        """``value`` encoded, or None when it cannot be (then it never compares equal to stored bytes)."""
        try:
            return self.format.encode(value)
        except Exception:
            return None

    def baseline(self) -> bytes | None:
        """The bytes a value must differ from to be worth writing: what is stored, or the default's encoding."""
        return self.disk if self.disk is not None else self.encoded(self.default)

    def stored_value(self) -> Any:
        """A new value equal to what is stored (the default when nothing is)."""
        return self.fresh_default() if self.disk is None else self.decode(self.disk)

    def restore(self, value: Any) -> None:
        """Make ``value`` the store's value, in place for a dict or list, so that references the caller took to
        ``store.value`` keep reaching the value that will be written."""
        store = self.store
        current: Any = store.value
        if type(current) is dict and type(value) is dict:
            current.clear()
            current.update(value)
        elif type(current) is list and type(value) is list:
            current[:] = value
        else:
            store.value = value

    def accept(self, stored: Stored) -> Any:
        """Remember what was read and return its value; CorruptStoreError when it does not decode."""
        value = self.fresh_default() if stored.data is None else self.decode(stored.data)
        self.disk, self.version = stored.data, stored.version
        return value

    # ----------------------------------------------------------------------------------------- ownership
    @property
    def active(self) -> Transaction[T] | None:
        return self._active()

    @active.setter
    def active(self, txn: Transaction[T] | None) -> None:
        self._active = _NONE if txn is None else weakref.ref(txn)

    def mine(self, owner: object) -> Transaction[T] | None:
        """The outermost transaction of ``owner`` (or of this thread, for a task running on it) on this Store."""
        txn = self._active()
        if txn is None or txn.done or txn.generation != generation():
            return None
        if txn.owner == owner or txn.owner == threading.get_ident():
            if not (txn.entered and txn.in_block):
                # Called inside that transaction's own __enter__ or __exit__ (a signal handler, a format's hook):
                # joined, its changes would be overwritten by the refresh or come after the write decision.
                raise LockReentryError(self.storage.lock_name or self.storage.target,
                                       "a transaction of this Store is being entered or left by this thread (a "
                                       "signal handler or a format hook ran in the middle of it); its lock cannot "
                                       "be joined there, and waiting for it would never end")
            frame = txn.frame
            if frame is not None and not running(frame, txn.entry):
                txn.end_dropped()  # its with statement was left without running __exit__ (see _block.py)
                return None
            return txn
        return None

    def take_guard(self, ticket: Ticket, timeout: float) -> None:
        """Wait (up to ``timeout``) until no other owner's transaction uses this Store."""
        other = self.guard.owner()
        if other is not None and conflicts(other, ticket.owner):
            # This very thread (a signal handler inside its reload()) or this event loop's task: it would wait for
            # itself.
            raise LockReentryError(self.storage.lock_name or self.storage.target)
        if not self.guard.take(ticket, timeout):
            raise LockTimeout(self.storage.lock_name or self.storage.target, timeout, path=self.storage.target,
                              holder=None, hint="", blocked_by=(
                                  "another thread of this process was using this Store (its transaction, reload() "
                                  "or commit()) for the whole wait"))


class Transaction(Generic[T]):
    """One transaction (or one ``commit()``) of one Store, by one owner; a sync and async context manager."""

    __slots__ = ("__weakref__", "acquired", "begun", "blocking", "core", "done", "entered", "entry", "frame",
                 "generation", "guard_ticket", "held", "in_block", "kind", "label", "outer", "owner", "savepoint",
                 "store", "timeout", "watch")

    def __init__(self, core: Core[T], timeout: float, *, blocking: bool, label: str | None, kind: int = BLOCK) -> None:
        self.core = core
        # Strongly: ``with lockstore.open(path).transaction() as s`` keeps no other reference to its Store.
        self.store = core.store
        self.timeout = timeout
        self.blocking = blocking
        self.label = label
        self.kind = kind
        self.owner: object = None
        self.generation = -1
        self.held: object = None
        self.guard_ticket: Ticket | None = None
        self.outer: Transaction[T] | None = None
        self.savepoint: Savepoint | None = None
        self.done = False
        self.watch: weakref.ref[Transaction[T]] | None = None
        self.begun = 0.0  # monotonic: when the outermost __enter__ began, and when it held the lock (0.0: not yet)
        self.acquired = 0.0
        self.entered = False  # between __enter__ and __exit__
        self.in_block = False  # __enter__ has completed (a signal handler's transaction may run inside it)
        # The frame whose with statement entered the outermost transaction, and its offset there: whether that
        # block still runs (see _block.py). None for an asyncio transaction or before entering.
        self.frame: FrameType | None = None
        self.entry = -1

    # ----------------------------------------------------------------------------------------- shared steps
    def _join(self, outer: Transaction[T]) -> Store[T]:
        """A nested transaction: a savepoint of the outer one."""
        store = self.store
        self.savepoint = Savepoint(store.value)
        self.outer = outer
        return store

    def _leave_nested(self, failed: bool) -> None:
        if failed and self.savepoint is not None:
            self.store.value = self.savepoint.restore()

    def _guarded(self) -> None:
        """Holding the storage's lock: take the Store. Another thread can have it now only for a bounded step that
        waits for no lock (its ``reload()``, or the end of its own transaction's release), so even a short timeout
        waits for that step, up to ``GUARD_GRACE``: a transaction that got the lock does not fail because of it."""
        core = self.core
        ticket = self.guard_ticket = Ticket(self.owner, self)
        timeout = self.timeout
        core.take_guard(ticket, timeout if timeout < 0 or timeout >= GUARD_GRACE else GUARD_GRACE)
        core.active = self

    def _refreshed(self, stored: Stored | None) -> CorruptStoreError | None:
        """Make the store's value what is stored; the decoding error when it must be set aside (``backup``)."""
        core = self.core
        store = self.store
        if stored is None:
            # Unchanged since this Store last read or wrote it: re-parse only if the caller changed the value since.
            baseline = core.baseline()
            if baseline is None or core.encoded(store.value) != baseline:
                core.restore(core.stored_value())
            return None
        try:
            store.value = core.accept(stored)
        except CorruptStoreError as exc:
            if core.on_corrupt == "raise":
                raise
            return exc
        return None

    def _set_aside_done(self, aside: str | None, error: CorruptStoreError) -> None:
        if aside is None:
            raise error  # this storage cannot move a value aside: never overwrite it
        core = self.core
        core.disk, core.version = None, None
        self.store.value = core.fresh_default()
        log.warning("lockstore: %s could not be decoded; moved it aside to %s and started from the default",
                    core.storage.target, aside)

    def _to_write(self) -> bytes | None:
        """The bytes to write at the end, or None when a transaction's value did not change."""
        core = self.core
        data = core.encode(self.store.value)
        if self.kind == BLOCK and data == core.baseline():
            return None
        return data

    def _written(self, data: bytes, version: object) -> None:
        core = self.core
        core.disk, core.version = data, version

    def _rollback(self) -> None:
        """The value goes back to what is stored (the block failed, or its write did); a failed ``commit()`` leaves
        the caller's value alone."""
        if self.kind == BLOCK:
            core = self.core
            core.restore(core.stored_value())

    def _forked_exit(self) -> None:
        """Leaving, in a forked child, a transaction the parent opened: nothing to write or release."""
        self.done = True
        core = self.core
        try:
            core.restore(core.stored_value())
        except CorruptStoreError:
            pass

    def _release(self) -> None:
        """Let go of the storage's lock, then of the Store (the storage's release still uses the Store's
        descriptors, which another thread may use once it has the Store); idempotent."""
        core = self.core
        self.done = True
        try:
            if self.held is not None:
                core.storage.release(self.held)
        finally:
            if core.active is self:
                core.active = None
            ticket = self.guard_ticket
            if ticket is not None:
                core.guard.give(ticket)

    def _end(self) -> None:
        """Release (idempotent) and disarm. Callers retry a call cut short, even at its very start:
        ``try: self._end() except BaseException: self._end(); raise``."""
        self._release()
        frame = self.frame
        if frame is not None:
            _left_here(self, frame)
        self.frame = None  # a frame and this object may refer to each other (``t = store.transaction(); with t:``)
        self._disarm()
        self._log()

    def end_dropped(self) -> None:
        """End a transaction whose ``with`` statement was left without running ``__exit__`` (an interrupt at its
        very first instruction): nothing is written; what it held is released. Called by its own owner only."""
        self.entered = False
        try:
            self._end()
        except BaseException:
            self._end()  # an interrupt cut the first call short
            raise

    def _log(self) -> None:
        """For pipelines: DEBUG per transaction, WARNING when it held the lock longer than ``warn_hold``."""
        acquired = self.acquired
        if not acquired:
            return
        self.acquired = 0.0  # logged once, even if the end is retried
        core = self.core
        limit = core.warn_hold
        debug = log.isEnabledFor(logging.DEBUG)
        if limit is None and not debug:
            return
        held = time.monotonic() - acquired
        if debug:
            log.debug("lockstore: %s: waited %.6f s, held %.6f s, label %s", core.storage.target,
                      acquired - self.begun, held, self.label)
        if limit is not None and held > limit:
            log.warning("lockstore: %s: a transaction held the lock for %.3f s (warn_hold=%g s): label %s, pid %d",
                        core.storage.target, held, limit, self.label, os.getpid())

    def _arm(self) -> None:
        """Give everything back if this object is dropped while it holds something (see the module docstring).

        The weak reference is kept by the Store, never by this object: the garbage collector does not call the
        callback of a weak reference that is itself part of the garbage.
        """
        # The callback is C code (SimpleQueue.put, given the weak reference as its ignored ``block`` argument): no
        # Python frame whose start a signal handler's exception could cut short, and no lock taken inside whatever
        # code the collector interrupts.
        self.watch = weakref.ref(self, functools.partial(_ABANDONED.put, (self.core, self.held)))
        self.core.watches.add(self.watch)  # dropped again by _disarm, or (dead) by the next _arm

    def _disarm(self) -> None:
        # Dropped, not only discarded: a weak reference still alive when this object dies would call back.
        self.core.watches.discard(self.watch)
        self.watch = None

    def _begin(self) -> None:
        """Before taking anything: release what dropped transactions left, and forget their watches."""
        if _RELEASING or not _ABANDONED.empty():
            release_abandoned()
        run_deferred()
        watches = self.core.watches
        if watches and len(watches) > 4:
            # Over a copy made by one C call: other threads of this Store add and discard their watches meanwhile.
            for watch in [w for w in watches.copy() if w() is None]:
                watches.discard(watch)

    # ----------------------------------------------------------------------------------------- sync
    def _once(self) -> None:
        """A transaction object may be used again once its block has ended (each use is a new transaction), but
        not entered while its block runs."""
        if self.entered:
            raise RuntimeError("this transaction object's block is still running: call store.transaction() for a "
                               "nested one")
        self.entered = True
        self.generation = -1
        self.held = None
        self.guard_ticket = None
        self.outer = None
        self.savepoint = None
        self.done = False
        self.acquired = 0.0
        self.frame = None
        self.in_block = False

    def __enter__(self) -> Store[T]:
        self._once()
        core = self.core
        owner = current_owner()
        outer = core.mine(owner)
        if outer is not None:
            return self._join(outer)
        frame = sys._getframe(1)
        if entered_by_with(frame):
            self.frame, self.entry = frame, frame.f_lasti
            _entered_here(self, frame)
        self.owner = owner
        self.generation = generation()
        storage = core.storage
        self._begin()
        try:
            self.held = storage.held(owner, self)
            self._arm()
            self.begun = time.monotonic()
            storage.acquire(self.held, timeout=self.timeout, blocking=self.blocking, label=self.label)
            self.acquired = time.monotonic()
            self._guarded()
            if self.kind == BLOCK:
                corrupt = self._refreshed(storage.fetch(self.held, core.version))
                if corrupt is not None:
                    self._set_aside_done(storage.set_aside(self.held), corrupt)
        except BaseException:
            self.entered = False
            try:
                self._end()
            except BaseException:
                self._end()  # an interrupt cut the first call short
                raise
            raise
        self.in_block = True  # no call between this and the return: no signal handler runs in between
        return self.store

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.entered = False
        if self.outer is not None:
            self._leave_nested(exc_type is not None)
            return
        # Checked without a call: a child must never release its parent's lock, whatever interrupts it here.
        if self.generation != FORKS[0]:
            self._forked_exit()
            return
        try:
            if exc_type is not None:
                self._rollback()
                return
            data = self._to_write()
            if data is not None:
                try:
                    self._written(data, self.core.storage.save(self.held, data, last=True))
                except DurabilityUnknownError:
                    self._written(data, None)  # in place; only its durability is unknown
                    raise
        except DurabilityUnknownError:
            raise
        except BaseException:
            self._rollback()
            raise
        finally:
            try:
                self._end()
            except BaseException:
                self._end()  # an interrupt cut the first call short
                raise

    # ----------------------------------------------------------------------------------------- async
    async def __aenter__(self) -> Store[T]:
        from ._aio import in_thread, settle

        self._once()
        core = self.core
        owner = current_owner()
        outer = core.mine(owner)
        if outer is not None:
            return self._join(outer)
        self.owner = owner
        self.generation = generation()
        storage = core.storage
        self._begin()
        try:
            self.held = storage.held(owner, self)
            self._arm()
            self.begun = time.monotonic()
            await storage.aacquire(self.held, timeout=self.timeout, blocking=self.blocking, label=self.label)
            self.acquired = time.monotonic()
            await in_thread(self._guarded)
            if self.kind == BLOCK:
                corrupt = await in_thread(self._refreshed, await storage.afetch(self.held, core.version))
                if corrupt is not None:
                    self._set_aside_done(await storage.aset_aside(self.held), corrupt)
        except BaseException:
            self.entered = False
            await settle(self._aend())
            raise
        self.in_block = True
        return self.store

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        from ._aio import in_thread, settle

        self.entered = False
        if self.outer is not None:
            self._leave_nested(exc_type is not None)
            return
        if self.generation != FORKS[0]:
            self._forked_exit()
            return
        wrote = False
        try:
            if exc_type is not None:
                await in_thread(self._rollback)
                return
            data = await in_thread(self._to_write)
            if data is not None:
                try:
                    self._written(data, await self.core.storage.asave(self.held, data, last=True))
                    wrote = True
                except DurabilityUnknownError:
                    self._written(data, None)
                    raise
        except DurabilityUnknownError:
            raise
        except BaseException:
            if not wrote:  # a cancellation that comes after the write keeps the written value
                await in_thread(self._rollback)
            raise
        finally:
            await settle(self._aend())

    async def _aend(self) -> None:
        core = self.core
        self.done = True
        try:
            if self.held is not None:
                await core.storage.arelease(self.held)
        finally:
            if core.active is self:
                core.active = None
            ticket = self.guard_ticket
            if ticket is not None:
                core.guard.give(ticket)
        self._disarm()
        self._log()


__all__ = ["BLOCK", "COMMIT", "Core", "Transaction"]
