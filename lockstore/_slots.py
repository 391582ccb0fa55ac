"""One lock file in this process: its ``_Slot`` (who holds it here, our descriptor, our flock), found by inode.

Per process, each lock file has one slot, keyed by the file's (device, inode): two Store objects reaching one lock
file by different paths (a symlinked directory, a relative path) share it, so the second one nested in the same
thread gets LockReentryError instead of waiting for itself. A slot's descriptors and waiter thread live as long as
some open Store uses the lock file; the last one closed or collected closes them. In a forked child every slot is
emptied (our copies of the parent's descriptors share its flocks: they are closed, never unlocked, and reopened on
use).

The flock calls are made directly (``fcntl.flock`` is a C function: no Python frame whose start a signal handler's
exception could interrupt). filelock's ``lock_descriptor``/``unlock_descriptor`` are the same primitive where there
is no blocking flock (Windows), polled.
"""

from __future__ import annotations

import errno
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._os import close_all
from ._owners import OwnerLock, at_fork
from ._waiter import AVAILABLE as CAN_BLOCK
from ._waiter import Waiter

if TYPE_CHECKING:
    from filelock import BaseFileLock

    from ._stats import TimedOut

LOCK_EX: int
LOCK_NB: int
LOCK_UN: int
flock: Callable[[int, int], None]
if CAN_BLOCK:
    import fcntl

    LOCK_EX, LOCK_NB, LOCK_UN = fcntl.LOCK_EX, fcntl.LOCK_EX | fcntl.LOCK_NB, fcntl.LOCK_UN
    flock = fcntl.flock
else:  # pragma: no cover - no blocking flock (Windows): filelock's descriptor primitives, polled
    from filelock import lock_descriptor, unlock_descriptor

    LOCK_EX, LOCK_NB, LOCK_UN = 1, 2, 3

    def flock(fd: int, op: int) -> None:
        if op == LOCK_UN:
            unlock_descriptor(fd)
        elif not lock_descriptor(fd, blocking=False):
            raise BlockingIOError(errno.EAGAIN, "locked")


class Slot(OwnerLock):
    """One lock file (by device and inode) in this process: who holds it here, and our descriptor's flock."""

    __slots__ = ("acquired_at", "area", "external", "external_count", "fds", "flocked", "handoff", "key",
                 "oldest_wait", "record_len", "refs", "timed_out", "waiters", "writable")

    def __init__(self, key: tuple[int, int]) -> None:
        super().__init__()
        self.key = key
        self.refs = 0
        self.fds: list[int] = []  # our descriptor of the lock file (one, or none until opened)
        self.writable = True
        self.flocked: int | None = None  # the descriptor whose flock this process holds now (ours or the waiter's)
        self.waiters: list[Waiter] = []  # this process's waiter thread for the file (one, or none yet)
        self.record_len = 0
        # The statistics area as read when the lock was taken (updated and written back at the release), when the
        # holder took it, the oldest announced wait seen then, and waits of this process that timed out since.
        self.area: bytearray | None = None
        self.acquired_at = 0.0
        self.oldest_wait = 0.0
        self.timed_out: list[TimedOut] = []
        # Set at a release that must hand the lock to a waiter that waited too long: this process's next
        # acquisition first lets that waiter take it (see _sidecar.py).
        self.handoff = False
        # FileLocks handed out as ``store.lock`` on this file (their is_locked answers for the calling thread).
        self.external: weakref.WeakSet[BaseFileLock] = weakref.WeakSet()
        self.external_count = 0  # how many were ever handed out: most slots have none, and need no look

    def close_files(self, *, forked: bool = False) -> None:
        """Close our descriptors and stop the waiter (never unlocks: only for an idle slot, or after fork)."""
        while self.waiters:
            self.waiters.pop().close(forked=forked)
        self.flocked = None
        close_all(self.fds)

    def held_by_filelock_here(self) -> bool:
        return bool(self.external_count) and any(lock.is_locked for lock in self.external)


SLOTS: dict[tuple[int, int], Slot] = {}
_LOCK = threading.Lock()


def _after_fork() -> None:
    global _LOCK
    _LOCK = threading.Lock()
    for slot in SLOTS.values():
        slot.close_files(forked=True)
        slot.handoff = False
        slot.timed_out = []


at_fork(_after_fork)


def find(key: tuple[int, int]) -> Slot:
    """The slot of the lock file with this identity, made if needed; the caller now counts as one of its users."""
    with _LOCK:
        slot = SLOTS.get(key)
        if slot is None:
            slot = SLOTS[key] = Slot(key)
        slot.refs += 1
    return slot


def register(fresh: Slot, key: tuple[int, int]) -> Slot:
    """Register ``fresh`` (holding a newly opened descriptor) under ``key``, unless another Store registered the
    file first: then that slot is returned (and the caller closes ``fresh``'s descriptor). The caller counts as a
    user of the returned slot."""
    with _LOCK:
        slot = SLOTS.get(key)
        if slot is None:
            fresh.key = key
            slot = SLOTS[key] = fresh
        slot.refs += 1
    return slot


def unref(slot: Slot) -> None:
    """One user fewer: the last one closes the slot's descriptors (at once when idle, else at its release)."""
    with _LOCK:
        slot.refs -= 1
    drop_if_unused(slot)


def drop_if_unused(slot: Slot) -> None:
    with _LOCK:
        if slot.refs > 0 or slot.busy():
            return
        if SLOTS.get(slot.key) is slot:
            del SLOTS[slot.key]
    slot.close_files()


def let_go(box: list[Slot | None]) -> None:
    """The finalizer of a SidecarLock: it no longer uses the slot in ``box``."""
    slot, box[0] = box[0], None
    if slot is not None:
        unref(slot)


def owner_of(dev: int, ino: int) -> object:
    """The owner in this process holding the lock file with this device and inode, or None."""
    slot = SLOTS.get((dev, ino))
    return None if slot is None else slot.owner()


def open_count() -> int:
    """How many lock files this process keeps open (for tests of resource use)."""
    return sum(1 for slot in SLOTS.values() if slot.fds)


__all__ = ["CAN_BLOCK", "LOCK_EX", "LOCK_NB", "LOCK_UN", "SLOTS", "Slot", "drop_if_unused", "find", "flock",
           "let_go", "open_count", "owner_of", "register", "unref"]
