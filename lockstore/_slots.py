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
from typing import TYPE_CHECKING, Final

from ._os import close_all
from ._owners import OwnerLock, at_fork
from ._stats import Pending
from ._waiter import AVAILABLE as CAN_BLOCK
from ._waiter import Waiter

if TYPE_CHECKING:
    from filelock import BaseFileLock

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

#: A slot's states (Slot.state): in use; being looked at by drop_if_unused; given up, its descriptors closed.
LIVE: Final = 0
MARKED: Final = 1
DROPPED: Final = 2


class Slot(OwnerLock):
    """One lock file (by device and inode) in this process: who holds it here, and our descriptor's flock."""

    __slots__ = (
        "acquired_at",
        "cold",
        "external",
        "external_count",
        "fds",
        "flocked",
        "handed_to_nobody",
        "handoff",
        "head",
        "inside",
        "key",
        "oldest_wait",
        "out",
        "out_area",
        "out_hot",
        "record_len",
        "refs",
        "repaired_at",
        "state",
        "timed_out",
        "waiter_fds",
        "waiters",
        "writable",
    )

    def __init__(self, key: tuple[int, int]) -> None:
        super().__init__()
        self.key = key
        self.refs = 0
        self.state = LIVE  # MARKED while drop_if_unused decides, DROPPED once its descriptors are being closed
        self.fds: list[int] = []  # our descriptor of the lock file (one, or none until opened)
        self.writable = True
        self.flocked: int | None = None  # the descriptor whose flock this process holds now (ours or the waiter's)
        self.waiters: list[Waiter] = []  # this process's waiter thread for the file (one, or none yet)
        # Each waiter's descriptor list, registered before the waiter opens it: a child forked at any moment finds
        # and closes every descriptor of the lock file it inherited.
        self.waiter_fds: list[list[int]] = []
        self.record_len = 0
        # What the holder read when it took the lock (the record, the statistics area at _stats.OFFSET, the waiters'
        # header), counted into and written back at the release; when the holder took it, the oldest announced wait
        # seen then, and waits of this process that timed out since.
        self.head: bytes | None = None
        self.acquired_at = 0.0
        self.oldest_wait = 0.0
        self.timed_out = pending(key)
        # What this process wrote at its last release that counted (the record's blanks, then the statistics area),
        # views of its area and of the area's part that every count changes, and the CRC of the area's first part:
        # while the lock file holds exactly this area, the next release counts into it in place and writes it
        # without checking it again (see _sidecar.SidecarLock._let_go).
        self.out: bytearray | None = None
        self.out_area: memoryview | None = None
        self.out_hot: memoryview | None = None
        self.cold = 0
        # Set at a release that must hand the lock to a waiter that waited too long (the start of its wait): this
        # process's next acquisition first lets that waiter take it (see _sidecar.py). A wait handed the lock that
        # nobody took (a stopped waiter, or a dead one that still looks alive) is remembered, and not handed to again.
        self.handoff = 0.0
        self.handed_to_nobody: list[float] = []  # the latest few such waits' starts
        self.repaired_at = 0.0  # when this process last rewrote the header's oldest wait without them (monotonic)
        # FileLocks handed out as ``store.lock`` on this file (their is_locked answers for the calling thread).
        self.external: weakref.WeakSet[BaseFileLock] = weakref.WeakSet()
        self.external_count = 0  # how many were ever handed out: most slots have none, and need no look
        self.inside: dict[object, object] = {}  # owners in a transaction inside their ``store.lock``: their ticket

    def close_files(self, *, forked: bool = False) -> None:
        """Close our descriptors and stop the waiter (never unlocks: only for an idle slot, or after fork)."""
        while self.waiters:
            self.waiters.pop().close(forked=forked)
        if forked:
            for fds in self.waiter_fds:
                close_all(fds)
        self.waiter_fds = [fds for fds in self.waiter_fds if fds]
        self.flocked = None
        close_all(self.fds)

    def busy(self) -> bool:
        return super().busy() or bool(self.inside)

    def held_by_filelock_here(self) -> bool:
        return bool(self.external_count) and any(lock.is_locked for lock in self.external)


SLOTS: dict[tuple[int, int], Slot] = {}
#: This process's timeouts not counted yet, per lock file: kept when its slot is dropped (a Store closed between a
#: timeout and the process's next acquisition on the file), given to the next slot of the file.
PENDING: dict[tuple[int, int], Pending] = {}


def pending(key: tuple[int, int]) -> Pending:
    return Pending() if key == (0, 0) else PENDING.setdefault(key, Pending())
