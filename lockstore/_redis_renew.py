"""The Redis store's renewal thread: it keeps the leases that one storage holds, on a connection of its own."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from ._redis_lease import TOKEN_GONE, RedisHeld


class Renewer:
    """A thread keeping the leases that one storage holds, on a connection of its own: it renews each every third of
    the lease, and retries a release that failed (the server was unreachable) until the lease would have ended.

    ``renew(held)`` returns True (extended), False (the token no longer holds the lock: the held is marked lost) or
    raises (unreachable: tried again soon, while the lease may still be saved); ``release(held)`` raises when it
    could not reach the server. Never inherited: a child after fork starts with nothing to keep and no thread.
    """

    def __init__(self, renew: Callable[[RedisHeld], bool], release: Callable[[RedisHeld], None], lease: float,
                 name: str, *, idle: float) -> None:
        self._renew = renew
        self._release = release
        self.interval = lease / 3
        self._idle = min(idle, self.interval)  # an idle thread looks this often (no first renewal comes sooner)
        self._lease = lease
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._due: dict[RedisHeld, float] = {}
        self._releasing: dict[RedisHeld, float] = {}  # -> when its lease ends at the latest
        self._thread: threading.Thread | None = None
        self._wake_at = 0.0  # when the thread will look again by itself
        self._pid = os.getpid()

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._cond = threading.Condition(threading.Lock())
            self._due, self._releasing = {}, {}
            self._thread = None

    def _schedule(self, held: RedisHeld, when: float) -> None:
        # With the condition held. The thread is woken only when it would look too late by itself: an idle thread
        # looks as often as the earliest first renewal comes, so taking a lease never costs a thread switch.
        self._due[held] = when
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"lockstore-lease {self._name}", daemon=True)
            self._thread.start()
        elif when < self._wake_at:
            self._cond.notify()

    def add(self, held: RedisHeld, first: float) -> None:
        """Renew ``held`` in ``first`` seconds, then every third of the lease."""
        self._check_fork()
        with self._cond:
            self._schedule(held, time.monotonic() + first)

    def remove(self, held: RedisHeld) -> None:
        self._check_fork()
        with self._cond:
            self._due.pop(held, None)

    def release_later(self, held: RedisHeld) -> None:
        """Retry releasing ``held`` in the background (its release could not reach the server)."""
        self._check_fork()
        with self._cond:
            self._releasing[held] = time.monotonic() + self._lease
            self._schedule(held, time.monotonic() + min(self.interval / 4, 0.5))

    def close(self) -> None:
        self._check_fork()
        with self._cond:
            self._due.clear()
            self._releasing.clear()
            self._thread = None  # the running thread sees that it is no longer the one and ends
            self._cond.notify()

    def _run(self) -> None:
        cond, me = self._cond, threading.current_thread()
        while True:
            with cond:
                if cond is not self._cond or me is not self._thread:
                    return
                now = time.monotonic()
                if not self._due:
                    self._wake_at = now + self._idle
                    cond.wait(self._idle)
                    continue
                held, when = min(self._due.items(), key=lambda item: item[1])
                if when > now:
                    self._wake_at = when
                    cond.wait(when - now)
                    continue
                ends = self._releasing.get(held)
                if ends is not None and time.monotonic() > ends:  # expired by now anyway
                    del self._due[held], self._releasing[held]
                    continue
                self._due[held] = time.monotonic() + (self.interval if ends is None else min(self.interval / 4, 0.5))
            try:
                if ends is not None:
                    self._release(held)
                    ok = False
                else:
                    ok = self._renew(held)
            except Exception:
                with cond:
                    if ends is None and held in self._due:  # unreachable: try again soon, the lease may be saved
                        self._due[held] = time.monotonic() + min(self.interval / 4, 1.0)
                continue
            with cond:
                if not ok:
                    self._due.pop(held, None)
                    self._releasing.pop(held, None)
            if ends is None and not ok:
                held.lost = "a renewal found the lease gone: " + TOKEN_GONE


__all__ = ["Renewer"]
