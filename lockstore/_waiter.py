"""Waiting for a native lock in the kernel's queue, with a timeout, from any thread.

filelock waits by polling a non-blocking flock every ``poll_interval``: a hand-over can lag a whole interval, and
a waiter that polls loses to a releaser that re-acquires at once, so under contention one process can starve. A
blocking flock sits in the kernel's queue and is woken at the release, but it cannot time out; so a daemon thread
sits in the kernel while the caller waits on a condition with its timeout.

The thread locks its OWN descriptor of the lock file (a separate open file description). Its grant and the
caller's descriptor therefore really exclude each other, and a grant that arrives after the caller gave up is
dropped by unlocking the thread's own descriptor, which nobody else uses. (A shared descriptor would make a
second flock on it "succeed" at once, and the thread's unlock of a withdrawn grant would release a lock that
someone else believed held.)

The condition's lock is an RLock used only through ``with self._lock``: its enter, exit and the condition's
release/re-acquire around a wait are all C calls, so a KeyboardInterrupt in the caller cannot leave it held.
"""

from __future__ import annotations

import os
import threading
from typing import Final

from ._os import O_CLOEXEC, O_NOFOLLOW, close_all, open_into

try:
    import fcntl

    AVAILABLE: Final = True
except ImportError:  # pragma: no cover - Windows: the caller polls instead
    AVAILABLE = False  # type: ignore[misc]


class Waiter:
    """One per process and lock file: a thread that takes the flock on its own descriptor when asked."""

    def __init__(self, lock_file: str) -> None:
        self._fds: list[int] = []
        try:
            self.fd = open_into(self._fds, lock_file, os.O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
            st = os.fstat(self.fd)
            self.inode = (st.st_dev, st.st_ino)
            self._lock = threading.RLock()
            self._cond = threading.Condition(self._lock)
            self._requested = False
            self._granted = False
            self._closing = False
            self._error: OSError | None = None
            threading.Thread(target=self._run, name=f"lockstore-waiter-{self.fd}", daemon=True).start()
        except BaseException:
            close_all(self._fds)
            raise

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self._requested or self._closing):
                        self._cond.wait()
                    if self._closing:
                        return
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX)
                except OSError as exc:
                    with self._lock:
                        self._error = exc
                        self._cond.notify_all()
                    return
                with self._lock:
                    if self._requested and not self._closing:
                        self._requested = False
                        self._granted = True
                        self._cond.notify_all()
                        continue
                    # The caller gave up meanwhile (or we are closing): drop the grant.
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
                    if self._closing:
                        return
        finally:
            close_all(self._fds)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds (negative: forever); True when ``self.fd`` now holds the lock.

        The caller must hold this process's slot for the lock file, and unlock ``self.fd`` when it releases. On an
        exception (a signal handler's) the request is withdrawn: nobody is left holding the lock.
        """
        with self._lock:
            if self._error is not None:
                raise self._error
            self._requested = True
            try:
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._granted or self._error is not None,
                                    None if timeout < 0 else timeout)
            except BaseException:
                self._withdraw()
                raise
            if self._granted:
                self._granted = False
                return True
            self._withdraw()
            if self._error is not None:
                raise self._error
            return False

    def _withdraw(self) -> None:
        self._requested = False
        if self._granted:  # granted in the instant after the wait ended
            self._granted = False
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self, *, forked: bool = False) -> None:
        """Stop the thread; it closes its descriptor (releasing any flock on it) when it leaves the kernel.

        In a forked child the thread does not exist (and its lock may have been held at the fork): only our copy of
        the descriptor is closed.
        """
        if forked:
            close_all(self._fds)
            return
        with self._lock:
            self._closing = True
            self._cond.notify_all()


__all__ = ["AVAILABLE", "Waiter"]
