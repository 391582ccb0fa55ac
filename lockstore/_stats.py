"""Lock statistics: a fixed-size area of the lock file where every process counts its waits, holds and timeouts.

The holder of the lock updates the area at its release (it knows then how long it waited and held) with one
``pwrite`` and no fsync: statistics describe live processes, and a crash only costs the last few counts. A
process that timed out does not hold the lock, so it reports its timeouts at its next acquisition
(:class:`TimedOut`). A torn area (a crash in the middle of the ``pwrite``), blanks, zeros, an older lockstore's
bytes or another tool's are not an area of this format: :func:`add` starts a fresh one, :func:`parse` returns None.
An area of a *newer* format is left alone (a lockstore of the next version running beside this one must not have
its statistics reset at every transaction of ours; later versions keep the first 12 bytes' meaning and the checksum
at their end, see :func:`_newer`); :func:`fresh` (``lockstore stats --reset``) replaces anything.

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
     792   128   wait histogram: 32 x u32
     920   128   hold histogram: 32 x u32 (a count that would pass 2^32 - 1 halves all counts of its histogram:
                 the shape, and so the percentiles, are kept; the acquisitions count stays exact)
    1048     4   reserved (0)
    1052     4   CRC-32 of bytes [0, 1052) (zlib.crc32), so that zlib.crc32 of the whole area is a constant

Histograms: bucket 0 counts values below 10 us, bucket i (1..30) values in [10 us x 2^(i-1), 10 us x 2^i), bucket
31 everything from 10 us x 2^30 (about 3 hours) up. A percentile is the upper bound of the bucket that holds it
(nearest rank: the smallest bucket bound with at least that share of the values at or below it), never more than
the exact maximum (kept apart): so the true value lies between half the figure and the figure, and a timeout chosen
from it never falls short because of the bucketing. Timed-out waits are not in the wait histogram (they did not
get the lock); they are counted apart, with the timeout that fired.

The suggested timeout: with at least :data:`MIN_ACQUISITIONS` acquisitions recorded, twice the largest of the
longest wait, the longest hold and the largest timeout that fired, rounded up to the next of 1, 2, 5, 10, 20, 30,
60, 120, 300, 600, 1200, 1800, 3600 s (then whole hours), never less than 1 s. Why each term: the longest wait
covers every wait that succeeded; the longest hold is what a waiter that arrives just after that holder took the
lock must sit out (the waits that met it may have timed out, and then they are not in the wait maximum); a wait
that timed out lasted longer than its timeout, by an unknown amount, so the suggestion at least doubles it (repeated
looks converge like a doubling search); the factor 2 is the margin. Only exact maxima enter the rule, never the
bucketed percentiles, so it can be redone from the printed figures.

:func:`add` is on every transaction's path: precompiled structs, counts bumped in their low byte, and CRC-32
over the area once (the check) plus once more over the part an acquisition changes (the last 300 bytes): about
2.7 us per call on a 2-core VM (``tests/test_stats.py`` prints the figure).
"""

from __future__ import annotations

import math
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

OFFSET: Final = 4096
SIZE: Final = 1056
VERSION: Final = 1
MAGIC: Final = b"LOCKSTAT"
BUCKETS: Final = 32
#: Upper bound of histogram bucket 0, in seconds; each next bucket's bound doubles.
FIRST_BOUND: Final = 1e-5
#: Below this many acquisitions there is no suggested timeout: a handful of waits say little about the next one.
MIN_ACQUISITIONS: Final = 20
#: The readable timeouts a suggestion is rounded up to (seconds); above the last, whole hours.
READABLE: Final = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
#: Bytes kept of a host name and of a label.
HOST_MAX: Final = 64
LABEL_MAX: Final = 48
#: Rows of the timeouts-by-label table and slots of the recent-timeouts ring.
LABEL_ROWS: Final = 4
RECENT: Final = 4

_PREFIX: Final = struct.pack("<8sHH", MAGIC, VERSION, SIZE)  # magic, version and size: bytes [0, 12)
_TIMEOUTS_AT: Final = 24
_LONGEST_AT: Final = 48
_LABELS_AT: Final = 176
_RECENT_AT: Final = 432
#: What every acquisition changes lies from here to the checksum, so that add() hashes the rest only once.
_HOT_AT: Final = 752
_WAIT_AT: Final = 792
_HOLD_AT: Final = 920
_CRC_AT: Final = SIZE - 4
#: zlib.crc32 of any byte string followed by its own CRC-32 (little-endian) is this constant: the area is checked
#: with one pass and no slicing.
_RESIDUE: Final = zlib.crc32(b"\x00\x00\x00\x00" + struct.pack("<I", zlib.crc32(b"\x00\x00\x00\x00")))
#: Waits and holds are clamped to this (a clock jump, not a wait).
_HUGE: Final = 1e9

