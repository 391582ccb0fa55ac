"""The Redis store's lock: a lease on ``KEY:lock`` that only its token's holder may write through, fair waiting.

Driver-agnostic (no ``redis`` import): what to send and how to read the answers (:class:`Lease`), an acquisition's
state (:class:`RedisHeld`), the renewal thread (:class:`Renewer`), and the per-process registries. ``_redis.py``
and ``_redis_aio.py`` do the I/O; the keys and the Lua scripts are in ``_redis_scripts.py``.

- Taking: the ACQUIRE script sets the lock (``<token>\\n<holder record>``, PX lease) when it is free and the caller
  is first in the queue (or the queue is empty); else it queues the caller and answers how long the lock's lease
  still runs. A process that releases and asks again therefore queues behind the others: first come, first served
  across processes. Inside one process, threads and tasks queue on the store's :class:`Slot` (an ``OwnerLock``)
  first, so only one of them waits in Redis.
- Waiting: BLPOP on the caller's own wake list, which a releaser (or a waiter that finds the lock free while
  another is first) pushes to. A push waits in the list until it is popped, so a release between an attempt and
  the BLPOP is never missed. Every BLPOP is bounded: by the lock's remaining lease (a killed holder's lease ends)
  and by a heartbeat (the caller's queue entry is refreshed by each attempt; one left unrefreshed for
  ``WAITER_TTL`` is a killed waiter's and is removed by whoever looks next).
- Holding: renewed every lease/3 while the token still holds the lock; a renewal that finds it gone marks the
  acquisition lost (the commit would be refused by the server anyway: the SAVE script is the fence).
- Releasing: one script unlocks (if the token holds the lock), withdraws the queue entry, and wakes the new head;
  it is idempotent, so it undoes a partial acquire wherever it stopped.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from . import _holder
from ._error import LockLost, LockReentryError
from ._owners import OwnerLock, Ticket, at_fork, blocks_this_loop, generation
from ._redis_scripts import Keys

if TYPE_CHECKING:
    from ._holder import Holder

#: Longest that a killed waiter can keep its place at the head of the queue (capped by the lease): live waiters
#: refresh their entry three times per this period.
WAITER_TTL: Final = 3.0
#: Why a commit or a read under the lock was refused.
TOKEN_GONE: Final = "the lock key no longer holds this transaction's token: its lease ran out and another process " \
                    "may hold the lock now"


class Slot(OwnerLock):
    """One store (server, db, key) in this process: which thread or task of ours may contend for its lock."""

    __slots__ = ("__weakref__",)


_SLOTS: weakref.WeakValueDictionary[tuple[object, ...], Slot] = weakref.WeakValueDictionary()
_SLOTS_LOCK = threading.Lock()
#: Tokens of the leases this process holds now -> their owner, to tell a lock held by this very owner (through a
#: Store reaching the same key by another URL) from one held elsewhere.
TOKENS: dict[str, object] = {}


def slot(identity: tuple[object, ...]) -> Slot:
    with _SLOTS_LOCK:
        found = _SLOTS.get(identity)
        if found is None:
            found = _SLOTS[identity] = Slot()
        return found


class RedisHeld:
    """One acquisition, made before acquiring: what ``release`` must undo, wherever acquiring stopped."""

    __slots__ = ("__weakref__", "generation", "known", "lost", "owner", "prefetched", "sent", "task", "ticket",
                 "token", "turn")

    def __init__(self, owner: object, holder: object, known: object) -> None:
        self.owner = owner
        self.ticket = Ticket(owner, holder)
        self.token = secrets.token_hex(16)
        self.generation = generation()
        self.sent = False  # an ACQUIRE went out: the server may hold our lock or queue entry
        self.lost: str | None = None  # why the lease is known to be gone (set by the renewal)
        self.known = known  # the version the ACQUIRE compares with, () to not read the value
        self.prefetched: list[Any] | None = None  # the ACQUIRE's answer about the value, for the fetch that follows
        self.task: Any = None  # asyncio: the renewal task
        self.turn: Any = None  # asyncio: this loop's turn for the slot

    def inherited(self) -> bool:
        """Made before a fork that this process is the child of: the lock is the parent's."""
        return self.generation != generation()


