"""The Redis storage's asyncio half: the same scripts through ``redis.asyncio``, never blocking the event loop.

- One client per event loop and storage, closed when the loop shuts down: it is tied to an async generator that
  the loop knows, and ``loop.shutdown_asyncgens()`` (which ``asyncio.run`` calls) closes it, so no connection is
  left to be collected, with a ResourceWarning, after its loop is gone.
- Tasks of one loop that want one store take turns (an ``asyncio.Lock``, first come first served), then take the
  process's slot (polled: only a thread of this process can hold it meanwhile), then queue in Redis as a sync
  caller does, waiting in BLPOP (for the grant) on the loop.
- The lease is renewed by a task. A cancellation anywhere leaves nothing behind: the transaction's cleanup runs
  ``release`` (shielded), which withdraws the queue entry or unlocks, and gives back the slot and the turn.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import redis
import redis.asyncio

from . import _redis_scripts as scripts
from ._error import LockReentryError, LockTimeout
from ._owners import at_fork
from ._redis_lease import REDIS_HINT, TOKENS, Call, RedisHeld, Slot, as_bytes

if TYPE_CHECKING:
    from ._backend import Stored
    from ._redis import RedisStorage
    from ._redis_scripts import Script

_T = TypeVar("_T")
_WITH_CLIENTS: weakref.WeakSet[RedisStorage] = weakref.WeakSet()
#: Clients of a parent's loops, found in a child after fork: kept, never closed (their sockets are the parent's).
_INHERITED: list[Any] = []
_CLOSING: set[asyncio.Future[Any]] = set()
#: Longest pause between two looks at the process's slot while one of its threads holds the store.
_SLOT_POLL = 0.05


class _Turn(asyncio.Lock):
    """The tasks of one loop that want one store take turns; ``owner`` is the task whose turn it is."""

    owner: object = None
    loop: asyncio.AbstractEventLoop | None = None


_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, weakref.WeakKeyDictionary[Slot, _Turn]] = (
    weakref.WeakKeyDictionary())


def _turn(slot: Slot) -> _Turn:
    loop = asyncio.get_running_loop()
    turns = _TURNS.setdefault(loop, weakref.WeakKeyDictionary())
    turn = turns.get(slot)
    if turn is None:
        turn = turns[slot] = _Turn()
        turn.loop = loop
    return turn


def _on_loop(loop: asyncio.AbstractEventLoop | None, func: Any) -> None:
    """Call ``func`` now if ``loop`` runs on this thread, else hand it to the loop."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if loop is None or running is loop:
        func()
    elif not loop.is_closed():
        loop.call_soon_threadsafe(func)


def give_turn(held: RedisHeld) -> None:
    turn, held.turn = held.turn, None
    if turn is not None:
        turn.owner = None
        _on_loop(turn.loop, turn.release)


def stop_renewal(held: RedisHeld) -> None:
    task, held.task = held.task, None
    if task is not None and not task.done():
        _on_loop(task.get_loop(), task.cancel)


# ------------------------------------------------------------------------------------------------ clients
async def _keeper(storage: RedisStorage, loop: asyncio.AbstractEventLoop,
                  entry: list[Any]) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        if storage.aio.get(loop) is entry:
            del storage.aio[loop]
        await entry[0].aclose()


async def client(storage: RedisStorage) -> redis.asyncio.Redis:
    loop = asyncio.get_running_loop()
    entry = storage.aio.get(loop)
    if entry is None:
        entry = [storage.async_client()]
        keeper = _keeper(storage, loop, entry)
        await keeper.asend(None)  # now the loop knows it: its shutdown closes the client
        entry.append(keeper)
        storage.aio[loop] = entry
        _WITH_CLIENTS.add(storage)
    c: redis.asyncio.Redis = entry[0]
    return c


