"""Guarantee 2 under kill -9: a writer killed at a random moment leaves a whole file (old or next value),
its temp files are swept by the next writer, and its lock is free at once."""

from __future__ import annotations

import fcntl
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

import lockstore

from ._harness import add, bump, check_value, child_cmd, child_env, make_value, report, temp_files


def lock_free_now(path: Path) -> bool:
    """One non-blocking flock try on the sidecar from this process (another process than the killed writer)."""
    fd = os.open(f"{path}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing the descriptor releases our flock
    return True


def _holder(path: Path) -> object:
    """holder() as a store sees it (without decoding the data file, which may be torn in a negative control)."""
    from lockstore._sidecar import SidecarLock

    return SidecarLock(f"{path}.lock").holder()


def kill_loop(directory: Path, kills: int, *, pad: int, inplace: bool = False, seed: int = 0) -> list[str]:
    """Kill a transaction-loop writer ``kills`` times at random moments; return the violations seen."""
    rng = random.Random(seed)
    path = directory / "counter.json"
    acked = 0
    violations: list[str] = []
    swept = 0
    extra = ["--inplace"] if inplace else []
    for i in range(kills):
        add("processes")
        proc = subprocess.Popen(child_cmd("loop", str(path), "--pad", str(pad), *extra), stdout=subprocess.PIPE,
                                env=child_env())
        assert proc.stdout is not None
        for _ in range(rng.randint(1, 3)):
            line = proc.stdout.readline()
            if not line:
                break
            acked = int(line)
        # A random moment inside the next transaction or two (randomness, not a guess at speed).
        time.sleep(rng.uniform(0, 0.004))
        proc.kill()
        proc.wait(30)
        for line in proc.stdout.read().split():
            acked = int(line)
        proc.stdout.close()
        add("kills")
        if not lock_free_now(path):
            violations.append(f"kill {i}: the lock is still held after its holder died")
        holder = _holder(path)
        if holder is not None:
            violations.append(f"kill {i}: holder() reports {holder} for a free lock")
        try:
            n = check_value(lockstore.read(path))
        except (ValueError, OSError) as exc:
            violations.append(f"kill {i}: {exc!r}")
            path.unlink()  # start the next round from a whole file
            lockstore.open(path, default=make_value(acked, pad)).commit()
            continue
        if n not in (acked, acked + 1):
            violations.append(f"kill {i}: file holds {n}, last acknowledged {acked}")
        if temp_files(directory):
            swept += 1
        # This process is the next writer: it must get the lock at once and sweep the killed writer's temp files.
        store = lockstore.open(path, default=make_value(0, pad))
        with store.transaction(timeout=0) as s:
            s.value = bump(s.value, pad)
            acked = check_value(s.value)
        store.close()
        left = temp_files(directory)
        if left:
            violations.append(f"kill {i}: the next writer left temp files {left}")
        add("transactions checked")
    add("temp files of killed writers swept", swept)
    return violations


@pytest.mark.timeout(120)
def test_kill_9_at_random_moments(tmp_path: Path) -> None:
    violations = kill_loop(tmp_path, 30, pad=4096, seed=1)
    report(violations)
    assert violations == []


@pytest.mark.stress
@pytest.mark.timeout(200)
def test_kill_9_hundreds_of_times(tmp_path: Path) -> None:
    violations = kill_loop(tmp_path, 150, pad=4096, seed=2)
    report(violations)
    assert violations == []


@pytest.mark.timeout(300)
def test_negative_control_in_place_writer_is_caught(tmp_path: Path) -> None:
    """A writer patched (in the child only) to rewrite the file in place must tear it under kill -9."""
    violations: list[str] = []
    # Usually the first round tears it; a machine busy with other jobs may need more (a kill lands only while the
    # child runs), so it tries up to 20 rounds and stops at the first tear.
    for round_ in range(20):
        violations = kill_loop(tmp_path, 10, pad=256 * 1024, inplace=True, seed=100 + round_)
        if violations:
            break
    report(violations, negative=True)
    assert violations, "200 kills of an in-place writer tore nothing: the kill test may have no teeth"
