"""Who inside this process holds a lock or a Store: owners (a thread, or an asyncio task), served in arrival order.

Every lock kind (the native sidecar, a caller's filelock instance, PostgreSQL, Redis) needs the same rules inside
one process, so they live here once:

- The holder is data, ``OwnerLock.ticket``, never the hidden state of a ``threading.Lock``: CPython can raise a
  KeyboardInterrupt right after ``lock.acquire()`` returned True and before the caller stored that fact, and the
  caller could then never tell whether to release. Here a caller makes its ticket first, and its cleanup,
  ``give(ticket)``, is right whether or not the ticket was ever made the holder. The short internal guard is a plain
  lock used only in ``with`` statements, whose enter and exit are C calls that no signal handler can split.
- Owners: the asyncio task running on this thread, else the thread (:func:`current_owner`). A second request by
  the holder's own owner through another ticket (another Store object on the same file) would wait for itself, so
  callers refuse it with LockReentryError; see :meth:`OwnerLock.held_by`.
- Waiters are served in arrival order: ``give()`` hands the lock to the first queued ticket directly.
- A holder that was garbage-collected without giving the lock back (an interrupt at the very start of an
  ``__exit__``) is detected through a weak reference, and its lock taken over.
- Fork: a child starts with every registered lock free (:func:`generation` changes; the registry's ``after_fork``
  hooks run), because the threads that held them did not survive the fork.
"""

from __future__ import annotations

import collections
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Final

#: While waiting without a deadline, how often a waiter checks whether the holder vanished without giving the lock
#: back (see the module docstring). Only that rare case costs this long.
_RECHECK: Final = 1.0

_generation = 0
#: ``FORKS[0]`` is :func:`generation` without a call, for code that must not offer a signal handler a point to run.
FORKS: list[int] = [0]


def generation() -> int:
    """A number that changes in a child after each fork."""
    return _generation


def current_owner() -> object:
    """The asyncio task running on this thread, or else this thread's ident."""
    aio = sys.modules.get("asyncio")
    if aio is not None:
        loop = aio._get_running_loop()
        if loop is not None:
            task = aio.current_task(loop)
            if task is not None:
                return task
    return threading.get_ident()


def blocks_this_loop(owner: object) -> bool:
    """Whether ``owner`` is an asyncio task of the event loop running on this thread: waiting here for something it
    holds would stop the very loop that must let it finish."""
    aio = sys.modules.get("asyncio")
    if aio is None or not isinstance(owner, aio.Task):
        return False
    loop = aio._get_running_loop()
    return loop is not None and owner.get_loop() is loop


def conflicts(holder: object, owner: object) -> bool:
    """Whether ``owner`` waiting for something ``holder`` holds would wait for itself: the same owner, this very
    thread (a task whose loop runs inside this thread's transaction), or a task of the loop running on this thread
    (a blocking wait here would stop the loop that must let it finish)."""
    return holder is not None and (holder == owner or holder == threading.get_ident() or blocks_this_loop(holder))


class Ticket:
    """One request for an :class:`OwnerLock`, made before asking, so that cleanup code can always find it."""

    __slots__ = ("__weakref__", "_ref", "owner", "wake")

    def __init__(self, owner: object, holder: object = None) -> None:
        self.owner = owner
        # A weak reference to what holds the lock through this ticket (a transaction): when it is gone without
        # giving the lock back, the lock is taken over (see the module docstring).
        self._ref: Callable[[], object] | None = None if holder is None else weakref.ref(holder)
        self.wake: Any = None  # a locked threading.Lock while queued; released when made the holder

    def abandoned(self) -> bool:
        return self._ref is not None and self._ref() is None


