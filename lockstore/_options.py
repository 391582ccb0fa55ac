"""Checking option values once, where they enter (``open()`` and each call), with errors that name the option."""

from __future__ import annotations

import math
import numbers
import threading
from typing import Final, Literal

#: A wait longer than this is a wait forever: ``threading`` and ``time.sleep`` refuse larger timeouts, and no lock
#: wait of three centuries is meant to end.
_LONGEST: Final = min(threading.TIMEOUT_MAX, 1e10)

OnCorrupt = Literal["raise", "backup"]


def timeout(value: object, name: str = "timeout") -> float:
    """A timeout in seconds: a negative number, ``inf`` or anything too long to sleep means forever (-1.0).

    Raises TypeError for a non-number (a bool included: ``timeout=True`` is a mistake, not one second) and
    ValueError for NaN.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:  # an int or Fraction beyond any float: as infinite
        seconds = -math.inf if value < 0 else math.inf
    if math.isnan(seconds):
        raise ValueError(f"{name} must be a number of seconds, not NaN")
    if seconds < 0 or seconds > _LONGEST:
        return -1.0
    return seconds


def positive(value: object, name: str) -> float:
    """A positive finite number of seconds (``poll_interval``, ``lease``, ``warn_hold``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    seconds = float(value)
    if not 0 < seconds <= _LONGEST:
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    return seconds


def flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {value!r}")
    return value


def on_corrupt(value: object) -> OnCorrupt:
    if value == "raise":
        return "raise"
    if value == "backup":
        return "backup"
    raise ValueError(f"on_corrupt must be 'raise' or 'backup', not {value!r}")


def label(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"label must be a string or None, not {type(value).__name__}")


__all__ = ["OnCorrupt", "flag", "label", "on_corrupt", "positive", "timeout"]
