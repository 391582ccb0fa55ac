"""The holder record: who holds a lock, written into the sidecar while it is held; the only importer of psutil.

The record is one line of JSON written with ``pwrite`` right after the lock is taken and overwritten with blanks
right before it is released (cheaper than a truncate, which frees and re-allocates the block), so a free lock
shows no record (QLockFile's ``getLockInfo`` is the prior art; portalocker
issues #106 and #118 ask for it). It is not fsynced: it describes a live process, and after a power loss no
process holds any lock. A record still present when the lock is free was left by a killed holder.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Final

_CMDLINE_MAX: Final = 200
#: Labels are cut so that a record always fits the 4 KiB that readers of the lock file read.
_LABEL_MAX: Final = 200
# psutil's create_time has clock-tick resolution (1/100 s on Linux); allow for rounding, never for reuse.
_START_TOLERANCE: Final = 0.05


@dataclass(frozen=True)
class Holder:
    """The process recorded as holding a lock.

    ``alive`` is True when that process still runs (same pid AND same start time, so a reused pid is told apart),
    False when it does not, and None when this process cannot tell (another host or PID namespace, no permission).
    """

    pid: int
    host: str
    user: str
    cmdline: list[str]
    acquired_at: float
    label: str | None
    alive: bool | None
    start_time: float | None = None

    @property
    def held_for(self) -> float:
        """Seconds since the holder took the lock (by this host's clock)."""
        return max(0.0, time.time() - self.acquired_at)

    def describe(self, *, stale: bool = False) -> str:
        """One line for people: how long, which process, on which host, whether alive, its command and label."""
        state = {True: "alive", False: "dead", None: "liveness unknown"}[self.alive]
        who = f"pid {self.pid} on host {self.host} ({state})"
        cmd = " ".join(" ".join(arg.split()) for arg in self.cmdline)  # one line, even for python -c "..."
        label = f" [label: {self.label}]" if self.label else ""
        if stale:
            return (
                f"the lock file's record names {who}: {cmd}{label}, but that process is gone, so the record is stale "
                "(left by a killed holder); the lock is held now by a process that wrote no record"
            )
        return f"held for {self.held_for:.1f} s by {who}: {cmd}{label}"


_static: tuple[int, str] | None = None


def _process_prefix() -> str:
    """The JSON head of this process's records, computed once per process (and again after fork)."""
    global _static
    pid = os.getpid()
    if _static is not None and _static[0] == pid:
        return _static[1]
    argv = list(getattr(sys, "orig_argv", sys.argv)) or [sys.executable]
    argv[0] = os.path.basename(argv[0])
    cmd: list[str] = []
    room = _CMDLINE_MAX
    for arg in argv:
        if room <= 0:
            cmd.append("...")
            break
        cmd.append(arg if len(arg) <= room else arg[:room] + "...")
        room -= len(arg) + 1
    head = {
        "pid": pid,
        "start": _own_start_time(),
        "pidns": _pid_namespace(),
        "host": _host_name(),
        "user": _user_name(),
        "cmd": cmd,
    }
    prefix = json.dumps(head)[:-1]
    _static = (pid, prefix)
    return prefix


def record(label: str | None) -> bytes:
    """The record this process writes when it takes a lock now."""
    tail = f', "at": {time.time():.3f}'
    if label is not None:
        label = label if len(label) <= _LABEL_MAX else label[:_LABEL_MAX] + "..."
        tail += f', "label": {json.dumps(label)}'
    return (_process_prefix() + tail + "}\n").encode()


def parse(data: bytes) -> Holder | None:
    """Parse a record; None when empty or unreadable (a torn read of a record being written, or not ours)."""
    if not data.strip():
        return None
    try:
        raw: dict[str, Any] = json.loads(data)
        pid = int(raw["pid"])
        start = raw.get("start")
        return Holder(
            pid=pid,
            host=str(raw.get("host", "")),
            user=str(raw.get("user", "")),
            cmdline=[str(a) for a in raw.get("cmd", [])],
            acquired_at=float(raw.get("at", 0.0)),
            label=raw.get("label"),
            alive=_alive(pid, start, str(raw.get("host", "")), raw.get("pidns")),
            start_time=None if start is None else float(start),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _alive(pid: int, start: float | None, host: str, pidns: str | None) -> bool | None:
    here = _host_name()
    if host != here or pidns != _pid_namespace():
        return None
    import psutil  # here only: importing psutil costs tens of milliseconds

    try:
        created = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return None
    if start is None:
        return None
    return bool(abs(created - float(start)) <= _START_TOLERANCE)


def soft_marker_holder(pid: int, host: str, written_at: float) -> Holder:
    """A Holder for a filelock soft-lock marker, which records only pid and host.

    A live local process that started after the marker was written cannot have written it (a reused pid).
    """
    alive: bool | None = None
    cmdline: list[str] = []
    user = ""
    here = _host_name()
    if host == here:
        import psutil

        try:
            proc = psutil.Process(pid)
            alive = proc.create_time() <= written_at + _START_TOLERANCE
            if alive:
                cmdline, user = proc.cmdline(), proc.username()
        except psutil.NoSuchProcess:
            alive = False
        except psutil.Error:
            alive = None
    return Holder(pid=pid, host=host, user=user, cmdline=cmdline, acquired_at=written_at, label=None, alive=alive)


def _own_start_time() -> float | None:
    # Linux: what psutil computes, without importing it (start ticks since boot / CLK_TCK + boot time).
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])
        with open("/proc/stat", "rb") as f:
            btime = next(float(line.split()[1]) for line in f if line.startswith(b"btime"))
        return ticks / os.sysconf("SC_CLK_TCK") + btime
    except (OSError, ValueError, StopIteration):
        pass
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:
        return None


def _host_name() -> str:
    return os.uname().nodename if hasattr(os, "uname") else os.environ.get("COMPUTERNAME", "")


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _user_name() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("USER") or os.environ.get("USERNAME") or str(getattr(os, "getuid", lambda: "")())


__all__ = ["Holder", "parse", "record"]
