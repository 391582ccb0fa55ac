"""Building the lock from ``lock=``: the native sidecar lock (``_sidecar.py``), or a caller's filelock instance.

The lock file is never deleted (tox-dev/filelock#31: waiters that opened the old inode would lock a different file
than new arrivals) and never broken by age: the OS releases a native lock when its holder dies.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Protocol

from filelock import BaseFileLock, Timeout

from . import _holder
from ._atomic import resolve_target
from ._error import LockReentryError, LockTimeout
from ._sidecar import FIRST_PAUSE, SidecarLock, _task_of_this_threads_loop

if TYPE_CHECKING:
    from ._holder import Holder


class Lock(Protocol):
    """What a store needs from a lock."""

    lock_file: str

    def acquire(self, token: object, *, timeout: float, poll_interval: float, blocking: bool,
                label: str | None, owner: object = None) -> bool:
        """Take the lock for ``token``; return True when a killed holder's leftovers should be swept.

        ``owner`` identifies the holder inside this process: the calling thread by default, an asyncio task for
        the async API. Raises LockTimeout, LockReentryError (``owner`` already holds it through another token).
        """

    def try_acquire(self, token: object, *, label: str | None, owner: object = None) -> bool | None:
        """One attempt that never blocks: None when the lock is busy, else what :meth:`acquire` returns."""

    def release(self) -> None:
        """Release the lock."""

    def holder(self) -> Holder | None:
        """The current holder, or None when the lock is free."""

    def timeout_error(self, waited: float) -> LockTimeout:
        """The LockTimeout to raise after waiting ``waited`` seconds (reads the lock file to name the holder)."""

    def held_here(self, token: object, owner: object = None) -> bool:
        """Whether ``owner`` (default: this thread) holds the lock through ``token``."""

    def held_by_filelock_here(self) -> bool:
        """Whether this thread holds the lock through a ``store.lock`` FileLock of any Store on this lock file."""


class FileLockAdapter:
    """A caller's filelock lock (e.g. ``filelock.SoftFileLock`` on a file system without working flock)."""

    def __init__(self, lock: BaseFileLock, *, data_path: str | None = None) -> None:
        self.lock = lock
        self.lock_file = lock.lock_file
        self.data_path = data_path
        self._owner: object = None
        self._token: object = None

    def __repr__(self) -> str:
        return f"<FileLockAdapter {self.lock!r}>"

    def held_here(self, token: object, owner: object = None) -> bool:
        return self._owner == (threading.get_ident() if owner is None else owner) and self._token is token

    def held_by_filelock_here(self) -> bool:
        return False  # the caller's own lock instance is used directly, and filelock checks its reentrancy

    def try_acquire(self, token: object, *, label: str | None, owner: object = None) -> bool | None:
        try:
            return self.acquire(token, timeout=0, poll_interval=0.05, blocking=False, label=label, owner=owner)
        except LockTimeout:
            return None

    def acquire(self, token: object, *, timeout: float, poll_interval: float, blocking: bool,
                label: str | None, owner: object = None) -> bool:
        me = threading.get_ident() if owner is None else owner
        if self._owner == me or (owner is None and _task_of_this_threads_loop(self._owner)):
            raise LockReentryError(self.lock_file)
        start = time.monotonic()
        try:
            self.lock.acquire(timeout=timeout, poll_interval=poll_interval, blocking=blocking)
        except Timeout as exc:
            raise self.timeout_error(time.monotonic() - start) from exc
        self._owner = me
        self._token = token
        # Other lock kinds leave no record to tell a killed holder; sweeping costs a directory scan, so always do.
        return True

    def release(self) -> None:
        self._owner = None
        self._token = None
        self.lock.release()

    def holder(self) -> Holder | None:
        return _soft_holder(self.lock)

    def timeout_error(self, waited: float) -> LockTimeout:
        return LockTimeout(self.lock_file, waited, path=self.data_path, holder=self.holder())


def _soft_holder(lock: BaseFileLock) -> Holder | None:
    """Holder information of a filelock soft lock, read from its marker (pid and host are what it records)."""
    try:
        with open(lock.lock_file, "rb") as f:
            data = f.read(4096)
    except OSError:
        return None
    lines = data.decode(errors="replace").splitlines()
    if not lines or not lines[0].strip().isdigit():
        return None
    pid = int(lines[0].strip())
    host = lines[1].strip() if len(lines) > 1 else ""
    try:
        mtime = os.stat(lock.lock_file).st_mtime
    except OSError:
        return None
    return _holder.soft_marker_holder(pid, host, mtime)


def build(lock: object, path: str) -> Lock | None:
    """Turn ``lock=`` into a lock: True (sidecar ``<path>.lock``), a path, a filelock instance, or False."""
    if lock is False or lock is None:
        return None
    if lock is True:
        # Beside the file actually written: a store opened through a symlink and one opened on its target must
        # share one lock.
        return SidecarLock(resolve_target(path) + ".lock", data_path=path)
    if isinstance(lock, (str, os.PathLike)):
        return SidecarLock(os.fspath(lock), data_path=path)
    if isinstance(lock, BaseFileLock):
        return FileLockAdapter(lock, data_path=path)
    raise TypeError(f"lock= must be True, False, a path or a filelock lock instance, not {type(lock).__name__}")


__all__ = ["FIRST_PAUSE", "FileLockAdapter", "Lock", "SidecarLock", "build"]
