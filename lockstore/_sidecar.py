"""The native sidecar lock: ``flock`` on ``<file>.lock``, fast, fair enough, and safe across threads, forks and signals.

It is the primitive filelock's ``FileLock`` uses (``flock(LOCK_EX)`` on the whole file), on one descriptor per
process and lock file (``_slots.py``), with the per-process rules of ``_owners.py`` done once per acquisition
instead of ``FileLock``'s full acquire (it opens the file, resolves its path and checks its fork state every
time; ``benchmarks/`` measures the difference).

- The lock file is never deleted (tox-dev/filelock#31: waiters that opened the old inode would lock a different
  file than new arrivals), never broken by age (the OS releases a native lock when its holder dies), and never
  followed through a symlink or used when it is not a regular file: lockstore writes into it, and must never write
  into somebody else's file.
- What lockstore keeps in the lock file: the holder record at 0 (``_holder.py``), the statistics from 4096
  (``_stats.py``), the waiters' announcements from 6144 (``_queue.py``). The holder reads all three in one
  ``pread`` when it takes the lock, and writes the first two back in one ``pwrite`` when it releases it.
- Hand-over: waiting is in the kernel's flock queue (a waiter thread when there is a timeout), and a releaser may
  take the lock straight back for its next transaction, unless a waiter has waited longer than
  ``_queue.STARVE_AFTER``: then it lets that waiter take it first (``_queue.py`` says why).
- Signals: every state change is recorded where :meth:`SidecarLock.release` finds it, before the call that makes it,
  and the unlock follows forgetting the flock with no call in between: a KeyboardInterrupt at any point of acquire
  or release leaves neither this process's slot nor the flock held.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import stat
import time
from typing import TYPE_CHECKING, ClassVar, Final

from . import _holder, _proclocks, _queue, _slots, _stats, _waiter
from ._error import LockReentryError, LockTimeout
from ._os import O_CLOEXEC, O_NOFOLLOW, O_NONBLOCK, close_all, close_probes, named, open_into, open_probe
from ._owners import Ticket, conflicts, current_owner, defer_when_collected
from ._slots import CAN_BLOCK, LOCK_EX, LOCK_NB, LOCK_UN, Slot, flock
from ._stats_report import LockStats, TimedOut
from ._waiter import Waiter

if TYPE_CHECKING:
    from filelock import BaseFileLock

    from ._holder import Holder

#: Where waiting has to poll (no blocking flock): first pause between two attempts, doubling up to poll_interval.
FIRST_PAUSE: Final = 0.0002
#: The holder record lives in the lock file's first bytes; readers read this much.
RECORD_MAX: Final = 4096
#: What the holder reads when it takes the lock: the record, the statistics and the waiters' header.
_HEAD: Final = _queue.HEADER + 16
#: While handing the lock over, how often the releaser looks whether the starving waiter has taken it.
_HANDOFF_POLL: Final = 0.00005
_BLANKS: Final = b" " * RECORD_MAX
#: How often, at most, a holder rewrites the header's oldest wait without the waits it handed the lock in vain.
_REPAIR_EVERY: Final = 10 * _queue.STARVE_AFTER
#: How many times stats() reads an area whose checksum is wrong before it gives up (see stats()).
_TORN_READS: Final = 5
_HOST: Final = _holder._host_name()
#: Where the statistics area lies in what the holder reads and writes, and the part of it every count changes.
_AREA_AT: Final = _stats.OFFSET
_HOT_IN_OUT: Final = slice(_AREA_AT + _stats.HOT.start, _AREA_AT + _stats.HOT.stop)


class _TimedOut(Exception):
    """The wait ran out; turned into a LockTimeout (describing the holder) only by callers that want one."""


class Held:
    """One acquisition's state, made before acquiring so that :meth:`SidecarLock.release` can always undo it."""

    __slots__ = ("announced", "counted", "heirs", "inside", "label", "resets", "slot", "start", "ticket")

    def __init__(self, owner: object, holder: object) -> None:
        self.ticket = Ticket(owner, holder)
        self.slot: Slot | None = None
        self.inside = False  # inside a ``store.lock`` FileLock this thread holds: no flock, no record of ours
        self.start = 0.0  # when the acquisition began (monotonic), for the statistics
        self.label: str | None = None
        self.announced: list[_queue.Announcement | None] = []  # this wait's announcement in the lock file
        self.resets = False  # an acquisition that starts the statistics afresh (and is not counted in them)
        self.counted = False  # its timeout is marked in the lock file for the next holder to count
        self.heirs: list[Ticket] = []  # the tickets that took it over to release it (see release)