class OwnerLock:
    """A lock held by a :class:`Ticket` (see the module docstring); also the base of a per-process lock slot."""

    __slots__ = ("_generation", "_guard", "_queue", "ticket")

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self.ticket: Ticket | None = None
        self._queue: collections.deque[Ticket] = collections.deque()
        self._generation = FORKS[0]

    def _check_fork(self) -> None:
        if self._generation != FORKS[0]:
            # Inherited through fork: whoever held or waited was a thread of the parent.
            self._guard = threading.Lock()
            self.ticket = None
            self._queue = collections.deque()
            self._generation = FORKS[0]

    def owner(self) -> object:
        """The owner holding it now, or None (a holder that vanished without giving it back counts as none)."""
        if self._generation != FORKS[0]:
            self._check_fork()
        ticket = self.ticket
        if ticket is None or ticket.abandoned():
            return None
        return ticket.owner

    def held_by(self, ticket: Ticket) -> bool:
        if self._generation != FORKS[0]:
            self._check_fork()
        return self.ticket is ticket

    def take(self, ticket: Ticket, timeout: float) -> bool:
        """Make ``ticket`` the holder, waiting up to ``timeout`` s (negative: forever, 0: no wait) behind earlier
        tickets. On any exception, and after False, the caller's cleanup is ``give(ticket)``."""
        if self._generation != FORKS[0]:
            self._check_fork()
        with self._guard:
            if self.ticket is not None and self.ticket.abandoned():
                self._pass_on()
            if self.ticket is None:  # then nobody is queued either: the lock always goes to the queue's head
                self.ticket = ticket
                return True
            if timeout == 0:
                return False
            wake = threading.Lock()
            wake.acquire()
            ticket.wake = wake
            self._queue.append(ticket)
        deadline = None if timeout < 0 else time.monotonic() + timeout
        while True:
            pause = _RECHECK if deadline is None else min(_RECHECK, max(0.0, deadline - time.monotonic()))
            woken = ticket.wake.acquire(True, pause)
            with self._guard:
                if not woken and self.ticket is not None and self.ticket.abandoned():
                    self._pass_on()
                if self.ticket is ticket:
                    return True
                if deadline is not None and time.monotonic() >= deadline:
                    self._remove(ticket)
                    return False

    def take_over(self, old: Ticket, new: Ticket) -> bool:
        """Make ``new`` the holder in place of ``old`` if ``old`` still holds it (one step, under the guard): of
        two parties cleaning up after a vanished holder, exactly one gets to."""
        if self._generation != FORKS[0]:
            self._check_fork()
        with self._guard:
            if self.ticket is not old:
                return False
            self.ticket = new
            return True

    def try_take(self, ticket: Ticket) -> bool:
        return self.take(ticket, 0.0)

    def give(self, ticket: Ticket) -> None:
        """Let go of the lock if ``ticket`` holds it (handing it to the next waiter), or withdraw ``ticket`` from
        the queue; does nothing otherwise, so cleanup code may call it whatever happened before."""
        if self._generation != FORKS[0]:
            self._check_fork()
        with self._guard:
            if self.ticket is ticket:
                self._pass_on()
            else:
                self._remove(ticket)

    def _pass_on(self) -> None:
        # Called with the guard held. The next waiter becomes the holder before it is woken: nobody can barge in.
        if self._queue:
            nxt = self._queue.popleft()
            self.ticket = nxt
            nxt.wake.release()
        else:
            self.ticket = None

    def _remove(self, ticket: Ticket) -> None:
        if ticket.wake is None:
            return  # never queued
        try:
            self._queue.remove(ticket)
        except ValueError:
            pass

    def busy(self) -> bool:
        """Whether anyone holds it or waits for it."""
        self._check_fork()
        return self.ticket is not None or bool(self._queue)


# ------------------------------------------------------------------------------------------------ deferred cleanup
#: Cleanups that garbage collection asked for (a Store or lock dropped without close()). A collection can run in the
#: middle of any code, lockstore's own locked sections included, so a finalizer only queues its work, with a C call
#: (``SimpleQueue.put`` is safe there), and :func:`run_deferred` does it at the next lockstore call of the process.
DEFERRED: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()


def defer_when_collected(obj: object, cleanup: Callable[[], object]) -> None:
    """Queue ``cleanup`` for :func:`run_deferred` once ``obj`` is garbage-collected (if it ever is)."""
    weakref.finalize(obj, DEFERRED.put, cleanup)


def run_deferred() -> None:
    """Run the cleanups queued by collected objects (called where no lockstore lock is held)."""
    if DEFERRED.empty():
        return
    while not DEFERRED.empty():
        try:
            cleanup = DEFERRED.get_nowait()
        except queue.Empty:
            return
        try:
            cleanup()
        except Exception:  # a cleanup is best effort: closing what nobody uses any more
            pass


# ------------------------------------------------------------------------------------------------ fork hooks
_AFTER_FORK: list[Callable[[], None]] = []


def at_fork(hook: Callable[[], None]) -> None:
    """Run ``hook`` in a child after each fork (after the generation changed)."""
    _AFTER_FORK.append(hook)


def _after_fork_in_child() -> None:
    global _generation, DEFERRED
    _generation += 1
    FORKS[0] = _generation
    DEFERRED = queue.SimpleQueue()  # the parent's collected objects are the parent's to clean up
    for hook in _AFTER_FORK:
        hook()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


__all__ = ["FORKS", "OwnerLock", "Ticket", "at_fork", "blocks_this_loop", "conflicts", "current_owner", "generation"]
