"""The asyncio API: ``store.atransaction()`` and ``lockstore.aread()``, with real files, locks and processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import filelock
import pytest

import lockstore

pytestmark = pytest.mark.timeout(180)

#: Seconds a test waits for a child to reach a point; generous because the machine may be loaded, never a pace.
DEADLINE = 60.0

_HOLD = """
import sys, lockstore
store = lockstore.open(sys.argv[1], default=0, durable=False)
with store.transaction(label=sys.argv[2]) as s:
    s.value += 1
    print("ready", flush=True)
    sys.stdin.readline()
"""


@contextlib.contextmanager
def holding(path: Path, label: str = "aio-test-holder") -> Iterator[subprocess.Popen[str]]:
    """A child process inside a transaction on ``path`` (adding 1) until ``release(child)`` or the block ends."""
    with subprocess.Popen([sys.executable, "-c", _HOLD, str(path), label], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            ready, _, _ = select.select([child.stdout], [], [], DEADLINE)
            assert ready and child.stdout.readline().strip() == "ready"
            yield child
            release(child)
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate(timeout=DEADLINE)


def release(child: subprocess.Popen[str]) -> None:
    if child.returncode is None:
        _, err = child.communicate("go\n", timeout=DEADLINE)
        assert child.returncode == 0, err


# --------------------------------------------------------------------------------------------- no lost update
def test_many_tasks_one_loop_are_exact(tmp_path: Path) -> None:
    store = lockstore.open(tmp_path / "c.json", default=0, durable=False)

    async def worker() -> None:
        for _ in range(20):
            async with store.atransaction() as s:
                value = s.value
                await asyncio.sleep(0)  # let every other task run while this one holds the lock
                s.value = value + 1

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(50)))

    asyncio.run(main())
    assert lockstore.read(tmp_path / "c.json") == 1000


def test_negative_control_tasks_without_a_transaction_lose_updates(tmp_path: Path) -> None:
    """The same read, yield, write without atransaction(): every task reads before any writes, so all but one of
    the increments are lost (deterministic, through a barrier)."""
    path = tmp_path / "c.json"
    lockstore.open(path, default=0).commit()

    async def main() -> None:
        barrier = asyncio.Barrier(10)

        async def worker() -> None:
            store = lockstore.open(path, default=0, durable=False)
            value = await lockstore.aread(path)
            await barrier.wait()
            store.value = value + 1
            await asyncio.to_thread(store.commit)

        await asyncio.gather(*(worker() for _ in range(10)))

    asyncio.run(main())
    assert lockstore.read(path) == 1


def test_many_tasks_with_a_soft_lock_are_exact(tmp_path: Path) -> None:
    """A caller's filelock lock is reentrant per thread, so tasks of one thread must take turns to exclude each
    other; the first assertion is the hazard (the negative control), the count is the guard."""
    soft = filelock.SoftFileLock(str(tmp_path / "c.json.soft"))
    with soft, soft:  # reentrant within a thread: two tasks of one thread would both "hold" it
        assert soft.is_locked
    store = lockstore.open(tmp_path / "c.json", default=0, durable=False, lock=soft)

    async def worker() -> None:
        for _ in range(10):
            async with store.atransaction() as s:
                value = s.value
                await asyncio.sleep(0)
                s.value = value + 1

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(10)))

    asyncio.run(main())
    assert lockstore.read(tmp_path / "c.json") == 100
    assert not soft.is_locked


_SYNC_CHILD = """
import sys, lockstore
store = lockstore.open(sys.argv[1], default=0, durable=False, timeout=-1)
sys.stdin.readline()
for _ in range(int(sys.argv[2])):
    with store.transaction() as s:
        s.value += 1
"""

_ASYNC_CHILD = """
import asyncio, sys, lockstore
store = lockstore.open(sys.argv[1], default=0, durable=False, timeout=-1)

async def worker(n):
    for _ in range(n):
        async with store.atransaction() as s:
            v = s.value
            await asyncio.sleep(0)
            s.value = v + 1

async def main(tasks, n):
    await asyncio.gather(*(worker(n) for _ in range(tasks)))

