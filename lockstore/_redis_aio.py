"""The Redis storage's asyncio half: the same scripts through ``redis.asyncio``, never blocking the event loop.

- One client per event loop and storage, closed when the loop shuts down: it is tied to an async generator that
  the loop knows, and ``loop.shutdown_asyncgens()`` (which ``asyncio.run`` calls) closes it, so no connection is
  left to be collected, with a ResourceWarning, after its loop is gone.
- Tasks of one loop that want one store take turns (an ``asyncio.Lock``, first come first served), then take the
  process's slot (polled: only a thread of this process can hold it meanwhile), then queue in Redis as a sync
  caller does, waiting in BLPOP on the loop.
- The lease is renewed by a task. A cancellation anywhere leaves nothing behind: the transaction's cleanup runs
  ``release`` (shielded), which withdraws the queue entry or unlocks, and gives back the slot and the turn.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio

from . import _redis_scripts as scripts
from ._error import LockReentryError, LockTimeout
from ._owners import at_fork
from ._redis_lease import TOKENS, RedisHeld, Slot, as_bytes

if TYPE_CHECKING:
    from ._backend import Stored
    from ._redis import RedisStorage
    from ._redis_scripts import Script

log = logging.getLogger("lockstore")

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


async def _eval(storage: RedisStorage, script: Script, call: tuple[tuple[str, ...], tuple[Any, ...]],
                doing: str) -> Any:
    c = await client(storage)
    keys, args = call
    try:
        try:
            return await c.evalsha(script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return await c.eval(script.text, len(keys), *keys, *args)
    except redis.RedisError as exc:
        storage.fail(exc, doing)


# ------------------------------------------------------------------------------------------------ the storage steps
async def load(storage: RedisStorage) -> Stored:
    try:
        data = as_bytes(await (await client(storage)).get(storage.key))
    except redis.RedisError as exc:
        storage.fail(exc, "reading")
    return storage.stored(data)


async def acquire(storage: RedisStorage, held: RedisHeld, *, timeout: float, blocking: bool,
                  label: str | None) -> None:
    lease = storage.lease
    start = time.monotonic()
    once = not blocking or timeout == 0
    turn = _turn(lease.slot)
    if turn.owner is held.owner or lease.slot.owner() == held.owner:
        raise LockReentryError(storage.lock_name)  # this task holds it through another Store object
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
            held.task = asyncio.get_running_loop().create_task(_renew(storage, held))
            return
        wait = lease.pause(reply, start, timeout, once)
        if wait is None:
            await release_in_redis(storage, held)
            raise await _timeout(storage, time.monotonic() - start)
        if wait > 0:
            try:
                await (await client(storage)).blpop([lease.wake_key(held)], timeout=wait)
            except redis.RedisError as exc:
                storage.fail(exc, "waiting for the lock")


async def _timeout(storage: RedisStorage, waited: float) -> LockTimeout:
    try:
        value = as_bytes(await (await client(storage)).get(storage.lock_name))
    except (redis.RedisError, OSError):
        value = None
    holder = await asyncio.to_thread(storage.lease.holder_of, value)  # may import psutil
    return LockTimeout(storage.lock_name, waited, path=storage.target, holder=holder)


async def _renew(storage: RedisStorage, held: RedisHeld) -> None:
    lease = storage.lease
    interval = lease.seconds / 3
    delay = interval
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
        ok = await _eval(storage, scripts.SAVE, ((storage.keys.lock, storage.key), (held.token, data)), "committing")
    except ConnectionError as exc:
        raise ConnectionError(f"{exc}; whether the commit was written is unknown") from exc.__cause__
    return storage.saved(held, data, ok)


async def set_aside(storage: RedisStorage, held: RedisHeld) -> str | None:
    return storage.aside(held, await _eval(storage, scripts.ASIDE, storage.aside_call(held), "moving the value aside"))


async def release_in_redis(storage: RedisStorage, held: RedisHeld) -> None:
    if held.sent:
        try:
            await _eval(storage, scripts.RELEASE, storage.lease.release_call(held), "releasing the lock")
        except OSError as exc:  # the lease and the queue entry expire by themselves
            log.debug("lockstore: %s: %s", storage.target, exc)
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

    async def asave(self: Any, held: object, data: bytes) -> object:
        assert isinstance(held, RedisHeld)
        return await save(self, held, data)

    async def aset_aside(self: Any, held: object) -> str | None:
        assert isinstance(held, RedisHeld)
        return await set_aside(self, held)

    async def arelease(self: Any, held: object) -> None:
        assert isinstance(held, RedisHeld)
        await release(self, held)


__all__ = ["AsyncHalf", "close_clients", "give_turn", "stop_renewal"]
