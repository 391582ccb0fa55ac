"""Building the lock from ``lock=``: the native sidecar lock, or a caller's filelock instance.

The sidecar lock is filelock's native primitive (``filelock.lock_descriptor``: ``flock`` on Unix, ``LockFileEx``
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
from typing import TYPE_CHECKING, Final, Protocol

from filelock import BaseFileLock, Timeout, lock_descriptor, unlock_descriptor

from . import _holder
from ._atomic import resolve_target
from ._error import LockReentryError, LockTimeout

if TYPE_CHECKING:
    from ._holder import Holder

_O_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)
#: Where the OS has no blocking ``flock`` (the polling fallback): first pause between two attempts, doubling up
#: to ``poll_interval``.
FIRST_PAUSE: Final = 0.0002
#: After releasing a lock that it had to wait for, a process lets this long pass before it tries again, so that
#: the waiter the kernel just woke takes the lock instead of the releaser barging back in (fairness, issue 3).
HANDOFF_PAUSE: Final = 0.0001

try:
    import fcntl

    _flock_blocking = fcntl.flock
    _LOCK_EX: int | None = fcntl.LOCK_EX
except ImportError:  # pragma: no cover - Windows: filelock's polling only
    _LOCK_EX = None


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

    def held_here(self, token: object, owner: object = None) -> bool:
        """Whether ``owner`` (default: this thread) holds the lock through ``token``."""


class _Shared:
    """One lock file's state in this process."""

    __slots__ = ("fd", "inode", "mutex", "owner", "record_len", "released_at", "token", "waited", "waiter", "writable")

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self.waiter: _Waiter | None = None
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
        if shared.fd is not None:
            with contextlib.suppress(OSError):
                os.close(shared.fd)
        shared.__init__()  # type: ignore[misc]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Waiter:
    """A daemon thread per process and lock file that waits in a blocking ``flock`` on the caller's behalf.

    filelock waits by polling a non-blocking flock every ``poll_interval``: a hand-over can lag a whole interval,
    and a waiter that polls loses to a releaser that re-acquires at once, so under contention one process can
    starve (measured: the longest wait of 8 processes was 270x the ideal). A blocking flock sits in the kernel's
    queue and is woken at the release, but it cannot time out; so the caller waits on a condition with its
    timeout while this thread sits in the kernel. A caller that gives up withdraws its request; if the flock is
    granted later, the thread unlocks it again. One thread serves every wait of the process on this lock file.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.cond = threading.Condition(threading.Lock())
        self.requested = False
        self.granted = False
        self.busy = False  # in flock, perhaps for a request already withdrawn
        self.error: OSError | None = None
        threading.Thread(target=self._run, name=f"lockstore-waiter-{fd}", daemon=True).start()

    def _run(self) -> None:
        cond = self.cond
        while True:
            with cond:
                while not self.requested:
                    cond.wait()
                self.busy = True
            try:
                _flock_blocking(self.fd, _LOCK_EX)  # type: ignore[arg-type]
            except OSError as exc:
                with cond:
                    self.error = exc
                    self.busy = False
                    cond.notify_all()
                return
            with cond:
                self.busy = False
                if self.requested:
                    self.requested = False
                    self.granted = True
                    cond.notify_all()
                    continue
            unlock_descriptor(self.fd)  # the caller timed out meanwhile

    def in_flight(self) -> bool:
        """Whether the thread sits in flock: then only it may take the lock (a second flock on the same
        descriptor would succeed, and the thread would then release a lock that its caller believes it holds)."""
        with self.cond:
            return self.busy

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds (negative: forever) for the flock; True when this process now holds it."""
        with self.cond:
            if self.error is not None:
                raise self.error
            self.requested = True
            self.granted = False
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.granted or self.error is not None, None if timeout < 0 else timeout)
            if self.granted:
                self.granted = False
                return True
            self.requested = False
            if self.error is not None:
                raise self.error
            return False


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

    def _open(self, shared: _Shared) -> int:
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | _O_CLOEXEC, 0o666)
            shared.writable = True
        except PermissionError:
            # A lock file we may not write can still be locked; we just leave no holder record in it.
            fd = os.open(self.lock_file, os.O_RDONLY | _O_CLOEXEC)
            shared.writable = False
        st = os.fstat(fd)
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
        return (st.st_dev, st.st_ino) == shared.inode

    def acquire(self, token: object, *, timeout: float, poll_interval: float, blocking: bool,
                label: str | None, owner: object = None) -> bool:
        start = time.monotonic()
        stale = self._acquire(token, start, timeout, poll_interval, blocking, label, owner)
        if stale is None:
            raise self._timeout(time.monotonic() - start)
        return stale

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
        try:
            if shared.waited and (pause := shared.released_at + HANDOFF_PAUSE - time.monotonic()) > 0:
                time.sleep(pause)
            shared.waited = False
            while True:
                fd = shared.fd if shared.fd is not None else self._open(shared)
                if not self._try(shared, fd):
                    if not blocking:
                        shared.mutex.release()
                        return None
                    shared.waited = True
                    self._wait(shared, fd, start, timeout, poll_interval)
                if self._still_the_lock_file(shared):
                    break
                # We hold the lock of a deleted or replaced lock file: let go of it and lock the current one.
                shared.fd, shared.waiter = None, None
                os.close(fd)
            stale = self._mark(shared, fd, label)
        except BaseException:
            self._unlock_quietly(shared)
            shared.mutex.release()
            raise
        shared.owner = me
        shared.token = token
        return stale

    def _try(self, shared: _Shared, fd: int) -> bool:
        if shared.waiter is not None and shared.waiter.in_flight():
            return False
        try:
            return lock_descriptor(fd, blocking=False)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, self.lock_file) from exc  # flock's errors name no path

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

    @staticmethod
    def _unlock_quietly(shared: _Shared) -> None:
        if shared.fd is not None:
            with contextlib.suppress(OSError):
                unlock_descriptor(shared.fd)

    def _wait(self, shared: _Shared, fd: int, start: float, timeout: float, poll_interval: float) -> None:
        if _LOCK_EX is not None and timeout < 0 and (shared.waiter is None or not shared.waiter.in_flight()):
            # Nothing to time out: wait in the kernel's queue in this thread. Through the waiter thread, every
            # contended acquisition costs a thread wake-up while the lock is already ours (measured p50 27 us, p99
            # 220 us on 2 busy cores) and ~4 context switches. A waiter still in flight for a withdrawn request is
            # left to finish (a second flock on the same descriptor would succeed at once).
            try:
                _flock_blocking(fd, _LOCK_EX)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, self.lock_file) from exc
            return
        if _LOCK_EX is not None:
            if shared.waiter is None:
                shared.waiter = _Waiter(fd)
            remaining = -1.0 if timeout < 0 else max(0.0, start + timeout - time.monotonic())
            try:
                got = shared.waiter.wait(remaining)
            except OSError as exc:
                shared.waiter = None  # its thread has ended; the next wait starts a new one
                raise OSError(exc.errno, exc.strerror, self.lock_file) from exc
            if not got:
                raise self._timeout(time.monotonic() - start)
            return
        pause = FIRST_PAUSE
        while True:
            now = time.monotonic()
            if 0 <= timeout <= now - start:
                raise self._timeout(now - start)
            sleep = pause if timeout < 0 else min(pause, max(0.0, start + timeout - now))
            time.sleep(sleep)
            if lock_descriptor(fd, blocking=False):
                return
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
        try:
            if fd is not None:
                if shared.writable:
                    # Blank the record in place rather than truncate: a truncate frees the file's block and the next
                    # record allocates it again, every transaction (~7 us on ext4); all blanks read as no holder.
                    with contextlib.suppress(OSError):
                        os.pwrite(fd, b" " * shared.record_len, 0)
                try:
                    unlock_descriptor(fd)
                except OSError:
                    shared.fd = None
                    shared.waiter = None  # it waits on the closed descriptor; the next wait starts a new one
                    with contextlib.suppress(OSError):
                        os.close(fd)
        finally:
            shared.mutex.release()

    def _timeout(self, waited: float) -> LockTimeout:
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
            raise LockTimeout(
                self.lock_file, time.monotonic() - start, path=self.data_path, holder=self.holder()
            ) from exc
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


__all__ = ["FileLockAdapter", "Lock", "SidecarLock", "build"]
