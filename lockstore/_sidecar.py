"""The native sidecar lock: ``flock`` on ``<file>.lock``, fast, fair, and safe across threads, forks and tasks.

It is filelock's native primitive (``filelock.lock_descriptor``: ``flock`` on Unix, ``LockFileEx``
on Windows) on one descriptor per process and lock file, with the thread, fork and reentrancy safety that
``filelock.FileLock`` provides done here once per process instead of on every acquire: ``FileLock`` opens the
file, resolves paths and checks its fork state about thirty times per acquire, ~90 us against ~1 us for the
flock itself, which would cost a non-durable transaction most of its speed.

- Threads: a per-process mutex per lock file lets one thread at a time hold the descriptor's flock.
- Reentrancy: the store joins nested transactions itself; a second Store object asking for a lock that its thread
  already holds would wait for itself forever, so it gets :class:`LockReentryError` at once.
- Fork: a child closes its inherited copies and starts with fresh mutexes (``os.register_at_fork``); an
  inherited descriptor shares the parent's lock, so using it in the child would break mutual exclusion.
- The lock file is never deleted (tox-dev/filelock#31: waiters that opened the old inode would lock a different
  file than new arrivals) and never broken by age: the OS releases a native lock when its holder dies.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Final

from filelock import BaseFileLock, lock_descriptor, unlock_descriptor

from . import _holder
from ._error import LockReentryError, LockTimeout
from ._waiter import AVAILABLE as _CAN_BLOCK
from ._waiter import Waiter, lock_blocking

if TYPE_CHECKING:
    from ._holder import Holder

_O_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)
#: Where the OS has no blocking ``flock`` (the polling fallback): first pause between two attempts, doubling up
#: to ``poll_interval``.
FIRST_PAUSE: Final = 0.0002
#: After releasing a lock that it had to wait for, a process lets this long pass before it tries again, so that
#: the waiter the kernel just woke takes the lock instead of the releaser barging back in (fairness, issue 3).
HANDOFF_PAUSE: Final = 0.0001


def _named(exc: OSError, lock_file: str) -> OSError:
    """The same error naming the lock file (flock's and fstat's errors name no path)."""
    if exc.filename is not None:
        return exc
    named = OSError(exc.errno, exc.strerror, lock_file)
    named.__cause__ = exc
    return named


class _TimedOut(Exception):
    """The wait ran out; turned into a LockTimeout (describing the holder) only by callers that want one."""


class _Shared:
    """One lock file's state in this process."""

    __slots__ = ("external", "fd", "held", "inode", "mutex", "owner", "record_len", "released_at", "token", "waited",
                 "waiter", "writable")

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self.waiter: Waiter | None = None
        self.held: int | None = None  # the descriptor holding the flock now: fd, or the waiter's
        # FileLocks handed out as ``store.lock`` on this file (thread-local: is_locked answers for this thread).
        self.external: weakref.WeakSet[BaseFileLock] = weakref.WeakSet()
        self.waited = False  # whether the current (or last) acquisition had to wait
        self.released_at = 0.0
        self.fd: int | None = None
        self.inode: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the file fd refers to
        self.writable = True
        self.record_len = 0  # bytes of our record in the lock file, blanked at release
        self.owner: object = None  # the holder in this process: a thread ident, or an asyncio task
        self.token: object = None  # the store holding it


_REGISTRY: dict[str, _Shared] = {}
_REGISTRY_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.Lock()
    for shared in _REGISTRY.values():
        # The waiter's thread did not survive the fork; the descriptors are this child's copies of the parent's.
        for fd in (shared.fd, shared.waiter.fd if shared.waiter is not None else None):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        shared.__init__()  # type: ignore[misc]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _task_of_this_threads_loop(owner: object) -> bool:
    """Whether ``owner`` is an asyncio task of the event loop running in this thread: a blocking wait here (a sync
    ``transaction()`` or ``commit()`` inside ``atransaction()``) would stop the very loop that must release the lock."""
    aio = sys.modules.get("asyncio")
    if aio is None or not isinstance(owner, aio.Task):
        return False
    try:
        return owner.get_loop() is aio.get_running_loop()
    except RuntimeError:
        return False


