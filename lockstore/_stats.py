"""Lock statistics: a fixed-size area of the lock file where every process counts its waits, holds and timeouts.

This module owns the area's bytes (layout, checksum, :func:`fresh`, :func:`add`, :func:`parse`); what the counts
mean to a reader (percentiles, the suggested timeout, the text and JSON) is ``_stats_report.py``.

The holder of the lock updates the area at its release (it knows then how long it waited and held) with one
``pwrite`` and no fsync: statistics describe live processes, and a crash only costs the last few counts. A
process that timed out does not hold the lock, so it reports its timeouts at its next acquisition
(``_stats_report.TimedOut``). A torn area (a crash in the middle of the ``pwrite``), blanks, zeros, an older lockstore's
bytes or another tool's are not an area of this format: :func:`add` starts a fresh one, :func:`parse` returns None.
An area of a *newer* format is left alone (a lockstore of the next version running beside this one must not have
its statistics reset at every transaction of ours; later versions keep the first 12 bytes' meaning and the checksum
at their end, see :func:`newer`); :func:`fresh` (``lockstore stats --reset``) replaces anything.

Layout (little-endian, every 8-byte field at a multiple of 8, ``SIZE`` = 1056 bytes from ``OFFSET`` = 4096)::

    offset size  field
       0     8   magic b"LOCKSTAT"
       8     2   format version (1)                  u16
      10     2   SIZE                                u16
      12     4   reserved (0)
      16     8   since: epoch seconds                f64
      24     8   timeouts                            u64
      32     8   smallest timeout that fired (s)     f64
      40     8   largest timeout that fired (s)      f64
      48   128   longest hold: at f64, pid u32, host length u8, label flag u8 (0 none, 1 text), label length u8,
                 pad 1, host 64 bytes, label 48 bytes (UTF-8, cut at a character boundary)
     176   256   timeouts by label: 4 x (count u64, flag u8 (0 empty, 1 no label, 2 text), length u8, pad 6,
                 label 48 bytes); the first 4 labels seen take the rows, later labels count only in "timeouts"
     432   320   the last 4 timeouts, a ring (the slot of the n-th timeout is n mod 4): 4 x (waited f64, timeout f64,
                 at f64, pid u32, flag u8, length u8, pad 2, label 48 bytes)
     752     8   acquisitions                        u64
     760     8   longest wait (s)                    f64
     768     8   longest hold (s)                    f64
     776     8   sum of waits (s)                    f64
     784     8   sum of holds (s)                    f64
     792   128   wait histogram: 32 x u32 (the buckets are described in ``_stats_report.py``)
     920   128   hold histogram: 32 x u32 (a count that would pass 2^32 - 1 halves all counts of its histogram:
                 the shape, and so the percentiles, are kept; the acquisitions count stays exact)
    1048     4   reserved (0)
    1052     4   CRC-32 of bytes [0, 1052) (zlib.crc32), so that zlib.crc32 of the whole area is a constant

:func:`add` is on every transaction's path: precompiled structs, counts bumped in their low byte, and CRC-32
over the area once (the check) plus once more over the part an acquisition changes (the last 300 bytes): about
a few microseconds per call (``tests/test_stats.py`` prints the figure).
"""

from __future__ import annotations

import collections
import math
import struct
import threading
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from ._stats_report import BUCKETS, LabelCount, LockStats, LongestHold, TimedOut, distribution, suggest

OFFSET: Final = 4096
SIZE: Final = 1056
VERSION: Final = 1
MAGIC: Final = b"LOCKSTAT"
#: Bytes kept of a host name and of a label.
HOST_MAX: Final = 64
LABEL_MAX: Final = 48
#: Rows of the timeouts-by-label table and slots of the recent-timeouts ring.
LABEL_ROWS: Final = 4
RECENT: Final = 4
#: Timeouts a process keeps whole until it counts them (see Pending), and labels it keeps counts for beyond them.
KEEP: Final = 64
FOLDED_LABELS: Final = 16

