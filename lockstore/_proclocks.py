"""Who holds, and who waits for, an flock on a file, read from /proc/locks without touching the lock.

Testing a lock by taking it (``flock(LOCK_EX | LOCK_NB)`` then unlocking) makes other processes' non-blocking
attempts fail while the probe holds it; reading /proc/locks never does. Linux only: elsewhere, and where /proc is
not mounted, every query returns None (``AVAILABLE`` is False).

What the kernel lists, one line per lock, and what the caller must know:

- ``1: FLOCK  ADVISORY  WRITE 5021 fe:00:2148125 0 EOF``: line id, kind (FLOCK, POSIX, OFDLCK, LEASE, ...), mode,
  READ or WRITE, the pid, ``MAJOR:MINOR:INODE`` (device in hexadecimal, at least two digits each; inode in
  decimal), range. A process blocked in ``flock`` is listed under the lock it waits for, with that lock's id and
  ``->``, indented one more space per level of the kernel's wait tree:
  ``1:  -> FLOCK  ADVISORY  WRITE 5025 fe:00:2148125 0 EOF``.
- The device is the file system's own device number. It equals ``st_dev`` on ext4, XFS, tmpfs and an overlayfs
  whose layers share one file system, but not on btrfs (each subvolume reports its own ``st_dev``, and /proc/locks
  cannot tell equal inode numbers of two subvolumes apart) nor on an overlayfs over several file systems. Pass
  ``lock_dev(fd)`` of an open descriptor of the file, which is right everywhere, rather than ``st_dev``.
- The pid is the process (never the thread) that took the lock. An flock belongs to the open file description,
  not to a process: after ``fork`` the child shares the lock, /proc/locks still shows one line with the taker's
  pid, and it keeps showing that pid after the taker exits while the child holds on (the pid may then be dead, or
  reused by an unrelated process). Taking the same lock again through the shared description keeps the taker's
  pid; converting it (``LOCK_SH`` after ``LOCK_EX``) records the converter's pid.
- Several holder lines appear only for a shared (``LOCK_SH``) lock, one per open file description, so the same
  pid may appear twice.
- Only pids visible in the PID namespace of /proc are listed: a lock whose pid cannot be named there (a process
  of another container, or a taker that exited while a forked child holds the lock) is left out, so the lock looks
  free. ``COMPLETE`` tells whether this reader is in the initial PID namespace, where nothing is left out.
- Non-positive pids (OFD locks show -1) are never returned: ``os.kill(-1, sig)`` would signal every process the
  caller may signal.

Reading /proc/locks takes no lock on the file: a concurrent ``flock(LOCK_EX | LOCK_NB)`` never fails because of it.
"""

from __future__ import annotations

import os
from typing import Final

from ._os import read_bytes

_PROC_LOCKS: Final = "/proc/locks"

# The kernel gives the initial PID namespace this fixed inode number (PROC_PID_INIT_INO).
_INIT_PID_NS_INO: Final = 0xEFFFFFFC


def _readable(path: str) -> bool:
    try:
        read_bytes(path, 1)
    except OSError:
        return False
    return True


def _in_initial_pid_namespace() -> bool:
    try:
        return os.stat("/proc/self/ns/pid").st_ino == _INIT_PID_NS_INO
    except OSError:
        return False


AVAILABLE: Final[bool] = _readable(_PROC_LOCKS)
"""Whether /proc/locks exists and is readable here (Linux with /proc mounted)."""

COMPLETE: Final[bool] = AVAILABLE and _in_initial_pid_namespace()
"""Whether /proc/locks lists every lock here. False in a container's PID namespace, where an empty answer does not
prove a lock free. Conservative: a reader in a child namespace looking at the host's /proc is also reported False."""


def _read() -> bytes | None:
    try:
        return read_bytes(_PROC_LOCKS)
    except OSError:
        return None


def _tokens(dev: int, ino: int) -> list[bytes]:
    """The ``MAJ:MIN:INODE`` field of the file, with the spaces around it so that no longer inode matches."""
    prefix = f" {os.major(dev):02x}:{os.minor(dev):02x}:"
    tokens = [f"{prefix}{ino} ".encode()]
    # Older kernels printed inode numbers as signed, so the top half of the range appears negative there.
    if ino >= 1 << 63:
        tokens.append(f"{prefix}{ino - (1 << 64)} ".encode())
    return tokens


