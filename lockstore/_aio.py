"""The asyncio API: ``Store.atransaction()`` and ``aread()``, never blocking the event loop.

A transaction's steps are the same as :meth:`Store.transaction`'s; only where they run differs:

- Waiting, inside this loop: tasks of one loop that want the same lock file take turns on an ``asyncio.Lock``
  (``_Turn``), first come first served, so an in-process hand-over is immediate and costs no polling.
- Waiting for other processes: the task whose turn it is tries ``Lock.try_acquire`` (one attempt that never
  blocks); if another process holds the native lock, it waits in the lock's own blocking wait (``Lock.acquire``,
  which sits in the kernel's flock queue) in a dedicated thread, in slices of ``_SLICE`` seconds so that a cancelled
  task stops waiting promptly. Polling ``try_acquire`` alone loses nearly every race against sync waiters that sit
  in the kernel's queue: with two processes running back-to-back transactions, a polling task waited up to 1.5 s
  for a lock that the sync waiters got within 0.1 ms (now: 5-10 ms). A caller's filelock lock (``lock=SoftFileLock``)
  is per thread, so it is polled on the loop's thread with ``asyncio.sleep`` backoff instead, as filelock does.
- File I/O (sweep, reload, encode, atomic write, the holder record read for a timeout message) runs in a worker
  thread through ``asyncio.to_thread``; the lock is released after that work has finished, even when the task is
  cancelled meanwhile (a write still running in a thread must never outlive the lock).

The holder inside this process is the asyncio task (``owner=``), so two tasks on one thread are told apart (the sync
API's holder is the thread). Importing this module imports asyncio; ``import lockstore`` does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ._error import LockReentryError, LockTimeout, TransactionLockError
from ._lock import FIRST_PAUSE, SidecarLock

if TYPE_CHECKING:
    from ._lock import Lock
    from ._store import Store

_T = TypeVar("_T")
#: Longest single blocking wait in a thread: how long a cancelled task may take to notice it was cancelled.
_SLICE: Final = 0.25


class _Turn(asyncio.Lock):
    """The tasks of one loop that want one lock file take turns (first come, first served); ``owner`` is the task
    whose turn it is, so that it asking again through a second Store object fails at once instead of waiting for
    itself. Taking turns also keeps a caller's filelock lock (``lock=SoftFileLock(...)``) correct: filelock locks are
    reentrant per thread, so two tasks of one thread would otherwise both "acquire" it."""

    owner: object = None


#: Each loop's turns, one per lock file.
_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Turn]] = weakref.WeakKeyDictionary()


def _turn(lock_file: str) -> _Turn:
    turns = _TURNS.setdefault(asyncio.get_running_loop(), {})
    key = os.path.normcase(os.path.abspath(lock_file))
    turn = turns.get(key)
    if turn is None:
        turn = turns[key] = _Turn()
    return turn


def atransaction(
    store: Store, timeout: float | None, *, blocking: bool | None, label: str | None
) -> contextlib.AbstractAsyncContextManager[Store]:
    """``async with store.atransaction(timeout=None, *, blocking=None, label=None) as s:`` (see the module doc).

    Same semantics as :meth:`Store.transaction`: lock, reload, run the block, write atomically if the value changed,
    release; if the block raises, nothing is written, ``store.value`` goes back to the value on disk and the
    exception propagates. A nested ``atransaction`` of the same store in the same task (or inside a
    ``transaction()`` of the same thread) joins the outer one as a savepoint: if the inner block raises, the value
    goes back to what it was when the inner block began. A second Store object on the same file, nested in the same
    task, raises LockReentryError at once.

    Another task waits for the lock like another thread would, so a task must not wait, inside its transaction, for
    a task that opens a transaction on the same file (it would time out). Inside the block, do not call the blocking
    ``store.transaction()`` or ``store.commit()``: they would wait, blocking the loop, for the lock this task holds.
    Raises TransactionLockError, LockTimeout, LockReentryError, CorruptStoreError, SerializationError, OSError, as
    ``transaction()`` does.
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
        savepoint = await _in_thread(store._savepoint)
        try:
            yield store
        except BaseException:
            await _in_thread(store._rollback, savepoint)
            raise
        return
    if lock.held_by_filelock_here():  # a thread-held FileLock cannot be joined from a task
        raise LockReentryError(lock.lock_file)
    wait = store.timeout if timeout is None else float(timeout)
    turn = _turn(lock.lock_file)
    if turn.owner is task:
        raise LockReentryError(lock.lock_file)
    stale = await _acquire(store, lock, task, turn, wait, blocking=True if blocking is None else blocking,
                           label=label)
    try:
        try:
            like = await _in_thread(_begin, store, stale)
            try:
                yield store
            except BaseException:
                await _in_thread(store._reset)
                raise
            await _in_thread(store._finish, like)
        finally:
            lock.release()
    finally:
        turn.owner = None
        turn.release()


