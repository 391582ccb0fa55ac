"""The holder record: who holds a lock, written into the sidecar while it is held; the only importer of psutil.

The record is one line of JSON written with ``pwrite`` right after the lock is taken and overwritten with blanks
right before it is released (cheaper than a truncate, which frees and re-allocates the block), so a free lock
shows no record (QLockFile's ``getLockInfo`` is the prior art; portalocker
issues #106 and #118 ask for it). It is not fsynced: it describes a live process, and after a power loss no
process holds any lock. A record still present when the lock is free was left by a killed holder.

Who holds the lock is never decided from the record alone (:func:`current`): the kernel says which process holds
the flock (``/proc/locks`` on Linux), and the record only adds what the kernel does not know (the label, since
when). A process holding the lock without lockstore (``flock(1)``, a plain ``FileLock``) is named from the OS.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Final

from ._os import read_bytes

#: The command line and the label are cut to this many characters, and to ``_JSON_PER_CHAR`` bytes of JSON per
#: character allowed (where one character can take 12: ``\\ud83d\\ude00``), so that a record always fits the 4 KiB
#: that readers of the lock file read, before the statistics that follow it.
_CMDLINE_MAX: Final = 200
_LABEL_MAX: Final = 200
_JSON_PER_CHAR: Final = 6
# psutil's create_time has clock-tick resolution (1/100 s on Linux); allow for rounding, never for reuse.
_START_TOLERANCE: Final = 0.05


@dataclass(frozen=True)
class Holder:
    """The process recorded as holding a lock.

    ``alive`` is True when that process still runs (same pid AND same start time, so a reused pid is told apart),
    False when it does not, and None when this process cannot tell (another host or PID namespace, no permission).
    ``recorded`` is False for a holder known only from the OS (it wrote no lockstore record): then ``acquired_at``
    and ``label`` are None. ``waiting_since`` is set for a waiter that announced itself (see ``Store.waiters``).
    """

    pid: int
    host: str
    user: str
    cmdline: list[str]
    acquired_at: float | None
    label: str | None
    alive: bool | None
    start_time: float | None = None
    recorded: bool = True
    waiting_since: float | None = None

    @property
    def held_for(self) -> float | None:
        """Seconds since the holder took the lock (by this host's clock), or None when unknown."""
        if self.acquired_at is None:
            return None
        return max(0.0, time.time() - self.acquired_at)

    def describe(self) -> str:
        """One line for people: how long, which process, on which host, whether alive, its command and label."""
        state = {True: "alive", False: "dead", None: "liveness unknown"}[self.alive]
        who = f"pid {self.pid} on host {self.host} ({state})"
        cmd = " ".join(" ".join(arg.split()) for arg in self.cmdline)  # one line, even for python -c "..."
        label = f" [label: {self.label}]" if self.label else ""
        if not self.recorded:
            return f"held by {who}: {cmd} (it holds the lock without lockstore, so it left no record)"
        if self.held_for is None:
            return f"held by {who}: {cmd}{label}"
        return f"held for {self.held_for:.1f} s by {who}: {cmd}{label}"


_static: tuple[int, str, bytes] | None = None


def _process_prefix() -> str:
    """The JSON head of this process's records, computed once per process (and again after fork)."""
    pid = os.getpid()
    if _static is not None and _static[0] == pid:
        return _static[1]
    return _made_prefix(pid)[1]


def _prefix_bytes() -> bytes:
    """:func:`_process_prefix`, encoded (what every record starts with)."""
    pid = os.getpid()
    if _static is not None and _static[0] == pid:
        return _static[2]
    return _made_prefix(pid)[2]


def _made_prefix(pid: int) -> tuple[int, str, bytes]:
    global _static
    argv = list(getattr(sys, "orig_argv", sys.argv)) or [sys.executable]
    argv[0] = os.path.basename(argv[0])
    cmd: list[str] = []
    room = _CMDLINE_MAX
    for arg in argv:
        if room <= 0:
            cmd.append("...")
            break
        cut = _cut(arg, room)
        cmd.append(cut)
        room -= max(len(cut), len(json.dumps(cut)) // _JSON_PER_CHAR) + 1
    head = {
        "pid": pid,
        "start": _own_start_time(),
        "pidns": _pid_namespace(),
        "host": _host_name(),
        "user": _user_name(),
        "cmd": cmd,
    }
    prefix = json.dumps(head)[:-1]
    _static = (pid, prefix, prefix.encode())
    return _static


def _cut(text: str, limit: int) -> str:
    """``text``, or its start and "...": at most ``limit`` characters, and ``limit * _JSON_PER_CHAR`` bytes of
    JSON."""
    if len(text) <= limit and len(json.dumps(text)) <= limit * _JSON_PER_CHAR:
        return text
    text = text[:limit]
    while text and len(json.dumps(text)) > limit * _JSON_PER_CHAR:
        text = text[: len(text) * 3 // 4]
    return text + "..."


def record(label: str | None) -> bytes:
    """The record this process writes when it takes a lock now."""
    if label is None:  # the usual case, at every acquisition: no str made and encoded
        return b'%s, "at": %.3f}\n' % (_prefix_bytes(), time.time())
    tail = f', "at": {time.time():.3f}, "label": {json.dumps(_cut(label, _LABEL_MAX))}}}\n'
    return (_process_prefix() + tail).encode()


def waiter_record(label: str | None, since: float, timeout: float, *, waited: float | None = None) -> bytes:
    """The record this process writes into a waiter slot while it waits for a lock (see ``_queue.py``); with
    ``waited``, the mark it leaves there when its wait timed out."""
    tail = f', "since": {since:.6f}, "timeout": {timeout:g}'
    if waited is not None:
        tail += f', "timed_out": [{waited:.6f}, {time.time():.3f}]'
    if label is not None:
        tail += f', "label": {json.dumps(_cut(label, _LABEL_MAX))}'
    return (_process_prefix() + tail + "}\n").encode()


def parse(data: bytes) -> Holder | None:
    """Parse a record; None when empty or unreadable (a torn read of a record being written, or not ours)."""
    line = data.split(b"\n", 1)[0]  # one line: what follows in a lock file is not the record's
    if not line.strip():
        return None
    try:
        raw: dict[str, Any] = json.loads(line)
        pid = int(raw["pid"])
        start = raw.get("start")
        return Holder(
            pid=pid,
            host=str(raw.get("host", "")),
            user=str(raw.get("user", "")),
            cmdline=[str(a) for a in raw.get("cmd", [])],
            acquired_at=None if raw.get("at") is None else float(raw["at"]),
            label=raw.get("label"),
            alive=_alive(pid, start, str(raw.get("host", "")), raw.get("pidns")),
            start_time=None if start is None else float(start),
            waiting_since=None if raw.get("since") is None else float(raw["since"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _alive(pid: int, start: float | None, host: str, pidns: str | None) -> bool | None:
    here = _host_name()
    if host != here or pidns != _pid_namespace():
        return None
    import psutil  # here only: importing psutil costs tens of milliseconds

    try:
        process = psutil.Process(pid)
        created = process.create_time()
        if process.status() == psutil.STATUS_ZOMBIE:
            return False  # killed, not yet reaped by its parent: it holds and waits for nothing any more
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return None
    if start is None:
        return None
    return bool(abs(created - float(start)) <= _START_TOLERANCE)


def current(record: bytes, holders: list[int] | None) -> tuple[Holder | None, bool]:
    """Who holds a lock, from its file's first bytes and the pids the kernel lists as holding its flock.

    Returns (holder or None when free, whether a stale record of a dead process is there). ``holders`` is None
    where the kernel's list cannot be read (not Linux): then the record alone is used, and only while its process
    is alive or cannot be checked. A holder in another PID namespace is not in the kernel's list for us: its record
    (if any) is believed, with ``alive=None``.
    """
    held = parse(record)
    stale = held is not None and held.alive is False
    if holders is None:
        return (None if stale else held), stale
    if not holders:
        if held is not None and held.alive is None:
            return held, False  # another host or PID namespace: the kernel hides its holders from us
        return None, stale
    if held is not None and held.pid in holders and held.alive:
        return held, False
    return from_pid(holders[0]), stale


def from_pid(pid: int) -> Holder:
    """A Holder for a process of this host known only by its pid (it holds or waits for a lock, from the OS)."""
    import psutil  # here only: importing psutil costs tens of milliseconds

    cmdline: list[str] = []
    user = ""
    start: float | None = None
    alive: bool | None = True
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            start = proc.create_time()
            try:
                cmdline = proc.cmdline()
                user = proc.username()
            except psutil.AccessDenied:
                pass
    except psutil.NoSuchProcess:
        alive = False
    except psutil.Error:
        alive = None
    return Holder(pid=pid, host=_host_name(), user=user, cmdline=cmdline, acquired_at=None, label=None, alive=alive,
                  start_time=start, recorded=False)


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
        stat = read_bytes("/proc/self/stat")
        ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])
        btime = None
        for line in read_bytes("/proc/stat").splitlines():
            if line.startswith(b"btime"):
                btime = float(line.split()[1])
                break
        if btime is None:
            raise ValueError("no btime in /proc/stat")
        return ticks / os.sysconf("SC_CLK_TCK") + btime
    except (OSError, ValueError):
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


__all__ = ["Holder", "current", "from_pid", "parse", "record"]
