"""``store.lock``: a ``filelock.FileLock`` on a Store's lock file that knows this process's transactions.

A plain ``FileLock`` opens its own descriptor, so a thread already inside a transaction on the same file would
wait in the kernel for the lock it holds itself, for the whole timeout. This subclass refuses that at once with
LockReentryError; the other direction (a transaction inside a held ``store.lock``) runs inside it, see
``_sidecar.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from filelock import FileLock

from ._error import LockReentryError
from ._owners import conflicts, current_owner

if TYPE_CHECKING:
    from ._owners import OwnerLock


class StoreFileLock(FileLock):
    """``FileLock(lock_file, preserve_lock_file=True)`` that raises LockReentryError instead of waiting for a lock
    its own thread (or, on an event loop's thread, one of its tasks) holds through a transaction."""

    def __init__(self, lock_file: str, *, timeout: float, slot: OwnerLock) -> None:
        super().__init__(lock_file, timeout=timeout, preserve_lock_file=True)
        self._lockstore_slot = slot

    def acquire(self, timeout: float | None = None, poll_interval: float | None = None, **kwargs: Any) -> Any:
        # Re-entering this FileLock itself is filelock's business, and fine.
        if not self.is_locked and conflicts(self._lockstore_slot.owner(), current_owner()):
            raise LockReentryError(self.lock_file)
        return super().acquire(timeout, poll_interval, **kwargs)


__all__ = ["StoreFileLock"]
