"""Code that runs in child processes, plus the helpers that start and talk to them.

Importable as ``_children`` (pytest's default ``prepend`` import mode puts ``tests/`` on ``sys.path``, and a
``multiprocessing`` spawn child inherits that path), and runnable as a script: ``python _children.py <command>``.
Script children say ``ready`` on stdout once they are where the test wants them, then wait for a line (or EOF) on
stdin, so that tests synchronise on pipes and never on sleeps.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import subprocess
import sys
from collections.abc import Iterator, Sequence
from multiprocessing.synchronize import Barrier, Event
from typing import IO, Any

import lockstore

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "_children.py")
#: Seconds a test waits for a child to reach a point; generous because the machine may be loaded, never a pace.
DEADLINE = 60.0


# ----------------------------------------------------------------------------------- script children
#: Holds a counter store's lock with label "holder": says ``ready`` holding it, lets go at a line on stdin.
HOLDER_SCRIPT = """
import sys, lockstore
store = lockstore.open(sys.argv[1], default={"n": 0}, durable=False)
with store.transaction(label="holder") as s:
    s.value["n"] += 1
    print("ready", flush=True)
    sys.stdin.readline()
"""


def spawn_script(script: str, *args: str) -> subprocess.Popen[str]:
    """``python -c script args...`` with text pipes on stdin, stdout and stderr."""
    return subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# ----------------------------------------------------------------------------------- multiprocessing targets
def increment(path: str, n: int, durable: bool = False) -> None:
    """Run ``n`` transactions that each add one to the counter in ``path``."""
    store = lockstore.open(path, default=0, durable=durable, timeout=-1)
    for _ in range(n):
        with store.transaction() as s:
            s.value += 1


def increment_inherited(store: lockstore.Store[int], n: int) -> None:
    """Run ``n`` increments on a store object created before fork (fork start method only)."""
    for _ in range(n):
        with store.transaction() as s:
            s.value += 1


def racy_increment(path: str, barrier: Barrier) -> None:
    """The negative control: read, wait until every racer has read, add one, commit (no transaction)."""
    store = lockstore.open(path, default=0, durable=False)
    store.reload()
    barrier.wait(DEADLINE)
    store.value += 1
    store.commit()


def impatient_and_patient(path: str, seconds: float, start: Event, result: Any) -> None:
    """Two threads on one Store: one gives up after 0.5 ms again and again (its waits are withdrawn while the waiter
    thread may just be getting the lock), one waits forever. Puts the number of acknowledged increments."""
    import threading
    import time

    store = lockstore.open(path, default={"n": 0}, durable=False)
    done = [0, 0]
    start.wait()
    end = time.monotonic() + seconds

    def impatient() -> None:
        while time.monotonic() < end:
            try:
                with store.transaction(timeout=0.0005) as s:
                    s.value["n"] += 1
                done[0] += 1
            except lockstore.LockTimeout:
                pass

    def patient() -> None:
        while time.monotonic() < end:
            with store.transaction(timeout=-1) as s:
                s.value["n"] += 1
            done[1] += 1

    threads = [threading.Thread(target=impatient), threading.Thread(target=patient)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.put(sum(done))


def hold_with_event(path: str, held: Event, release: Event) -> None:
    """Hold a transaction on ``path`` until ``release`` is set."""
    store = lockstore.open(path, default=0, durable=False)
    with store.transaction(label="mp-holder"):
        held.set()
        release.wait(DEADLINE)


# ----------------------------------------------------------------------------------- script children
class Child:
    """A script child (``python _children.py ...``) that reports ``ready`` and then waits for a line on stdin."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, prefix: Sequence[str] = ()) -> None:
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, SCRIPT, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.pid = self.proc.pid

    def wait_ready(self) -> str:
        """Wait for the child's ``ready`` line; return it (it may carry data after the word)."""
        line = read_line(self.proc.stdout, DEADLINE)
        if not line.startswith("ready"):
            self.proc.kill()
            _, err = self.proc.communicate(timeout=DEADLINE)
            raise AssertionError(f"child did not get ready: {line!r}\n{err}")
        return line

    def release(self) -> str:
        """Let the child go on; return its remaining stdout (raises if it failed)."""
        out, err = self.proc.communicate("go\n", timeout=DEADLINE)
        if self.proc.returncode != 0:
            raise AssertionError(f"child failed ({self.proc.returncode}):\n{out}\n{err}")
        return out

    def kill(self) -> None:
        """SIGKILL the child and reap it."""
        self.proc.kill()
        self.proc.communicate(timeout=DEADLINE)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.communicate(timeout=DEADLINE)


def read_line(stream: IO[str] | None, deadline: float) -> str:
    """Read one line from a child's pipe, failing after ``deadline`` seconds instead of hanging."""
    assert stream is not None
    ready, _, _ = select.select([stream], [], [], deadline)
    if not ready:
        raise AssertionError(f"no line from the child within {deadline} s")
    return stream.readline().strip()


def run(*args: str, prefix: Sequence[str] = ()) -> Any:
    """Run a script child to completion and return the JSON value it prints last."""
    proc = subprocess.run(
        [*prefix, sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=DEADLINE, check=False
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1])