class SidecarLock:
    """The native lock on one lock file (see the module docstring)."""

    #: Whether acquisitions are counted in the lock file's statistics area. Only the benchmarks turn it off (in a
    #: subclass), to measure what the statistics cost with everything else the same.
    _statistics: ClassVar[bool] = True

    def __init__(self, lock_file: str, *, data_path: str | None = None) -> None:
        self.lock_file = lock_file
        self.data_path = data_path
        # The slot this lock counts as a user of, in a box that the finalizer (which must not refer to self) shares:
        # a Store collected without close() still gives its lock file back.
        self._box: list[Slot | None] = [None]
        defer_when_collected(self, functools.partial(_slots.let_go, self._box))

    def __repr__(self) -> str:
        return f"<SidecarLock {self.lock_file!r}>"

    # ------------------------------------------------------------------------------------------- the slot
    def _refuse(self, st: os.stat_result) -> None:
        if stat.S_ISLNK(st.st_mode):
            raise OSError(errno.ELOOP, "the lock file is a symbolic link; lockstore never follows one (it would "
                                       "write into the link's target): remove the link or pass lock= another path",
                          self.lock_file)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, "the lock file is a directory", self.lock_file)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "the lock file is not a regular file; lockstore writes a holder record "
                                        "into it and refuses anything else", self.lock_file)

    def _find_slot(self) -> Slot:
        """The slot of the file now at ``lock_file``, creating the file if needed (one lstat when known).

        The path is looked at every time, not only once the flock is held (``_still_the_lock_file``): a process
        that kept using the slot of a deleted or replaced lock file would wait for that file's holder, however long
        it holds it, while the file at the path is free."""
        try:
            st = os.lstat(self.lock_file)
        except FileNotFoundError:
            return self._create_slot()
        except OSError as exc:
            raise named(exc, self.lock_file) from None
        self._refuse(st)
        key = (st.st_dev, st.st_ino)
        slot = self._box[0]
        if slot is not None and slot.key == key and slot.state == _slots.LIVE:
            return slot
        return _slots.find(key, self._box)

    def _create_slot(self) -> Slot:
        fresh = Slot((0, 0))  # its own: threads of one Store may create at once
        _slots.FRESH.append(fresh)  # a child forked before it is registered closes its descriptor too
        found: Slot | None = None
        try:
            self._open(fresh)
            st = os.fstat(fresh.fds[0])
            self._refuse(st)
            found = _slots.register(fresh, (st.st_dev, st.st_ino), self._box)
        except OSError as exc:
            raise named(exc, self.lock_file) from None
        finally:
            try:
                if found is not fresh:  # not registered (an error, or another Store registered this file first)
                    try:
                        close_all(fresh.fds)
                    except BaseException:
                        close_all(fresh.fds)  # an interrupt cut the first call short
                        raise
            finally:
                try:
                    _slots.FRESH.remove(fresh)
                except ValueError:
                    pass
        return found

    def _open(self, slot: Slot) -> None:
        """Open our descriptor of the lock file into ``slot.fds`` (never through a symlink)."""
        flags = O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK
        try:
            open_into(slot.fds, self.lock_file, os.O_RDWR | os.O_CREAT | flags, 0o666)
            slot.writable = True
        except PermissionError as denied:
            # A lock file we may not write can still be locked; we just leave no holder record in it. If it does not
            # exist either (a directory we may not write), the permission error is the one to report.
            try:
                open_into(slot.fds, self.lock_file, os.O_RDONLY | flags)
            except FileNotFoundError:
                raise named(denied, self.lock_file) from None
            slot.writable = False

    def _ready(self, slot: Slot) -> bool:
        """Holding the slot: make sure our descriptor is open on the slot's file; False when the path now names
        another file (deleted or replaced: the caller starts over), or when the slot was given up meanwhile (see
        _slots.drop_if_unused: its descriptors are being closed)."""
        if slot.state != _slots.LIVE:
            return False
        if not slot.fds:
            self._open(slot)
            try:
                st = os.fstat(slot.fds[0])
            except OSError as exc:
                raise named(exc, self.lock_file) from None
            self._refuse(st)
            if (st.st_dev, st.st_ino) != slot.key:
                close_all(slot.fds)
                return False
        return True

    def _still_the_lock_file(self, slot: Slot) -> bool:
        """Whether the file we locked is still the one at ``lock_file``: operators delete or replace lock files
        (which must never be done), and new processes would then lock the new file while we hold the old one."""
        try:
            st = os.lstat(self.lock_file)
        except FileNotFoundError:
            return False
        if (st.st_dev, st.st_ino) != slot.key:
            return False
        waiter = slot.waiters[0] if slot.waiters else None
        return waiter is None or slot.flocked != waiter.fd or waiter.inode == slot.key

    # ------------------------------------------------------------------------------------------- acquire
    def held(self, owner: object, holder: object) -> Held:
        return Held(owner, holder)

    def acquire(self, held: object, *, timeout: float, poll_interval: float, blocking: bool, label: str | None,
                start: float | None = None) -> bool:
        """Take the lock for ``held`` (see ``Lock.acquire``); on any exception the caller calls :meth:`release`."""
        assert isinstance(held, Held)
        begun = time.monotonic() if start is None else start
        try:
            return self._acquire(held, begun, timeout, poll_interval, blocking, label)
        except _TimedOut:
            self.release(held)
            raise self.timeout_error(time.monotonic() - begun, label=label, timeout=timeout if blocking else 0.0,
                                     counted=held.counted) from None

    def acquire_within(self, held: object, *, timeout: float, poll_interval: float, label: str | None,
                       start: float, blocking: bool = True) -> bool | None:
        """:meth:`acquire`, but None (and nothing held) when the time runs out, without reading the holder for a
        LockTimeout: for callers that wait in slices and describe the holder only at their own deadline."""
        assert isinstance(held, Held)
        try:
            return self._acquire(held, start, timeout, poll_interval, blocking, label, final=False)
        except _TimedOut:
            self.release(held)
            return None

    def _acquire(self, held: Held, start: float, timeout: float, poll_interval: float, blocking: bool,
                 label: str | None, *, final: bool = True) -> bool:
        ticket = held.ticket
        held.start, held.label = start, label
        while True:
            slot = held.slot = self._find_slot()
            if slot.held_by_filelock_here():
                # This thread holds the OS lock through ``store.lock``: work inside it, without queueing behind
                # this process's other threads (they wait in the kernel for that very FileLock).
                if ticket.owner in slot.inside or conflicts(slot.owner(), ticket.owner):
                    raise LockReentryError(self.lock_file)
                slot.inside[ticket.owner] = ticket
                held.inside = True
                return False
            if conflicts(slot.owner(), ticket.owner) or ticket.owner in slot.inside:
                raise LockReentryError(self.lock_file)
            if not slot.take(ticket, _remaining(start, timeout) if blocking else 0.0):
                if final:  # another thread of this process held the lock file's slot all along
                    self.mark_aside(held, start, timeout if blocking else 0.0, label)
                raise _TimedOut
            if not self._ready(slot):
                slot.give(ticket)
                continue
            if slot.handoff:
                self._hand_over(slot)
            if slot.flocked is None:  # else a holder that vanished without releasing left it to us
                fd = slot.flocked = slot.fds[0]  # recorded first: release() undoes it whatever happens next
                try:
                    flock(fd, LOCK_NB)
                except BlockingIOError:
                    slot.flocked = None
                    if not blocking:
                        if final and slot.writable:
                            self._give_up(held, fd, start, label)
                        raise _TimedOut from None
                    self._wait(held, slot, fd, start, timeout, poll_interval, label, final)
                except OSError as exc:
                    slot.flocked = None
                    raise named(exc, self.lock_file) from None
            if self._still_the_lock_file(slot):
                return self._mark(slot, label)
            # We hold the lock of a deleted or replaced lock file: let go of it and lock the current one.
            self._let_go(held, slot, close=True)

    @staticmethod
    def _hand_over(slot: Slot) -> None:
        """At the last release a waiter had waited too long: let it take the lock before we try (it writes its
        record when it does; bounded, in case it gave up meanwhile)."""
        since, slot.handoff = slot.handoff, 0.0
        fd = slot.fds[0]
        deadline = time.monotonic() + _queue.STARVE_AFTER
        try:
            while os.pread(fd, 1, 0) in (b"", b" "):
                if time.monotonic() >= deadline:
                    # Nobody came: the oldest wait in the header was stale (a killed waiter's, or one a racing
                    # withdrawal wrote back), or its waiter cannot take the lock (stopped). Never hand over to this
                    # wait again, and let this turn's release put the true oldest wait into the header: either would
                    # otherwise make every release, this process's and others', hand over to nobody.
                    slot.handed_to_nobody = [*slot.handed_to_nobody[-_queue.SLOTS:], since]
                    break
                time.sleep(_HANDOFF_POLL)
        except OSError:
            pass

    def _wait(self, held: Held, slot: Slot, fd: int, start: float, timeout: float, poll_interval: float,
              label: str | None, final: bool) -> None:
        """Wait for the flock, announced in the lock file; on return ``slot.flocked`` is the descriptor holding it
        (ours, or the waiter thread's). A ``final`` wait that times out leaves its timed-out mark (see _queue.py);
        a slice of a longer wait (the asyncio path) does not."""
        try:
            if slot.writable:
                # Appended by C code as it is returned, inside the try: an interrupt when the call returns (where
                # CPython runs signal handlers) finds it withdrawn by the finally below.
                held.announced.extend(map(_queue.announce, (fd,), (label,), (timeout,)))
            self._wait_in_kernel(slot, fd, start, timeout, poll_interval)
        except _TimedOut:
            if final:
                self._leave_mark(held, start, timeout, label)
            raise
        finally:
            try:
                self._withdraw_all(held)
            except BaseException:
                self._withdraw_all(held)  # an interrupt cut the first call short
                raise

    def _give_up(self, held: Held, fd: int, start: float, label: str | None, timeout: float = 0.0) -> None:
        """A try that found the lock taken (``blocking=False``), or a wait that gave up without reaching the flock
        (:meth:`mark_aside`): announce it and turn the announcement into its timed-out mark at once, as a wait that
        timed out does, so that it is counted even when its process exits at once (``lockstore incr -n`` in cron)."""
        try:
            held.announced.extend(map(_queue.announce, (fd,), (label,), (timeout,)))  # see _wait
            self._leave_mark(held, start, timeout, label)
        finally:
            try:
                self._withdraw_all(held)
            except BaseException:
                self._withdraw_all(held)  # an interrupt cut the first call short
                raise

    def mark_aside(self, held: object, start: float, timeout: float, label: str | None) -> None:
        """A wait that timed out before it reached the flock (behind another thread of this process, or an
        asyncio wait given up between its slices): leave its timed-out mark through a descriptor of its own (the
        slot's may be in another thread's hands), so that it is counted even when the process exits at once."""
        assert isinstance(held, Held)
        if held.counted:
            return
        probe: list[io.FileIO] = []
        try:
            fd = open_probe(probe, self.lock_file, os.O_RDWR | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)
            self._give_up(held, fd, start, label, timeout)
        except OSError:
            pass  # not counted here: this process counts it at its next acquisition
        finally:
            try:
                close_probes(probe)
            except BaseException:
                close_probes(probe)  # an interrupt cut the first call short
                raise

    @staticmethod
    def _leave_mark(held: Held, start: float, timeout: float, label: str | None) -> None:
        """Turn the wait's announcement into its timed-out mark, for the next holder to count."""
        announcement = held.announced[-1] if held.announced else None
        if announcement is not None:
            mark = _holder.waiter_record(label, announcement.since, timeout, waited=time.monotonic() - start)
            marked = _queue.withdraw(announcement, mark)
            held.announced.pop()  # after the withdrawal: interrupted before it, the caller's cleanup withdraws
            held.counted = marked  # else (no room for the mark, or a failed write) this process counts it

    @staticmethod
    def _withdraw_all(held: Held) -> None:
        """Withdraw the wait's announcements. Each leaves the list only once withdrawn (withdrawing twice is
        harmless): an announcement dropped unwithdrawn would make every holder hand the lock over to nobody."""
        while held.announced:
            announcement = held.announced[-1]
            if announcement is not None:
                _queue.withdraw(announcement)
            held.announced.pop()

    def _wait_in_kernel(self, slot: Slot, fd: int, start: float, timeout: float, poll_interval: float) -> None:
        if CAN_BLOCK and timeout < 0:
            # Nothing to time out: wait in the kernel's queue in this thread, with no hop through the waiter thread.
            slot.flocked = fd
            try:
                flock(fd, LOCK_EX)
            except OSError as exc:
                slot.flocked = None
                raise named(exc, self.lock_file) from None
            return
        if CAN_BLOCK:
            if not slot.waiters:
                # A waiter thread left in the kernel by a closed Store on this file (see _waiter.PARKED): taken
                # over with its place in the queue rather than a second thread started beside it.
                slot.waiters.extend(filter(None, map(_waiter.adopt, (slot.key,))))
                if slot.waiters:
                    slot.waiter_fds.append(slot.waiters[0].fds)
            if not slot.waiters:
                fds: list[int] = []
                slot.waiter_fds.append(fds)  # registered before the descriptor exists: see _slots.Slot
                try:
                    # Appended by C code as it is returned: an interrupt cannot orphan a running waiter thread.
                    slot.waiters.extend(map(Waiter, (self.lock_file,), (fds,)))
                except OSError as exc:
                    raise named(exc, self.lock_file) from None
            waiter = slot.waiters[0]
            slot.flocked = waiter.fd  # recorded first; the waiter's own withdrawal handles a grant that comes late
            try:
                got = waiter.wait(_remaining(start, timeout))
            except OSError as exc:
                slot.flocked = None
                slot.waiters.clear()
                waiter.close()  # its thread has ended; the next wait starts a new one
                raise named(exc, self.lock_file) from None
            if not got:
                slot.flocked = None
                raise _TimedOut
            return
        pause = FIRST_PAUSE  # pragma: no cover - the polling fallback
        while True:  # pragma: no cover
            if 0 <= timeout <= time.monotonic() - start:
                raise _TimedOut
            time.sleep(pause if timeout < 0 else min(pause, _remaining(start, timeout)))
            slot.flocked = fd
            try:
                flock(fd, LOCK_NB)
                return
            except BlockingIOError:
                slot.flocked = None
            pause = min(pause * 2, poll_interval)

    def _mark(self, slot: Slot, label: str | None) -> bool:
        """Holding the flock: read what the lock file keeps (one pread), write our holder record; return True when
        a killed holder's record was still there (time to sweep)."""
        slot.acquired_at = time.monotonic()
        slot.head = None
        slot.oldest_wait = 0.0
        if not slot.writable:
            return True
        fd = slot.fds[0]
        try:
            head = os.pread(fd, _HEAD, 0)
        except OSError:
            return True
        stale = head[:1] not in (b"", b" ")  # all blanks: a record cleared at release
        if self._statistics:
            slot.head = head
        slot.oldest_wait, marked = _queue.state(head)
        if marked and slot.head is not None and not _stats.newer(head[_stats.OFFSET : _stats.OFFSET + _stats.SIZE]):
            # Taken out of the lock file only by a holder that will count them: a newer lockstore's area is left
            # alone (see _stats.add), and so are its marks.
            slot.timed_out.add([TimedOut(*mark) for mark in _queue.collect_timed_out(fd)])
        # The record is diagnostics only: a full or failing disk must not cost the caller the lock (the data write
        # that follows reports the disk's state and names the data file).
        try:
            record = _holder.record(label)
            if stale:
                # Cover the whole stale record, not only our shorter one, so that no tail of it survives.
                end = head.find(b"\n", 0, RECORD_MAX) + 1 or len(head[:RECORD_MAX].rstrip(b"\0"))
                record = record.ljust(min(max(end, len(record)), RECORD_MAX))
            os.pwrite(fd, record, 0)
            slot.record_len = len(record)
        except OSError:
            pass
        return stale

    # ------------------------------------------------------------------------------------------- release
    def release(self, held: object, *, abandoned: object = None) -> None:
        """Undo whatever :meth:`acquire` did for ``held``, wherever it stopped; calling it again does nothing.

        ``abandoned``: ``held`` belongs to a transaction dropped without its end; the caller cleans up (see
        Storage.release). A thread waiting for the slot may take it over at the same moment (inheriting the
        flock), so the cleanup first takes the slot over itself, in one step: only the winner touches the flock.
        Its ticket is recorded in ``held.heirs`` before it can hold anything, so that an attempt cut short by an
        interrupt, wherever it stopped, is found and finished by the next one."""
        assert isinstance(held, Held)
        slot = held.slot
        if slot is None:
            return
        if abandoned is not None:
            held.heirs.append(Ticket(current_owner(), abandoned))
            heir = held.heirs[-1]
            for earlier in (held.ticket, *held.heirs):
                if slot.take_over(earlier, heir):
                    break
            else:
                slot.give(held.ticket)  # not the holder (any more): at most withdraw a queued request
                return
            held.ticket = heir
        if held.inside:
            if slot.inside.get(held.ticket.owner) is held.ticket:
                del slot.inside[held.ticket.owner]
            return
        if not slot.held_by(held.ticket):
            slot.give(held.ticket)  # withdraw a queued request
            return
        self._let_go(held, slot)

    def _let_go(self, held: Held, slot: Slot, *, close: bool = False) -> None:
        """Release the flock and give the slot back; ``close``: close the slot's descriptors too (a deleted or
        replaced lock file), before the slot passes to another thread, which would otherwise use them meanwhile."""
        # Runs after the caller's write completed: an error here must not report that write as failed. A record
        # left behind only costs the next holder a sweep; a failed unlock is finished by closing our descriptors.
        try:
            # What this turn read and wrote, taken once: a wait that ended without the lock (an interrupt) must not
            # find the previous turn's and write it over the real holder's record.
            head, slot.head = slot.head, None
            record_len, slot.record_len = slot.record_len, 0
            landed: list[int] | None = None  # when this release counts this process's timeouts: see _stats.Pending
            out: bytes | bytearray
            if slot.waiters and slot.flocked is not None and slot.flocked == slot.waiters[0].fd:
                slot.waiters[0].withdraw()  # a grant still to come for a wait given up is dropped, not kept
            if slot.flocked is not None and slot.writable and slot.fds:
                # Only while we hold the flock are the record and the statistics ours to write. The record is
                # blanked in place rather than truncated (a truncate frees the file's block and the next record
                # allocates it again, every transaction); all blanks read as no holder. One pwrite does both.
                if head is not None:
                    if held.resets:
                        slot.out = None
                        # This process's timeouts so far came before the reset: dropped once the fresh area lands.
                        landed = []
                        slot.timed_out.begin(landed)
                        out = _BLANKS + _stats.fresh(time.time())
                    else:
                        out, landed = self._counted(held, slot, head)
                    if landed is None:
                        os.pwrite(slot.fds[0], out, 0)
                    else:  # its result appended by C code as it returns: see _stats.Pending
                        landed.extend(map(os.pwrite, (slot.fds[0],), (out,), (0,)))
                elif record_len:
                    os.pwrite(slot.fds[0], b" " * record_len, 0)
                # A waiter that has waited too long gets the lock first (see _hand_over), unless it was handed the
                # lock in vain before: then the header is rewritten without it now and then (others' withdrawals
                # put it back), so that the next oldest waiter is handed the lock instead.
                oldest, slot.handoff = slot.oldest_wait, 0.0
                if oldest and time.time() - oldest > _queue.STARVE_AFTER:
                    if not _queue.among(oldest, slot.handed_to_nobody):
                        slot.handoff = oldest
                    elif time.monotonic() - slot.repaired_at > _REPAIR_EVERY:
                        slot.repaired_at = time.monotonic()
                        live = _queue.repair_oldest(slot.fds[0], unless=slot.handed_to_nobody)
                        # Remembered only while they wait: never more than the lock file's slots.
                        slot.handed_to_nobody = [s for s in slot.handed_to_nobody if _queue.among(s, live)]
        except OSError:
            pass
        finally:
            try:
                # Forgotten right before the unlock, with no call in between: a signal handler's exception can come
                # only after a call returns, so it finds the flock either still recorded or already released.
                fd, slot.flocked = slot.flocked, None
                if fd is not None:
                    try:
                        flock(fd, LOCK_UN)
                    except OSError:
                        slot.close_files()  # closing our descriptors releases the lock whatever went wrong
            finally:
                try:
                    if close:
                        slot.close_files()
                finally:
                    try:
                        slot.give(held.ticket)
                    finally:
                        if slot.refs <= 0:
                            _slots.drop_if_unused(slot)

    @staticmethod
    def _counted(held: Held, slot: Slot, head: bytes) -> tuple[bytes | bytearray, list[int] | None]:
        """Count this turn into the statistics area read in ``head``: (what to write at 0, the record's blanks and
        the area; the list that write's result must be appended to when this process's timeouts were counted too,
        see _stats.Pending)."""
        acquired_at = slot.acquired_at
        waited, kept = acquired_at - held.start, time.monotonic() - acquired_at
        # The usual case: the lock file holds exactly the area this process wrote last (compared byte for byte,
        # whoever wrote it), there are no timeouts to report, and this is not the longest hold. It is counted in
        # place and written as it is: no copy, no check of the whole area. An interrupt in the middle leaves
        # ``slot.out`` differing from the lock file, so the next release checks the file's area whole.
        out, mine_area = slot.out, slot.out_area
        if (out is not None and mine_area is not None and head.startswith(mine_area, _AREA_AT) and not slot.timed_out
                and _stats.count(mine_area, waited, kept, slot.cold, slot.out_hot) >= 0):
            return out, None
        area = bytearray(head[_AREA_AT : _AREA_AT + _stats.SIZE])
        mine = out is not None and mine_area is not None and area == mine_area
        landed: list[int] = []
        timeouts, folded = slot.timed_out.begin(landed)
        cold = _stats.add(area, waited=waited, held=kept, now=time.time(), label=held.label, pid=os.getpid(),
                          host=_HOST, timeouts=timeouts, folded=folded, cold=slot.cold if mine else None)
        out = bytearray(_BLANKS)
        out += area
        if cold >= 0:  # else an area of a newer format, left alone: never ours to count into
            view = memoryview(out)
            # One assignment, no call in between: the views and the CRC always describe ``out``.
            slot.out, slot.out_area, slot.out_hot, slot.cold = out, view[_AREA_AT:], view[_HOT_IN_OUT], cold
        return out, landed

    def close(self) -> None:
        """Stop using the lock file: the last user in this process closes its descriptors and waiter thread."""
        _slots.let_go(self._box)

    # ------------------------------------------------------------------------------------------- diagnostics
    def timeout_error(self, waited: float, *, label: str | None = None, timeout: float | None = None,
                      counted: bool = False) -> LockTimeout:
        """The LockTimeout for a wait of ``waited`` s, naming the holder. A waiter that does not hold the lock
        cannot write the statistics: its wait is counted by the next holder from the mark it left in the lock
        file (``counted``), or else at this process's next acquisition."""
        if not counted:
            slot = self._box[0]
            pending = None if slot is None else slot.timed_out
            if pending is None:  # this Store has not used the lock file yet (an asyncio wait for its loop's turn)
                try:
                    st = os.lstat(self.lock_file)
                    pending = _slots.pending((st.st_dev, st.st_ino))
                except OSError:
                    pass  # no lock file: nothing to count into
            if pending is not None:
                pending.add((TimedOut(waited, waited if timeout is None else timeout, label, os.getpid(),
                                      time.time()),))
        holder, stale = self.holder_and_staleness()
        return LockTimeout(self.lock_file, waited, path=self.data_path, holder=holder, holder_stale=stale)

    def holder(self) -> Holder | None:
        """Who holds the lock now, read without taking it (see :func:`lockstore._holder.current`)."""
        return self.holder_and_staleness()[0]

    def _probe_read(self, size: int, *, waiters: list[Holder] | None = None) -> tuple[bytes, int, int] | None:
        """(the lock file's first ``size`` bytes, its device as /proc/locks shows it, its inode), or None; with
        ``waiters``, also the announced waiters found in them, put there (the probe's own open file description
        claims no slot, so the claims tell which announcements are left by dead waiters)."""
        probe: list[io.FileIO] = []  # its own: threads may ask at once
        try:
            fd = open_probe(probe, self.lock_file, os.O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)
            st = os.fstat(fd)
            data = os.pread(fd, size, 0) if stat.S_ISREG(st.st_mode) else b""
            if waiters is not None:
                waiters.extend(_queue.announced_in(data, fd))
            return data, _proclocks.lock_dev(fd), st.st_ino
        except OSError:
            return None
        finally:
            try:
                close_probes(probe)
            except BaseException:
                close_probes(probe)  # an interrupt cut the first call short
                raise

    def holder_and_staleness(self) -> tuple[Holder | None, bool]:
        found = self._probe_read(RECORD_MAX)
        if found is None:
            return None, False
        record, dev, ino = found
        return _holder.current(record, _proclocks.flock_holders(dev, ino))

    def waiters(self) -> list[Holder]:
        """The processes waiting for this lock now, oldest first: the kernel's list of blocked processes
        (``/proc/locks``), each with its announcement (label, since when) where it is a lockstore process."""
        listed: list[Holder] = []
        found = self._probe_read(_queue.END, waiters=listed)
        if found is None:
            return []
        _, dev, ino = found
        announced = {w.pid: w for w in listed}
        blocked = _proclocks.flock_waiters(dev, ino)
        if blocked is None:  # no /proc/locks: the announcements are all there is
            return list(announced.values())
        found_waiters = [announced.pop(pid) if pid in announced else _holder.from_pid(pid)
                         for pid in dict.fromkeys(blocked)]
        # Announced but not (yet, or not visibly: another PID namespace) blocked in the kernel: still waiting.
        found_waiters += announced.values()
        return sorted(found_waiters, key=lambda w: w.waiting_since or float("inf"))

    def stats(self) -> LockStats | None:
        """The lock file's statistics, read without the lock (None when there are none yet)."""
        for _ in range(_TORN_READS):
            found = self._probe_read(_stats.OFFSET + _stats.SIZE)
            if found is None:
                return None
            area = found[0][_stats.OFFSET :]
            parsed = _stats.parse(area)
            if parsed is not None or not area.startswith(_stats.MAGIC):
                return parsed
            # Our format with a wrong checksum: most likely read while a holder rewrote it (a read without the
            # lock is not atomic against a write); read again.
        return None

    def reset_stats(self, owner: object, *, timeout: float, poll_interval: float) -> None:
        """Start the statistics afresh: taken under the lock, written at its release."""
        held = Held(owner, None)
        held.resets = True
        try:
            self.acquire(held, timeout=timeout, poll_interval=poll_interval, blocking=True,
                         label="lockstore stats --reset")
        finally:
            try:
                self.release(held)
            except BaseException:
                self.release(held)  # an interrupt cut the first call short
                raise

    def filelock(self, timeout: float) -> BaseFileLock:
        """A ``filelock.FileLock`` on this lock file (``store.lock``), known to this process's transactions."""
        from ._storelock import StoreFileLock

        slot = self._find_slot()
        lock = StoreFileLock(self.lock_file, timeout=timeout, slot=slot)
        slot.external.add(lock)
        slot.external_count += 1
        return lock

    @staticmethod
    def counted(held: object) -> bool:
        """Whether the timeout of ``held``'s wait is marked in the lock file (the next holder counts it)."""
        return isinstance(held, Held) and held.counted

    def held_here(self, held: Held) -> bool:
        return held.slot is not None and held.slot.held_by(held.ticket)


def _remaining(start: float, timeout: float) -> float:
    return -1.0 if timeout < 0 else max(0.0, start + timeout - time.monotonic())


__all__ = ["FIRST_PAUSE", "Held", "SidecarLock"]
