"""Holders and waiters of an flock read from /proc/locks, checked against real processes holding real locks."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lockstore import _proclocks

pytestmark = pytest.mark.skipif(not _proclocks.AVAILABLE, reason="needs a readable /proc/locks (Linux)")

DEADLINE = 10.0
ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, namespaces)")

# A child that takes a lock (the statement in argv[2]) on argv[1], says "ready", and holds it until a line on stdin.
_HOLD = """
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
exec(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
"""
FLOCK_EX = "fcntl.flock(fd, fcntl.LOCK_EX)"
LOCKF = "fcntl.lockf(fd, fcntl.LOCK_EX, 1, 0)"  # byte 0
OFD = "fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack('hhqqi4x', fcntl.F_WRLCK, 0, 100, 1, 0))"  # byte 100

# A child that blocks in flock on argv[1] (LOCK_EX, or LOCK_SH when argv[2] is "s"), writes its pid to stdout once
# it has the lock, and exits (which releases the lock).
_WAIT = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_SH if sys.argv[2] == "s" else fcntl.LOCK_EX)
os.write(1, b"%d\\n" % os.getpid())
"""

# A child that tries flock(LOCK_EX | LOCK_NB) and unlocks, in a loop, until a byte arrives on stdin; it prints
# "failed" at its first failed attempt, then "ATTEMPTS FAILURES" at the end.
_TRY_LOOP = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.set_blocking(0, False)
attempts = failures = 0
print("ready", flush=True)
while True:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        failures += 1
        if failures == 1:
            print("failed", flush=True)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
    attempts += 1
    if attempts % 64 == 0:
        try:
            if os.read(0, 1):
                break
        except BlockingIOError:
            pass
print(attempts, failures, flush=True)
"""


# ------------------------------------------------------------------------------------------------------- helpers
def key(path: Path) -> tuple[int, int]:
    """``(dev, ino)`` of ``path`` as /proc/locks names it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _proclocks.lock_dev(fd), os.fstat(fd).st_ino
    finally:
        os.close(fd)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds; fail after DEADLINE seconds (never a fixed sleep that assumes speed)."""
    end = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def read_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], DEADLINE)
    assert ready, "no line from the child"
    return proc.stdout.readline().strip()


def spawn(
    code: str, *args: str, stdin: int = subprocess.PIPE, stdout: int = subprocess.PIPE, pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen[str]:
    """A ``python -c code args...`` child, with text pipes for stdin and stdout unless told otherwise."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdin=stdin, stdout=stdout, text=True, pass_fds=pass_fds
    )


