"""Who waits for a lock file, and since when: announcements in the lock file that need no lock.

A lockstore process that has to wait for the lock writes a small record into one of the lock file's waiter slots
(its pid, start time, host, PID namespace, label, timeout and since when it waits) and clears it when it stops
waiting. Two things read them:

- ``Store.waiters()`` and ``lockstore holder``: the queue, with labels, merged with the kernel's list of blocked
  processes (``/proc/locks``), which also shows waiters that are not lockstore;
- the holder, for fairness: the header keeps the start of the oldest wait, and a holder that sees, when it takes
  the lock, a waiter that has waited longer than :data:`STARVE_AFTER` hands the lock over at its release instead of
  taking it straight back for its next transaction (see ``_sidecar.py``). Waits shorter than that let a releaser
  barge back in, which keeps the lock busy (a fair hand-over every time would wake a sleeping process every time);
  this is the "starvation mode" of Go's ``sync.Mutex`` and of the Linux kernel's mutexes.

Layout, after the holder record (``[0, 4096)``) and the statistics (``_stats.py``, from 4096, at most 2 KiB; the
holder rewrites both in one ``pwrite`` at its release, so nothing a waiter writes may lie inside them):

- ``HEADER`` at 6144: magic, a flag set by a waiter that timed out, then the oldest announced wait's start (epoch
  seconds, a double; 0 when none). Waiters write it with ``pwrite`` and without the lock: racing writers can leave a
  later start than the true oldest, which only delays a hand-over until the oldest waiter rewrites it.
- ``SLOTS`` slots of ``SLOT`` bytes from 8192: a JSON record padded with spaces, or blanks when free. A waiter
  takes the first free slot after ``hash(pid)``; a killed waiter's slot is taken over once its process is gone.
  Two waiters reading the slots at once could pick the same free one (and the one that got the lock would then
  blank the other's timed-out mark), so a waiter first claims its slot with an OFD byte-range lock on the slot's
  bytes (Linux; ``flock`` and these locks do not see each other), held until it withdraws, and reads the slot again
  under the claim. A process that dies gives its claims back with its descriptors.

A waiter that times out leaves its slot marked "timed out" (its wait, its timeout, its label) and sets the flag;
the next holder sees the flag in what it reads anyway, collects the marks into the statistics and clears them. So
a timeout is counted even when its process exits right after (a cron job), without that process holding the lock.

Everything here is best effort: an unwritable lock file, a full disk or a foreign file only costs the
diagnostics and the hand-over, never the lock.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

try:
    import fcntl

    _OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None)
    _OFD_GETLK: int | None = getattr(fcntl, "F_OFD_GETLK", None)
except ImportError:  # pragma: no cover - not Unix
    _OFD_SETLK = _OFD_GETLK = None

from . import _holder

if TYPE_CHECKING:
    from ._holder import Holder

HEADER: Final = 6144
_MAGIC: Final = b"LSWQ"
_HEAD: Final = struct.Struct("<4sI d")  # magic, timed-out flag, oldest wait's start
_FLAG: Final = struct.Struct("<I")
FIRST_SLOT: Final = 8192
SLOT: Final = 512
SLOTS: Final = 64
END: Final = FIRST_SLOT + SLOT * SLOTS
#: A wait longer than this makes the holder hand the lock over at its release instead of barging back in.
STARVE_AFTER: Final = 0.002
_BLANK: Final = b" " * SLOT
#: What only a timed-out mark holds: the key and its list (``_holder.waiter_record``). Labels and command lines are
#: JSON strings, whose quotes are escaped, so no label can contain it (a label "timed_out" is not a mark).
_MARK: Final = b'"timed_out": ['
#: struct flock (l_type, l_whence, l_start, l_len, l_pid), native layout; l_pid must be 0 for an OFD lock.
_FLOCK: Final = struct.Struct("hhqqi")


def state(data: bytes) -> tuple[float, bool]:
    """(the start of the oldest announced wait, or 0.0 when none; whether some waiter left a timed-out mark), from
    the lock file's bytes read from offset 0 (the header lies at ``HEADER``): one unpack, no slicing, for the
    holder's read at every acquisition. Neither when the header is missing or not ours."""
    if len(data) < HEADER + _HEAD.size:
        return 0.0, False
    magic, flag, since = _HEAD.unpack_from(data, HEADER)
    if magic != _MAGIC:
        return 0.0, False
    return (since if since > 0 else 0.0), flag != 0


def oldest(head: bytes) -> float:
    """The start of the oldest announced wait in a header's bytes (0.0 when none, or not a header of ours)."""
    if len(head) < _HEAD.size:
        return 0.0
    magic, _, since = _HEAD.unpack_from(head)
    return since if magic == _MAGIC and since > 0 else 0.0


class Announcement:
    """This process's announcement of one wait in one lock file (made by :func:`announce`)."""

    __slots__ = ("fd", "index", "since")

    def __init__(self, fd: int, index: int, since: float) -> None:
        self.fd = fd
        self.index = index
        self.since = since


