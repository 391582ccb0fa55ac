"""The native sidecar lock: ``flock`` on ``<file>.lock``, fast, fair, and safe across threads, forks, tasks and signals.

It is the primitive filelock's ``FileLock`` uses (``flock(LOCK_EX)`` on the whole file), on one descriptor per
process and lock file, with the per-process rules (owners, reentry, fork, arrival order) of ``_owners.py`` done
once per acquisition instead of ``FileLock``'s full acquire (it opens the file, resolves its path and checks its
fork state every time; ``benchmarks/`` measures the difference). Per process, each lock file has one
:class:`_Slot`, found by the file's (device, inode): two Store objects reaching one lock file by different paths
(a symlinked directory, a relative path) share it, so the second one nested in the same thread gets
LockReentryError instead of waiting for itself.

- The lock file is never deleted (tox-dev/filelock#31: waiters that opened the old inode would lock a different
  file than new arrivals), never broken by age (the OS releases a native lock when its holder dies), and never
  followed through a symlink or used when it is not a regular file: lockstore writes its holder record into it,
  and must never write into somebody else's file.
- Signals: the flock calls are made directly (C calls), and every state change is recorded where the cleanup,
  :meth:`SidecarLock.release`, finds it, before the call that makes it: a KeyboardInterrupt at any point of
  acquire or release leaves neither this process's slot nor the flock held.
- Resources: a slot's descriptors and waiter thread live as long as some open Store uses the lock file; the last
  Store closed or collected closes them.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from . import _holder, _proclocks
from ._error import LockReentryError, LockTimeout
from ._os import O_CLOEXEC, O_NOFOLLOW, O_NONBLOCK, close_all, named, open_into
from ._owners import OwnerLock, Ticket, at_fork, conflicts
from ._waiter import AVAILABLE as _CAN_BLOCK
from ._waiter import Waiter

if TYPE_CHECKING:
    from filelock import BaseFileLock

    from ._holder import Holder

_LOCK_EX: int
_LOCK_NB: int
_LOCK_UN: int
_flock: Callable[[int, int], None]
if _CAN_BLOCK:
    import fcntl

    # fcntl.flock itself, a C function: no Python frame whose start a signal handler's exception could interrupt.
    _LOCK_EX, _LOCK_NB, _LOCK_UN = fcntl.LOCK_EX, fcntl.LOCK_EX | fcntl.LOCK_NB, fcntl.LOCK_UN
    _flock = fcntl.flock
else:  # pragma: no cover - no blocking flock (Windows): filelock's descriptor primitives, polled
    from filelock import lock_descriptor, unlock_descriptor

    _LOCK_EX, _LOCK_NB, _LOCK_UN = 1, 2, 3

    def _flock(fd: int, op: int) -> None:
        if op == _LOCK_UN:
            unlock_descriptor(fd)
        elif not lock_descriptor(fd, blocking=False):
            raise BlockingIOError(errno.EAGAIN, "locked")


#: Where waiting has to poll (no blocking flock): first pause between two attempts, doubling up to poll_interval.
FIRST_PAUSE: Final = 0.0002
#: After releasing a lock that it had to wait for, a process lets this long pass before it tries again, so that
#: the waiter the kernel just woke takes the lock instead of the releaser barging back in.
HANDOFF_PAUSE: Final = 0.0001
#: The holder record lives in the lock file's first bytes; readers read this much.
RECORD_MAX: Final = 4096


class _TimedOut(Exception):
    """The wait ran out; turned into a LockTimeout (describing the holder) only by callers that want one."""


class _Slot(OwnerLock):
    """One lock file (by device and inode) in this process: who holds it here, and our descriptor's flock."""

    __slots__ = ("external", "external_count", "fds", "flocked", "key", "record_len", "refs", "released_at", "waited",
                 "waiters", "writable")

    def __init__(self, key: tuple[int, int]) -> None:
        super().__init__()
        self.key = key
        self.refs = 0
        self.fds: list[int] = []  # our descriptor of the lock file (one, or none until opened)
        self.writable = True
        self.flocked: int | None = None  # the descriptor whose flock this process holds now (ours or the waiter's)
        self.waiters: list[Waiter] = []  # this process's waiter thread for the file (one, or none yet)
        self.record_len = 0
        self.waited = False
        self.released_at = 0.0
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