@contextlib.contextmanager
def holding(path: str, label: str = "test-holder", *extra: str) -> Iterator[Child]:
    """A child process inside ``store.transaction(label=...)`` on ``path`` for the duration of the block."""
    with Child("hold", path, label, *extra) as child:
        child.wait_ready()
        yield child
        if child.proc.poll() is None:
            child.release()


def _ready(data: str = "") -> None:
    print("ready" + (" " + data if data else ""), flush=True)


def _wait() -> None:
    sys.stdin.readline()


def _error(exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "type": type(exc).__name__, "str": str(exc),
            "filename": getattr(exc, "filename", None), "mro": [c.__name__ for c in type(exc).__mro__]}


def _cmd_hold(path: str, label: str, soft: str = "", *padding: str) -> None:
    lock: object = True
    if soft:
        import filelock

        lock = filelock.SoftFileLock(path + ".soft")
    store = lockstore.open(path, default=0, durable=False, lock=lock)
    with store.transaction(label=label) as s:
        s.value = (s.value or 0) + 1
        _ready()
        _wait()


def _cmd_hold_in_write(path: str) -> None:
    """Block inside the atomic write, after the temp file is written and before the rename, for a SIGKILL."""
    store: lockstore.Store[Any] = lockstore.open(path, default=0, durable=False)

    def paused_replace(src: str, dst: str) -> None:
        _ready(json.dumps({"temp": src}))
        _wait()
        raise AssertionError("this child should have been killed")

    os.replace = paused_replace  # type: ignore[assignment]
    with store.transaction() as s:
        s.value = "new"


def _cmd_flock(lock_file: str) -> None:
    """Hold a raw flock on ``lock_file`` without writing anything into it (a process that is not lockstore)."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _ready()
    _wait()


def _cmd_flock_cycles(lock_file: str) -> None:
    """For each ``hold`` line: take a raw flock, say ``held``, keep it until a process waits for it (seen in
    /proc/locks) or a ``release`` line comes, release it and say ``released``. A holder that hands over exactly when
    the waiter is in the kernel's queue, again and again, without a new process each time."""
    from lockstore import _proclocks

    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    st = os.fstat(fd)
    dev = _proclocks.lock_dev(fd)
    for line in sys.stdin:
        if line.strip() != "hold":
            continue  # a "release" that came after the hand-over already happened
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        while not _proclocks.flock_waiters(dev, st.st_ino):
            if select.select([sys.stdin], [], [], 0.0005)[0]:
                sys.stdin.readline()
                break
        fcntl.flock(fd, fcntl.LOCK_UN)
        print("released", flush=True)


def _cmd_try(path: str, timeout: str, soft: str = "") -> None:
    """Try one transaction; print the LockTimeout's attributes as JSON."""
    lock: object = True
    if soft:
        import filelock

        lock = filelock.SoftFileLock(path + ".soft")
    store = lockstore.open(path, default=0, durable=False, lock=lock)
    try:
        with store.transaction(float(timeout)):
            pass
    except lockstore.LockTimeout as exc:
        h = exc.holder
        out = _error(exc)
        out.update(waited=exc.waited, lock_file=exc.lock_file, path=exc.path, stale=exc.holder_stale,
                   holder=None if h is None else {"pid": h.pid, "cmdline": h.cmdline, "alive": h.alive,
                                                  "label": h.label, "host": h.host})
        print(json.dumps(out))
        return
    print(json.dumps({"ok": True}))


def _cmd_holder(path: str) -> None:
    h = lockstore.open(path, default=0).holder()
    print(json.dumps(None if h is None else {"pid": h.pid, "cmdline": h.cmdline, "alive": h.alive,
                                             "label": h.label}))


def _cmd_commit(path: str, value: str, durable: str = "1") -> None:
    """Commit ``value`` (JSON) once; print ``{"ok": true}`` or the error as JSON."""
    store = lockstore.open(path, default=None, durable=durable == "1")
    store.value = json.loads(value)
    before = set(os.listdir("/proc/self/fd"))
    try:
        store.commit()
    except Exception as exc:
        # Also the descriptors of files in the store's directory opened by the failed commit and still open (the
        # lock file's, kept for the next transaction, aside): a failed write must close its own at once.
        directory = os.path.dirname(os.path.abspath(path))
        left = [t for t in (_fd_target(fd) for fd in set(os.listdir("/proc/self/fd")) - before)
                if t.startswith(directory + "/") and not t.endswith(".lock")]
        print(json.dumps({**_error(exc), "open": left}))
        return
    print(json.dumps({"ok": True}))


def _fd_target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _cmd_commit_as_nobody(directory: str, name: str, value: str) -> None:
    """Enter ``directory`` as root, drop to nobody, commit ``value`` to ``name`` there; print the outcome."""
    import pwd

    os.chdir(directory)
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
    _cmd_commit(name, value)


COMMANDS = {
    "hold": _cmd_hold,
    "hold_in_write": _cmd_hold_in_write,
    "flock": _cmd_flock,
    "flock_cycles": _cmd_flock_cycles,
    "try": _cmd_try,
    "holder": _cmd_holder,
    "commit": _cmd_commit,
    "commit_as_nobody": _cmd_commit_as_nobody,
}


if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])  # type: ignore[operator]
