"""Shared helpers of the reliability suite: the scorecard registry, self-checking values, children, strace.

Everything here runs in the pytest process except the module-level worker functions, which multiprocessing
children import by name (so they must stay importable and picklable).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

#: Counts for the end-of-run scorecard (printed by ``conftest.pytest_terminal_summary``).
SCORE: collections.Counter[str] = collections.Counter()
#: Scorecard rows, in print order.
ROWS = (
    "processes",
    "transactions checked",  # printed as one row: processes x transactions checked
    "lock-free reads checked",
    "kills",
    "crash points enumerated",
    "power cuts: ext4",
    "power cuts: ext4-noauto_da_alloc",
    "power cuts: xfs",
    "fault x site combinations",
    "bad inputs tried",
    "negative controls failed as they should",
    "violations",
)

CHILD = str(Path(__file__).with_name("_child.py"))
HERE = str(Path(__file__).parent.parent)  # tests/: makes ``reliability`` importable in children


def add(key: str, n: int = 1) -> None:
    """Add ``n`` to a scorecard row."""
    SCORE[key] += n


def report(violations: Sequence[str], *, negative: bool = False) -> None:
    """Book a harness result: violations of a guarantee test, or the expected failure of a negative control."""
    if negative:
        if violations:
            add("negative controls failed as they should")
        return
    add("violations", len(violations))


# ----------------------------------------------------------------------------------------------- values
def make_value(n: int, pad: int = 64) -> dict[str, Any]:
    """A counter value that carries a hash of its own payload, so a torn or mixed file is detected."""
    payload = {"n": n, "pad": f"{n:08d}" * max(1, pad // 8)}
    return {**payload, "sha": _digest(payload)}


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def check_value(value: Any) -> int:
    """Return the counter of a self-checking value; raise ValueError when it is not whole."""
    if not isinstance(value, dict) or set(value) != {"n", "pad", "sha"}:
        raise ValueError(f"not a self-checking value: {str(value)[:80]!r}")
    payload = {"n": value["n"], "pad": value["pad"]}
    if _digest(payload) != value["sha"]:
        raise ValueError(f"self-check hash mismatch at n={value['n']!r}")
    return int(value["n"])


def bump(value: dict[str, Any], pad: int = 64) -> dict[str, Any]:
    """The next self-checking value after ``value``."""
    return make_value(check_value(value) + 1, pad)


def temp_files(directory: str | os.PathLike[str]) -> list[str]:
    """Temp files lockstore's atomic writer leaves behind (``.<name>.<token>.tmp``)."""
    return sorted(n for n in os.listdir(directory) if n.startswith(".") and n.endswith(".tmp"))


# ----------------------------------------------------------------------------------------------- children
def child_env(*, eatmydata: bool = False) -> dict[str, str]:
    """Environment for a child: the suite's helpers importable, optionally fsync made a no-op by libeatmydata."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH", "")) if p)
    env.pop("LD_PRELOAD", None)
    if eatmydata:
        env["LD_PRELOAD"] = eatmydata_library()
    return env


def eatmydata_library() -> str:
    """Path of libeatmydata (skips the test when the eatmydata package is missing)."""
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        candidate = os.path.join(d, "libeatmydata.so")
        if os.path.exists(candidate):
            return candidate
    pytest.skip("libeatmydata.so not found: apt-get install eatmydata")


def need_tool(name: str) -> str:
    """Absolute path of a command, or skip the test naming the missing tool."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def need_root() -> None:
    """Skip unless running as root (mounts, loop devices, privilege drop)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts, loop devices, privilege drop)")


def child_cmd(*args: str) -> list[str]:
    return [sys.executable, CHILD, *args]


def run_child(*args: str, timeout: float = 60, eatmydata: bool = False, check: bool = True) -> str:
    """Run ``_child.py`` with ``args`` to completion; return its stdout (raise with its stderr on failure)."""
    add("processes")
    proc = subprocess.run(child_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env=child_env(eatmydata=eatmydata), check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"child {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def lock_is_free(path: str | os.PathLike[str]) -> bool:
    """Whether ANOTHER process can take the store's lock at once (one non-blocking try)."""
    out = run_child("trylock", os.fspath(path))
    return out.strip() == "free"