#: Slots being created (their descriptor is open, the file's identity not yet known): a fork finds them here.
FRESH: list[Slot] = []
_LOCK = threading.Lock()


def _after_fork() -> None:
    global _LOCK
    _LOCK = threading.Lock()
    PENDING.clear()  # the parent's to count; and their locks may be held by threads gone here
    for slot in [*SLOTS.values(), *FRESH]:
        slot.close_files(forked=True)
        slot.handoff = 0.0
        slot.timed_out = pending(slot.key)
        slot.inside = {}
    FRESH.clear()


at_fork(_after_fork)


def find(key: tuple[int, int], box: list[Slot | None]) -> Slot:
    """The slot of the lock file with this identity, made if needed, put into the caller's ``box`` in place of the
    one there (the caller now counts as a user of the new one, no longer of the old one)."""
    with _LOCK:
        slot = SLOTS.get(key)
        if slot is None or slot.state != LIVE:  # not LIVE: left MARKED by an interrupt (see drop_if_unused)
            slot = SLOTS[key] = Slot(key)
        old = _swap(slot, box)
    _drop_unused(old)
    return slot


def register(fresh: Slot, key: tuple[int, int], box: list[Slot | None]) -> Slot:
    """Register ``fresh`` (holding a newly opened descriptor) under ``key`` unless another Store registered the file
    first, and put the registered slot into ``box`` (as :func:`find`); when it is not ``fresh``, the caller closes
    ``fresh``'s descriptor."""
    with _LOCK:
        slot = SLOTS.get(key)
        if slot is None or slot.state != LIVE:
            fresh.key = key
            fresh.timed_out = pending(key)
            slot = SLOTS[key] = fresh
        old = _swap(slot, box)
    _drop_unused(old)
    return slot


def _drop_unused(old: Slot | None) -> None:
    """Close the slot given up, and any other that nobody uses (one whose last user was interrupted between giving
    it up and closing it): checked whenever this process looks up a lock file anew."""
    for slot in [old, *(s for s in list(SLOTS.values()) if s.refs <= 0)]:
        if slot is not None:
            drop_if_unused(slot)


def _swap(slot: Slot, box: list[Slot | None]) -> Slot | None:
    # Under _LOCK, with no call in between: the count and the caller's record of it change together, whatever
    # interrupts the caller afterwards.
    old = box[0]
    slot.refs += 1
    box[0] = slot
    if old is not None:
        old.refs -= 1
    return old


def unref(slot: Slot) -> None:
    """One user fewer: the last one closes the slot's descriptors (at once when idle, else at its release)."""
    with _LOCK:
        slot.refs -= 1
    drop_if_unused(slot)


def drop_if_unused(slot: Slot) -> None:
    """Close the descriptors of a slot that no lock object uses and no thread holds or waits for. A thread may
    still have the slot in hand (its lock object was given back while it acquired): the slot is marked before the
    check, so such a thread that takes it from now on finds it not LIVE (SidecarLock._ready) and looks the file up
    again, while one that took it before the check keeps it (the mark is taken back, and its release drops the
    slot). Only the caller that marks it DROPPED closes it: the decision is made under _LOCK."""
    with _LOCK:
        if slot.state == DROPPED:
            return
        slot.state = MARKED
        if slot.refs > 0 or slot.busy():
            slot.state = LIVE
            return
        slot.state = DROPPED
        if SLOTS.get(slot.key) is slot:
            del SLOTS[slot.key]
            if not slot.timed_out:
                PENDING.pop(slot.key, None)
    slot.close_files()


def let_go(box: list[Slot | None]) -> None:
    """A SidecarLock (closed, or collected: its finalizer) no longer uses the slot in ``box``."""
    with _LOCK:
        slot, box[0] = box[0], None
        if slot is not None:
            slot.refs -= 1
    if slot is not None:
        drop_if_unused(slot)


def owner_of(dev: int, ino: int) -> object:
    """The owner in this process holding the lock file with this device and inode, or None."""
    slot = SLOTS.get((dev, ino))
    return None if slot is None else slot.owner()


def open_count() -> int:
    """How many lock files this process keeps open (for tests of resource use)."""
    return sum(1 for slot in SLOTS.values() if slot.fds)


__all__ = ["CAN_BLOCK", "DROPPED", "LIVE", "LOCK_EX", "LOCK_NB", "LOCK_UN", "MARKED", "SLOTS", "Slot", "drop_if_unused",
           "find", "flock", "let_go", "open_count", "owner_of", "register", "unref"]
