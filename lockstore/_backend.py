"""The one small interface between a Store and where its bytes live: a file, a PostgreSQL row, a Redis key.

A storage reads and writes encoded bytes and locks; it knows nothing of formats, values, savepoints or the Store.
The transaction logic (``_txn.py``) drives it the same way for every storage, synchronously or from asyncio:

    held = storage.held(owner, txn)          no resources yet: made first, so cleanup always finds it
    storage.acquire(held, ...)               the lock (and, for a database, its transaction)
    storage.fetch(held, known)               the stored bytes, or None when unchanged since version ``known``
    storage.save(held, data, last=)          the new bytes, durable before it returns (fenced: a holder whose
                                             lock lapsed gets LockLost and writes nothing)
    storage.release(held)                    idempotent: undoes whatever acquire did, wherever it stopped

Every method of the async half (``a``-prefixed) does the same without blocking the event loop. A version is any
value compared with ``==``: the file's identity and times, a row's version number, a Redis counter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from ._error import LockTimeout
    from ._holder import Holder


class Stored(NamedTuple):
    """What a storage holds: the encoded value (None when nothing is stored yet) and its version."""

    data: bytes | None
    version: object


class Storage(Protocol):
    """A place for one encoded value, with a lock (see the module docstring)."""

    #: Names the store in errors and ``repr``: a path, or a URL without its password plus ``#key``.
    target: str

    @property
    def lock_name(self) -> str | None:
        """The lock file or lock key shown to operators, or None without a lock."""

    @property
    def locked(self) -> bool:
        """Whether there is a lock (transactions need one)."""

    def load(self) -> Stored:
        """Read without the lock (a reader always sees one whole committed value)."""

    def put(self, data: bytes) -> object:
        """Write without a lock (only for a storage opened without one); returns the new version."""

    def held(self, owner: object, holder: object) -> object:
        """A new acquisition's state, for ``owner`` (a thread ident or asyncio task), on behalf of ``holder``."""

    def acquire(self, held: object, *, timeout: float, blocking: bool, label: str | None) -> None:
        """Take the lock (negative timeout: forever). Raises LockTimeout, LockReentryError, OSError; whatever it
        raises, the caller then calls :meth:`release`."""

    def fetch(self, held: object, known: object) -> Stored | None:
        """Holding the lock: what is stored, or None when its version still equals ``known``."""

    def save(self, held: object, data: bytes, *, last: bool = False) -> object:
        """Holding the lock: store ``data`` durably (as configured); return its version. ``last``: the
        transaction ends right after, so the storage may release its lock in the same round trip (``release``
        then only gives back what is left)."""

    def set_aside(self, held: object) -> str | None:
        """Holding the lock: move an undecodable stored value out of the way (``on_corrupt="backup"``); return
        where it went, or None when this storage cannot."""

    def release(self, held: object, *, abandoned: object = None) -> None:
        """Undo whatever :meth:`acquire` did; calling it again does nothing. ``abandoned``: ``held``'s transaction
        was dropped without its end, and the caller (maybe another thread of this process) cleans up after it; it
        is an object that lives as long as the caller's attempt (what tickets taken over for it refer to)."""

    def holder(self) -> Holder | None:
        """Who holds the lock now, read without taking it."""

    def waiters(self) -> list[Holder]:
        """Who waits for the lock now, oldest first where known."""

    def timeout_error(self, waited: float) -> LockTimeout:
        """The LockTimeout after waiting ``waited`` seconds, naming the holder."""

    def close(self) -> None:
        """Give back descriptors, threads and connections kept for speed."""

    # The asyncio half: same meaning, never blocking the loop.
    async def aload(self) -> Stored: ...

    async def aacquire(self, held: object, *, timeout: float, blocking: bool, label: str | None) -> None: ...

    async def afetch(self, held: object, known: object) -> Stored | None: ...

    async def asave(self, held: object, data: bytes, *, last: bool = False) -> object: ...

    async def aset_aside(self, held: object) -> str | None: ...

    async def arelease(self, held: object) -> None: ...


__all__ = ["Storage", "Stored"]