_HEAD = struct.Struct("<8sHHI")  # magic, version, size, reserved
_VERSION_SIZE = struct.Struct("<HH")
_SINCE = struct.Struct("<d")
_HOT = struct.Struct("<Qdddd")  # acquisitions, longest wait, longest hold, sum of waits, sum of holds
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


class TimedOut(NamedTuple):
    """A wait that gave up: how long it waited, the timeout that fired, its label, its pid, when (epoch seconds)."""

    waited: float
    timeout: float
    label: str | None
    pid: int
    at: float


@dataclass(frozen=True)
class Distribution:
    """Waits or holds, in seconds: percentiles (bucket upper bounds, see the module doc), the exact maximum, the
    sum, and the histogram's counts (``counts[i]``: values below ``FIRST_BOUND * 2**i``, above the previous
    bound; the last bucket has no upper bound)."""

    p50: float
    p90: float
    p99: float
    max: float
    total: float
    counts: tuple[int, ...]


@dataclass(frozen=True)
class LongestHold:
    """The longest hold since ``since``: seconds, the process (pid, host), its label, when it released (epoch s)."""

    seconds: float
    pid: int
    host: str
    label: str | None
    at: float


@dataclass(frozen=True)
class LabelCount:
    """How many of the timeouts came from waiters with this label (None: no label)."""

    label: str | None
    count: int