@contextlib.contextmanager
def holding(path: Path, lock: str = FLOCK_EX) -> Iterator[subprocess.Popen[str]]:
    """A child holding ``lock`` on ``path`` for the duration of the block."""
    proc = spawn(_HOLD, str(path), lock)
    try:
        assert read_line(proc) == "ready"
        yield proc
    finally:
        try:
            proc.communicate("go\n", timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise


def lock_file(tmp_path: Path, name: str = "data.lock") -> Path:
    path = tmp_path / name
    path.touch()
    return path


# ----------------------------------------------------------------------------------------------------- holders
def test_holder_is_listed_with_its_pid_and_nothing_else_matches(tmp_path: Path) -> None:
    path = lock_file(tmp_path)
    other = lock_file(tmp_path, "other.lock")  # never locked
    dev, ino = key(path)
    with holding(path) as child:
        assert _proclocks.flock_holders(dev, ino) == [child.pid]
        assert _proclocks.flock_waiters(dev, ino) == []
        assert _proclocks.flock_state(dev, ino) == ([child.pid], [])
        # negative control: the same query with a wrong inode or a wrong device must see nothing, so the match above
        # comes from this file's line, not from any FLOCK line
        assert _proclocks.flock_holders(*key(other)) == []
        assert _proclocks.flock_holders(os.makedev(os.major(dev) + 1, os.minor(dev)), ino) == []
    # the kernel drops the lock when its holder exits
    assert _proclocks.flock_state(dev, ino) == ([], [])


def test_free_lock_has_no_holder(tmp_path: Path) -> None:
    path = lock_file(tmp_path)
    dev, ino = key(path)
    assert _proclocks.flock_state(dev, ino) == ([], [])
    # negative control: the same query does see a holder once there is one
    with holding(path) as child:
        assert _proclocks.flock_holders(dev, ino) == [child.pid]


@pytest.mark.skipif(shutil.which("flock") is None, reason="needs flock(1) from util-linux")
def test_flock_command_is_listed_under_its_own_pid_not_its_childs(tmp_path: Path) -> None:
    path = lock_file(tmp_path)
    dev, ino = key(path)
    # flock(1) takes the lock and runs cat, which inherits the descriptor and so shares the lock
    proc = subprocess.Popen(["flock", str(path), "cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: _proclocks.flock_holders(dev, ino) != [], "flock(1) to take the lock")
        assert _proclocks.flock_holders(dev, ino) == [proc.pid]
    finally:
        proc.communicate(b"", timeout=DEADLINE)
    assert _proclocks.flock_holders(dev, ino) == []


def test_posix_and_ofd_locks_are_not_flock_holders(tmp_path: Path) -> None:
    path = lock_file(tmp_path)
    dev, ino = key(path)
    token = f" {os.major(dev):02x}:{os.minor(dev):02x}:{ino} "
    with holding(path, LOCKF) as posix, holding(path, OFD):
        assert _proclocks.flock_holders(dev, ino) == []
        # negative control: those locks are on the same inode in /proc/locks, so only the kind filter left them out
        kinds = [line.split()[1] for line in Path("/proc/locks").read_text().splitlines() if token in line]
        assert sorted(kinds) == ["OFDLCK", "POSIX"]
        # flock and POSIX locks do not conflict on Linux: an flock holder alongside is the only one reported
        with holding(path) as flocker:
            assert _proclocks.flock_state(dev, ino) == ([flocker.pid], [])
        assert posix.poll() is None


def test_lock_on_another_file_is_not_reported(tmp_path: Path) -> None:
    path = lock_file(tmp_path)
    other = lock_file(tmp_path, "other.lock")
    with holding(other) as child:
        assert _proclocks.flock_state(*key(path)) == ([], [])
        assert _proclocks.flock_holders(*key(other)) == [child.pid]  # negative control: the other file's lock is seen


def test_fork_shares_one_lock_listed_under_the_taker(tmp_path: Path) -> None:
    path = lock_file(tmp_path)
    dev, ino = key(path)
    r, w = os.pipe()
    # the taker locks, forks a child that keeps the inherited descriptor until a byte arrives on the pipe, prints
    # the child's pid, and exits when told on stdin
    code = f"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
pid = os.fork()
if pid == 0:
    os.close(0)  # so that the taker's pipes close when the taker exits
    os.close(1)
    os.read({r}, 1)
    os._exit(0)
print(pid, flush=True)
sys.stdin.readline()
"""
    taker = spawn(code, str(path), pass_fds=(r,))
    os.close(r)
    try:
        forked = int(read_line(taker))
        assert _proclocks.flock_holders(dev, ino) == [taker.pid]  # two processes share it: one line, the taker's
        taker.communicate("go\n", timeout=DEADLINE)
        # the taker is gone, the lock stays with the forked child, and the line still names the taker
        expected = [taker.pid] if _proclocks.COMPLETE else []  # elsewhere the kernel cannot name it and omits it
        assert _proclocks.flock_holders(dev, ino) == expected
        assert forked not in (_proclocks.flock_holders(dev, ino) or [])
    finally:
        os.write(w, b"x")
        os.close(w)
    # negative control: once the forked child exits, the line goes, so it was that child's lock being listed
    wait_until(lambda: _proclocks.flock_holders(dev, ino) == [], "the forked child to release the lock")


# ----------------------------------------------------------------------------------------------------- waiters
def is_waiting(dev: int, ino: int, pid: int) -> bool:
    return pid in (_proclocks.flock_waiters(dev, ino) or [])


@pytest.fixture
def reaper() -> Iterator[list[subprocess.Popen[str]]]:
    """A list of children that are killed, if still running, and reaped after the test, whatever its outcome."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=DEADLINE)


def queue_waiters(
    path: Path, dev: int, ino: int, modes: str, out: int, reaper: list[subprocess.Popen[str]]
) -> list[int]:
    """Start one waiter per letter of ``modes`` (x: LOCK_EX, s: LOCK_SH) writing to ``out``; return their pids.

    Each is listed as waiting before the next starts, so the start order is the order they began to wait.
    """
    for mode in modes:
        proc = spawn(_WAIT, str(path), mode, stdin=subprocess.DEVNULL, stdout=out)
        reaper.append(proc)
        wait_until(functools.partial(is_waiting, dev, ino, proc.pid), f"waiter {proc.pid} to queue")
    return [proc.pid for proc in reaper[-len(modes) :]]


def all_succeed(procs: list[subprocess.Popen[str]]) -> bool:
    return all(proc.wait(timeout=DEADLINE) == 0 for proc in procs)


def read_pids(fd: int) -> list[int]:
    """The pids written to the pipe ``fd`` until every writer has closed it."""
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    return [int(x) for x in data.split()]


def test_exclusive_waiters_are_listed_in_queue_order_and_granted_in_it(
    tmp_path: Path, reaper: list[subprocess.Popen[str]]
) -> None:
    path = lock_file(tmp_path)
    dev, ino = key(path)
    r, w = os.pipe()  # every waiter writes its pid here while it holds the lock: the order of grants
    with holding(path) as holder:
        pids = queue_waiters(path, dev, ino, "xxx", w, reaper)
        os.close(w)
        assert _proclocks.flock_state(dev, ino) == ([holder.pid], pids)
    # the holder has exited: the lock passes down the queue
    assert read_pids(r) == pids
    os.close(r)
    assert all_succeed(reaper)
    assert _proclocks.flock_state(dev, ino) == ([], [])


def test_control_mixed_waiters_are_listed_depth_first_not_in_arrival_order(
    tmp_path: Path, reaper: list[subprocess.Popen[str]]
) -> None:
    # negative control for the test above: the listing order is read from /proc/locks, not assumed from start or pid
    # order, and the queue-order claim holds for LOCK_EX waiters only. A LOCK_SH waiter queues under the first
    # waiter it conflicts with; the kernel lists that wait tree depth first.
    path = lock_file(tmp_path)
    dev, ino = key(path)
    r, w = os.pipe()
    with holding(path) as holder:
        x1, s1, s2, x2 = queue_waiters(path, dev, ino, "xssx", w, reaper)
        os.close(w)
        assert _proclocks.flock_state(dev, ino) == ([holder.pid], [x1, s1, x2, s2])
    assert sorted(read_pids(r)) == sorted([x1, s1, s2, x2])  # all got the lock in the end
    os.close(r)
    assert all_succeed(reaper)


# ---------------------------------------------------------------------------------------- reading is harmless
def _run_try_loop(path: Path, poll: Callable[[], None], until_failure: bool) -> tuple[int, int]:
    """Run the non-blocking try loop in a child while ``poll`` runs here; return (attempts, failures).

    With ``until_failure``, keep polling past the 10,000 rounds until the child reports a failed attempt (or the
    deadline): on a machine with one CPU, two processes rarely collide in a short window.
    """
    child = spawn(_TRY_LOOP, str(path))
    assert child.stdout is not None
    try:
        assert read_line(child) == "ready"
        end = time.monotonic() + DEADLINE
        rounds = 0
        while rounds < 10_000 or (until_failure and time.monotonic() < end):
            poll()
            rounds += 1
            if until_failure and rounds % 1000 == 0 and select.select([child.stdout], [], [], 0)[0]:
                break
        out, _ = child.communicate("x", timeout=DEADLINE)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    attempts, failures = (int(x) for x in out.split()[-2:])
    return attempts, failures


def test_reading_proc_locks_never_fails_a_nonblocking_locker(tmp_path: Path) -> None:
    path = lock_file(tmp_path)
    dev, ino = key(path)

    def read_holders() -> None:
        _proclocks.flock_holders(dev, ino)

    attempts, failures = _run_try_loop(path, read_holders, until_failure=False)
    assert attempts > 0
    assert failures == 0


def test_control_a_nonblocking_probe_does_fail_a_nonblocking_locker(tmp_path: Path) -> None:
    path = lock_file(tmp_path)
    fd = os.open(path, os.O_RDWR)

    def probe() -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        fcntl.flock(fd, fcntl.LOCK_UN)

    try:
        attempts, failures = _run_try_loop(path, probe, until_failure=True)
    finally:
        os.close(fd)
    assert attempts > 0
    assert failures > 0


# ------------------------------------------------------------------------------------------------ parser edges
# Lines in the format this kernel writes (taken from it), with neighbours built to trip a careless parser.
_SAMPLE = b"""\
1: FLOCK  ADVISORY  WRITE 5021 fe:00:2148125 0 EOF
1: -> FLOCK  ADVISORY  WRITE 5024 fe:00:2148125 0 EOF
1:  -> FLOCK  ADVISORY  WRITE 5025 fe:00:2148125 0 EOF
1:   -> FLOCK  ADVISORY  WRITE 5030 fe:00:2148125 0 EOF
2: FLOCK  ADVISORY  READ 7005 fe:00:21481250 0 EOF
3: FLOCK  ADVISORY  WRITE 7006 fe:01:2148125 0 EOF
4: POSIX  ADVISORY  WRITE 7007 fe:00:2148125 5 14
4: -> POSIX  ADVISORY  WRITE 7008 fe:00:2148125 0 EOF
5: OFDLCK ADVISORY  READ -1 fe:00:2148125 100 EOF
6: LEASE  ACTIVE    READ 7009 fe:00:2148125 0 EOF
7: FLOCK  ADVISORY  WRITE 7010 <none>:0 0 EOF
8: FLOCK  ADVISORY  READ 7011 fe:00:2148125 0 EOF
"""


def test_parse_picks_this_inodes_flock_lines_only() -> None:
    dev = os.makedev(0xFE, 0)
    # every other line differs in one respect: inode with an extra digit, another minor, POSIX, OFD, lease
    assert _proclocks.parse(_SAMPLE, dev, 2148125) == ([5021, 7011], [5024, 5025, 5030])
    assert _proclocks.parse(_SAMPLE, dev, 21481250) == ([7005], [])
    assert _proclocks.parse(_SAMPLE, os.makedev(0xFE, 1), 2148125) == ([7006], [])
    # negative control: an inode with no line gets nothing, so the answers above come from matching, not defaults
    assert _proclocks.parse(_SAMPLE, dev, 214812) == ([], [])
    assert _proclocks.parse(b"", dev, 2148125) == ([], [])


def test_parse_wide_device_numbers_and_huge_inodes() -> None:
    # anonymous devices (tmpfs, overlayfs, btrfs) soon exceed two hex digits of minor; old kernels printed inode
    # numbers signed
    text = b"1: FLOCK  ADVISORY  WRITE 42 00:1b3:148 0 EOF\n2: FLOCK  ADVISORY  WRITE 43 103:02:-2 0 EOF\n"
    assert _proclocks.parse(text, os.makedev(0, 0x1B3), 148) == ([42], [])
    assert _proclocks.parse(text, os.makedev(0x103, 2), (1 << 64) - 2) == ([43], [])
    assert _proclocks.parse(text, os.makedev(0x103, 2), 2) == ([], [])  # control: not every inode matches


# -------------------------------------------------------------------------------------- devices and namespaces
@ROOT
@pytest.mark.root
def test_lock_dev_names_overlayfs_files_as_proc_locks_does(tmp_path: Path) -> None:
    # an overlayfs over two file systems reports, in stat, a device of its own per layer; /proc/locks names the
    # overlay's own device
    lower, upper, merged = tmp_path / "lower", tmp_path / "upper", tmp_path / "merged"
    mounted: list[Path] = []
    try:
        for d in (lower, upper, merged):
            d.mkdir()
        for d in (lower, upper):
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(d)], check=True)
            mounted.append(d)
        (upper / "u").mkdir()
        (upper / "w").mkdir()
        options = f"lowerdir={lower},upperdir={upper / 'u'},workdir={upper / 'w'}"
        if subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)]).returncode != 0:
            pytest.skip("overlayfs cannot be mounted here")
        mounted.append(merged)
        path = lock_file(merged)
        dev, ino = key(path)
        with holding(path) as child:
            assert _proclocks.flock_holders(dev, ino) == [child.pid]
            # negative control: stat's device does not find it, which is why lock_dev exists
            assert os.stat(path).st_dev != dev
            assert _proclocks.flock_holders(os.stat(path).st_dev, ino) == []
    finally:
        for d in reversed(mounted):
            subprocess.run(["umount", str(d)], check=False)


@ROOT
@pytest.mark.root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) from util-linux")
def test_other_pid_namespace_does_not_see_the_holder(tmp_path: Path) -> None:
    path = lock_file(tmp_path)
    dev, ino = key(path)
    code = (
        "import sys; from lockstore import _proclocks as p; "
        "print(p.COMPLETE, p.flock_holders(int(sys.argv[1]), int(sys.argv[2])))"
    )
    with holding(path) as child:
        # negative control: from here the holder is listed
        assert _proclocks.flock_holders(dev, ino) == [child.pid]
        inside = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code, str(dev), str(ino)],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
        if inside.returncode != 0:
            pytest.skip(f"cannot enter a new PID namespace here: {inside.stderr.strip()}")
        # the held lock looks free inside a new PID namespace, and the module says its answers are incomplete
        assert inside.stdout.split() == ["False", "[]"]