def parse(data: bytes, dev: int, ino: int) -> tuple[list[int], list[int]]:
    """The flock holders and waiters of ``(dev, ino)`` in a /proc/locks text, each in the order listed.

    Pure parsing, exposed for tests and for callers that read the file once for several inodes. Lines of other
    lock kinds, other files, and non-positive pids are skipped; lines it does not understand are skipped too.
    """
    holders: list[int] = []
    waiters: list[int] = []
    for token in _tokens(dev, ino):
        # Search the token rather than splitting every line: on a busy machine the file has many lines, and only
        # those of this inode matter.
        hit = data.find(token)
        while hit >= 0:
            start = data.rfind(b"\n", 0, hit) + 1
            fields = data[start:hit].split()
            hit = data.find(token, hit + len(token))
            waiting = len(fields) > 1 and fields[1] == b"->"
            described = fields[2:] if waiting else fields[1:]  # kind, mode, READ or WRITE, pid
            if len(described) < 2 or described[0] != b"FLOCK":
                continue
            try:
                pid = int(fields[-1])
            except ValueError:
                continue
            if pid > 0:
                (waiters if waiting else holders).append(pid)
    return holders, waiters


def flock_state(dev: int, ino: int) -> tuple[list[int], list[int]] | None:
    """``(holders, waiters)`` of the flock on the file ``(dev, ino)`` in one read; None when /proc/locks is unreadable.

    See ``flock_holders`` and ``flock_waiters`` for what each list means.
    """
    data = _read()
    return None if data is None else parse(data, dev, ino)


def flock_holders(dev: int, ino: int) -> list[int] | None:
    """The pids holding an flock on the file ``(dev, ino)``; None when /proc/locks cannot be read.

    Usually one pid (an exclusive lock), one per open file description for a shared lock; empty when no visible
    process holds it (see ``COMPLETE``). The pid is the process that took the lock, which may have exited while a
    forked child holds on.
    """
    state = flock_state(dev, ino)
    return None if state is None else state[0]


def flock_waiters(dev: int, ino: int) -> list[int] | None:
    """The pids blocked in ``flock`` on the file ``(dev, ino)``, in listed order; None when /proc/locks is unreadable.

    When every waiter asks for ``LOCK_EX`` (as lockstore does), this is queue order: each new waiter queues behind
    the last, and the kernel hands the lock down the queue in that order. But a process that is not waiting can
    take the lock between two hand-overs, and a waiter whose wait a signal interrupts (Python then retries the
    call) loses its place: it and the waiters behind it queue again, in whichever order they get there. With
    ``LOCK_SH`` waiters mixed in, the listing is the kernel's wait tree depth first, which is not arrival order.
    """
    state = flock_state(dev, ino)
    return None if state is None else state[1]


def lock_dev(fd: int) -> int:
    """The device number /proc/locks shows for the file open on ``fd``: its file system's, from /proc/self/mountinfo.

    Differs from ``os.fstat(fd).st_dev`` on btrfs and on an overlayfs over several file systems. Falls back to
    ``st_dev`` when /proc does not tell (not Linux, /proc not mounted). Reads two small /proc files: callers that
    query the same descriptor often should keep the result.
    """
    try:
        mnt_id = b""
        for line in read_bytes(f"/proc/self/fdinfo/{fd}").splitlines():
            if line.startswith(b"mnt_id:"):
                mnt_id = line.split()[1]
                break
        for line in read_bytes("/proc/self/mountinfo").splitlines():
            fields = line.split(maxsplit=3)
            if fields[0] == mnt_id:
                major, minor = fields[2].split(b":")
                return os.makedev(int(major), int(minor))
    except (OSError, ValueError, IndexError):
        pass
    return os.fstat(fd).st_dev


__all__ = ["AVAILABLE", "COMPLETE", "flock_holders", "flock_state", "flock_waiters", "lock_dev", "parse"]