@dataclass(frozen=True)
class LockStats:
    """A lock's statistics since ``since`` (epoch seconds of the first use or the last reset): see ``store.stats()``.

    ``timeout_min``/``timeout_max`` are the smallest and largest timeouts that fired (None without timeouts);
    ``timeout_labels`` counts the timeouts of the first 4 waiter labels seen (the rest count only in ``timeouts``);
    ``recent_timeouts`` are the last 4, newest first. ``suggested_timeout`` is None with fewer than
    ``MIN_ACQUISITIONS`` acquisitions; the rule is in :func:`suggest`.
    """

    acquisitions: int
    timeouts: int
    wait: Distribution
    hold: Distribution
    longest_hold: LongestHold | None
    since: float
    suggested_timeout: float | None
    timeout_min: float | None
    timeout_max: float | None
    timeout_labels: tuple[LabelCount, ...]
    recent_timeouts: tuple[TimedOut, ...]

    def as_dict(self) -> dict[str, Any]:
        """The statistics as plain JSON-ready data, with the field names of these dataclasses (timeouts as objects
        with ``TimedOut``'s field names)."""
        return {
            "acquisitions": self.acquisitions,
            "timeouts": self.timeouts,
            "wait": _distribution_dict(self.wait),
            "hold": _distribution_dict(self.hold),
            "longest_hold": None if self.longest_hold is None else {
                "seconds": self.longest_hold.seconds, "pid": self.longest_hold.pid, "host": self.longest_hold.host,
                "label": self.longest_hold.label, "at": self.longest_hold.at},
            "since": self.since,
            "suggested_timeout": self.suggested_timeout,
            "timeout_min": self.timeout_min,
            "timeout_max": self.timeout_max,
            "timeout_labels": [{"label": row.label, "count": row.count} for row in self.timeout_labels],
            "recent_timeouts": [t._asdict() for t in self.recent_timeouts],
        }

    def basis(self) -> str:
        """The recommendation and its basis (the end of :meth:`describe`), wrapped at 100 columns."""
        if not self.acquisitions:
            return "suggested timeout: none yet (no acquisitions recorded)"
        seen = (f"longest wait seen {duration(self.wait.max)} (p99 {duration(self.wait.p99)}) over "
                f"{self.acquisitions:,} acquisition{_s(self.acquisitions)}")
        if self.longest_hold is not None:
            seen += f"; longest hold {duration(self.longest_hold.seconds)}{_labelled(self.longest_hold.label)}"
        if self.timeouts:
            seen += f"; {self.timeouts:,} timeout{_s(self.timeouts)}, {self._timeouts_text()}"
        else:
            seen += "; no timeouts"
        if self.suggested_timeout is None:
            return "\n".join([
                f"suggested timeout: none yet ({self.acquisitions:,} acquisition{_s(self.acquisitions)} recorded, "
                f"the rule needs at least {MIN_ACQUISITIONS})",
                _wrap(seen + "."),
            ])
        suggested = _seconds(self.suggested_timeout)
        terms = [f"the longest wait ({duration(self.wait.max)})", f"the longest hold ({duration(self.hold.max)})"]
        largest = max(self.wait.max, self.hold.max)
        if self.timeout_max is not None:
            terms.append(f"the largest timeout that fired ({_seconds(self.timeout_max)})")
            largest = max(largest, self.timeout_max)
        if self.timeouts:
            seen += (f"; a timeout of {suggested} would have covered every wait that got the lock, and is at least "
                     f"twice every timeout that fired.")
        else:
            seen += f"; a timeout of {suggested} would have covered every wait seen."
        rule = (f"rule: 2 x the largest of {', '.join(terms[:-1])} and {terms[-1]} = {duration(2 * largest)}, "
                f"rounded up to the next of 1, 2, 5, 10, 20, 30, 60, 120, 300, 600 s... (at least 1 s).")
        if self.timeouts:
            rule += (f" The waits that timed out lasted longer than their timeout, by how much is not known: if "
                     f"timeouts still fire with {suggested}, reset the statistics (lockstore stats --reset) and look "
                     f"again.")
        return "\n".join([f"suggested timeout: {suggested}", _wrap(seen), _wrap(rule)])

    def describe(self, *, now: float | None = None) -> str:
        """The text ``lockstore stats`` prints: counts, p50/p90/p99/max of waits and holds with a text histogram,
        the longest hold, the timeouts, and the recommendation with its basis."""
        now = time.time() if now is None else now
        lines = [f"since {_when(self.since)} ({_age(now - self.since)} ago): {self.acquisitions:,} "
                 f"acquisition{_s(self.acquisitions)}, {self.timeouts:,} timeout{_s(self.timeouts)}"]
        if self.acquisitions:
            busy = min(1.0, self.hold.total / max(now - self.since, 1e-9))
            lines += [
                "",
                f"        {'p50':>9} {'p90':>9} {'p99':>9} {'max':>9} {'mean':>9}",
                *(f"  {name}  {duration(d.p50):>9} {duration(d.p90):>9} {duration(d.p99):>9} {duration(d.max):>9} "
                  f"{duration(d.total / self.acquisitions):>9}" for name, d in (("wait", self.wait),
                                                                                 ("hold", self.hold))),
                "  (p50/p90/p99 are the upper bounds of log-scale buckets: the true value is between half and all",
                f"  of it; max is exact; the lock was held {_three(100 * busy)}% of the time)",
                "",
                *_histogram(self.wait.counts, self.hold.counts),
            ]
        if self.longest_hold is not None:
            h = self.longest_hold
            lines += ["", f"longest hold: {duration(h.seconds)} by pid {h.pid} on {h.host or '?'}"
                          f"{_labelled(h.label)}, released {_when(h.at)}"]
        if self.timeouts:
            last = len(self.recent_timeouts)
            lines += ["", f"timeouts: {self.timeouts:,}, {self._timeouts_text()}; the last {last}:"]
            lines += [f"  {_when(t.at)}  pid {t.pid}{_labelled(t.label)} gave up after {duration(t.waited)} "
                      f"(timeout={_number(t.timeout)})" for t in self.recent_timeouts]
        lines += ["", self.basis()]
        return "\n".join(lines)

    def _timeouts_text(self) -> str:
        if self.timeout_min is None or self.timeout_max is None:
            configured = ""
        elif self.timeout_min == self.timeout_max:
            configured = f"all with timeout={_number(self.timeout_max)}"
        else:
            configured = f"with timeouts from {_number(self.timeout_min)} to {_number(self.timeout_max)}"
        rows = [f"{_label_name(row.label)} {row.count:,}" for row in self.timeout_labels]
        others = self.timeouts - sum(row.count for row in self.timeout_labels)
        if others > 0:
            rows.append(f"other labels {others:,}")
        if len(rows) == 1 and not others:
            return f"{configured} ({_label_name(self.timeout_labels[0].label)})"
        return f"{configured} ({'; '.join(rows)})" if rows else configured


# --------------------------------------------------------------------------------------------- the area
def fresh(now: float) -> bytearray:
    """An empty area: magic, format version and size, ``since=now``, zero counts, its checksum."""
    area = bytearray(SIZE)
    _HEAD.pack_into(area, 0, MAGIC, VERSION, SIZE, 0)
    _SINCE.pack_into(area, 16, _epoch(now))
    _CRC.pack_into(area, _CRC_AT, _crc32(memoryview(area)[:_CRC_AT]))
    return area


