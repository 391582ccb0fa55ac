"""What each command accepts: the argument types (KEY, VALUE, a number, SECONDS, an exit code) and each command's
arguments with their help (the command table in ``cli.py`` names them).
"""

from __future__ import annotations

import argparse
from typing import Any, Final, NoReturn

from ._cli_exit import EXIT_CONFLICT

_FORMATS: Final = ("json", "pickle", "bson")


# --------------------------------------------------------------------------------------------- KEY and VALUE
def _key(text: str) -> list[str]:
    parts = text.split(".")
    if "" in parts:
        raise argparse.ArgumentTypeError(f"invalid KEY {text!r}: a dotted path of non-empty parts, like stats.runs")
    return parts


def _value(text: str) -> Any:
    """VALUE as JSON, or the text itself when it is not standard JSON (``NaN`` stays the string "NaN")."""
    import json

    def no_constants(name: str) -> NoReturn:
        raise ValueError(name)

    try:
        return json.loads(text, parse_constant=no_constants)
    except ValueError:
        return text


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return number


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value != value:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return -1.0 if value == float("inf") else value  # negative: wait forever


def _exit_code(text: str) -> int:
    try:
        code = int(text)
    except ValueError:
        code = -1
    if not 0 <= code <= 255:
        raise argparse.ArgumentTypeError(f"an exit code is an integer from 0 to 255, not {text!r}")
    return code


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"a positive integer, not {text!r}")
    return n


# --------------------------------------------------------------------------------------------- arguments
_KEY_HELP: Final = "dotted path: stats.runs, jobs.0.state (integer parts index lists, negative from the end)"
_VALUE_HELP: Final = ("JSON (42, true, null, [1,2], {\"a\":1}, '\"quoted\"'); anything else is taken as a string; "
                      "put -- before a VALUE that starts with - and is not a number")


_FILE_HELP: Final = ("the data file (a missing file starts as {}), or a server target: "
                     "postgresql://USER@HOST:PORT/DB#KEY, redis://HOST:PORT/DB#KEY")


def _add_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help=_FILE_HELP)
    p.add_argument("--format", choices=_FORMATS, default=None, help="the file's format (default: json)")
    _add_target_options(p)


def _add_target_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--table", default=None, help="PostgreSQL targets: the table (default lockstore)")
    p.add_argument("--lease", type=seconds, default=None, metavar="SECONDS",
                   help="Redis targets: the lock's lease (default 30)")


def _add_locking(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("locking and writing (like flock(1))")
    group.add_argument("-w", "--timeout", type=seconds, metavar="SECONDS", default=None,
                       help="wait at most SECONDS for the lock (default 30; negative waits forever, 0 tries once)")
    group.add_argument("-n", "--nonblock", action="store_true", help="fail at once if the lock is busy")
    group.add_argument("-E", "--conflict-exit-code", type=_exit_code, metavar="CODE", default=EXIT_CONFLICT,
                       help="exit code when the lock is busy (default 1)")
    group.add_argument("--no-durable", dest="durable", action="store_false",
                       help="skip the fsyncs (still atomic against a crash, not against power loss)")
    group.add_argument("--label", help="shown to operators by 'lockstore holder' and in timeout messages")


def args_get(p: argparse.ArgumentParser) -> None:
    _add_file(p)
    p.add_argument("key", metavar="KEY", type=_key, nargs="?", help=_KEY_HELP)
    p.add_argument("-r", "--raw", action="store_true", help="print a string without JSON quotes")


def args_key_value(p: argparse.ArgumentParser) -> None:
    _add_file(p)
    p.add_argument("key", metavar="KEY", type=_key, help=_KEY_HELP)
    p.add_argument("value", metavar="VALUE", type=_value, help=_VALUE_HELP)
    _add_locking(p)


def args_incr(p: argparse.ArgumentParser) -> None:
    _add_file(p)
    p.add_argument("key", metavar="KEY", type=_key, help=_KEY_HELP)
    p.add_argument("--by", type=_number, default=1, metavar="N",
                   help="the increment (default 1; may be negative or a decimal)")
    _add_locking(p)


def args_delete(p: argparse.ArgumentParser) -> None:
    _add_file(p)
    p.add_argument("key", metavar="KEY", type=_key, help=_KEY_HELP)
    p.add_argument("--missing-ok", action="store_true", help="succeed when KEY is already missing")
    _add_locking(p)


def args_holder(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help=_FILE_HELP + " (a file's lock is FILE.lock)")
    _add_target_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object for machines")


def args_stats(p: argparse.ArgumentParser) -> None:
    from . import _cli_stats

    _cli_stats.add_arguments(p)


def args_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=_positive_int, default=8, help="worker processes (default 8)")
    p.add_argument("--increments", type=_positive_int, default=200, help="increments per worker (default 200)")
