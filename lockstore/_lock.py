"""The file store's lock, built from ``lock=``: the native sidecar lock (``_sidecar.py``) or a caller's filelock lock.

Both implement :class:`Lock`. The per-process rules (owners, reentry, arrival order, fork) are ``_owners.py``'s;
a caller's filelock instance gets one :class:`~lockstore._owners.OwnerLock` per instance, so two Stores sharing one
instance exclude each other inside the process too (filelock's own lock is reentrant per thread, so nesting their
transactions would otherwise re-enter it and lose the inner update).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Protocol

from filelock import BaseFileLock, Timeout

from . import _holder
from ._error import LockReentryError, LockTimeout
from ._os import read_bytes
from ._owners import OwnerLock, Ticket, at_fork, conflicts
from ._sidecar import SidecarLock

if TYPE_CHECKING:
    from ._holder import Holder


class Lock(Protocol):
    """What the file store needs from a lock. ``held`` objects are made by :meth:`held` before acquiring, so
    that :meth:`release` can undo an acquisition cut short anywhere (by an error or a signal)."""

    lock_file: str

    def held(self, owner: object, holder: object) -> object:
        """A new acquisition's state, for ``owner`` (a thread ident or an asyncio task), on behalf of ``holder``."""

    def acquire(self, held: object, *, timeout: float, poll_interval: float, blocking: bool, label: str | None,
                start: float | None = None) -> bool:
        """Take the lock; return True when a killed holder's leftovers should be swept.

        Raises LockTimeout, LockReentryError (the owner already holds it through another Store), OSError naming
        the lock file. Whatever it raises, the caller then calls :meth:`release`.
        """

    def release(self, held: object) -> None:
        """Undo whatever :meth:`acquire` did for ``held``; idempotent."""

    def holder(self) -> Holder | None:
        """Who holds the lock now, read without taking it."""

    def waiters(self) -> list[Holder]:
        """Who waits for it now, oldest first where known."""

    def timeout_error(self, waited: float) -> LockTimeout:
        """The LockTimeout to raise after waiting ``waited`` seconds (names the holder)."""

    def close(self) -> None:
        """Give back what this process keeps open for the lock."""


class _AdapterHeld:
    __slots__ = ("before", "taking", "ticket")

    def __init__(self, owner: object, holder: object) -> None:
        self.ticket = Ticket(owner, holder)
        self.taking = False
        self.before = 0  # the filelock's hold count in this thread before we acquired


_INSTANCE_SLOTS: weakref.WeakKeyDictionary[BaseFileLock, OwnerLock] = weakref.WeakKeyDictionary()
_INSTANCE_SLOTS_LOCK = threading.Lock()


def _after_fork() -> None:
    global _INSTANCE_SLOTS_LOCK
    _INSTANCE_SLOTS_LOCK = threading.Lock()  # another thread may have held it at the fork


at_fork(_after_fork)


class FileLockAdapter:
    """A caller's filelock lock (e.g. ``filelock.SoftFileLock`` on a file system without working flock)."""

    def __init__(self, lock: BaseFileLock, *, data_path: str | None = None) -> None:
        self.lock = lock
        self.lock_file = lock.lock_file
        self.data_path = data_path
        with _INSTANCE_SLOTS_LOCK:
            slot = _INSTANCE_SLOTS.get(lock)
            if slot is None:
                slot = _INSTANCE_SLOTS[lock] = OwnerLock()
        self._slot = slot

    def __repr__(self) -> str:
        return f"<FileLockAdapter {self.lock!r}>"

    def held(self, owner: object, holder: object) -> _AdapterHeld:
        return _AdapterHeld(owner, holder)

    def acquire(self, held: object, *, timeout: float, poll_interval: float, blocking: bool, label: str | None,
                start: float | None = None) -> bool:
        assert isinstance(held, _AdapterHeld)
        begun = time.monotonic() if start is None else start
        slot = self._slot
        if conflicts(slot.owner(), held.ticket.owner):
            raise LockReentryError(self.lock_file)
        remaining = -1.0 if timeout < 0 else max(0.0, begun + timeout - time.monotonic())
        if not slot.take(held.ticket, remaining if blocking else 0.0):
            raise self.timeout_error(time.monotonic() - begun)
        remaining = -1.0 if timeout < 0 else max(0.0, begun + timeout - time.monotonic())
        held.before = self.lock.lock_counter
        held.taking = True  # recorded first: release() checks the hold count, so it never undoes a caller's hold
        try:
            self.lock.acquire(timeout=remaining, poll_interval=poll_interval, blocking=blocking)
        except Timeout as exc:
            raise self.timeout_error(time.monotonic() - begun) from exc
        # Other lock kinds leave no record to tell a killed holder; sweeping costs a directory scan, so always do.
        return True

    def release(self, held: object) -> None:
        assert isinstance(held, _AdapterHeld)
        try:
            # Checked against the hold count before unlocking, and forgotten only after: a repeated call after an
            # interrupt neither skips the release nor releases twice.
            if held.taking and self.lock.lock_counter > held.before:
                self.lock.release()
            held.taking = False
        finally:
            self._slot.give(held.ticket)

    def holder(self) -> Holder | None:
        return _soft_holder(self.lock)

    def waiters(self) -> list[Holder]:
        return []  # a filelock lock keeps no queue that another process could read

    def timeout_error(self, waited: float) -> LockTimeout:
        return LockTimeout(self.lock_file, waited, path=self.data_path, holder=self.holder())

    def close(self) -> None:
        """The caller's lock instance is the caller's: nothing to give back."""


def _soft_holder(lock: BaseFileLock) -> Holder | None:
    """Holder information of a filelock soft lock, read from its marker (pid and host are what it records)."""
    try:
        data = read_bytes(lock.lock_file, 4096)
        mtime = os.stat(lock.lock_file).st_mtime
    except OSError:
        return None
    lines = data.decode(errors="replace").splitlines()
    if not lines or not lines[0].strip().isdigit():
        return None
    pid = int(lines[0].strip())
    host = lines[1].strip() if len(lines) > 1 else ""
    return _holder.soft_marker_holder(pid, host, mtime)


def build(lock: object, path: str) -> Lock | None:
    """Turn ``lock=`` into a lock with a fixed lock file: a path, a filelock instance, or False (None).

    ``lock=True`` (the sidecar beside the data file's symlink target) is chosen per transaction by the file store.
    """
    if lock is False or lock is None:
        return None
    if isinstance(lock, (str, os.PathLike)):
        return SidecarLock(os.fspath(lock), data_path=path)
    if isinstance(lock, BaseFileLock):
        return FileLockAdapter(lock, data_path=path)
    raise TypeError(f"lock= must be True, False, a path or a filelock lock instance, not {type(lock).__name__}")


__all__ = ["FileLockAdapter", "Lock", "SidecarLock", "build"]
