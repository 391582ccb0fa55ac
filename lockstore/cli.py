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
from typing import TYPE_CHECKING, Any, Final, NoReturn

from . import _keys

if TYPE_CHECKING:
    from . import Holder, Store

EXIT_OK: Final = 0
EXIT_CONFLICT: Final = 1
EXIT_USAGE: Final = 2
EXIT_KEY: Final = 3
EXIT_DATA: Final = 4
EXIT_IO: Final = 5
EXIT_MISSING: Final = 6
EXIT_INTERRUPTED: Final = 130

_EPILOG: Final = (__doc__ or "")[(__doc__ or "").index("Exit codes:"):]
#: On a terminal, a wait longer than this many seconds is announced on stderr with the holder's description.
_ANNOUNCE_AFTER: Final = 1.0
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


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if seconds != seconds:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return -1.0 if seconds == float("inf") else seconds  # negative: wait forever


def _exit_code(text: str) -> int:
    try:
        code = int(text)
    except ValueError:
        code = -1
    if not 0 <= code <= 255:
        raise argparse.ArgumentTypeError(f"an exit code is an integer from 0 to 255, not {text!r}")
    return code


# --------------------------------------------------------------------------------------------- commands
def _open(args: argparse.Namespace) -> Store[Any]:
    import lockstore

    return lockstore.open(args.file, default={}, format=args.format, durable=args.durable, **_target_options(args))


