"""The PostgreSQL storage's asyncio half: the same steps (``_pg_row``) on AsyncConnections, never blocking the loop.

- One ``AsyncConnection`` per Store and event loop for transactions, and a second for lock-free reads while a
  transaction holds the first; a loop closed without closing the Store has its sessions closed at the Store's next
  asyncio call (or by ``close()``).
- Tasks of one loop that want one row take turns (an ``asyncio.Lock`` per row and loop, first come first served),
  then take the process's slot for the row (an ``OwnerLock`` shared with this process's threads) from a helper
  thread, in slices of at most ``_SLICE``, so a cancelled task notices soon.
- An asyncio transaction dropped without ``__aexit__`` (an interrupt) is released from synchronous code by
  :func:`release_here`: its connection is closed (the server rolls back) and its turns given back.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Final, TypeVar

import psycopg
from psycopg import pq

from ._error import LockReentryError, LockTimeout
from ._pg_holder import PG_HINT
from ._pg_io import ENDS, Steps, usable
from ._pg_row import PgHeld, PgRow, time_left

if TYPE_CHECKING:
    from ._backend import Stored
    from ._owners import OwnerLock

_T = TypeVar("_T")

#: Longest blocking wait of an asyncio task in a helper thread (for this process's other threads): how long a
#: cancelled task may take to notice.
_SLICE: Final = 0.25


class Turn(asyncio.Lock):
    """The tasks of one event loop that want one row take turns; ``owner`` is the task whose turn it is."""

    owner: object = None


_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[object, ...], Turn]] = (
    weakref.WeakKeyDictionary())


def _turn(identity: tuple[object, ...]) -> Turn:
    for loop in [loop for loop in _TURNS if loop.is_closed()]:  # a waiting turn keeps its loop alive: let it go
        del _TURNS[loop]
    turns = _TURNS.setdefault(asyncio.get_running_loop(), {})
    turn = turns.get(identity)
    if turn is None:
        turn = turns[identity] = Turn()
    return turn


def forget_turns() -> None:
    """In a forked child: the parent's loops and their turns are not the child's."""
    _TURNS.clear()


class LoopState:
    """A Store's asyncio connections on one event loop: one for transactions, one for lock-free reads during one."""

    __slots__ = ("conn", "loop", "read", "read_lock", "tx_lock", "tx_owner")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = weakref.ref(loop)
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.read: psycopg.AsyncConnection[Any] | None = None
        self.tx_lock = asyncio.Lock()  # who uses ``conn``: a transaction, or a short lock-free read
        self.tx_owner: object = None
        self.read_lock = asyncio.Lock()

    def gone(self) -> bool:
        loop = self.loop()
        return loop is None or loop.is_closed()

    def finish(self) -> None:
        """Close both connections from any thread (a closed loop cannot run their coroutines any more)."""
        for conn in (self.conn, self.read):
            if conn is not None:
                try:
                    conn.pgconn.finish()
                except Exception:
                    pass
        self.conn = self.read = None


def _give_turns(held: PgHeld) -> None:
    """Give back the asyncio locks ``held`` holds: its Store's connection on this loop, and the loop's turn."""
    state = held.state
    if state is not None and state.tx_owner is held:
        state.tx_owner = None
        try:
            state.tx_lock.release()
        except RuntimeError:
            pass
    turn, held.turn = held.turn, None
    if turn is not None:
        turn.owner = None
        try:
            turn.release()
        except RuntimeError:
            pass


def release_here(held: PgHeld) -> None:
    """An asyncio transaction dropped without ``__aexit__`` (an interrupt): no coroutine can run from here, so
    its connection is closed (the server rolls back) and its turns given back."""
    conn, held.conn = held.conn, None
    try:
        conn.pgconn.finish()
    except Exception:
        pass
    _give_turns(held)


