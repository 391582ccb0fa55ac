"""The asyncio API: ``Store.atransaction()`` and ``aread()``, never blocking the event loop.

A transaction's steps are the same as :meth:`Store.transaction`'s; only where they run differs:

- Waiting: the lock is polled with ``Lock.try_acquire`` (one attempt that never blocks) and ``asyncio.sleep``
  between attempts, starting at ``_lock.FIRST_PAUSE`` and doubling up to ``store.poll_interval``, so a hand-over is
  prompt and a long wait costs little CPU. The holder inside this process is the asyncio task, so two tasks on one
  thread are told apart (the sync API's holder is the thread).
- File I/O (sweep, reload, encode, atomic write, and the holder record read for a timeout message) runs in a worker
  thread through ``asyncio.to_thread``; the lock is released on the loop after that work has finished, even when
  the task is cancelled meanwhile (a write still running in a thread must never outlive the lock).

Importing this module imports asyncio; ``import lockstore`` does not.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from . import _atomic
from ._error import LockReentryError, LockTimeout, TransactionLockError
from ._lock import FIRST_PAUSE, SidecarLock

if TYPE_CHECKING:
    from ._lock import Lock
    from ._store import Store

log = logging.getLogger("lockstore")
_T = TypeVar("_T")
_Waiters = collections.deque["asyncio.Future[None]"]
#: Tasks of one loop waiting for one lock file, oldest first. A release by a task of the same loop wakes the oldest at
#: once: polling alone would leave the lock idle for up to ``poll_interval`` at each in-process hand-over (50 tasks
#: on one store spent 6x longer per transaction than one task alone).
_WAITERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Waiters]] = weakref.WeakKeyDictionary()


def _waiters(lock_file: str) -> _Waiters:
    return _WAITERS.setdefault(asyncio.get_running_loop(), {}).setdefault(lock_file, collections.deque())


def _wake_next(lock_file: str) -> None:
    waiters = _WAITERS.get(asyncio.get_running_loop(), {}).get(lock_file)
    while waiters:
        future = waiters.popleft()
        if not future.done():
            future.set_result(None)
            return


def atransaction(
    store: Store, timeout: float | None, *, blocking: bool | None, label: str | None
) -> contextlib.AbstractAsyncContextManager[Store]:
    """``async with store.atransaction(timeout=None, *, blocking=None, label=None) as s:`` (see the module doc).

    Same semantics as :meth:`Store.transaction`: lock, reload, run the block, write atomically if the value changed,
    release; if the block raises, nothing is written, ``store.value`` goes back to the value on disk and the
    exception propagates. A nested ``atransaction`` (or ``transaction``) of the same store in the same task joins the
    outer one. Another task waits for the lock like another thread would, so a task must not wait, inside its
    transaction, for a task that opens a transaction on the same file (it would time out). Inside the block, do not
    call the blocking ``store.transaction()`` or ``store.commit()``: they would wait, blocking the loop, for the lock
    this task holds. Raises TransactionLockError, LockTimeout, LockReentryError, CorruptStoreError,
    SerializationError, OSError, as ``transaction()`` does.
    """
    return _atransaction(store, timeout, blocking=blocking, label=label)


@contextlib.asynccontextmanager
async def _atransaction(
    store: Store, timeout: float | None, *, blocking: bool | None, label: str | None
) -> AsyncIterator[Store]:
    lock = store._lock
    if lock is None:
        raise TransactionLockError(store.path)
    task = asyncio.current_task()
    if lock.held_here(store, task) or store._in_transaction():
        # Nested: a savepoint, as in transaction(). If the inner block raises, the value goes back to what it was
        # when the inner block began, and the outer block decides whether the rest is written.
        savepoint = await _in_thread(_savepoint, store)
        try:
            yield store
        except BaseException:
            await _in_thread(_rollback, store, savepoint)
            raise
        return
    if store._filelock is not None and store._filelock.is_locked:
        raise LockReentryError(lock.lock_file)
    wait = store.timeout if timeout is None else float(timeout)
    stale = await _acquire(store, lock, task, wait, blocking=True if blocking is None else blocking, label=label)
    try:
        like = await _in_thread(_begin, store, stale)
        try:
            yield store
        except BaseException:
            await _in_thread(store._reset)
            raise
        await _in_thread(_finish, store, like)
    finally:
        try:
            lock.release()
        finally:
            _wake_next(lock.lock_file)


async def _acquire(store: Store, lock: Lock, task: object, timeout: float, *, blocking: bool,
                   label: str | None) -> bool:
    """Poll ``try_acquire`` until it succeeds or ``timeout`` passes (negative: never; 0 or not blocking: one try)."""
    start = time.monotonic()
    pause = FIRST_PAUSE
    waiters: _Waiters | None = None
    while True:
        stale = lock.try_acquire(store, label=label, owner=task)
        if stale is not None:
            return stale
        now = time.monotonic()
        if not blocking or 0 <= timeout <= now - start:
            raise await _timeout(store, lock, now - start)
        if waiters is None:
            waiters = _waiters(lock.lock_file)
        # Sleep until a task of this loop releases the lock, or the pause ends (the holder may be another process).
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(woken)
        try:
            await asyncio.wait((woken,), timeout=pause if timeout < 0 else min(pause, max(0.0, start + timeout - now)))
        finally:
            if not woken.done():
                woken.cancel()
                with contextlib.suppress(ValueError):
                    waiters.remove(woken)
        pause = min(pause * 2, store.poll_interval)


async def _timeout(store: Store, lock: Lock, waited: float) -> LockTimeout:
    holder = await asyncio.to_thread(lock.holder)  # reads the lock file and may import psutil
    # Like SidecarLock._timeout: a dead process's record under a held native lock is stale, not the holder.
    stale = isinstance(lock, SidecarLock) and holder is not None and holder.alive is False
    return LockTimeout(lock.lock_file, waited, path=store.path, holder=holder, holder_stale=stale)


def _begin(store: Store, stale: bool) -> os.stat_result | None:
    """In a worker thread, holding the lock: sweep a killed writer's temp files (as ``Store._locked``), reload."""
    local = store._local
    # The worker thread acts for the task that holds the lock: a corrupt file moved aside by on_corrupt="backup"
    # must not try to take the lock again from this thread.
    local.depth, local.pid = 1, os.getpid()
    try:
        if stale or not store._swept:
            removed = _atomic.sweep(store.path)
            store._swept = True
            if removed:
                log.info("lockstore: removed %d temp file(s) left by a killed writer of %s", len(removed), store.path)
        return store._refresh()
    finally:
        local.depth = 0