def close_clients(storage: RedisStorage) -> None:
    """Close the storage's asyncio clients whose loops still run (a closed loop's were closed at its shutdown)."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    for loop, entry in list(storage.aio.items()):
        del storage.aio[loop]
        keeper = entry[1]
        if loop.is_closed():
            continue
        if running is not None and loop is running:
            task = loop.create_task(keeper.aclose())
            _CLOSING.add(task)
            task.add_done_callback(_CLOSING.discard)
        elif loop.is_running():
            asyncio.run_coroutine_threadsafe(keeper.aclose(), loop)
        # else: a loop that does not run now closes it at its shutdown


def _after_fork() -> None:
    for storage in list(_WITH_CLIENTS):
        _INHERITED.append(list(storage.aio.values()))
        storage.aio.clear()
    _WITH_CLIENTS.clear()


at_fork(_after_fork)


async def _call(storage: RedisStorage, func: Callable[[redis.asyncio.Redis], Awaitable[_T]], doing: str, *,
                retry: bool = True) -> _T:
    """``RedisStorage.call`` for the asyncio client."""
    from ._redis import RETRY_PAUSES

    c = await client(storage)
    for pause in (*RETRY_PAUSES, None) if retry else (None,):
        try:
            return await func(c)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if pause is None or isinstance(exc, redis.AuthenticationError):
                storage.fail(exc, doing)
            await asyncio.sleep(pause)
        except redis.RedisError as exc:
            storage.fail(exc, doing)
    raise AssertionError("unreachable")  # pragma: no cover


async def _eval(storage: RedisStorage, script: Script, call: Call,
                doing: str, *, retry: bool = True) -> Any:
    keys, args = call

    async def run(c: redis.asyncio.Redis) -> Any:
        try:
            return await c.evalsha(script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return await c.eval(script.text, len(keys), *keys, *args)

    return await _call(storage, run, doing, retry=retry)


# ------------------------------------------------------------------------------------------------ the storage steps
async def load(storage: RedisStorage) -> Stored:
    return storage.stored(as_bytes(await _call(storage, lambda c: c.get(storage.key), "reading")))


async def acquire(storage: RedisStorage, held: RedisHeld, *, timeout: float, blocking: bool,
                  label: str | None) -> None:
    lease = storage.lease
    start = time.monotonic()
    once = not blocking or timeout == 0
    turn = _turn(lease.slot)
    holder = lease.slot.owner()
    if (turn.owner is not None and turn.owner is held.owner) or (
            holder is not None and (holder == held.owner or holder == threading.get_ident())):
        # this task holds it through another Store object, or this thread's transaction runs this loop
        raise LockReentryError(storage.lock_name)
    if once and turn.locked():
        raise await _timeout(storage, 0.0)
    try:
        async with asyncio.timeout(None if timeout < 0 else start + timeout - time.monotonic()):
            await turn.acquire()
            held.turn = turn  # no await in between: a cancellation cannot fall between taking and recording
            turn.owner = held.owner
    except TimeoutError:
        raise await _timeout(storage, time.monotonic() - start) from None
    pause = 0.0005
    while not lease.slot.take(held.ticket, 0.0):  # a thread of this process holds the store
        remaining = start + timeout - time.monotonic()
        if once or (timeout >= 0 and remaining <= 0):
            raise await _timeout(storage, time.monotonic() - start)
        await asyncio.sleep(pause if timeout < 0 else min(pause, remaining))
        pause = min(pause * 2, _SLOT_POLL)
    call = lease.acquire_call(held, label, once)
    while True:
        held.sent = True
        reply = await _eval(storage, scripts.ACQUIRE, call, "taking the lock")
        if lease.got(held, reply):
            break
        wait = lease.pause(reply, start, timeout, once)
        if wait is None:
            await release_in_redis(storage, held)
            raise await _timeout(storage, time.monotonic() - start)
        if wait > 0:
            popped = await _call(storage, _blpop(lease.wake_key(held), wait), "waiting for the lock")
            grant = lease.granted(held, popped)
            if grant is not None and lease.got(held, grant):
                reply = grant
                break
    held.task = asyncio.get_running_loop().create_task(_renew(storage, held, lease.first_renewal(reply)))


def _blpop(key: str, timeout: float) -> Callable[[redis.asyncio.Redis], Awaitable[Any]]:
    async def pop(c: redis.asyncio.Redis) -> Any:
        return await c.blpop([key], timeout=timeout)

    return pop


async def _timeout(storage: RedisStorage, waited: float) -> LockTimeout:
    try:
        value = as_bytes(await (await client(storage)).get(storage.lock_name))
    except (redis.RedisError, OSError):
        value = None
    holder = await asyncio.to_thread(storage.lease.holder_of, value)  # may import psutil
    return LockTimeout(storage.lock_name, waited, path=storage.target, holder=holder, hint=REDIS_HINT)


async def _renew(storage: RedisStorage, held: RedisHeld, first: float) -> None:
    lease = storage.lease
    interval = lease.seconds / 3
    delay = first
    while True:
        await asyncio.sleep(delay)
        try:
            async with asyncio.timeout(interval):
                ok = await _eval(storage, scripts.RENEW, ((lease.keys.lock,), (held.token, lease.ms)),
                                 "renewing the lease")
        except OSError:  # TimeoutError included: unreachable, try again soon while the lease may still be saved
            delay = min(interval / 4, 1.0)
            continue
        if not ok:
            held.lost = "a renewal found the lease gone"
            return
        delay = interval


async def fetch(storage: RedisStorage, held: RedisHeld, known: object) -> Stored | None:
    reply = storage.lease.prefetched(held, known) or await _eval(storage, scripts.FETCH,
                                                                 storage.fetch_call(held, known), "reading")
    return storage.fetched(held, known, reply)


async def save(storage: RedisStorage, held: RedisHeld, data: bytes) -> object:
    storage.lease.check(held, storage.target)
    try:
        ok = await _eval(storage, scripts.SAVE, ((storage.keys.lock, storage.key), (held.token, data)), "committing",
                         retry=False)
    except ConnectionError as exc:
        raise ConnectionError(f"{exc}; whether the commit was written is unknown") from exc.__cause__
    return storage.saved(held, data, ok)


async def save_last(storage: RedisStorage, held: RedisHeld, data: bytes) -> object:
    storage.lease.check(held, storage.target)
    storage.stop_renewing(held)
    stop_renewal(held)
    try:
        ok = await _eval(storage, scripts.SAVE_RELEASE, storage.lease.save_release_call(held, data), "committing",
                         retry=False)
    except ConnectionError as exc:
        raise ConnectionError(f"{exc}; whether the commit was written is unknown") from exc.__cause__
    version = storage.saved(held, data, ok)
    held.sent = False  # released by the same script
    return version


async def set_aside(storage: RedisStorage, held: RedisHeld) -> str | None:
    reply = await _eval(storage, scripts.ASIDE, storage.aside_call(held), "moving the value aside", retry=False)
    return storage.aside(held, reply)


async def release_in_redis(storage: RedisStorage, held: RedisHeld) -> None:
    if held.sent:
        try:
            await _eval(storage, scripts.RELEASE, storage.lease.release_call(held), "releasing the lock")
        except OSError as exc:  # never an error: tried again in the background
            storage.release_failed(held, exc)
        held.sent = False


async def release(storage: RedisStorage, held: RedisHeld) -> None:
    if held.inherited():
        return
    stop_renewal(held)
    TOKENS.pop(held.token, None)
    try:
        await release_in_redis(storage, held)
    finally:
        storage.lease.slot.give(held.ticket)
        give_turn(held)


class AsyncHalf:
    """The asyncio half of ``RedisStorage`` (see ``_backend.Storage``): the same steps, awaited."""

    async def aload(self: Any) -> Stored:
        return await load(self)

    async def aacquire(self: Any, held: object, *, timeout: float, blocking: bool, label: str | None) -> None:
        assert isinstance(held, RedisHeld)
        await acquire(self, held, timeout=timeout, blocking=blocking, label=label)

    async def afetch(self: Any, held: object, known: object) -> Stored | None:
        assert isinstance(held, RedisHeld)
        return await fetch(self, held, known)

    async def asave(self: Any, held: object, data: bytes, *, last: bool = False) -> object:
        assert isinstance(held, RedisHeld)
        if last:
            return await save_last(self, held, data)
        return await save(self, held, data)

    async def asave_last(self: Any, held: object, data: bytes) -> object:
        """``save_last`` (see ``RedisStorage.save_last``), awaited."""
        assert isinstance(held, RedisHeld)
        return await save_last(self, held, data)

    async def aset_aside(self: Any, held: object) -> str | None:
        assert isinstance(held, RedisHeld)
        return await set_aside(self, held)

    async def arelease(self: Any, held: object) -> None:
        assert isinstance(held, RedisHeld)
        await release(self, held)


__all__ = ["AsyncHalf", "close_clients", "give_turn", "stop_renewal"]