def announce(fd: int, label: str | None, timeout: float) -> Announcement | None:
    """Write this process's waiter record into a free slot and the header; None when it cannot.

    Interrupted (a signal handler's exception), it gives the slot back before the exception goes on: the caller
    never got the announcement, so nobody would withdraw it, and a wait left announced makes every holder hand the
    lock over to nobody."""
    since = time.time()
    record = _holder.waiter_record(label, since, timeout)
    if len(record) > SLOT:
        return None
    index = -1
    written = placed = False
    try:
        slots = os.pread(fd, SLOT * SLOTS, FIRST_SLOT)
        pid = os.getpid()
        start = hash(pid) % SLOTS
        for i in range(SLOTS):
            chunk = slots[((start + i) % SLOTS) * SLOT : ((start + i) % SLOTS) * SLOT + SLOT]
            # With claims, a waiter's record is only ever there while its waiter claims the slot: a slot we can
            # claim holds no live waiter's record, wherever its pid is (another PID namespace, a zombie).
            if chunk.strip(b" \0") and not _reusable(chunk, pid, claims=_OFD_SETLK is not None):
                continue
            index = (start + i) % SLOTS  # set before the claim: the cleanup below gives back what it may hold
            claimed = _claim(fd, index)
            if claimed is False:
                index = -1
                continue  # another waiter's, announced since our read
            chunk = os.pread(fd, SLOT, FIRST_SLOT + index * SLOT)
            if chunk.strip(b" \0") and not _reusable(chunk, pid, claims=claimed is True):
                _unclaim(fd, index)
                index = -1
                continue
            written = True  # before the write: blanking a slot we claimed is harmless, a record left is not
            os.pwrite(fd, record.ljust(SLOT), FIRST_SLOT + index * SLOT)
            placed = True
            head = os.pread(fd, _HEAD.size, HEADER)
            current = oldest(head)
            if not current or since < current:
                os.pwrite(fd, _MAGIC, HEADER)
                os.pwrite(fd, struct.pack("<d", since), HEADER + 8)
            return Announcement(fd, index, since)
    except OSError:
        if placed:
            return Announcement(fd, index, since)  # in its slot; only the header could not be updated
        if index >= 0:
            _give_back(fd, index, written)
    except BaseException:
        if index >= 0:
            try:
                _give_back(fd, index, written)
            except BaseException:
                _give_back(fd, index, written)  # an interrupt cut the first call short
                raise
        raise
    return None


def _give_back(fd: int, index: int, written: bool) -> None:
    try:
        if written:
            os.pwrite(fd, _BLANK, FIRST_SLOT + index * SLOT)
    except OSError:
        pass
    finally:
        _unclaim(fd, index)


def withdraw(announcement: Announcement, timed_out: bytes | None = None) -> bool:
    """Clear the announcement (or, after a timeout, leave the ``timed_out`` mark in its place and set the flag); if
    it was the oldest wait, put the next oldest (or none) into the header. True when the mark was left; False when
    it does not fit the slot or could not be written (the caller then counts the timeout itself)."""
    fd = announcement.fd
    marked = False
    try:
        try:
            if timed_out is not None and len(timed_out) <= SLOT:
                os.pwrite(fd, timed_out.ljust(SLOT), FIRST_SLOT + announcement.index * SLOT)
                os.pwrite(fd, _FLAG.pack(1), HEADER + 4)
                marked = True
            else:
                os.pwrite(fd, _BLANK, FIRST_SLOT + announcement.index * SLOT)
        finally:
            # After the mark is written (nobody takes the slot before it is counted), and even if that failed.
            try:
                _unclaim(fd, announcement.index)
            except BaseException:
                _unclaim(fd, announcement.index)  # an interrupt cut the first call short
                raise
        if oldest(os.pread(fd, _HEAD.size, HEADER)) == announcement.since:
            remaining = [w.waiting_since for w in _records(os.pread(fd, SLOT * SLOTS, FIRST_SLOT), fd)]
            os.pwrite(fd, struct.pack("<d", min((s for s in remaining if s), default=0.0)), HEADER + 8)
    except OSError:
        pass
    return marked


def repair_oldest(fd: int, unless: Sequence[float] = ()) -> list[float]:
    """Rewrite the header's oldest wait from the slots of waiters still alive (0 when none), leaving out the waits
    that start at one of ``unless`` (see :func:`among`): after a hand-over that nobody took, the header named a
    wait that had ended, or whose waiter cannot take the lock (stopped). A waiter announcing meanwhile may lose its
    start to this write; it only delays that waiter's hand-over until another waiter rewrites the header. Returns
    the starts of the waits found (all of them, ``unless`` included)."""
    try:
        remaining = [w.waiting_since or 0.0 for w in _records(os.pread(fd, SLOT * SLOTS, FIRST_SLOT), fd)]
        starts = [s for s in remaining if s and not among(s, unless)]
        os.pwrite(fd, struct.pack("<d", min(starts, default=0.0)), HEADER + 8)
    except OSError:
        return list(unless)  # nothing learnt
    return remaining