_SLOTS: dict[tuple[int, int], _Slot] = {}
_SLOTS_LOCK = threading.Lock()


def _after_fork() -> None:
    # The parent's threads did not survive the fork; our copies of its descriptors share its flocks, so they are
    # closed (which unlocks nothing: the parent still has the same open file descriptions) and reopened on use.
    global _SLOTS_LOCK
    _SLOTS_LOCK = threading.Lock()
    for slot in _SLOTS.values():
        slot.close_files(forked=True)
        slot.waited = False


at_fork(_after_fork)


def _unref(slot: _Slot) -> None:
    with _SLOTS_LOCK:
        slot.refs -= 1
        if slot.refs > 0 or slot.busy():
            return
        if _SLOTS.get(slot.key) is slot:
            del _SLOTS[slot.key]
    slot.close_files()


class Held:
    """One acquisition's state, made before acquiring so that :meth:`SidecarLock.release` can always undo it."""

    __slots__ = ("inside", "slot", "ticket")

    def __init__(self, owner: object, holder: object) -> None:
        self.ticket = Ticket(owner, holder)
        self.slot: _Slot | None = None
        self.inside = False  # inside a ``store.lock`` FileLock this thread holds: no flock, no record of ours


class SidecarLock:
    """The native lock on one lock file (see the module docstring)."""

    def __init__(self, lock_file: str, *, data_path: str | None = None) -> None:
        self.lock_file = lock_file
        self.data_path = data_path
        self._slot: _Slot | None = None
        self._fresh: _Slot | None = None  # a slot being created: its descriptor is closed if creation is cut short
        self._probe: list[int] = []  # a descriptor opened to read who holds or waits (closed at the next read)
        # The slot this lock counts as a user of, in a box that the finalizer (which must not refer to self) shares:
        # a Store collected without close() still gives its lock file back.
        self._box: list[_Slot | None] = [None]
        self._finalizer = weakref.finalize(self, _let_slot_go, self._box)

    def __repr__(self) -> str:
        return f"<SidecarLock {self.lock_file!r}>"

    # ------------------------------------------------------------------------------------------- the slot
    def _refuse(self, st: os.stat_result) -> None:
        if stat.S_ISLNK(st.st_mode):
            raise OSError(errno.ELOOP, "the lock file is a symbolic link; lockstore never follows one (it would "
                                       "write into the link's target): remove the link or pass lock= another path",
                          self.lock_file)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, "the lock file is a directory", self.lock_file)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "the lock file is not a regular file; lockstore writes a holder record "
                                        "into it and refuses anything else", self.lock_file)

    def _find_slot(self) -> _Slot:
        """The slot of the file now at ``lock_file``, creating the file if needed (one lstat when known)."""
        try:
            st = os.lstat(self.lock_file)
        except FileNotFoundError:
            return self._create_slot()
        except OSError as exc:
            raise named(exc, self.lock_file) from None
        self._refuse(st)
        key = (st.st_dev, st.st_ino)
        slot = self._slot
        if slot is not None and slot.key == key:
            return slot
        with _SLOTS_LOCK:
            found = _SLOTS.get(key)
            if found is None:
                found = _SLOTS[key] = _Slot(key)
            found.refs += 1
        return self._adopt(found)

    def _adopt(self, slot: _Slot) -> _Slot:
        """Use ``slot`` (whose count of users the caller already raised) instead of the previous one."""
        old, self._slot = self._slot, slot
        self._box[0] = slot
        if old is not None and old is not slot:
            _unref(old)
        elif old is slot:
            _unref(old)  # counted twice: once is enough
        return slot

    def _create_slot(self) -> _Slot:
        if self._fresh is not None:  # left by an interrupt last time
            close_all(self._fresh.fds)
        fresh = self._fresh = _Slot((0, 0))
        try:
            self._open(fresh)
            st = os.fstat(fresh.fds[0])
            self._refuse(st)
            key = (st.st_dev, st.st_ino)
            with _SLOTS_LOCK:
                found = _SLOTS.get(key)
                if found is None:
                    fresh.key = key
                    found = _SLOTS[key] = fresh
                    self._fresh = None
                found.refs += 1
        except OSError as exc:
            raise named(exc, self.lock_file) from None
        finally:
            if self._fresh is not None:  # not registered (an error, or another Store registered this file first)
                self._fresh = None
                close_all(fresh.fds)
        return self._adopt(found)

    def _open(self, slot: _Slot) -> None:
        """Open our descriptor of the lock file into ``slot.fds`` (never through a symlink)."""
        flags = O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK
        try:
            open_into(slot.fds, self.lock_file, os.O_RDWR | os.O_CREAT | flags, 0o666)
            slot.writable = True
        except PermissionError as denied:
            # A lock file we may not write can still be locked; we just leave no holder record in it. If it does not
            # exist either (a directory we may not write), the permission error is the one to report.
            try:
                open_into(slot.fds, self.lock_file, os.O_RDONLY | flags)
            except FileNotFoundError:
                raise named(denied, self.lock_file) from None
            slot.writable = False

    def _ready(self, slot: _Slot) -> bool:
        """Holding the slot: make sure our descriptor is open on the slot's file; False when the path now names
        another file (deleted or replaced: the caller starts over)."""
        if not slot.fds:
            self._open(slot)
            st = os.fstat(slot.fds[0])
            self._refuse(st)
            if (st.st_dev, st.st_ino) != slot.key:
                close_all(slot.fds)
                return False
        return True

    def _still_the_lock_file(self, slot: _Slot) -> bool:
        """Whether the file we locked is still the one at ``lock_file``: operators delete or replace lock files
        (which must never be done), and new processes would then lock the new file while we hold the old one."""
        try:
            st = os.lstat(self.lock_file)
        except FileNotFoundError:
            return False
        if (st.st_dev, st.st_ino) != slot.key:
            return False
        waiter = slot.waiters[0] if slot.waiters else None
        return waiter is None or slot.flocked != waiter.fd or waiter.inode == slot.key

    # ------------------------------------------------------------------------------------------- acquire
    def held(self, owner: object, holder: object) -> Held:
        return Held(owner, holder)

    def acquire(self, held: object, *, timeout: float, poll_interval: float, blocking: bool, label: str | None,
                start: float | None = None) -> bool:
        """Take the lock for ``held`` (see ``Lock.acquire``); on any exception the caller calls :meth:`release`."""
        assert isinstance(held, Held)
        begun = time.monotonic() if start is None else start
        try:
            return self._acquire(held, begun, timeout, poll_interval, blocking, label)
        except _TimedOut:
            self.release(held)
            raise self.timeout_error(time.monotonic() - begun) from None

    def acquire_within(self, held: object, *, timeout: float, poll_interval: float, label: str | None,
                       start: float, blocking: bool = True) -> bool | None:
        """:meth:`acquire`, but None (and nothing held) when the time runs out, without reading the holder for a
        LockTimeout: for callers that wait in slices and describe the holder only at their own deadline."""
        assert isinstance(held, Held)
        try:
            return self._acquire(held, start, timeout, poll_interval, blocking, label)
        except _TimedOut:
            self.release(held)
            return None

    def _acquire(self, held: Held, start: float, timeout: float, poll_interval: float, blocking: bool,
                 label: str | None) -> bool:
        ticket = held.ticket
        while True:
            slot = held.slot = self._find_slot()
            if conflicts(slot.owner(), ticket.owner):
                raise LockReentryError(self.lock_file)
            if not slot.take(ticket, _remaining(start, timeout) if blocking else 0.0):
                raise _TimedOut
            if slot.held_by_filelock_here():
                held.inside = True  # this thread holds the OS lock through ``store.lock``: work inside it
                return False
            if not self._ready(slot):
                slot.give(ticket)
                continue
            if slot.waited and (pause := slot.released_at + HANDOFF_PAUSE - time.monotonic()) > 0:
                time.sleep(pause)
            slot.waited = False
            if slot.flocked is None:  # else a holder that vanished without releasing left it to us
                fd = slot.flocked = slot.fds[0]  # recorded first: release() undoes it whatever happens next
                try:
                    _flock(fd, _LOCK_NB)
                except BlockingIOError:
                    slot.flocked = None
                    if not blocking:
                        raise _TimedOut from None
                    slot.waited = True
                    self._wait(slot, fd, start, timeout, poll_interval)
                except OSError as exc:
                    slot.flocked = None
                    raise named(exc, self.lock_file) from None
            if self._still_the_lock_file(slot):
                return self._mark(slot, label)
            # We hold the lock of a deleted or replaced lock file: let go of it and lock the current one.
            self._let_go(held, slot)
            slot.close_files()

    def _wait(self, slot: _Slot, fd: int, start: float, timeout: float, poll_interval: float) -> None:
        """Wait for the flock; on return ``slot.flocked`` is the descriptor holding it (ours, or the waiter's)."""
        if _CAN_BLOCK and timeout < 0:
            # Nothing to time out: wait in the kernel's queue in this thread, with no hop through the waiter thread.
            slot.flocked = fd
            try:
                _flock(fd, _LOCK_EX)
            except OSError as exc:
                slot.flocked = None
                raise named(exc, self.lock_file) from None
            return
        if _CAN_BLOCK:
            if not slot.waiters:
                try:
                    # Appended by C code as it is returned: an interrupt cannot orphan a running waiter thread.
                    slot.waiters.extend(map(Waiter, (self.lock_file,)))
                except OSError as exc:
                    raise named(exc, self.lock_file) from None
            waiter = slot.waiters[0]
            slot.flocked = waiter.fd  # recorded first; the waiter's own withdrawal handles a grant that comes late
            try:
                got = waiter.wait(_remaining(start, timeout))
            except OSError as exc:
                slot.flocked = None
                slot.waiters.clear()
                waiter.close()  # its thread has ended; the next wait starts a new one
                raise named(exc, self.lock_file) from None
            if not got:
                slot.flocked = None
                raise _TimedOut
            return
        pause = FIRST_PAUSE  # pragma: no cover - the polling fallback
        while True:  # pragma: no cover
            if 0 <= timeout <= time.monotonic() - start:
                raise _TimedOut
            time.sleep(pause if timeout < 0 else min(pause, _remaining(start, timeout)))
            slot.flocked = fd
            try:
                _flock(fd, _LOCK_NB)
                return
            except BlockingIOError:
                slot.flocked = None
            pause = min(pause * 2, poll_interval)

    def _mark(self, slot: _Slot, label: str | None) -> bool:
        """Write our holder record; return True when a killed holder's record was still there (time to sweep)."""
        if not slot.writable:
            return True
        fd = slot.fds[0]
        try:
            head = os.pread(fd, 1, 0)
        except OSError:
            return True
        stale = head not in (b"", b" ")  # all blanks: a record cleared at release
        # The record is diagnostics only: a full or failing disk must not cost the caller the lock (the data write
        # that follows reports the disk's state and names the data file).
        try:
            record = _holder.record(label)
            if stale:
                # Cover the whole stale record, not only our shorter one, so that no tail of it survives.
                old = os.pread(fd, RECORD_MAX, 0)
                end = old.find(b"\n") + 1 or len(old.rstrip(b"\0"))
                record = record.ljust(min(max(end, len(record)), RECORD_MAX))
            os.pwrite(fd, record, 0)
            slot.record_len = len(record)
        except OSError:
            pass
        return stale

    # ------------------------------------------------------------------------------------------- release
    def release(self, held: object) -> None:
        """Undo whatever :meth:`acquire` did for ``held``, wherever it stopped; calling it again does nothing."""
        assert isinstance(held, Held)
        slot = held.slot
        if slot is None:
            return
        if not slot.held_by(held.ticket):
            slot.give(held.ticket)  # withdraw a queued request
            return
        if held.inside:
            slot.give(held.ticket)
            return
        self._let_go(held, slot)

    def _let_go(self, held: Held, slot: _Slot) -> None:
        # Runs after the caller's write completed: an error here must not report that write as failed. A record
        # left behind only costs the next holder a sweep; a failed unlock is finished by closing our descriptors.
        try:
            if slot.flocked is not None and slot.writable and slot.record_len and slot.fds:
                # Only while we hold the flock is the record ours to clear. Blank it in place rather than truncate:
                # a truncate frees the file's block and the next record allocates it again, every transaction; all
                # blanks read as no holder.
                os.pwrite(slot.fds[0], b" " * slot.record_len, 0)
        except OSError:
            pass
        finally:
            try:
                # Forgotten right before the unlock, with no call in between: a signal handler's exception can come
                # only after a call returns, so it finds the flock either still recorded or already released.
                fd, slot.flocked = slot.flocked, None
                if fd is not None:
                    try:
                        _flock(fd, _LOCK_UN)
                    except OSError:
                        slot.close_files()  # closing our descriptors releases the lock whatever went wrong
            finally:
                try:
                    slot.give(held.ticket)
                finally:
                    slot.released_at = time.monotonic()
                    if slot.refs <= 0:
                        _unref_idle(slot)

    def close(self) -> None:
        """Stop using the lock file: the last user in this process closes its descriptors and waiter thread."""
        self._slot = None
        _let_slot_go(self._box)

    # ------------------------------------------------------------------------------------------- diagnostics
    def timeout_error(self, waited: float) -> LockTimeout:
        """The LockTimeout for a wait of ``waited`` s, naming the holder (or a stale record, as such)."""
        holder, stale = self.holder_and_staleness()
        return LockTimeout(self.lock_file, waited, path=self.data_path, holder=holder, holder_stale=stale)

    def holder(self) -> Holder | None:
        """Who holds the lock now, read without taking it (see :func:`lockstore._holder.current`)."""
        return self.holder_and_staleness()[0]

    def holder_and_staleness(self) -> tuple[Holder | None, bool]:
        probe = self._probe
        close_all(probe)
        try:
            fd = open_into(probe, self.lock_file, os.O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)
            st = os.fstat(fd)
            record = os.pread(fd, RECORD_MAX, 0) if stat.S_ISREG(st.st_mode) else b""
            dev = _proclocks.lock_dev(fd)
        except OSError:
            return None, False
        finally:
            try:
                close_all(probe)
            except BaseException:
                close_all(probe)  # an interrupt cut the first call short
                raise
        holders = _proclocks.flock_holders(dev, st.st_ino)
        return _holder.current(record, holders)

    def waiters(self) -> list[Holder]:
        """The processes waiting for this lock now (Linux: from /proc/locks), oldest request first."""
        probe = self._probe
        close_all(probe)
        try:
            fd = open_into(probe, self.lock_file, os.O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)
            ino, dev = os.fstat(fd).st_ino, _proclocks.lock_dev(fd)
        except OSError:
            return []
        finally:
            try:
                close_all(probe)
            except BaseException:
                close_all(probe)  # an interrupt cut the first call short
                raise
        pids = _proclocks.flock_waiters(dev, ino) or []
        return [_holder.from_pid(pid) for pid in dict.fromkeys(pids)]

    def filelock(self, timeout: float) -> BaseFileLock:
        """A ``filelock.FileLock`` on this lock file (``store.lock``), known to this process's transactions."""
        from ._storelock import StoreFileLock

        slot = self._find_slot()
        lock = StoreFileLock(self.lock_file, timeout=timeout, slot=slot)
        slot.external.add(lock)
        slot.external_count += 1
        return lock

    def held_here(self, held: Held) -> bool:
        return held.slot is not None and held.slot.held_by(held.ticket)

    def owner_here(self) -> object:
        """The owner in this process holding this lock file now (through any Store), or None."""
        slot = self._slot
        return None if slot is None else slot.owner()


def _let_slot_go(box: list[_Slot | None]) -> None:
    slot, box[0] = box[0], None
    if slot is not None:
        _unref(slot)


def _unref_idle(slot: _Slot) -> None:
    """A slot whose every Store was closed while it was held: close it now that it is free."""
    with _SLOTS_LOCK:
        if slot.refs > 0 or slot.busy():
            return
        if _SLOTS.get(slot.key) is slot:
            del _SLOTS[slot.key]
    slot.close_files()


def _remaining(start: float, timeout: float) -> float:
    return -1.0 if timeout < 0 else max(0.0, start + timeout - time.monotonic())


def slot_owner(dev: int, ino: int) -> object:
    """The owner in this process holding the lock file with this device and inode, or None."""
    slot = _SLOTS.get((dev, ino))
    return None if slot is None else slot.owner()


def open_slots() -> int:
    """How many lock files this process keeps open (for tests of resource use)."""
    return sum(1 for slot in _SLOTS.values() if slot.fds)


__all__ = ["FIRST_PAUSE", "HANDOFF_PAUSE", "Held", "SidecarLock", "open_slots", "slot_owner"]