def add(area: bytearray, *, waited: float, held: float, now: float, label: str | None, pid: int, host: str,
        timeouts: Sequence[TimedOut] = (), cold: int | None = None) -> int:
    """Count one acquisition that waited ``waited`` s and held ``held`` s (released at ``now``, epoch seconds), and
    the ``timeouts`` this process reports; in place, with the checksum updated.

    ``area`` is what the lock file holds at ``OFFSET`` (up to ``SIZE`` bytes, fewer or none for an older lock
    file). When it is not an area of this format, it is replaced by ``fresh(now)`` first (resized in place); an
    area of a newer format is left as it is. Never raises for any content of ``area``.

    Returns the CRC-32 of the area's first part (before the counts every acquisition changes). A caller that knows
    ``area`` holds exactly the bytes it wrote last passes that value back as ``cold``: the area is then not checked
    again (the check hashes the whole area; it costs a third of the call).
    """
    # The checksum is computed in two parts: the part before _HOT_AT changes only with a new longest hold or
    # timeouts, so its CRC, computed once for the check, is where the new checksum starts from.
    view = memoryview(area)
    if cold is None or len(area) != SIZE:
        cold = _crc32(view[:_HOT_AT]) if len(area) >= _HOT_AT else 0
        if len(area) != SIZE or not area.startswith(_PREFIX) or _crc32(view[_HOT_AT:], cold) != _RESIDUE:
            view.release()  # a resize needs no views of the bytearray
            if _newer(area):
                return _crc32(area[:_HOT_AT])
            area[:] = fresh(now)
            view = memoryview(area)
            cold = _crc32(view[:_HOT_AT])
    if not 0.0 <= waited < 1e9:  # _HUGE, as a literal: this is the hot path
        waited = _clean(waited)
    if not 0.0 <= held < 1e9:
        held = _clean(held)
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
    if held >= hold_max or timeouts:
        if held >= hold_max:
            _set_longest(area, held_at=now, pid=pid, host=host, label=label)
        if timeouts:
            _add_timeouts(area, timeouts)
        cold = _crc32(view[:_HOT_AT])
    _CRC.pack_into(area, _CRC_AT, _crc32(view[_HOT_AT:_CRC_AT], cold))
    return cold


def parse(area: bytes | bytearray | memoryview) -> LockStats | None:
    """The statistics in ``area`` (what the lock file holds at ``OFFSET``; only its first ``SIZE`` bytes are read),
    or None when it is not a valid area of this format (none yet, torn, foreign, or of another version)."""
    data = bytes(area[:SIZE])
    if len(data) != SIZE or not data.startswith(_PREFIX) or _crc32(data) != _RESIDUE:
        return None
    (since,) = _SINCE.unpack_from(data, 16)
    acquisitions, wait_max, hold_max, wait_sum, hold_sum = _HOT.unpack_from(data, _HOT_AT)
    timeouts, timeout_min, timeout_max = _TIMEOUTS.unpack_from(data, _TIMEOUTS_AT)
    wait = _distribution(_HIST.unpack_from(data, _WAIT_AT), wait_max, wait_sum)
    hold = _distribution(_HIST.unpack_from(data, _HOLD_AT), hold_max, hold_sum)
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


def suggest(*, acquisitions: int, wait_max: float, hold_max: float, timeout_max: float | None) -> float | None:
    """The suggested timeout (see the module doc): None below ``MIN_ACQUISITIONS`` acquisitions, else twice the
    largest of the longest wait, the longest hold and the largest timeout that fired, rounded up to a readable
    number of seconds (:data:`READABLE`, then whole hours), at least 1 s."""
    if acquisitions < MIN_ACQUISITIONS:
        return None
    need = 2.0 * max(wait_max, hold_max, timeout_max or 0.0)
    for readable in READABLE:
        if need <= readable:
            return readable
    return math.ceil(need / 3600.0) * 3600.0


def bucket_bound(i: int) -> float:
    """The upper bound of histogram bucket ``i`` in seconds (infinite for the last)."""
    return math.inf if i >= BUCKETS - 1 else FIRST_BOUND * 2.0**i


# --------------------------------------------------------------------------------------------- helpers
def _newer(area: bytearray) -> bool:
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


def _bump(area: bytearray, at: int, histogram: int) -> None:
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