async def _acquire(store: Store, lock: Lock, task: object, turn: _Turn, timeout: float, *, blocking: bool,
                   label: str | None) -> bool:
    """Take this loop's turn, then the lock, within ``timeout`` (negative: no limit; 0 or not blocking: one try).

    Returns True when a killed holder's leftovers should be swept. On any failure the turn is given back. Raises
    LockTimeout, LockReentryError (this task holds the lock through another Store object).
    """
    start = time.monotonic()
    once = not blocking or timeout == 0
    if once and turn.locked():
        raise await _timeout(lock, 0.0)
    try:
        async with asyncio.timeout(None if timeout < 0 else timeout):
            await turn.acquire()  # returns at once, without yielding to the loop, when nobody has the turn
    except TimeoutError:
        raise await _timeout(lock, time.monotonic() - start) from None
    turn.owner = task
    try:
        pause = FIRST_PAUSE
        while True:
            stale = lock.try_acquire(store, label=label, owner=task)
            if stale is not None:
                return stale
            seconds = -1.0
            if timeout >= 0:
                seconds = start + timeout - time.monotonic()
                if once or seconds <= 0:
                    raise await _timeout(lock, time.monotonic() - start)
            if isinstance(lock, SidecarLock):
                # Wait in the kernel's queue; slices keep a cancellation prompt.
                got = await _wait_in_thread(store, lock, task, _SLICE if seconds < 0 else min(_SLICE, seconds), label)
                if got is not None:
                    return got
            else:
                # A caller's filelock lock is per thread: it must be taken and released on this (the loop's) thread,
                # so poll it, as filelock itself does.
                await asyncio.sleep(pause if seconds < 0 else min(pause, seconds))
                pause = min(pause * 2, store.poll_interval)
    except BaseException:
        turn.owner = None
        turn.release()
        raise


async def _wait_in_thread(
    store: Store, lock: SidecarLock, task: object, seconds: float, label: str | None
) -> bool | None:
    """``lock.acquire_within`` for at most ``seconds`` in a dedicated thread (not the default executor, which the lock
    holders need for their file I/O); None on timeout. A cancelled caller still waits for the thread, and releases
    the lock if the thread got it, before the cancellation propagates."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bool | None] = loop.create_future()

    def settle(result: bool | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def run() -> None:
        result: bool | None = None
        error: BaseException | None = None
        try:
            result = lock.acquire_within(store, timeout=seconds, poll_interval=store.poll_interval, blocking=True,
                                         label=label, owner=task)
        except BaseException as exc:  # handed to the waiting task
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody will release what was taken
            if result is not None:
                lock.release()

    threading.Thread(target=run, name="lockstore-async-wait", daemon=True).start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        while not done.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([done])
        if not done.cancelled() and done.exception() is None and done.result() is not None:
            lock.release()
        raise


async def _timeout(lock: Lock, waited: float) -> LockTimeout:
    return await asyncio.to_thread(lock.timeout_error, waited)  # reads the lock file and may import psutil


def _begin(store: Store, stale: bool) -> os.stat_result | None:
    """In a worker thread, holding the lock: sweep a killed writer's temp files (as ``Store._locked``), reload."""
    local = store._local
    # The worker thread acts for the task that holds the lock: a corrupt file moved aside by on_corrupt="backup"
    # must not try to take the lock again from this thread.
    local.depth, local.pid = 1, os.getpid()
    try:
        store._sweep(stale)
        return store._refresh()
    finally:
        local.depth = 0


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