#: (how many, the smallest and the largest timeout that fired) of timeouts folded under one label.
Folded = tuple[int, float, float]
#: The key under which timeouts of labels beyond FOLDED_LABELS are folded: counted, in no label's row.
_OTHER_LABELS: Final = object()


_PREFIX: Final = struct.pack("<8sHH", MAGIC, VERSION, SIZE)  # magic, version and size: bytes [0, 12)
_TIMEOUTS_AT: Final = 24
_LONGEST_AT: Final = 48
_LABELS_AT: Final = 176
_RECENT_AT: Final = 432
#: What every acquisition changes lies from here to the checksum, so that add() hashes the rest only once.
_HOT_AT: Final = 752
_HOLD_MAX_AT: Final = 768
_WAIT_AT: Final = 792
_HOLD_AT: Final = 920
_CRC_AT: Final = SIZE - 4
#: The part of the area that count() checksums anew (a caller keeps a view of it: see count()).
HOT: Final = slice(_HOT_AT, _CRC_AT)
#: zlib.crc32 of any byte string followed by its own CRC-32 (little-endian) is this constant: the area is checked
#: with one pass and no slicing.
_RESIDUE: Final = zlib.crc32(b"\x00\x00\x00\x00" + struct.pack("<I", zlib.crc32(b"\x00\x00\x00\x00")))
#: Waits and holds are clamped to this (a clock jump, not a wait).
_HUGE: Final = 1e9

_HEAD = struct.Struct("<8sHHI")  # magic, version, size, reserved
_VERSION_SIZE = struct.Struct("<HH")
_SINCE = struct.Struct("<d")
_HOT = struct.Struct("<Qdddd")  # acquisitions, longest wait, longest hold, sum of waits, sum of holds
_HOLD_MAX = struct.Struct("<d")
_TIMEOUTS = struct.Struct("<Qdd")  # timeouts, smallest and largest timeout that fired
_LONGEST = struct.Struct(f"<dIBBBx{HOST_MAX}s{LABEL_MAX}s")
_LABEL_ROW = struct.Struct(f"<QBB6x{LABEL_MAX}s")
_RECENT_ROW = struct.Struct(f"<dddIBB2x{LABEL_MAX}s")
_COUNT = struct.Struct("<I")
_HIST = struct.Struct(f"<{BUCKETS}I")
_CRC = struct.Struct("<I")
_crc32 = zlib.crc32
_frexp = math.frexp

assert _RECENT_AT + RECENT * _RECENT_ROW.size == _HOT_AT and _HOT_AT + _HOT.size == _WAIT_AT
assert _HOLD_AT + _HIST.size + 8 == SIZE
assert _LONGEST_AT + _LONGEST.size == _LABELS_AT and _LABELS_AT + LABEL_ROWS * _LABEL_ROW.size == _RECENT_AT


# --------------------------------------------------------------------------------------------- the area
def fresh(now: float) -> bytearray:
    """An empty area: magic, format version and size, ``since=now``, zero counts, its checksum."""
    area = bytearray(SIZE)
    _HEAD.pack_into(area, 0, MAGIC, VERSION, SIZE, 0)
    _SINCE.pack_into(area, 16, _epoch(now))
    _CRC.pack_into(area, _CRC_AT, _crc32(memoryview(area)[:_CRC_AT]))
    return area


