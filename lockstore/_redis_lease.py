"""The Redis store's lock: a lease on ``KEY:lock`` that only its token's holder may write through, fair waiting.

Driver-agnostic (no ``redis`` import): what to send and how to read the answers (:class:`Lease`), an acquisition's
state (:class:`RedisHeld`) and the per-process registries (the renewal thread is in ``_redis_renew.py``). ``_redis.py``
and ``_redis_aio.py`` do the I/O; the keys and the Lua scripts are in ``_redis_scripts.py``.

- Taking: the ACQUIRE script sets the lock (``<token>\\n<holder record>``, PX lease) when it is free and the caller
  is first in the queue (or the queue is empty); else it queues the caller and answers how long the lock's lease
  still runs. Inside one process, threads and tasks queue on the store's :class:`Slot` (an ``OwnerLock``) first, so
  only one of them waits in Redis.
- Handing over: a releaser never leaves the lock free while someone waits. The RELEASE script gives it to the
  queue's head (for a short lease, the waiters' TTL, so that a killed waiter keeps it only briefly; the new holder's
  renewal extends it) and pushes the grant, with the value when it is small, into the head's wake list. So a process
  that releases and asks again queues behind the others (first come, first served across processes), and the new
  holder starts its block as soon as it pops the grant, without another round trip or write.
- Waiting: BLPOP on the caller's own wake list. A grant waits in the list until it is popped, so one pushed between
  an attempt and the BLPOP is never missed. Every BLPOP is bounded: by the lock's remaining lease (a killed
  holder's lease ends; the head then takes the lock itself) and by a heartbeat (each attempt refreshes the caller's
  queue entry; one left unrefreshed for ``WAITER_TTL`` is a killed waiter's and is removed by whoever looks next).
- Holding: renewed every lease/3 while the token still holds the lock; a renewal that finds it gone marks the
  acquisition lost (the commit would be refused by the server anyway: the SAVE script is the fence).
- Releasing: one script unlocks (if the token holds the lock), withdraws the queue entry and hands over; it is
  idempotent, so it undoes a partial acquire wherever it stopped.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Final

from . import _holder
from ._error import LockLost, LockReentryError
from ._owners import OwnerLock, Ticket, at_fork, conflicts, generation
from ._redis_scripts import Keys

if TYPE_CHECKING:
    from ._holder import Holder

#: Longest that a killed waiter can keep its place at the head of the queue (capped by the lease): live waiters
#: refresh their entry three times per this period.
WAITER_TTL: Final = 3.0
#: A script's KEYS and ARGV.
Call = tuple[tuple[Any, ...], tuple[Any, ...]]
#: A grant carries the value when it is at most this long (else the new holder reads it: one round trip more).
GRANT_CAP: Final = 16384
#: Why a commit or a read under the lock was refused.
TOKEN_GONE: Final = "the lock key no longer holds this transaction's token: its lease ran out and another process " \
                    "may hold the lock now"

#: What a LockTimeout tells operators about a Redis store's lock.
REDIS_HINT: Final = ("deleting the lock key breaks mutual exclusion; a killed holder's lock frees itself when its "
                     "lease ends")


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
        k = self.keys
        # Encoded once: the driver packs bytes as they are.
        self._keys = tuple(name.encode() for name in (k.data, k.lock, k.queue, k.expiry, k.waiters))
        self._wake, self._ms = k.wake.encode(), str(self.ms).encode()
        self._ttl, self._cap = str(self.waiter_ttl_ms).encode(), str(GRANT_CAP).encode()

    def held(self, owner: object, holder: object, known: object) -> RedisHeld:
        # commit() (kind 1) writes without reading: its ACQUIRE does not send the value back
        return RedisHeld(owner, holder, () if getattr(holder, "kind", None) == 1 else known)

    def check_reentry(self, held: RedisHeld) -> None:
        """Refuse a second request of the slot's holding owner through another Store (it would wait for itself)."""
        if conflicts(self.slot.owner(), held.owner):
            raise LockReentryError(self.keys.lock)

    def acquire_call(self, held: RedisHeld, label: str | None, once: bool) -> Call:
        known = "-" if held.known == () else (held.known or "")
        return (self._keys, (held.token, _holder.record(label), self._ms, b"0" if once else b"1", self._ttl, known,
                             self._wake, self._cap))

    def got(self, held: RedisHeld, reply: list[Any]) -> bool:
        """Whether an ACQUIRE (or a grant) gave us the lock (then remember it); LockReentryError when this owner
        holds it already through a Store that reached the same key by another URL."""
        if reply[0] == 1:
            TOKENS[held.token] = held.owner
            held.prefetched = reply
            return True
        if conflicts(TOKENS.get(text(reply[2])), held.owner):
            raise LockReentryError(self.keys.lock)
        return False

    def granted(self, held: RedisHeld, popped: Any) -> list[Any] | None:
        """A wake-up popped from our list as an ACQUIRE answer when it is a grant (the lock is ours), else None."""
        if popped is None:
            return None
        message = as_bytes(popped[1]) or b""
        if not message.startswith(b"g"):
            return None
        ttl = self.waiter_ttl_ms  # a grant's lease: renewed soon
        if message[1:2] == b"0":
            return [1, 0, ttl, b""]
        if message[1:2] == b"2":
            data = message[2:]
            return [1, 1, ttl, b""] if held.known == sha(data) else [1, 2, ttl, data]
        return [1, 3, ttl, b""]

    def first_renewal(self, reply: list[Any]) -> float:
        """When to renew a lease first: a handed-over one runs only the waiters' TTL."""
        return min(self.seconds / 3, max(0.001, float(reply[2]) / 3000))

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
        return [pre[1], pre[3]]

    def check(self, held: RedisHeld, target: str, *, lost: bool = False) -> None:
        """LockLost when the lease is known to be gone, or a fenced script found it ``lost`` just now."""
        if lost and held.lost is None:
            held.lost = TOKEN_GONE
        if held.lost is not None:
            raise LockLost(target, held.lost)

    def release_call(self, held: RedisHeld | str) -> Call:
        return self._keys, (held if isinstance(held, str) else held.token, self._wake, self._ttl, self._cap)

    def save_release_call(self, held: RedisHeld, data: bytes) -> Call:
        return self._keys, (held.token, data, self._wake, self._ttl, self._cap)

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


def _after_fork() -> None:
    global _SLOTS_LOCK
    _SLOTS_LOCK = threading.Lock()
    TOKENS.clear()  # the parent's leases: the child holds none


at_fork(_after_fork)


__all__ = ["GRANT_CAP", "TOKENS", "TOKEN_GONE", "WAITER_TTL", "Call", "Lease", "RedisHeld", "Slot", "as_bytes", "sha",
           "slot", "text"]
