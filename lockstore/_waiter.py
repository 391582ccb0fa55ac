"""Waiting for a native lock in the kernel's queue, with a timeout, from any thread.

filelock waits by polling a non-blocking flock every ``poll_interval``: a hand-over can lag a whole interval, and
a waiter that polls loses to a releaser that re-acquires at once, so under contention one process can starve
(measured: the longest wait of 8 processes was 209x the ideal). A blocking flock sits in the kernel's queue and is
woken at the release, but it cannot time out; so a daemon thread sits in the kernel while the caller waits on a
condition with its timeout.

The thread locks its OWN descriptor of the lock file (a separate open file description). Its grant and the
caller's descriptor therefore really exclude each other, and a grant that arrives after the caller gave up is
dropped by unlocking the thread's own descriptor, which nobody else uses. (A shared descriptor would make a
second flock on it "succeed" at once, and the thread's unlock of a withdrawn grant would release a lock that
someone else believed held.)
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Final

_O_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)

try:
    import fcntl

    AVAILABLE: Final = True
except ImportError:  # pragma: no cover - Windows: the caller polls instead
    AVAILABLE = False  # type: ignore[misc]


def lock_blocking(fd: int) -> None:
    """flock ``fd`` exclusively, waiting in the kernel's queue for as long as it takes."""
    fcntl.flock(fd, fcntl.LOCK_EX)


class Waiter:
    """One per process and lock file: a thread that takes the flock on its own descriptor when asked."""

    def __init__(self, lock_file: str) -> None:
        self.fd = os.open(lock_file, os.O_RDONLY | _O_CLOEXEC)
        st = os.fstat(self.fd)
        self.inode = (st.st_dev, st.st_ino)
        self._cond = threading.Condition(threading.Lock())
        self._requested = False
        self._granted = False
        self._closing = False
        self._error: OSError | None = None
        threading.Thread(target=self._run, name=f"lockstore-waiter-{self.fd}", daemon=True).start()

    def _run(self) -> None:
        cond = self._cond
        try:
            while True:
                with cond:
                    while not (self._requested or self._closing):
                        cond.wait()
                    if self._closing:
                        return
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX)
                except OSError as exc:
                    with cond:
                        self._error = exc
                        cond.notify_all()
                    return
                with cond:
                    if self._requested and not self._closing:
                        self._requested = False
                        self._granted = True
                        cond.notify_all()
                        continue
                    # The caller gave up meanwhile (or we are closing): drop the grant.
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
                    if self._closing:
                        return
        finally:
            with contextlib.suppress(OSError):
                os.close(self.fd)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds (negative: forever); True when ``self.fd`` now holds the lock.

        The caller must hold the process's mutex for this lock file, and unlock ``self.fd`` when it releases.
        """
        with self._cond:
            if self._error is not None:
                raise self._error
            self._requested = True
            self._cond.notify_all()
            try:
                self._cond.wait_for(lambda: self._granted or self._error is not None,
                                    None if timeout < 0 else timeout)
            except BaseException:
                self._withdraw()  # e.g. a signal handler raised: nobody may be left holding the lock
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

    def close(self) -> None:
        """Stop the thread; it closes its descriptor (releasing any flock on it) when it leaves the kernel."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()


__all__ = ["AVAILABLE", "Waiter", "lock_blocking"]