sys.stdin.readline()
asyncio.run(main(int(sys.argv[2]), int(sys.argv[3])))
"""


def test_sync_and_async_processes_mixed_are_exact(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    children = [
        *(subprocess.Popen([sys.executable, "-c", _SYNC_CHILD, str(path), "100"], stdin=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for _ in range(2)),
        *(subprocess.Popen([sys.executable, "-c", _ASYNC_CHILD, str(path), "10", "10"], stdin=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for _ in range(2)),
    ]
    for child in children:  # start together: each waits for this line after its imports
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    for child in children:
        _, err = child.communicate(timeout=DEADLINE * 2)
        assert child.returncode == 0, err
    assert lockstore.read(path) == 2 * 100 + 2 * 10 * 10


# --------------------------------------------------------------------------------------------- semantics
def test_exception_writes_nothing_and_resets_the_value(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    store = lockstore.open(path, default={"n": 0})

    async def main() -> None:
        async with store.atransaction() as s:
            s.value["n"] = 1
        inode = path.stat().st_ino
        with pytest.raises(KeyError):
            async with store.atransaction() as s:
                s.value["n"] = 99
                raise KeyError("boom")
        assert store.value == {"n": 1}
        assert path.stat().st_ino == inode and lockstore.read(path) == {"n": 1}
        assert store.holder() is None  # released
        async with store.atransaction(timeout=0) as s:  # and free for the next one
            s.value["n"] += 1

    asyncio.run(main())
    assert lockstore.read(path) == {"n": 2}


def test_reload_under_the_lock_and_no_write_when_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    store = lockstore.open(path, default=0, durable=False)
    other = lockstore.open(path, default=0, durable=False)

    async def main() -> None:
        async with store.atransaction() as s:
            s.value = 0  # the default on a missing file: nothing changed, nothing written
        assert not path.exists()
        async with store.atransaction() as s:
            s.value = 5
        with other.transaction() as o:  # another writer changes the file behind ``store``'s back
            o.value = 41
        async with store.atransaction() as s:
            assert s.value == 41  # reloaded under the lock, not the stale 5
            s.value += 1
        inode = path.stat().st_ino
        async with store.atransaction() as s:
            s.value = 42  # unchanged
        assert path.stat().st_ino == inode

    asyncio.run(main())
    assert lockstore.read(path) == 42


def test_nested_atransaction_in_the_same_task_joins(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    store = lockstore.open(path, default=0, durable=False)

    async def main() -> None:
        async with store.atransaction() as outer:
            outer.value = 1
            async with store.atransaction(timeout=0) as inner:  # joins: no wait, no second lock
                assert inner is outer
                inner.value += 1
            assert not path.exists()  # only the outermost writes
            with pytest.raises(ValueError):
                async with store.atransaction():
                    store.value = 100
                    raise ValueError
            assert store.value == 2  # a savepoint: the failed inner block rolled back to its own start
            store.value += 5
        assert lockstore.read(path) == 7

    asyncio.run(main())


def test_atransaction_inside_a_sync_transaction_of_the_same_thread_joins(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    store = lockstore.open(path, default=0, durable=False)

    async def main() -> None:
        with store.transaction() as s:
            s.value = 1
            async with store.atransaction(timeout=0) as a:
                a.value += 1
            assert not path.exists()

    asyncio.run(main())
    assert lockstore.read(path) == 2


def test_two_tasks_are_told_apart(tmp_path: Path) -> None:
    """A second task does not join the first task's transaction: it waits for the lock like another thread."""
    path = tmp_path / "c.json"
    store = lockstore.open(path, default=0, durable=False)

    async def main() -> None:
        inside = asyncio.Event()
        leave = asyncio.Event()

        async def first() -> None:
            async with store.atransaction() as s:
                s.value += 1
                inside.set()
                await leave.wait()

        task = asyncio.create_task(first())
        await inside.wait()
        with pytest.raises(lockstore.LockTimeout) as info:
            async with store.atransaction(timeout=0):
                pass
        assert info.value.holder is not None and info.value.holder.pid == os.getpid()
        with pytest.raises(lockstore.LockTimeout):
            async with store.atransaction(blocking=False):
                pass
        second = asyncio.create_task(_increment(store))
        await asyncio.sleep(0)
        assert not second.done()
        leave.set()
        await asyncio.wait_for(asyncio.gather(task, second), DEADLINE)

    asyncio.run(main())
    assert lockstore.read(path) == 2


async def _increment(store: lockstore.Store[int]) -> None:
    async with store.atransaction(timeout=DEADLINE) as s:
        s.value += 1