class Lease:
    """One store's lock: the arguments of its scripts and the meaning of their answers (no I/O)."""

    def __init__(self, key: str, lease: float, identity: tuple[object, ...]) -> None:
        self.keys = Keys.of(key)
        self.seconds = lease
        self.ms = max(1, round(lease * 1000))
        self.waiter_ttl_ms = max(1, round(min(lease, WAITER_TTL) * 1000))
        self.heartbeat = self.waiter_ttl_ms / 3000
        self.slot = slot(identity)

    def held(self, owner: object, holder: object, known: object) -> RedisHeld:
        # commit() (kind 1) writes without reading: its ACQUIRE does not send the value back
        return RedisHeld(owner, holder, () if getattr(holder, "kind", None) == 1 else known)

    def check_reentry(self, held: RedisHeld) -> None:
        """Refuse a second request of the slot's holding owner through another Store (it would wait for itself)."""
        owner = self.slot.owner()
        if owner is not None and (owner == held.owner or blocks_this_loop(owner)):
            raise LockReentryError(self.keys.lock)

    def acquire_call(self, held: RedisHeld, label: str | None, once: bool) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        k = self.keys
        record = _holder.record(label)
        known = "-" if held.known == () else (held.known or "")
        return ((k.data, k.lock, k.queue, k.expiry, k.waiters),
                (held.token, held.token.encode() + b"\n" + record, self.ms, "0" if once else "1", record,
                 self.waiter_ttl_ms, known, k.wake))

    def got(self, held: RedisHeld, reply: list[Any]) -> bool:
        """Whether an ACQUIRE took the lock (then remember it); LockReentryError when this owner holds it already
        through a Store that reached the same key by another URL."""
        if reply[0] == 1:
            TOKENS[held.token] = held.owner
            held.prefetched = reply
            return True
        owner = TOKENS.get(text(reply[2]))
        if owner is not None and (owner == held.owner or blocks_this_loop(owner)):
            raise LockReentryError(self.keys.lock)
        return False

    def pause(self, reply: list[Any], start: float, timeout: float, once: bool) -> float | None:
        """How long to wait for a wake-up before trying again, or None when the time is up."""
        if once:
            return None
        wait = self.heartbeat  # the queue entry's refresh
        if timeout >= 0:
            remaining = start + timeout - time.monotonic()
            if remaining <= 0:
                return None
            wait = min(wait, remaining)
        if reply[1] >= 0:  # the lock's lease ends then: its holder may be dead
            wait = min(wait, reply[1] / 1000 + 0.001)
        return wait if wait >= 0.001 else 0.0

    def wake_key(self, held: RedisHeld) -> str:
        return self.keys.wake + held.token

    def prefetched(self, held: RedisHeld, known: object) -> list[Any] | None:
        """The ACQUIRE's answer as a FETCH answer when it compared with ``known`` ({-1} when the lease is lost)."""
        if held.lost is not None:
            return [-1]
        pre, held.prefetched = held.prefetched, None
        if pre is None or held.known != known or pre[1] == 3:
            return None
        return pre[1:]

    def check(self, held: RedisHeld, target: str, reply: object = 1) -> None:
        """LockLost when the lease is known to be gone, or when a fenced script's ``reply`` says so."""
        if held.lost is None and reply in (0, -1):
            held.lost = TOKEN_GONE
        if held.lost is not None:
            raise LockLost(target, held.lost)

    def release_call(self, held: RedisHeld | str) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        k = self.keys
        return ((k.lock, k.queue, k.expiry, k.waiters),
                (held if isinstance(held, str) else held.token, k.wake, self.waiter_ttl_ms))

    @staticmethod
    def holder_of(value: bytes | None) -> Holder | None:
        return None if value is None else _holder.parse(value.partition(b"\n")[2])

    @staticmethod
    def waiting(reply: list[Any]) -> tuple[list[Holder], list[str]]:
        """The WAITERS answer as holders (oldest first) and the tokens of killed local waiters."""
        import dataclasses

        found: list[Holder] = []
        dead: list[str] = []
        for token, record in zip(reply[::2], reply[1::2], strict=True):
            h = _holder.parse(record)
            if h is None:
                continue
            if h.alive is False:
                dead.append(text(token))
                continue
            found.append(dataclasses.replace(h, acquired_at=None, waiting_since=h.acquired_at))
        return found, dead


def sha(data: bytes | None) -> str | None:
    """A value's version: its SHA-1 (what the scripts compute with ``redis.sha1hex``); None when nothing is stored."""
    return None if data is None else hashlib.sha1(data).hexdigest()


def as_bytes(value: object) -> bytes | None:
    """A reply as bytes (the clients are made without ``decode_responses``; a URL may still ask for it)."""
    if value is None or isinstance(value, bytes):
        return value
    return str(value).encode()


def text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# ------------------------------------------------------------------------------------------------ renewal
class Renewer:
    """A thread renewing the leases that one storage holds, every third of the lease, on a connection of its own.

    ``renew(held)`` returns True (extended), False (the token no longer holds the lock: the held is marked lost) or
    raises (unreachable: tried again soon, while the lease may still be saved). Never inherited: a child after fork
    starts with nothing to renew and no thread.
    """

    def __init__(self, renew: Callable[[RedisHeld], bool], lease: float, name: str) -> None:
        self._renew = renew
        self.interval = lease / 3
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._due: dict[RedisHeld, float] = {}
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._cond = threading.Condition(threading.Lock())
            self._due = {}
            self._thread = None

    def add(self, held: RedisHeld) -> None:
        self._check_fork()
        with self._cond:
            idle = not self._due
            self._due[held] = time.monotonic() + self.interval
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"lockstore-lease {self._name}", daemon=True)
                self._thread.start()
            elif idle:
                self._cond.notify()

    def remove(self, held: RedisHeld) -> None:
        self._check_fork()
        with self._cond:
            self._due.pop(held, None)

    def close(self) -> None:
        self._check_fork()
        with self._cond:
            self._due.clear()
            self._thread = None  # the running thread sees that it is no longer the one and ends
            self._cond.notify()

    def _run(self) -> None:
        cond, me = self._cond, threading.current_thread()
        while True:
            with cond:
                if cond is not self._cond or me is not self._thread:
                    return
                if not self._due:
                    cond.wait()
                    continue
                held, when = min(self._due.items(), key=lambda item: item[1])
                if (delay := when - time.monotonic()) > 0:
                    cond.wait(delay)
                    continue
                self._due[held] = time.monotonic() + self.interval
            try:
                ok = self._renew(held)
            except Exception:
                with cond:
                    if held in self._due:  # unreachable: try again soon, the lease may still be saved
                        self._due[held] = time.monotonic() + min(self.interval / 4, 1.0)
                continue
            if not ok:
                held.lost = "a renewal found the lease gone: " + TOKEN_GONE
                with cond:
                    self._due.pop(held, None)


def _after_fork() -> None:
    global _SLOTS_LOCK
    _SLOTS_LOCK = threading.Lock()
    TOKENS.clear()  # the parent's leases: the child holds none


at_fork(_after_fork)


__all__ = ["TOKENS", "TOKEN_GONE", "WAITER_TTL", "Lease", "RedisHeld", "Renewer", "Slot", "as_bytes", "sha", "slot",
           "text"]
