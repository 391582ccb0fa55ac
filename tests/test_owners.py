"""``lockstore/_owners.py``: the in-process lock that Stores' threads and tasks queue on (one per Store, one per lock
file), driven by real threads."""

from __future__ import annotations

import threading

from _children import DEADLINE

from lockstore._owners import OwnerLock, Ticket


def _take_in_thread(lock: OwnerLock, ticket: Ticket, timeout: float) -> bool:
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(lock.take(ticket, timeout)))
    thread.start()
    thread.join(DEADLINE)
    return got[0]


def test_a_timed_out_request_leaves_nothing_queued_and_is_never_handed_the_lock() -> None:
    lock = OwnerLock()
    holder, late = Ticket("holder"), Ticket("late")  # no transaction behind them: never taken over as abandoned
    assert lock.take(holder, -1)
    assert not _take_in_thread(lock, late, 0.05)
    assert not lock.busy() or lock.held_by(holder)
    assert lock.owner() == "holder"
    lock.give(holder)
    # The hand-over at the release must not go to the request that gave up: nobody would ever give it back.
    assert lock.owner() is None and not lock.busy()
    third = Ticket("third")
    assert _take_in_thread(lock, third, 0.0)
    lock.give(third)


def test_queued_requests_are_served_in_order() -> None:
    lock = OwnerLock()
    first = Ticket("first")
    assert lock.take(first, -1)
    order: list[str] = []
    started: list[threading.Thread] = []
    for name in ("a", "b", "c"):
        ticket = Ticket(name)

        def run(t: Ticket = ticket) -> None:
            assert lock.take(t, DEADLINE)
            order.append(str(t.owner))
            lock.give(t)

        thread = threading.Thread(target=run)
        thread.start()
        started.append(thread)
        while not any(q is ticket for q in lock._queue):  # queued before the next one starts
            threading.Event().wait(0.001)
    lock.give(first)
    for thread in started:
        thread.join(DEADLINE)
    assert order == ["a", "b", "c"]
