"""Running blocking work from asyncio without blocking the event loop; the file storage's async lock acquisition.

The transaction logic itself is ``_txn.Transaction`` (its ``__aenter__``/``__aexit__``); this module only supplies:

- :func:`in_thread` and :func:`settle`: run a function in a worker thread, or a coroutine, to its end even when the
  calling task is cancelled meanwhile. A thread cannot be stopped: returning early would let the caller release
  the lock while the thread still reads or replaces the file, and another process could write in between.
- :func:`acquire_file`: the file storage's lock from a task. Tasks of one loop that want the same lock file take
  turns on an ``asyncio.Lock`` (``_Turn``), first come first served. The task whose turn it is tries the lock once
  on the loop; if another process (or thread) holds it, it waits in the lock's own blocking wait in a dedicated
  thread, in slices of ``_SLICE`` seconds so that a cancelled task stops waiting promptly. (Polling alone loses
  nearly every race against sync waiters that sit in the kernel's flock queue.) A caller's filelock lock is per
  thread, so it is polled on the loop's thread with ``asyncio.sleep`` backoff instead, as filelock does.

Importing this module imports asyncio; ``import lockstore`` does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ._error import LockReentryError, LockTimeout
from ._sidecar import FIRST_PAUSE, SidecarLock

if TYPE_CHECKING:
    from ._file import FileHeld, FileStorage
    from ._lock import Lock

_T = TypeVar("_T")
#: Longest single blocking wait in a thread: how long a cancelled task may take to notice it was cancelled.
_SLICE: Final = 0.25


async def in_thread(func: Callable[..., _T], *args: Any) -> _T:
    """``asyncio.to_thread(func, *args)`` that, when cancelled, still waits for the thread before re-raising."""
    return await settle(asyncio.to_thread(func, *args))


async def settle(awaitable: Awaitable[_T]) -> _T:
    """Await ``awaitable`` to its end even if the calling task is cancelled meanwhile (then re-raise that)."""
    future = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is what the caller sees
        raise


class _Turn(asyncio.Lock):
    """The tasks of one loop that want one lock file take turns; ``owner`` is the task whose turn it is."""

    owner: object = None


_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Turn]] = weakref.WeakKeyDictionary()


def _turn(lock_file: str) -> _Turn:
    turns = _TURNS.setdefault(asyncio.get_running_loop(), {})
    key = os.path.normcase(os.path.abspath(lock_file))
    turn = turns.get(key)
    if turn is None:
        turn = turns[key] = _Turn()
    return turn


def give_turn(held: FileHeld) -> None:
    """Give this loop's turn back (on the loop's thread; a no-op when none is held)."""
    turn, held.turn = held.turn, None
    if turn is not None:
        turn.owner = None
        turn.release()


async def acquire_file(storage: FileStorage, held: FileHeld, *, timeout: float, blocking: bool,
                       label: str | None) -> None:
    """``FileStorage.acquire`` for a task (see the module docstring); the caller releases on any exception."""
    start = time.monotonic()
    once = not blocking or timeout == 0
    while True:
        lock = storage.lock_to_take()
        held.lock = lock
        held.lock_held = lock.held(held.owner, held.holder and held.holder())
        turn = _turn(lock.lock_file)
        if turn.owner is held.owner:
            raise LockReentryError(lock.lock_file)  # this task holds it through another Store object
        if once and turn.locked():
            raise await _timeout(lock, held, start, 0.0, label)
        try:
            async with asyncio.timeout(None if timeout < 0 else max(0.0, start + timeout - time.monotonic())):
                await turn.acquire()
        except TimeoutError:
            raise await _timeout(lock, held, start, timeout, label) from None
        held.turn = turn
        turn.owner = held.owner
        stale = await _take(lock, held, start, timeout, once, storage.poll_interval, label)
        if await in_thread(storage.settle, held, lock):
            break
        give_turn(held)  # the symlink was switched: take the new file's lock
    await in_thread(storage.swept, held, stale)


async def _take(lock: Lock, held: FileHeld, start: float, timeout: float, once: bool, poll_interval: float,
                label: str | None) -> bool:
    pause = FIRST_PAUSE
    while True:
        if isinstance(lock, SidecarLock):
            stale = lock.acquire_within(held.lock_held, timeout=0.0, poll_interval=poll_interval, label=label,
                                        start=time.monotonic(), blocking=False)
        else:
            try:
                stale = lock.acquire(held.lock_held, timeout=0.0, poll_interval=poll_interval, blocking=False,
                                     label=label)
            except LockTimeout:
                lock.release(held.lock_held)
                stale = None
        if stale is not None:
            return stale
        seconds = -1.0
        if timeout >= 0:
            seconds = start + timeout - time.monotonic()
            if once or seconds <= 0:
                raise await _timeout(lock, held, start, 0.0 if once else timeout, label)
        if isinstance(lock, SidecarLock):
            got = await _wait_in_thread(lock, held, _SLICE if seconds < 0 else min(_SLICE, seconds), poll_interval,
                                        label)
            if got is not None:
                return got
        else:
            await asyncio.sleep(pause if seconds < 0 else min(pause, seconds))
            pause = min(pause * 2, poll_interval)


async def _wait_in_thread(lock: SidecarLock, held: FileHeld, seconds: float, poll_interval: float,
                          label: str | None) -> bool | None:
    """``lock.acquire_within`` for at most ``seconds`` in a dedicated thread (not the default executor, which the
    lock holders need for their file I/O); None on timeout. A cancelled caller still waits for the thread, and
    releases the lock if the thread got it, before the cancellation propagates."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bool | None] = loop.create_future()

    def deliver(result: bool | None, error: BaseException | None) -> None:
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
            result = lock.acquire_within(held.lock_held, timeout=seconds, poll_interval=poll_interval, label=label,
                                         start=time.monotonic(), blocking=True)
        except BaseException as exc:  # handed to the waiting task
            error = exc
        try:
            loop.call_soon_threadsafe(deliver, result, error)
        except RuntimeError:  # the loop is closed: nobody will release what was taken
            lock.release(held.lock_held)

    threading.Thread(target=run, name="lockstore-async-wait", daemon=True).start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        while not done.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([done])
        lock.release(held.lock_held)
        raise


async def _timeout(lock: Lock, held: FileHeld, start: float, timeout: float, label: str | None) -> LockTimeout:
    """The LockTimeout of a wait that gave up; a native lock's leaves its mark in the lock file first, so that it
    is counted even when the process exits at once (its slices never left one)."""

    def give_up() -> LockTimeout:
        if isinstance(lock, SidecarLock):
            lock.mark_aside(held.lock_held, start, timeout, label)
            return lock.timeout_error(time.monotonic() - start, label=label, timeout=timeout,
                                      counted=lock.counted(held.lock_held))
        return lock.timeout_error(time.monotonic() - start)

    return await asyncio.to_thread(give_up)  # reads the lock file and may import psutil


async def aread(path: Any, default: Any = None, **kwargs: Any) -> Any:
    """``await lockstore.aread(path, default=None, format=None, ...)``: :func:`lockstore.read` off the loop."""
    from ._store import read

    return await asyncio.to_thread(read, path, default, **kwargs)


__all__ = ["acquire_file", "aread", "give_turn", "in_thread", "settle"]