def _target_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--table`` and ``--lease``, for the server targets that take them (only when given)."""
    options: dict[str, Any] = {}
    if getattr(args, "table", None) is not None:
        options["table"] = args.table
    if getattr(args, "lease", None) is not None:
        options["lease"] = args.lease
    return options


def _transact(args: argparse.Namespace, change: Callable[[Any, argparse.Namespace], Any]) -> Any:
    """Run ``change(value, args)`` in one transaction, announcing a long wait on a terminal (see the module doc)."""
    from . import LockTimeout

    store = _open(args)
    timeout = store.timeout if args.timeout is None else args.timeout
    blocking = not args.nonblock
    waited = 0.0
    if blocking and (timeout < 0 or timeout > _ANNOUNCE_AFTER) and sys.stderr.isatty():
        try:
            with store.transaction(timeout=_ANNOUNCE_AFTER, label=args.label) as s:
                return change(s.value, args)
        except LockTimeout as exc:
            waited = exc.waited
            holder = exc.holder.describe() if exc.holder is not None else "no holder visible from here"
            forever = "forever" if timeout < 0 else f"up to {timeout - waited:.1f} s more"
            _error(f"waiting ({forever}) for the lock on {args.file}: {holder}")
            timeout = timeout if timeout < 0 else max(0.0, timeout - waited)
    try:
        with store.transaction(timeout=timeout, blocking=blocking, label=args.label) as s:
            return change(s.value, args)
    except LockTimeout as exc:
        exc.waited += waited
        raise


def _print_json(value: Any, *, raw: bool = False) -> None:
    import json

    if raw and isinstance(value, str):
        print(value)
        return
    # Other formats (pickle) may hold values JSON cannot show: print their repr as a JSON string.
    print(json.dumps(value, ensure_ascii=False, default=repr))


def _cmd_get(args: argparse.Namespace) -> int:
    import lockstore

    value = lockstore.read(args.file, default={}, format=args.format, **_target_options(args))
    _print_json(value if args.key is None else _keys.lookup(value, args.key), raw=args.raw)
    return EXIT_OK


def _cmd_set(args: argparse.Namespace) -> int:
    _transact(args, _keys.do_set)
    return EXIT_OK


def _cmd_incr(args: argparse.Namespace) -> int:
    _print_json(_transact(args, _keys.do_incr))
    return EXIT_OK


def _cmd_append(args: argparse.Namespace) -> int:
    _transact(args, _keys.do_append)
    return EXIT_OK


def _cmd_delete(args: argparse.Namespace) -> int:
    _transact(args, _keys.do_delete)
    return EXIT_OK


class _Opaque:
    """A format that reads any file as None: ``holder`` must work even on a corrupt or foreign data file."""

    @staticmethod
    def loads(data: bytes) -> None:
        return None

    @staticmethod
    def dumps(value: Any) -> bytes:
        raise TypeError("the holder command never writes")


def _holder_dict(holder: Holder) -> dict[str, Any]:
    import dataclasses

    held_for = holder.held_for
    return {**dataclasses.asdict(holder), "held_for": None if held_for is None else round(held_for, 3)}


def _describe_lines(holder: Holder, *, waiting: bool = False) -> list[str]:
    import time

    def when(t: float | None) -> str:
        return "unknown" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))

    alive = {True: "yes", False: "no", None: "unknown (another host or PID namespace)"}
    lines = [f"pid:      {holder.pid}", f"host:     {holder.host}", f"user:     {holder.user}",
             f"alive:    {alive[holder.alive]}"]
    if waiting:
        since = holder.waiting_since
        if since is not None:
            lines.append(f"waiting:  {max(0.0, time.time() - since):.1f} s (since {when(since)})")
    elif holder.held_for is not None:
        lines.append(f"held for: {holder.held_for:.1f} s (since {when(holder.acquired_at)})")
    else:
        lines.append("held for: unknown (it holds the lock without lockstore, so it left no record)")
    lines.append(f"command:  {_one_line(' '.join(holder.cmdline))}")
    if holder.label:
        lines.append(f"label:    {holder.label}")
    return lines


def _cmd_holder(args: argparse.Namespace) -> int:
    import lockstore

    store = lockstore.open(args.file, format=_Opaque, is_binary=True, **_target_options(args))
    holder = store.holder()
    waiting = store.waiters()
    if args.json:
        import json

        print(json.dumps({"file": args.file, "lock_file": store.lock_file, "held": holder is not None,
                          "holder": None if holder is None else _holder_dict(holder),
                          "waiting": [_holder_dict(w) for w in waiting]}))
        return EXIT_OK
    if holder is None:
        print(f"{store.lock_file}: free")
    else:
        print(f"{store.lock_file}: held")
        for line in _describe_lines(holder):
            print(f"  {line}")
    if waiting:
        print(f"waiting: {len(waiting)} process{'es' if len(waiting) > 1 else ''}, oldest first")
        for i, waiter in enumerate(waiting, 1):
            lines = _describe_lines(waiter, waiting=True)
            print(f"  {i}. {lines[0]}")
            for line in lines[1:]:
                print(f"     {line}")
    return EXIT_OK


def _args_stats(p: argparse.ArgumentParser) -> None:
    from . import _cli_stats

    _cli_stats.add_arguments(p)


def _cmd_stats(args: argparse.Namespace) -> int:
    from . import _cli_stats

    return _cli_stats.run(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import _demo

    return _demo.main(args.workers, args.increments)


# --------------------------------------------------------------------------------------------- the parser
def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"a positive integer, not {text!r}")
    return n


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
    p.add_argument("--lease", type=_seconds, default=None, metavar="SECONDS",
                   help="Redis targets: the lock's lease (default 30)")


def _add_locking(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("locking and writing (like flock(1))")
    group.add_argument("-w", "--timeout", type=_seconds, metavar="SECONDS", default=None,
                       help="wait at most SECONDS for the lock (default 30; negative waits forever, 0 tries once)")
    group.add_argument("-n", "--nonblock", action="store_true", help="fail at once if the lock is busy")
    group.add_argument("-E", "--conflict-exit-code", type=_exit_code, metavar="CODE", default=EXIT_CONFLICT,
                       help="exit code when the lock is busy (default 1)")
    group.add_argument("--no-durable", dest="durable", action="store_false",
                       help="skip the fsyncs (still atomic against a crash, not against power loss)")
    group.add_argument("--label", help="shown to operators by 'lockstore holder' and in timeout messages")


def _args_get(p: argparse.ArgumentParser) -> None:
    _add_file(p)
    p.add_argument("key", metavar="KEY", type=_key, nargs="?", help=_KEY_HELP)
    p.add_argument("-r", "--raw", action="store_true", help="print a string without JSON quotes")


def _args_key_value(p: argparse.ArgumentParser) -> None:
    _add_file(p)
    p.add_argument("key", metavar="KEY", type=_key, help=_KEY_HELP)
    p.add_argument("value", metavar="VALUE", type=_value, help=_VALUE_HELP)
    _add_locking(p)


def _args_incr(p: argparse.ArgumentParser) -> None:
    _add_file(p)
    p.add_argument("key", metavar="KEY", type=_key, help=_KEY_HELP)
    p.add_argument("--by", type=_number, default=1, metavar="N",
                   help="the increment (default 1; may be negative or a decimal)")
    _add_locking(p)


def _args_delete(p: argparse.ArgumentParser) -> None:
    _add_file(p)
    p.add_argument("key", metavar="KEY", type=_key, help=_KEY_HELP)
    p.add_argument("--missing-ok", action="store_true", help="succeed when KEY is already missing")
    _add_locking(p)


def _args_holder(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help=_FILE_HELP + " (a file's lock is FILE.lock)")
    _add_target_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object for machines")


def _args_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=_positive_int, default=8, help="worker processes (default 8)")
    p.add_argument("--increments", type=_positive_int, default=200, help="increments per worker (default 200)")


_Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
#: name -> (summary, details, add its arguments, run it)
_COMMANDS: Final[dict[str, _Command]] = {
    "get": ("print the value, or the part at KEY, as JSON", "Reads without taking the lock.", _args_get, _cmd_get),
    "set": ("set KEY to VALUE", "Creates what is missing along KEY, as jq does: a list where the next part is an "
            "integer (padded with nulls up to it), else a dict.", _args_key_value, _cmd_set),
    "incr": ("add N to the number at KEY and print the new value",
             "A missing (or null) KEY starts at 0; what is missing along KEY is created as by set.", _args_incr,
             _cmd_incr),
    "append": ("append VALUE to the list at KEY",
               "A missing (or null) KEY starts a new list; what is missing along KEY is created as by set.",
               _args_key_value, _cmd_append),
    "delete": ("remove KEY", "A missing KEY is a key error (exit 3) unless --missing-ok.", _args_delete, _cmd_delete),
    "holder": ("show who holds FILE's lock, or that it is free, and who waits for it",
               "Prints the pid, host, user, whether the process is alive, how long it has held the lock, its "
               "command and label, then the processes waiting for it, oldest first. The kernel names the holder "
               "(Linux: /proc/locks), the record lockstore keeps in FILE.lock adds its label and since when. Never "
               "takes the lock.",
               _args_holder, _cmd_holder),
    "stats": ("show the lock's wait and hold statistics and a suggested timeout",
              "Every process that uses FILE.lock keeps counts and histograms of its waits and holds in the lock file; "
              "this prints them, with a timeout that would have covered every wait seen. --reset starts afresh.",
              _args_stats, _cmd_stats),
    "demo": ("the README's demo: worker processes increment one counter, without and with transactions",
             "Prints the final count of plain reload() + commit() (lost updates) and of transaction() (exact).",
             _args_demo, _cmd_demo),
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


def _one_line(text: str) -> str:
    """A recorded command line may hold newlines (``python -c`` scripts): keep each message on one line."""
    return " ".join(text.splitlines())


def _error(message: str) -> None:
    import contextlib

    with contextlib.suppress(OSError):  # stderr is gone (a closed terminal or pipe): the exit code still tells
        print(f"lockstore: {_one_line(message)}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (see the module docstring)."""
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser(argv[0] if argv and argv[0] in _COMMANDS else None).parse_args(argv)
    from . import CorruptStoreError, LockLost, LockTimeout, NotDurableError, SerializationError

    try:
        code: int = args.func(args)
        sys.stdout.flush()
    except (LockTimeout, LockLost) as exc:  # both mean: run it again later
        _error(str(exc))
        return int(getattr(args, "conflict_exit_code", EXIT_CONFLICT))
    except NotDurableError as exc:
        _error(f"{exc} (on the command line: --no-durable)")
        return EXIT_IO
    except _keys.KeyPathError as exc:
        _error(f"key error: {exc}")
        return EXIT_KEY
    except (CorruptStoreError, SerializationError) as exc:
        _error(str(exc))
        return EXIT_DATA
    except ImportError as exc:
        _error(str(exc))
        return EXIT_MISSING
    except (TypeError, ValueError) as exc:  # an option the target does not take, a target without #KEY...
        _error(str(exc))
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (``lockstore get f | head``); silence the interpreter's flush at exit too.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_IO
    except OSError as exc:
        _error(str(exc))
        return EXIT_IO
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