def test_second_store_nested_in_the_same_task_raises_at_once(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    a = lockstore.open(path, default=0, durable=False)
    b = lockstore.open(path, default=0, durable=False)

    async def main() -> None:
        async with a.atransaction():
            with pytest.raises(lockstore.LockReentryError):
                async with b.atransaction(timeout=DEADLINE):
                    pass

    asyncio.run(main())


def test_lock_false_has_no_transactions(tmp_path: Path) -> None:
    store = lockstore.open(tmp_path / "c.json", default=0, lock=False)

    async def main() -> None:
        with pytest.raises(lockstore.TransactionLockError):
            async with store.atransaction():
                pass

    asyncio.run(main())


def test_cancelled_inside_the_block_writes_nothing_and_releases(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    store = lockstore.open(path, default=0, durable=False)

    async def main() -> None:
        inside = asyncio.Event()

        async def victim() -> None:
            async with store.atransaction() as s:
                s.value = 99
                inside.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(victim())
        await inside.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert store.holder() is None
        await _increment(store)

    asyncio.run(main())
    assert lockstore.read(path) == 1


# --------------------------------------------------------------------------------------------- the event loop
def test_the_loop_keeps_running_while_waiting_for_another_process(tmp_path: Path) -> None:
    """A ticker task keeps ticking while atransaction() waits for a lock held by another process; the holder is
    released only after 20 ticks, so a blocked loop would never get there (and would time out instead)."""
    path = tmp_path / "c.json"
    store = lockstore.open(path, default=0, durable=False)
    with holding(path) as child:

        async def main() -> int:
            ticks = 0
            started = asyncio.Event()

            async def ticker() -> None:
                nonlocal ticks
                await started.wait()
                while ticks < 20:
                    await asyncio.sleep(0.005)
                    ticks += 1
                await asyncio.to_thread(release, child)

            async def waiter() -> int:
                started.set()
                async with store.atransaction(timeout=DEADLINE) as s:
                    s.value += 1
                    return int(s.value)

            _, value = await asyncio.wait_for(asyncio.gather(ticker(), waiter()), DEADLINE)
            assert ticks == 20
            return value

        assert asyncio.run(main()) == 2  # the holder's increment, then ours
    assert lockstore.read(path) == 2


def test_negative_control_the_sync_transaction_blocks_the_loop(tmp_path: Path) -> None:
    """What the test above guards against: a blocking transaction() in a coroutine stops every other task."""
    path = tmp_path / "c.json"
    store = lockstore.open(path, default=0, durable=False)
    with holding(path):

        async def main() -> int:
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0)
                    ticks += 1

            task = asyncio.create_task(ticker())
            await asyncio.sleep(0)
            before = ticks
            with pytest.raises(lockstore.LockTimeout), store.transaction(timeout=0.2):
                pass
            during = ticks - before
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return during

        assert asyncio.run(main()) == 0


def test_timeout_names_the_holder_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    store = lockstore.open(path, default=0, durable=False)
    with holding(path, label="aio-rollup") as child:

        async def main() -> lockstore.LockTimeout:
            with pytest.raises(lockstore.LockTimeout) as info:
                async with store.atransaction(timeout=0.1):
                    pass
            return info.value

        exc = asyncio.run(main())
        assert exc.waited >= 0.1
        assert exc.holder is not None and exc.holder.pid == child.pid and exc.holder.label == "aio-rollup"
        assert f"by pid {child.pid}" in str(exc) and exc.path == str(path)
    assert lockstore.read(path) == 1


def test_cancelled_while_waiting_leaves_no_lock(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    store = lockstore.open(path, default=0, durable=False)
    with holding(path):

        async def main() -> None:
            task = asyncio.create_task(_increment(store))
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(main())
    asyncio.run(_increment(store))
    assert lockstore.read(path) == 2


# --------------------------------------------------------------------------------------------- aread, imports
def test_aread(tmp_path: Path) -> None:
    path = tmp_path / "c.json"

    async def main() -> tuple[object, object, object]:
        missing = await lockstore.aread(path, default={"fresh": True})
        with lockstore.open(path, default=cast("list[int]", [])) as s:
            s.value.append(1)
        return missing, await lockstore.aread(path), await lockstore.aread(str(path), None, format="json")

    assert asyncio.run(main()) == ({"fresh": True}, [1], [1])


def test_import_lockstore_does_not_import_asyncio() -> None:
    proc = subprocess.run([sys.executable, "-c", "import sys, lockstore; print('asyncio' in sys.modules)"],
                          capture_output=True, text=True, timeout=DEADLINE, check=True)
    assert proc.stdout.strip() == "False"