class AsyncHalf(PgRow):
    """The asyncio half of ``PgStorage`` (see ``_backend.Storage``): the same steps, awaited."""

    # Set by PgStorage: this row's slot in this process, and this Store's connections per event loop.
    _slot: OwnerLock
    _loops: dict[int, LoopState]

    def _check_fork(self) -> None:
        """In a forked child: drop the parent's sessions (PgStorage's)."""
        raise NotImplementedError

    def _loop_state(self) -> LoopState:
        self._check_fork()
        loop = asyncio.get_running_loop()
        for key, state in list(self._loops.items()):
            if state.gone():  # a loop closed without closing this Store: its sessions are closed now
                del self._loops[key]
                state.finish()
        found = self._loops.get(id(loop))
        if found is None or found.loop() is not loop:
            found = self._loops[id(loop)] = LoopState(loop)
        return found

    async def _aconnection(self, state: LoopState) -> psycopg.AsyncConnection[Any]:
        conn = state.conn
        if conn is None or not usable(conn):
            if conn is not None:
                conn.pgconn.finish()
            conn = state.conn = await self._anew_connection()
        return conn

    async def _areading(self, steps: Steps[_T]) -> _T:
        state = self._loop_state()
        if not state.tx_lock.locked():
            async with state.tx_lock:
                return await self._io.adrive(await self._aconnection(state), steps)
        async with state.read_lock:
            conn = state.read
            if conn is None or not usable(conn):
                if conn is not None:
                    conn.pgconn.finish()
                conn = state.read = await self._anew_connection()
            return await self._io.adrive(conn, steps)

    async def aload(self) -> Stored:
        return await self._areading(self._load_steps())

    async def _atimeout(self, start: float) -> LockTimeout:
        try:
            holder = await self._areading(self._holder_steps())
        except OSError:
            holder = None
        return LockTimeout(self.lock_name, time.monotonic() - start, path=self.target, holder=holder, hint=PG_HINT)

    async def aacquire(self, held: object, *, timeout: float, blocking: bool, label: str | None) -> None:
        from ._aio import in_thread

        assert isinstance(held, PgHeld)
        start = time.monotonic()
        held.wait = wait = timeout if blocking else 0.0
        held.label = label
        slot = held.slot = self._slot
        state = held.state = self._loop_state()
        turn = _turn(self._identity)
        holder = slot.owner()  # tasks of this loop queue on the turn; the same task, or this very thread, cannot
        if turn.owner is held.owner or (holder is not None and holder in (held.owner, threading.get_ident())):
            raise LockReentryError(self.lock_name)
        if wait == 0 and turn.locked():
            raise await self._atimeout(start)
        try:
            async with asyncio.timeout(None if wait < 0 else time_left(start, wait)):
                await turn.acquire()
        except TimeoutError:
            raise await self._atimeout(start) from None
        held.turn = turn
        turn.owner = held.owner
        # Then this process's other threads (tasks of this loop never hold the slot here: they hold the turn).
        while not slot.try_take(held.ticket):
            left = time_left(start, wait)
            if left == 0:
                raise await self._atimeout(start)
            if await in_thread(slot.take, held.ticket, _SLICE if left < 0 else min(_SLICE, left)):
                break
        await state.tx_lock.acquire()
        state.tx_owner = held
        conn = held.conn = await self._aconnection(state)
        await self._io.adrive(conn, self._lock_steps(held, start))

    async def afetch(self, held: object, known: object) -> Stored | None:
        assert isinstance(held, PgHeld)
        stored, read = self._fetched(held, known)
        if read and stored is not None:
            assert isinstance(stored.version, tuple)
            return await self._io.adrive(held.conn, self._value_steps(stored.version))
        return stored

    async def asave(self, held: object, data: bytes, *, last: bool = False) -> object:
        assert isinstance(held, PgHeld)
        return await self._io.adrive(held.conn, self._save_steps(held, data))

    async def aset_aside(self, held: object) -> str | None:
        assert isinstance(held, PgHeld)
        return await self._io.adrive(held.conn, self._set_aside_steps(held))

    async def arelease(self, held: object) -> None:
        assert isinstance(held, PgHeld)
        if held.pid != os.getpid():
            return
        try:
            conn = held.conn
            if conn is not None:
                await self._aend(conn, commit=held.aside and not held.committed)
                held.conn = None
        finally:
            try:
                _give_turns(held)
            finally:
                if held.slot is not None:
                    held.slot.give(held.ticket)

    async def _aend(self, conn: psycopg.AsyncConnection[Any], *, commit: bool) -> None:
        if conn.closed:
            return
        status = conn.info.transaction_status
        if status == pq.TransactionStatus.IDLE and usable(conn):
            return
        if status in (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR) and usable(conn):
            try:
                await self._io.arun(conn, [(ENDS[commit and status == pq.TransactionStatus.INTRANS], (), None)])
                return
            except psycopg.Error:
                pass
            except BaseException:
                conn.pgconn.finish()
                raise
        conn.pgconn.finish()


__all__ = ["AsyncHalf", "LoopState", "Turn", "forget_turns", "release_here"]