def add(area: bytearray, *, waited: float, held: float, now: float, label: str | None, pid: int, host: str,
        timeouts: Sequence[TimedOut] = (), folded: Mapping[object, Folded] | None = None,
        cold: int | None = None) -> int:
    """Count one acquisition that waited ``waited`` s and held ``held`` s (released at ``now``, epoch seconds), and
    the ``timeouts`` this process reports (``folded``: older ones, counted per label, see :class:`Pending`); in
    place, with the checksum updated.

    ``area`` is what the lock file holds at ``OFFSET`` (up to ``SIZE`` bytes, fewer or none for an older lock
    file). When it is not an area of this format, it is replaced by ``fresh(now)`` first (resized in place); an
    area of a newer format is left as it is. Never raises for any content of ``area``.

    Returns the CRC-32 of the area's first part (before the counts every acquisition changes). A caller that knows
    ``area`` holds exactly the bytes it wrote last passes that value back as ``cold``: the area is then not checked
    again (the check hashes the whole area; it costs a third of the call). Returns -1 when the area is of a newer
    format and was left alone: it is not this version's to count into, ever (do not pass it as ``cold``).
    """
    # The checksum is computed in two parts: the part before _HOT_AT changes only with a new longest hold or
    # timeouts, so its CRC, computed once for the check, is where the new checksum starts from.
    view = memoryview(area)
    if cold is None or len(area) != SIZE:
        cold = _crc32(view[:_HOT_AT]) if len(area) >= _HOT_AT else 0
        if len(area) != SIZE or not area.startswith(_PREFIX) or _crc32(view[_HOT_AT:], cold) != _RESIDUE:
            view.release()  # a resize needs no views of the bytearray
            if newer(area):
                return -1
            area[:] = fresh(now)
            view = memoryview(area)
            cold = _crc32(view[:_HOT_AT])
    if not 0.0 <= waited < 1e9:  # _HUGE, as a literal: this is the hot path
        waited = _clean(waited)
    if not 0.0 <= held < 1e9:
        held = _clean(held)
    if not timeouts and not folded:
        done = count(area, waited, held, cold)
        if done >= 0:
            return done
    hold_max = _tally(area, waited, held)
    if held >= hold_max:
        _set_longest(area, held_at=now, pid=pid, host=host, label=label)
    if timeouts or folded:
        _add_timeouts(area, timeouts, folded or {})
    cold = _crc32(view[:_HOT_AT])
    _CRC.pack_into(area, _CRC_AT, _crc32(view[_HOT_AT:_CRC_AT], cold))
    return cold


def count(area: bytearray | memoryview, waited: float, held: float, cold: int, hot: memoryview | None = None) -> int:
    """:func:`add` for the usual case, lean and positional (it runs at every release): ``area`` is known to be a
    valid area of this format whose first part has the CRC-32 ``cold`` (the caller wrote it last, and ``add`` or
    this returned ``cold``), there are no timeouts to report and the hold is not the longest yet. Returns ``cold``
    again, or -1 having changed nothing when the case is not the usual one (then call :func:`add`). ``hot``: a view
    of ``area[HOT_AT:CRC_AT]`` that the caller keeps, so that none is made here."""
    if not (0.0 <= waited < 1e9 and 0.0 <= held < 1e9) or len(area) != SIZE:
        return -1
    acquisitions, wait_max, hold_max, wait_sum, hold_sum = _HOT.unpack_from(area, _HOT_AT)
    if held >= hold_max:
        return -1
    # _tally, inlined (see there); the longest hold stays as it is.
    e = _frexp(waited * 1e5)[1]
    at = _WAIT_AT + 4 * (0 if e < 0 else 31 if e > 31 else e)
    if area[at] < 255:
        area[at] += 1
    else:
        _bump(area, at, _WAIT_AT)
    e = _frexp(held * 1e5)[1]
    at = _HOLD_AT + 4 * (0 if e < 0 else 31 if e > 31 else e)
    if area[at] < 255:
        area[at] += 1
    else:
        _bump(area, at, _HOLD_AT)
    _HOT.pack_into(area, _HOT_AT, acquisitions + 1, waited if waited > wait_max else wait_max, hold_max,
                   wait_sum + waited, hold_sum + held)
    _CRC.pack_into(area, _CRC_AT, _crc32(memoryview(area)[_HOT_AT:_CRC_AT] if hot is None else hot, cold))
    return cold