def among(since: float, starts: Sequence[float]) -> bool:
    """Whether a wait's start is one of ``starts``: the header keeps it exactly, a record to the microsecond."""
    return any(abs(since - s) < 1e-5 for s in starts)


def collect_timed_out(fd: int) -> list[tuple[float, float, str | None, int, float]]:
    """Holding the lock: take the timed-out marks out of the slots (clearing the flag first, so that a mark left
    meanwhile sets it again); return (waited, timeout, label, pid, when) of each."""
    found: list[tuple[float, float, str | None, int, float]] = []
    try:
        os.pwrite(fd, _FLAG.pack(0), HEADER + 4)
        slots = os.pread(fd, SLOT * SLOTS, FIRST_SLOT)
        for index in range(len(slots) // SLOT):
            chunk = slots[index * SLOT : index * SLOT + SLOT]
            if _MARK not in chunk:
                continue
            os.pwrite(fd, _BLANK, FIRST_SLOT + index * SLOT)
            try:
                raw = json.loads(chunk.split(b"\n", 1)[0])
                waited, at = (float(x) for x in raw["timed_out"])
                label = raw.get("label")
                found.append((waited, float(raw.get("timeout", waited)), label if isinstance(label, str) else None,
                              int(raw.get("pid", 0)), at))
            except (ValueError, KeyError, TypeError):
                continue  # not a mark of ours: cleared, not counted
    except OSError:
        pass
    return found


def _reusable(chunk: bytes, pid: int, *, claims: bool = False) -> bool:
    """A slot holding a record of this very process (left by an interrupted wait) or of a process that is gone
    (``claims``: the caller can claim the slot, which tells); never a timed-out mark, which waits for the next
    holder to count it even when its process is gone."""
    try:
        raw: dict[str, Any] = json.loads(chunk)
        if "timed_out" in raw:
            return False
        if claims or int(raw["pid"]) == pid:
            return True
    except (ValueError, KeyError, TypeError):
        return True  # not a record of ours: overwrite it
    holder = _holder.parse(chunk)
    return holder is None or holder.alive is False


def _claim(fd: int, index: int) -> bool | None:
    """Claim slot ``index`` for this open file description (an OFD write lock on its bytes, not waited for): True
    when claimed, False when another holds it. None without OFD locks (not Linux, or a file system that refuses
    them): the slot is taken unclaimed, as before, and its record says nothing about its waiter's life."""
    if _OFD_SETLK is None:
        return None
    try:
        fcntl.fcntl(fd, _OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, FIRST_SLOT + index * SLOT, SLOT, 0))
    except OSError as exc:
        return False if exc.errno in (errno.EAGAIN, errno.EACCES) else None
    return True


def _unclaim(fd: int, index: int) -> None:
    if _OFD_SETLK is None:
        return
    try:
        fcntl.fcntl(fd, _OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, FIRST_SLOT + index * SLOT, SLOT, 0))
    except OSError:
        pass


def _unclaimed(fd: int, index: int) -> bool:
    """Whether no open file description claims slot ``index``: then no waiter is there, whatever its record says
    (its waiter died, in another PID namespace, or as a zombie not yet reaped, and cannot be checked by its pid).
    False when it cannot be known (no OFD locks, or a file system that refuses them)."""
    if _OFD_GETLK is None:
        return False
    try:
        found = fcntl.fcntl(fd, _OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, FIRST_SLOT + index * SLOT, SLOT,
                                                          0))
    except OSError:
        return False
    return bool(_FLOCK.unpack(found)[0] == fcntl.F_UNLCK)


def _records(slots: bytes, fd: int | None = None) -> list[Holder]:
    """The live waiters' records among ``slots``; ``fd`` (a descriptor of the lock file that claims no slot)
    lets the claims tell which records are left by dead waiters."""
    found = []
    for index in range(len(slots) // SLOT):
        chunk = slots[index * SLOT : index * SLOT + SLOT]
        if chunk.strip(b" \0") and _MARK not in chunk:
            holder = _holder.parse(chunk)
            if (holder is not None and holder.waiting_since is not None and holder.alive is not False
                    and (fd is None or not _unclaimed(fd, index))):
                found.append(holder)
    return found


def announced_in(data: bytes, fd: int | None = None) -> list[Holder]:
    """The lockstore waiters announced in a lock file's first bytes (read from 0), oldest first; dead ones are
    left out (see :func:`_records` for ``fd``)."""
    return sorted(_records(data[FIRST_SLOT:END], fd), key=lambda h: h.waiting_since or 0.0)


__all__ = ["END", "HEADER", "STARVE_AFTER", "Announcement", "announce", "announced_in", "collect_timed_out",
           "among", "repair_oldest", "state", "withdraw"]
