"""The ``lockstore`` command line: read and update one JSON value in one file from shell scripts and cron jobs.

Every command that changes the file (set, incr, append, delete) is one transaction: it takes the sidecar lock
``FILE.lock``, reloads the file under it, changes the value and replaces the file atomically before releasing, so
parallel shell loops never lose an update. ``get`` reads without the lock (atomic replace means a reader always sees
a whole file). KEY is a dotted path (``stats.runs``, ``jobs.0.state``): integer parts index lists; set, incr and
append create what is missing along the way as jq does (a list where the next part is an integer, else a dict; an
index past a list's end pads it with nulls). VALUE is parsed as JSON and taken as a string when it is not valid
JSON. A missing file starts as ``{}``.

Start-up time matters for a tool run once per shell-loop iteration, so the library is imported only after the
arguments are parsed and psutil only when a holder is described (``lockstore._holder``).

Exit codes:
  0    success
  1    the lock was busy: timeout (-w) or -n, or a server lock's lease lapsed (nothing was written); run it again
       later; -E/--conflict-exit-code CODE picks another code
  2    usage error (bad arguments or KEY)
  3    key error: KEY is missing (get, delete), or its path crosses a value of the wrong type
       (a string where a dict or list is needed, incr of a non-number, append to a non-list, a list index out of
       range for get and delete, a negative index before a list's start, or a list to grow by over 10,000 items)
  4    data error: FILE cannot be decoded (it is left untouched) or the value cannot be encoded
  5    I/O error: permission denied, missing directory, disk full, read-only file system, a server unreachable
       or refusing the password, a server that does not make commits durable (--no-durable)...
  6    a module this command needs is not installed (the message names the extra to install)
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Final

from . import _cli_exit
from ._cli_args import args_delete, args_demo, args_get, args_holder, args_incr, args_key_value, args_stats
from ._cli_commands import cmd_append, cmd_delete, cmd_demo, cmd_get, cmd_holder, cmd_incr, cmd_set, cmd_stats
from ._cli_exit import (
    EXIT_CONFLICT,
    EXIT_DATA,
    EXIT_INTERRUPTED,
    EXIT_IO,
    EXIT_KEY,
    EXIT_MISSING,
    EXIT_OK,
    EXIT_USAGE,
)

_EPILOG: Final = (__doc__ or "")[(__doc__ or "").index("Exit codes:"):]


_Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
#: name -> (summary, details, add its arguments, run it)
_COMMANDS: Final[dict[str, _Command]] = {
    "get": ("print the value, or the part at KEY, as JSON", "Reads without taking the lock.", args_get, cmd_get),
    "set": ("set KEY to VALUE", "Creates what is missing along KEY, as jq does: a list where the next part is an "
            "integer (padded with nulls up to it), else a dict.", args_key_value, cmd_set),
    "incr": ("add N to the number at KEY and print the new value",
             "A missing (or null) KEY starts at 0; what is missing along KEY is created as by set.", args_incr,
             cmd_incr),
    "append": ("append VALUE to the list at KEY",
               "A missing (or null) KEY starts a new list; what is missing along KEY is created as by set.",
               args_key_value, cmd_append),
    "delete": ("remove KEY", "A missing KEY is a key error (exit 3) unless --missing-ok.", args_delete, cmd_delete),
    "holder": ("show who holds FILE's lock, or that it is free, and who waits for it",
               "Prints the pid, host, user, whether the process is alive, how long it has held the lock, its "
               "command and label, then the processes waiting for it, oldest first. The kernel names the holder "
               "(Linux: /proc/locks), the record lockstore keeps in FILE.lock adds its label and since when. Never "
               "takes the lock.",
               args_holder, cmd_holder),
    "stats": ("show the lock's wait and hold statistics and a suggested timeout",
              "Every process that uses FILE.lock keeps counts and histograms of its waits and holds in the lock file; "
              "this prints them, with a timeout that would have covered every wait seen. --reset starts afresh.",
              args_stats, cmd_stats),
    "demo": ("the README's demo: worker processes increment one counter, without and with transactions",
             "Prints the final count of plain reload() + commit() (lost updates) and of transaction() (exact).",
             args_demo, cmd_demo),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, the other commands get no arguments (a command line names one command,
    and adding every command's arguments costs a noticeable part of a shell-loop iteration's start-up)."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="lockstore", description="One value in one file, shared safely by many processes.",
        epilog=_EPILOG, formatter_class=raw,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"lockstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, details, add_arguments, run) in _COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=summary)
            continue
        p = sub.add_parser(name, help=summary, description=f"{summary}\n\n{details}", epilog=_EPILOG,
                           formatter_class=raw)
        add_arguments(p)
        p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (see the module docstring)."""
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser(argv[0] if argv and argv[0] in _COMMANDS else None).parse_args(argv)
    return _cli_exit.run(args)


__all__ = ["EXIT_CONFLICT", "EXIT_DATA", "EXIT_INTERRUPTED", "EXIT_IO", "EXIT_KEY", "EXIT_MISSING", "EXIT_OK",
           "EXIT_USAGE", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
