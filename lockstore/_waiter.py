"""Waiting for a native lock in the kernel's queue, with a timeout, from any thread.

filelock waits by polling a non-blocking flock every ``poll_interval``: a hand-over can lag a whole interval, and
a waiter that polls loses to a releaser that re-acquires at once, so under contention one process can starve. A
blocking flock sits in the kernel's queue and is woken at the release, but it cannot time out; so a daemon thread
sits in the kernel while the caller waits, with its timeout, for that thread's answer.

The thread locks its OWN descriptor of the lock file (a separate open file description). Its grant and the
caller's descriptor therefore really exclude each other, and a grant that arrives after the caller gave up is
dropped by unlocking the thread's own descriptor, which nobody else uses.

Signals reach only the caller (a KeyboardInterrupt is raised in the main thread), so the caller's side uses nothing
but C calls between its decisions: each wait is a :class:`_Request`, handed to the thread through a
``queue.SimpleQueue`` (one C call), whose ``done`` lock the thread releases, and every change of a request's state
happens under a plain lock, in ``with`` statements, so that the caller and the thread agree on whether a grant was
taken or dropped whatever interrupts the caller. ``threading.Condition`` is Python code on both sides: an interrupt
inside ``notify()`` right after it woke the thread leaves a stale entry behind, and the next ``notify()`` then wakes
nobody (the next wait times out with the lock free), which real SIGINT bursts did.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Final

from ._os import O_CLOEXEC, O_NOFOLLOW, close_all, open_into
from ._owners import at_fork

try:
    import fcntl

    AVAILABLE: Final = True
except ImportError:  # pragma: no cover - Windows: the caller polls instead
    AVAILABLE = False  # type: ignore[misc]


class _Request:
    """One wait: ``done`` is released by the thread when it decided (granted, or an error)."""

    __slots__ = ("cancelled", "done", "granted")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.granted = False
        self.cancelled = False


#: Waiters whose Stores were all closed while their thread was blocked in the kernel, by the lock file's
#: (device, inode). A blocking flock cannot be called off, so such a thread stays until the lock comes to it; the
#: next Store on the same file adopts it (with its place in the kernel's queue) instead of starting another, so a
#: program that opens a Store per attempt while a foreign process holds the lock for hours keeps one thread and one
#: descriptor per lock file, not one per attempt. A parked thread that gets the lock before anyone adopts it drops
#: the grant and ends.
PARKED: dict[tuple[int, int], Waiter] = {}
_PARK_LOCK = threading.Lock()


def adopt(inode: tuple[int, int]) -> Waiter | None:
    """The parked waiter of this lock file, now the caller's (None when there is none)."""
    with _PARK_LOCK:
        waiter = PARKED.pop(inode, None)
        if waiter is not None:
            waiter._parked = False
        return waiter