class SidecarLock:
    """The native lock on a sidecar file (see the module docstring)."""

    def __init__(self, lock_file: str, *, data_path: str | None = None) -> None:
        self.lock_file = lock_file
        self.data_path = data_path
        key = os.path.normcase(os.path.abspath(lock_file))
        with _REGISTRY_LOCK:
            self._shared = _REGISTRY.setdefault(key, _Shared())

    def __repr__(self) -> str:
        return f"<SidecarLock {self.lock_file!r}>"

    def held_here(self, token: object, owner: object = None) -> bool:
        shared = self._shared
        return shared.owner == (threading.get_ident() if owner is None else owner) and shared.token is token

    def filelock(self, timeout: float) -> BaseFileLock:
        """A ``filelock.FileLock`` on this lock file (``store.lock``), known to this process's transactions."""
        from filelock import FileLock

        lock = FileLock(self.lock_file, preserve_lock_file=True, timeout=timeout)
        self._shared.external.add(lock)
        return lock

    def held_by_filelock_here(self) -> bool:
        return any(lock.is_locked for lock in self._shared.external)

    def _open(self, shared: _Shared) -> int:
        try:
            try:
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | _O_CLOEXEC, 0o666)
                shared.writable = True
            except PermissionError:
                # A lock file we may not write can still be locked; we just leave no holder record in it.
                fd = os.open(self.lock_file, os.O_RDONLY | _O_CLOEXEC)
                shared.writable = False
            try:
                st = os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise
        except OSError as exc:
            raise _named(exc, self.lock_file)  # noqa: B904 - _named chains it
        shared.fd, shared.inode = fd, (st.st_dev, st.st_ino)
        return fd

    def _still_the_lock_file(self, shared: _Shared) -> bool:
        """Whether the descriptor we locked is still the file at ``lock_file``.

        The descriptor is kept open for speed; if someone deleted or replaced the lock file (which must never be
        done, but operators do it), our flock would sit on an orphaned inode that new processes never see. One
        stat per acquisition notices it, and the caller then locks the new file instead.
        """
        try:
            st = os.stat(self.lock_file)
        except FileNotFoundError:
            return False
        now = (st.st_dev, st.st_ino)
        return now == shared.inode and (shared.waiter is None or shared.held != shared.waiter.fd
                                        or now == shared.waiter.inode)

    def acquire(self, token: object, *, timeout: float, poll_interval: float, blocking: bool,
                label: str | None, owner: object = None) -> bool:
        start = time.monotonic()
        stale = self.acquire_within(token, timeout=timeout, poll_interval=poll_interval, blocking=blocking,
                                    label=label, owner=owner, start=start)
        if stale is None:
            raise self.timeout_error(time.monotonic() - start)
        return stale

    def acquire_within(self, token: object, *, timeout: float, poll_interval: float, blocking: bool,
                       label: str | None, owner: object = None, start: float | None = None) -> bool | None:
        """:meth:`acquire`, but None instead of a LockTimeout (which reads the lock file to describe the holder):
        for callers that wait in slices and describe the holder only at their own deadline."""
        try:
            return self._acquire(token, time.monotonic() if start is None else start, timeout, poll_interval,
                                 blocking, label, owner)
        except _TimedOut:
            return None

    def try_acquire(self, token: object, *, label: str | None, owner: object = None) -> bool | None:
        return self._acquire(token, time.monotonic(), 0.0, FIRST_PAUSE, False, label, owner)

    def _acquire(self, token: object, start: float, timeout: float, poll_interval: float, blocking: bool,
                 label: str | None, owner: object) -> bool | None:
        """Take the lock; None when it is busy (``blocking=False``) or the wait for this process's mutex timed out."""
        shared = self._shared
        me = threading.get_ident() if owner is None else owner
        if shared.owner == me or (owner is None and _task_of_this_threads_loop(shared.owner)):
            raise LockReentryError(self.lock_file)
        if not shared.mutex.acquire(blocking, (-1.0 if timeout < 0 else timeout) if blocking else -1):
            return None
        held: int | None = None
        try:
            if shared.waited and (pause := shared.released_at + HANDOFF_PAUSE - time.monotonic()) > 0:
                time.sleep(pause)
            shared.waited = False
            while True:
                fd = shared.fd if shared.fd is not None else self._open(shared)
                if self._try(fd):
                    held = fd
                elif not blocking:
                    shared.mutex.release()
                    return None
                else:
                    shared.waited = True
                    held = self._wait(shared, fd, start, timeout, poll_interval)
                shared.held = held
                if self._still_the_lock_file(shared):
                    break
                # We hold the lock of a deleted or replaced lock file: let go of it and lock the current one.
                unlock_descriptor(held)
                held = shared.held = None
                self._drop(shared)
            stale = self._mark(shared, fd, label)
        except BaseException:
            if held is not None:  # only what this call locked: never a lock some other party holds
                with contextlib.suppress(OSError):
                    unlock_descriptor(held)
            shared.held = None
            shared.mutex.release()
            raise
        shared.owner = me
        shared.token = token
        return stale

    @staticmethod
    def _drop(shared: _Shared) -> None:
        """Forget our descriptors (after the lock file was replaced, or an unlock failed): the next use reopens."""
        if shared.waiter is not None:
            shared.waiter.close()
            shared.waiter = None
        if shared.fd is not None:
            with contextlib.suppress(OSError):
                os.close(shared.fd)
            shared.fd = None

    def _try(self, fd: int) -> bool:
        try:
            return lock_descriptor(fd, blocking=False)
        except OSError as exc:
            raise _named(exc, self.lock_file)  # noqa: B904 - _named chains it

    @staticmethod
    def _mark(shared: _Shared, fd: int, label: str | None) -> bool:
        """Write our holder record; return True when a killed holder's record was still there."""
        if not shared.writable:
            return True
        try:
            stale = os.pread(fd, 1, 0) not in (b"", b" ")  # blanks: a record cleared at release
        except OSError:
            return True
        # The record is diagnostics only: a full or failing disk must not cost the caller the lock (the data write
        # that follows reports the disk's state and names the data file; pwrite's errors name no path at all).
        try:
            if stale:
                os.ftruncate(fd, 0)
            record = _holder.record(label)
            os.pwrite(fd, record, 0)
            shared.record_len = len(record)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        return stale

    def _wait(self, shared: _Shared, fd: int, start: float, timeout: float, poll_interval: float) -> int:
        """Wait for the lock; return the descriptor that holds it (``fd``, or the waiter thread's)."""
        if _CAN_BLOCK and timeout < 0:
            # Nothing to time out: wait in the kernel's queue in this thread. Through the waiter thread, every
            # contended acquisition costs a thread wake-up while the lock is already ours (measured p50 27 us, p99
            # 220 us on 2 busy cores) and ~4 context switches.
            try:
                lock_blocking(fd)
            except OSError as exc:
                raise _named(exc, self.lock_file)  # noqa: B904 - _named chains it
            return fd
        if _CAN_BLOCK:
            if shared.waiter is None:
                try:
                    shared.waiter = Waiter(self.lock_file)
                except OSError as exc:
                    raise _named(exc, self.lock_file)  # noqa: B904 - _named chains it
            remaining = -1.0 if timeout < 0 else max(0.0, start + timeout - time.monotonic())
            try:
                got = shared.waiter.wait(remaining)
            except OSError as exc:
                shared.waiter.close()
                shared.waiter = None  # its thread has ended; the next wait starts a new one
                raise _named(exc, self.lock_file)  # noqa: B904 - _named chains it
            if not got:
                raise _TimedOut
            return shared.waiter.fd
        pause = FIRST_PAUSE
        while True:
            now = time.monotonic()
            if 0 <= timeout <= now - start:
                raise _TimedOut
            sleep = pause if timeout < 0 else min(pause, max(0.0, start + timeout - now))
            time.sleep(sleep)
            if lock_descriptor(fd, blocking=False):
                return fd
            pause = min(pause * 2, poll_interval)

    def release(self) -> None:
        shared = self._shared
        fd = shared.fd
        shared.owner = None
        shared.token = None
        shared.released_at = time.monotonic()
        # Release runs after the caller's write completed: an error here must not report that write as failed.
        # A record left behind only costs the next holder a sweep; a failed unlock is finished by closing our only
        # descriptor of the file, which releases the lock whatever went wrong.
        held, shared.held = shared.held, None
        try:
            if fd is not None and shared.writable:
                # Blank the record in place rather than truncate: a truncate frees the file's block and the next
                # record allocates it again, every transaction (~7 us on ext4); all blanks read as no holder.
                with contextlib.suppress(OSError):
                    os.pwrite(fd, b" " * shared.record_len, 0)
            if held is not None:
                try:
                    unlock_descriptor(held)
                except OSError:
                    self._drop(shared)  # closing our descriptors releases the lock whatever went wrong
        finally:
            shared.mutex.release()

    def timeout_error(self, waited: float) -> LockTimeout:
        """The LockTimeout for a wait of ``waited`` s; a dead process's record under a held lock is stale."""
        holder = self.holder()
        stale = holder is not None and holder.alive is False
        return LockTimeout(self.lock_file, waited, path=self.data_path, holder=holder, holder_stale=stale)

    def holder(self) -> Holder | None:
        """Read the record, or None when the lock is free (a record left by a killed holder is ignored then)."""
        try:
            fd = os.open(self.lock_file, os.O_RDONLY | _O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            shared = self._shared
            if shared.owner is None and lock_descriptor(fd, blocking=False):
                unlock_descriptor(fd)
                return None
            return _holder.parse(os.pread(fd, 4096, 0))
        finally:
            os.close(fd)


__all__ = ["FIRST_PAUSE", "HANDOFF_PAUSE", "SidecarLock"]