def _tally(area: bytearray, waited: float, held: float) -> float:
    """Count one acquisition in the hot part (histograms, counts, maxima, sums); returns the longest hold before."""
    acquisitions, wait_max, hold_max, wait_sum, hold_sum = _HOT.unpack_from(area, _HOT_AT)
    # Bucket = frexp's exponent of the value in units of 10 us: [1, 2) -> 1, [2, 4) -> 2, below 1 -> 0 or less.
    # A count is incremented in its low byte (little-endian), through struct only when that byte carries.
    e = _frexp(waited * 1e5)[1]
    at = _WAIT_AT + 4 * (0 if e < 0 else 31 if e > 31 else e)
    if area[at] < 255:
        area[at] += 1
    else:
        _bump(area, at, _WAIT_AT)
    e = _frexp(held * 1e5)[1]
    at = _HOLD_AT + 4 * (0 if e < 0 else 31 if e > 31 else e)
    if area[at] < 255:
        area[at] += 1
    else:
        _bump(area, at, _HOLD_AT)
    _HOT.pack_into(area, _HOT_AT, acquisitions + 1, waited if waited > wait_max else wait_max,
                   held if held > hold_max else hold_max, wait_sum + waited, hold_sum + held)
    return float(hold_max)


def parse(area: bytes | bytearray | memoryview) -> LockStats | None:
    """The statistics in ``area`` (what the lock file holds at ``OFFSET``; only its first ``SIZE`` bytes are read),
    or None when it is not a valid area of this format (none yet, torn, foreign, or of another version)."""
    data = bytes(area[:SIZE])
    if len(data) != SIZE or not data.startswith(_PREFIX) or _crc32(data) != _RESIDUE:
        return None
    (since,) = _SINCE.unpack_from(data, 16)
    acquisitions, wait_max, hold_max, wait_sum, hold_sum = _HOT.unpack_from(data, _HOT_AT)
    timeouts, timeout_min, timeout_max = _TIMEOUTS.unpack_from(data, _TIMEOUTS_AT)
    wait = distribution(_HIST.unpack_from(data, _WAIT_AT), wait_max, wait_sum)
    hold = distribution(_HIST.unpack_from(data, _HOLD_AT), hold_max, hold_sum)
    longest = None
    if acquisitions:
        at, pid, host_len, flag, label_len, host, label = _LONGEST.unpack_from(data, _LONGEST_AT)
        longest = LongestHold(seconds=hold_max, pid=pid, host=_decode(host[:host_len]),
                              label=_decode(label[:label_len]) if flag else None, at=at)
    rows = []
    for i in range(LABEL_ROWS):
        count, flag, label_len, label = _LABEL_ROW.unpack_from(data, _LABELS_AT + i * _LABEL_ROW.size)
        if flag:
            rows.append(LabelCount(label=_decode(label[:label_len]) if flag == 2 else None, count=count))
    recent = []
    for n in range(timeouts - 1, max(timeouts - RECENT, 0) - 1, -1):
        waited, timeout, at, pid, flag, label_len, label = _RECENT_ROW.unpack_from(
            data, _RECENT_AT + (n % RECENT) * _RECENT_ROW.size)
        recent.append(TimedOut(waited, timeout, _decode(label[:label_len]) if flag == 2 else None, pid, at))
    return LockStats(
        acquisitions=acquisitions,
        timeouts=timeouts,
        wait=wait,
        hold=hold,
        longest_hold=longest,
        since=since,
        suggested_timeout=suggest(acquisitions=acquisitions, wait_max=wait_max, hold_max=hold_max,
                                  timeout_max=timeout_max if timeouts else None),
        timeout_min=timeout_min if timeouts else None,
        timeout_max=timeout_max if timeouts else None,
        timeout_labels=tuple(sorted(rows, key=lambda row: -row.count)),
        recent_timeouts=tuple(recent),
    )