class Waiter:
    """One per process and lock file: a thread that takes the flock on its own descriptor when asked.

    ``fds`` is the list that holds the thread's descriptor, owned by the caller (so that a forked child, where the
    thread does not exist, can close it).
    """

    def __init__(self, lock_file: str, fds: list[int]) -> None:
        self._fds = fds
        self._guard = threading.Lock()  # the requests' state; only ever used in ``with`` statements
        # Requests for the thread (None: stop). A withdrawn request may still be in it; the thread skips it.
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        # The latest request: :meth:`withdraw` (called at the caller's release) withdraws it, so that a grant still
        # to come is dropped even when the caller's own withdrawal in wait() was cut short by interrupts.
        self._current: _Request | None = None
        self._closing = False
        self._busy = False  # the thread is in the kernel for a request (under _guard)
        self._parked = False  # in PARKED (under _PARK_LOCK)
        self._error: OSError | None = None
        try:
            self.fd = open_into(fds, lock_file, os.O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
            st = os.fstat(self.fd)
            self.inode = (st.st_dev, st.st_ino)
            threading.Thread(target=self._run, name=f"lockstore-waiter-{self.fd}", daemon=True).start()
        except BaseException:
            # Interrupted in Thread.start, the thread may be running already: told to end (it has no request yet),
            # and its descriptor closed here (it finds the list empty).
            self.close()
            close_all(fds)
            raise

    def _run(self) -> None:
        try:
            while True:
                request = self._requests.get()
                with self._guard:
                    if self._closing:
                        return
                    if request is None or request.cancelled:
                        continue  # withdrawn before the thread came to it
                    self._busy = True
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX)
                except OSError as exc:
                    with self._guard:
                        self._error = exc
                        self._busy = False
                        self._unpark()
                    request.done.release()
                    return
                with self._guard:
                    self._busy = False
                    dropped = request.cancelled or self._closing
                    if dropped:
                        fcntl.flock(self.fd, fcntl.LOCK_UN)  # the caller gave up meanwhile
                    else:
                        request.granted = True
                    ending = self._closing or self._unpark()
                if not dropped:
                    request.done.release()
                elif ending:
                    return
        finally:
            close_all(self._fds)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds (negative: forever); True when ``self.fd`` now holds the lock.

        The caller must hold this process's slot for the lock file, and unlock ``self.fd`` when it releases. On an
        exception (a signal handler's) the request is withdrawn: nobody is left holding the lock.
        """
        if self._error is not None:
            raise self._error
        request = _Request()
        self._current = request  # recorded before the thread can see it
        try:
            self._requests.put(request)
            request.done.acquire(True, -1 if timeout < 0 else timeout)
            with self._guard:
                if request.granted:
                    return True
                request.cancelled = True
        except BaseException:
            try:
                self._cancel(request)
            except BaseException:
                self._cancel(request)  # an interrupt cut the first call short
                raise
            raise
        if self._error is not None:
            raise self._error
        return False

    def withdraw(self) -> None:
        """Before the caller unlocks ``self.fd`` at its release: withdraw the latest request, so that a grant that
        comes later (its wait was given up and that withdrawal cut short by interrupts) is dropped by the thread.
        The unlock itself stays one C call right after the caller forgets the lock (see SidecarLock._let_go)."""
        with self._guard:
            request = self._current
            if request is not None:
                request.cancelled = True
                request.granted = False

    def _cancel(self, request: _Request) -> None:
        """Withdraw ``request``: a grant it got is dropped, one still to come will be."""
        with self._guard:
            request.cancelled = True
            granted, request.granted = request.granted, False
            if granted:
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _unpark(self) -> bool:
        """Under ``_guard``: leave PARKED; True when this thread was parked (nobody adopted it: it ends)."""
        with _PARK_LOCK:
            if not self._parked:
                return False
            self._parked = False
            if PARKED.get(self.inode) is self:
                del PARKED[self.inode]
            return True

    def close(self, *, forked: bool = False) -> None:
        """Stop the thread; it closes its descriptor (releasing any flock on it) when it leaves the kernel. A thread
        in the kernel for a withdrawn request is parked instead, for the next Store on the file to adopt.

        In a forked child the thread does not exist (and its locks may have been held at the fork): only our copy of
        the descriptor is closed.
        """
        if forked:
            close_all(self._fds)
            return
        with self._guard:
            if self._busy and not self._closing:
                with _PARK_LOCK:
                    if self.inode not in PARKED:
                        PARKED[self.inode] = self
                        self._parked = True
                        return
            self._closing = True
        self._requests.put(None)

    @property
    def fds(self) -> list[int]:
        """The list that holds the thread's descriptor (for an adopting slot's fork bookkeeping)."""
        return self._fds


def _after_fork() -> None:
    """In a child: the parked threads do not exist here; close our copies of their descriptors."""
    global _PARK_LOCK
    _PARK_LOCK = threading.Lock()
    for waiter in PARKED.values():
        close_all(waiter.fds)
    PARKED.clear()


at_fork(_after_fork)

__all__ = ["AVAILABLE", "PARKED", "Waiter", "adopt"]