def _add_timeouts(area: bytearray, timeouts: Sequence[TimedOut]) -> None:
    count, smallest, largest = _TIMEOUTS.unpack_from(area, _TIMEOUTS_AT)
    for t in timeouts:
        timeout = t.timeout if 0.0 <= t.timeout < _HUGE else _clean(t.timeout)
        waited = t.waited if 0.0 <= t.waited < _HUGE else _clean(t.waited)
        smallest = timeout if count == 0 or timeout < smallest else smallest
        largest = timeout if count == 0 or timeout > largest else largest
        flag = 1 if t.label is None else 2
        label_b = b"" if t.label is None else _text(t.label, LABEL_MAX)
        for i in range(LABEL_ROWS):
            at = _LABELS_AT + i * _LABEL_ROW.size
            n, row_flag, row_len, row_label = _LABEL_ROW.unpack_from(area, at)
            if row_flag == 0:
                _LABEL_ROW.pack_into(area, at, 1, flag, len(label_b), label_b)
                break
            if row_flag == flag and row_label[:row_len] == label_b:
                _LABEL_ROW.pack_into(area, at, n + 1, flag, row_len, row_label)
                break
        _RECENT_ROW.pack_into(area, _RECENT_AT + (count % RECENT) * _RECENT_ROW.size, waited, timeout,
                              _epoch(t.at), t.pid & 0xFFFFFFFF, flag, len(label_b), label_b)
        count += 1
    _TIMEOUTS.pack_into(area, _TIMEOUTS_AT, count, smallest, largest)


def _distribution(counts: tuple[int, ...], maximum: float, total: float) -> Distribution:
    n = sum(counts)
    found = []
    for p in (50, 90, 99):
        rank = max(1, (p * n + 99) // 100)  # nearest rank: ceil(p% of n)
        seen = 0
        value = 0.0
        for i, c in enumerate(counts):
            seen += c
            if seen >= rank:
                value = min(bucket_bound(i), maximum)
                break
        found.append(value if n else 0.0)
    return Distribution(p50=found[0], p90=found[1], p99=found[2], max=maximum, total=total, counts=counts)


def _distribution_dict(d: Distribution) -> dict[str, Any]:
    return {"p50": d.p50, "p90": d.p90, "p99": d.p99, "max": d.max, "total": d.total, "counts": list(d.counts)}


def _histogram(waits: tuple[int, ...], holds: tuple[int, ...], width: int = 20) -> list[str]:
    """Two bar columns, one row per bucket from the first to the last one used; 3 or more empty rows in a row are
    shown as one "..." row."""
    used = [i for i in range(BUCKETS) if waits[i] or holds[i]]
    if not used:
        return []
    top_w, top_h = max(waits) or 1, max(holds) or 1

    def bar(count: int, top: int) -> str:
        n = 0 if not count else max(1, round(width * count / top))
        return ("#" * n).ljust(width)

    lines = [f"  {'below':>9}  {'waits':<{width}} {'':>9}  holds"]
    empty: list[str] = []
    for i in range(used[0], used[-1] + 1):
        bound = "longer" if i == BUCKETS - 1 else duration(bucket_bound(i))
        row = f"  {bound:>9}  {bar(waits[i], top_w)} {waits[i]:>9,}  {bar(holds[i], top_h)} {holds[i]:>9,}"
        if waits[i] or holds[i]:
            lines += empty if len(empty) < 3 else [f"  {'...':>9}"]
            empty = []
            lines.append(row)
        else:
            empty.append(row)
    return lines


def duration(seconds: float) -> str:
    """Seconds for people, with three significant digits: 8 us, 0.33 ms, 82 ms, 3.41 s, 1,200 s."""
    if seconds != seconds or seconds == math.inf:
        return str(seconds)
    if seconds < 1e-3:
        return f"{_three(seconds * 1e6)} us"
    if seconds < 1.0:
        return f"{_three(seconds * 1e3)} ms"
    return f"{_three(seconds)} s"


def _three(value: float) -> str:
    """``value`` (>= 0) with three significant digits, trailing zeros dropped; whole numbers from 100 up."""
    if value >= 99.95:
        return f"{value:,.0f}"
    digits = 2 if value < 9.995 else 1
    return f"{value:.{digits}f}".rstrip("0").rstrip(".")


def _seconds(value: float) -> str:
    return f"{_number(value)} s"


def _number(value: float) -> str:
    """A configured timeout as it was probably written: 2, 0.05, 1800."""
    return f"{value:g}" if value < 1e6 else f"{value:,.0f}"


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _wrap(text: str) -> str:
    import textwrap  # only for people's output

    return textwrap.fill(text, width=100, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _label_name(label: str | None) -> str:
    return "no label" if label is None else f"label {label}"


def _labelled(label: str | None) -> str:
    return "" if label is None else f" (label {label})"


def _when(epoch: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
    except (OverflowError, OSError, ValueError):
        return f"{epoch:.0f}"


__all__ = ["OFFSET", "SIZE", "Distribution", "LabelCount", "LockStats", "LongestHold", "TimedOut", "add", "fresh",
           "parse", "suggest"]