# ----------------------------------------------------------------------------------------------- strace
class Attached:
    """A ``_child.py`` process waiting for ``go``, with strace attached to it (so counting starts now)."""

    def __init__(self, child_args: Sequence[str], strace_args: Sequence[str], *, eatmydata: bool = False) -> None:
        add("processes")
        self.child = subprocess.Popen(child_cmd(*child_args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=child_env(eatmydata=eatmydata))
        assert self.child.stdout is not None and self.child.stdin is not None
        ready = self.child.stdout.readline()
        if ready.strip() != "ready":
            err = self.child.stderr.read() if self.child.stderr else ""
            raise AssertionError(f"child did not get ready: {ready!r} {err}")
        self.strace = subprocess.Popen([need_tool("strace"), "-f", *strace_args, "-p", str(self.child.pid)],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True)
        # "Process N attached" is printed after PTRACE_SEIZE and PTRACE_INTERRUPT: from then on every syscall of
        # the child is seen, so telling it to go cannot race with the attach.
        assert self.strace.stderr is not None
        line = self.strace.stderr.readline()
        if "attached" not in line:
            self.child.kill()
            raise AssertionError(f"strace could not attach: {line}{self.strace.stderr.read()}")

    def go(self, timeout: float = 60) -> tuple[int, str, str]:
        """Let the child run its operation; return (its exit status, stdout, stderr) after strace is done."""
        assert self.child.stdin is not None
        try:
            self.child.stdin.write("go\n")
            self.child.stdin.flush()
        except BrokenPipeError:  # pragma: no cover - killed before it read go
            pass
        out, err = self.child.communicate(timeout=timeout)
        self.strace.communicate(timeout=timeout)
        return self.child.returncode, out, err


# ----------------------------------------------------------------------------------------------- mounts
def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=120)


@contextmanager
def tmpfs(mountpoint: Path, options: str) -> Iterator[Path]:
    """Mount a tmpfs with ``options`` on ``mountpoint`` (the test's own directory); unmount it afterwards."""
    need_root()
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = run("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint), check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {proc.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        run("umount", "-l", str(mountpoint), check=False)


@contextmanager
def bind_ro(source: Path, mountpoint: Path) -> Iterator[Path]:
    """Bind ``source`` read-only on ``mountpoint``; unmount afterwards."""
    need_root()
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = run("mount", "--bind", str(source), str(mountpoint), check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {proc.stderr.strip()}")
    try:
        run("mount", "-o", "remount,bind,ro", str(mountpoint))
        yield mountpoint
    finally:
        run("umount", "-l", str(mountpoint), check=False)


# ----------------------------------------------------------------------------------------------- concurrency workers
PAD = 2048  # big enough that a torn file could not pass for a whole one


def incr_worker(path: str, m: int, start: Any, mode: str, store: Any = None) -> None:
    """Add 1 to the counter ``m`` times: ``locked`` (transactions), ``inherited`` (a store made before fork),
    or ``unlocked`` (reload()+commit() with lock=False: the negative control that must lose updates)."""
    import lockstore

    start.wait()
    if mode == "unlocked":
        s = lockstore.open(path, default=make_value(0, PAD), lock=False)
        for _ in range(m):
            s.value = bump(s.reload(), PAD)
            s.commit()
        return
    s = store if mode == "inherited" else lockstore.open(path, default=make_value(0, PAD), timeout=-1)
    for _ in range(m):
        with s.transaction() as t:
            t.value = bump(t.value, PAD)


def read_worker(path: str, stop: Any, results: Any) -> None:
    """Lock-free reader: every value must be whole (self-check) and the counter must never go back."""
    import lockstore

    last, reads, bad = -1, 0, []
    while not stop.is_set():
        try:
            value = lockstore.read(path)
        except Exception as exc:
            bad.append(f"read failed: {exc!r}")
            continue
        if value is None:
            continue
        try:
            n = check_value(value)
        except ValueError as exc:
            bad.append(str(exc))
            continue
        if n < last:
            bad.append(f"counter went back from {last} to {n}")
        last = n
        reads += 1
    results.put((reads, bad))
