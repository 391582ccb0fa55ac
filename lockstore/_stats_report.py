"""What a lock's statistics say: the :class:`LockStats` that ``_stats.parse`` reads from the lock file and its parts,
the percentiles, the suggested timeout, and the text (``lockstore stats``) and JSON made of them.

Kept apart from the area's binary format (``_stats.py``): that one is on every transaction's path, this one runs
only when someone looks.

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
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

#: Histogram buckets (the area keeps one u32 count per bucket, see ``_stats.py``).
BUCKETS: Final = 32
#: Upper bound of histogram bucket 0, in seconds; each next bucket's bound doubles.
FIRST_BOUND: Final = 1e-5
#: Below this many acquisitions there is no suggested timeout: a handful of waits say little about the next one.
MIN_ACQUISITIONS: Final = 20
#: The readable timeouts a suggestion is rounded up to (seconds); above the last, whole hours.
READABLE: Final = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)


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


def distribution(counts: tuple[int, ...], maximum: float, total: float) -> Distribution:
    """Waits or holds from a histogram's ``counts``, their exact ``maximum`` and their ``total``."""
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


# --------------------------------------------------------------------------------------------- helpers
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


__all__ = ["BUCKETS", "FIRST_BOUND", "MIN_ACQUISITIONS", "READABLE", "Distribution", "LabelCount", "LockStats",
           "LongestHold", "TimedOut", "bucket_bound", "distribution", "duration", "suggest"]