# --------------------------------------------------------------------------------------------- helpers
def newer(area: bytes | bytearray) -> bool:
    """Whether ``area`` is lockstore's area of a later format version, which this version must not reset.

    Later versions keep the magic, the version and their size in the first 12 bytes and a CRC-32 over their size in
    their last 4 bytes: a later area of the same size or smaller is checked; of a larger one only its start is in
    ``area``, and its magic and version are believed (only lockstore writes this magic).
    """
    if len(area) < 12 or not area.startswith(MAGIC):
        return False
    version, size = _VERSION_SIZE.unpack_from(area, 8)
    if version <= VERSION:
        return False
    return size > len(area) or (size >= 16 and _crc32(memoryview(area)[:size]) == _RESIDUE)


def _bump(area: bytearray | memoryview, at: int, histogram: int) -> None:
    """Add one to the count at ``at`` (the carry case of add()); at 2^32 halve every count of the histogram."""
    count = _COUNT.unpack_from(area, at)[0] + 1
    if count > 0xFFFFFFFF:
        _HIST.pack_into(area, histogram, *(c // 2 for c in _HIST.unpack_from(area, histogram)))
        count = _COUNT.unpack_from(area, at)[0] + 1
    _COUNT.pack_into(area, at, count)


def _clean(seconds: float) -> float:
    """A duration from a clock that jumped (negative, NaN, huge): 0 or the clamp."""
    return 0.0 if seconds != seconds or seconds < 0.0 else _HUGE


def _epoch(seconds: float) -> float:
    """A time as stored: finite (so that the statistics always make valid JSON), else 0."""
    return seconds if -1e12 < seconds < 1e12 else 0.0


def _text(text: str, limit: int) -> bytes:
    """UTF-8 of ``text``, cut to ``limit`` bytes at a character boundary."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", "ignore").encode("utf-8")


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _set_longest(area: bytearray, *, held_at: float, pid: int, host: str, label: str | None) -> None:
    host_b = _text(host, HOST_MAX)
    label_b = b"" if label is None else _text(label, LABEL_MAX)
    _LONGEST.pack_into(area, _LONGEST_AT, _epoch(held_at), pid & 0xFFFFFFFF, len(host_b), label is not None,
                       len(label_b), host_b, label_b)


def _add_timeouts(area: bytearray, timeouts: Sequence[TimedOut], folded: Mapping[object, Folded]) -> None:
    count, smallest, largest = _TIMEOUTS.unpack_from(area, _TIMEOUTS_AT)
    # The folded ones are the older: counted first, so that the ring of recent timeouts ends with the newest.
    for key, (n, low, high) in folded.items():
        low, high = (t if 0.0 <= t < _HUGE else _clean(t) for t in (low, high))
        smallest = low if count == 0 or low < smallest else smallest
        largest = high if count == 0 or high > largest else largest
        if key is not _OTHER_LABELS:
            _count_label(area, None if key is None else str(key), n)
        count += n
    for t in timeouts:
        timeout = t.timeout if 0.0 <= t.timeout < _HUGE else _clean(t.timeout)
        waited = t.waited if 0.0 <= t.waited < _HUGE else _clean(t.waited)
        smallest = timeout if count == 0 or timeout < smallest else smallest
        largest = timeout if count == 0 or timeout > largest else largest
        flag, label_b = _count_label(area, t.label, 1)
        _RECENT_ROW.pack_into(area, _RECENT_AT + (count % RECENT) * _RECENT_ROW.size, waited, timeout,
                              _epoch(t.at), t.pid & 0xFFFFFFFF, flag, len(label_b), label_b)
        count += 1
    _TIMEOUTS.pack_into(area, _TIMEOUTS_AT, count, smallest, largest)


def _count_label(area: bytearray, label: str | None, n: int) -> tuple[int, bytes]:
    """Add ``n`` timeouts to the row of ``label`` (the first ``LABEL_ROWS`` labels seen take the rows; later ones
    count only in the total); returns the label's flag and bytes as stored."""
    flag = 1 if label is None else 2
    label_b = b"" if label is None else _text(label, LABEL_MAX)
    for i in range(LABEL_ROWS):
        at = _LABELS_AT + i * _LABEL_ROW.size
        count, row_flag, row_len, row_label = _LABEL_ROW.unpack_from(area, at)
        if row_flag == 0:
            _LABEL_ROW.pack_into(area, at, n, flag, len(label_b), label_b)
            break
        if row_flag == flag and row_label[:row_len] == label_b:
            _LABEL_ROW.pack_into(area, at, count + n, flag, row_len, row_label)
            break
    return flag, label_b


class _Batch:
    """Timeouts added between two releases that count them."""

    __slots__ = ("folded", "items", "landed")

    def __init__(self) -> None:
        self.items: collections.deque[TimedOut] = collections.deque()
        self.folded: dict[object, Folded] = {}
        self.landed: list[int] = []  # the write of the release that counted it: not empty once it landed


class Pending:
    """This process's timeouts on one lock file, not counted yet: a waiter that timed out does not hold the lock, so
    the process's next acquisition counts them. Threads add while the holding thread counts them, under ``lock``
    (reentrant: a signal handler's own timeout may come while its thread is in here). The newest ``KEEP`` of a batch
    are kept whole (the statistics show the last few); older ones are folded into counts per label, so that memory
    stays bounded however many waits time out before the next acquisition.

    Counting must survive an interrupt at any point of the release: :meth:`begin` seals the batch being added to and
    hands over every sealed batch, each of which stays until the write of a release that counted it has landed. The
    release's ``pwrite`` appends its result to the list given to ``begin`` from C code, with no point in between
    where a signal handler could run; every step before is idempotent. So an interrupted release counts nothing
    twice and loses nothing: the next one counts what did not land."""

    __slots__ = ("batch", "lock", "sealed")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.batch = _Batch()
        self.sealed: list[_Batch] = []

    def __bool__(self) -> bool:
        batch = self.batch
        return bool(self.sealed or batch.items or batch.folded)

    def add(self, timeouts: Iterable[TimedOut]) -> None:
        with self.lock:
            batch = self.batch
            for t in timeouts:
                batch.items.append(t)
                if len(batch.items) > KEEP:
                    _fold(batch.folded, batch.items.popleft())

    def begin(self, landed: list[int]) -> tuple[list[TimedOut], dict[object, Folded]]:
        """Everything to count now, oldest first; counted for good once the caller's write appends to ``landed``."""
        with self.lock:
            while self.sealed and self.sealed[0].landed:
                del self.sealed[0]  # counted by a write that landed
            batch = self.batch
            if batch.items or batch.folded:
                if not self.sealed or self.sealed[-1] is not batch:  # not sealed yet by an interrupted call
                    self.sealed.append(batch)
                self.batch = _Batch()
            items: list[TimedOut] = []
            folded: dict[object, Folded] = {}
            for sealed in self.sealed:
                sealed.landed = landed
                items.extend(sealed.items)
                for key, (n, low, high) in sealed.folded.items():
                    m, low2, high2 = folded.get(key, (0, low, high))
                    folded[key] = (n + m, min(low, low2), max(high, high2))
            return items, folded


def _fold(folded: dict[object, Folded], t: TimedOut) -> None:
    key: object = t.label
    if key not in folded and len(folded) >= FOLDED_LABELS:
        key = _OTHER_LABELS
    n, low, high = folded.get(key, (0, t.timeout, t.timeout))
    folded[key] = (n + 1, min(low, t.timeout), max(high, t.timeout))


__all__ = ["HOT", "KEEP", "OFFSET", "SIZE", "Folded", "Pending", "add", "count", "fresh", "newer", "parse"]