def _finish(store: Store, like: os.stat_result | None) -> None:
    """In a worker thread, holding the lock: encode once, write only if the value changed (as transaction())."""
    data = store._encode()
    # A missing file reads as ``default``: a block that leaves the default as it was changed nothing.
    if data != (store._disk if store._disk is not None else store._encoded_default()):
        store._write(data, like)


def _savepoint(store: Store) -> bytes | None:
    try:
        return store.format.encode(store.value)
    except Exception:  # unencodable now: a rollback falls back to the value on disk
        return None


def _rollback(store: Store, savepoint: bytes | None) -> None:
    if savepoint is None:
        store._reset()
    else:
        store.value = store.format.decode(savepoint)


async def _in_thread(func: Callable[..., _T], *args: Any) -> _T:
    """``asyncio.to_thread(func, *args)`` that, when cancelled, still waits for the thread before re-raising.

    A thread cannot be stopped: returning early would let the caller release the lock while the thread is still
    reading or replacing the file, and another process could then write in between (a lost update).
    """
    future = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is what the caller sees
        raise


async def aread(path: Any, default: Any = None, **kwargs: Any) -> Any:
    """``await lockstore.aread(path, default=None, format=None, ...)``: :func:`lockstore.read` in a worker thread."""
    from ._store import read

    return await asyncio.to_thread(read, path, default, **kwargs)


__all__ = ["aread", "atransaction"]
