"""What each command does: the key commands (get reads; set, incr, append and delete are each one transaction,
announcing a long wait on a terminal), the holder listing, and the entry points of the stats and demo commands.

The library is imported inside the commands, once the arguments are parsed (see ``cli.py``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from . import _keys
from ._cli_exit import EXIT_OK, error, one_line

if TYPE_CHECKING:
    from . import Holder, Store

#: On a terminal, a wait longer than this many seconds is announced on stderr with the holder's description.
_ANNOUNCE_AFTER: Final = 1.0


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
            error(f"waiting ({forever}) for the lock on {args.file}: {holder}")
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


def cmd_get(args: argparse.Namespace) -> int:
    import lockstore

    value = lockstore.read(args.file, default={}, format=args.format, **_target_options(args))
    _print_json(value if args.key is None else _keys.lookup(value, args.key), raw=args.raw)
    return EXIT_OK


def cmd_set(args: argparse.Namespace) -> int:
    _transact(args, _keys.do_set)
    return EXIT_OK


def cmd_incr(args: argparse.Namespace) -> int:
    _print_json(_transact(args, _keys.do_incr))
    return EXIT_OK


def cmd_append(args: argparse.Namespace) -> int:
    _transact(args, _keys.do_append)
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    _transact(args, _keys.do_delete)
    return EXIT_OK


class Opaque:
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
    lines.append(f"command:  {one_line(' '.join(holder.cmdline))}")
    if holder.label:
        lines.append(f"label:    {holder.label}")
    return lines


def cmd_holder(args: argparse.Namespace) -> int:
    import lockstore

    store = lockstore.open(args.file, format=Opaque, is_binary=True, **_target_options(args))
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


def cmd_stats(args: argparse.Namespace) -> int:
    from . import _cli_stats

    return _cli_stats.run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from . import _demo

    return _demo.main(args.workers, args.increments)
