"""``lockstore stats FILE [--json] [--reset]``: the lock's wait and hold statistics and a suggested timeout.

Wired into ``cli.py`` as ``add_arguments`` and ``run``; only the public API is used (``lockstore.open``,
``store.stats()``, ``store.reset_stats()``), imported when the command runs, so that other commands do not pay for
it. Reading takes no lock; ``--reset`` prints the statistics it is about to discard, then takes the lock (waiting up
to ``-w`` seconds) to start them afresh: a transaction that ends between the two is in neither.
"""

from __future__ import annotations

import argparse

from ._cli_args import seconds
from ._cli_commands import Opaque
from ._cli_exit import EXIT_OK


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``stats`` command's arguments."""
    p.add_argument("file", metavar="FILE", help="the data file (its lock is FILE.lock)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with the field names of lockstore.LockStats (null when there are "
                        "no statistics yet)")
    p.add_argument("--reset", action="store_true",
                   help="print the statistics, then start them afresh (takes the lock)")
    p.add_argument("-w", "--timeout", type=seconds, metavar="SECONDS", default=None,
                   help="with --reset: wait at most SECONDS for the lock (default 30; negative waits forever)")


def run(args: argparse.Namespace) -> int:
    """Print the statistics of FILE's lock (for people, or ``--json``), and with ``--reset`` start them afresh.

    Returns ``cli.EXIT_OK``; errors are raised for ``cli.main`` to turn into exit codes (a busy lock at ``--reset``:
    ``LockTimeout``, exit 1; a store whose lock keeps no statistics at ``--reset``: ``TypeError``, exit 2).
    """
    import lockstore

    options = {} if args.timeout is None else {"timeout": args.timeout}
    # Opaque: the statistics are in the lock file, and must be readable whatever the data file holds.
    store = lockstore.open(args.file, format=Opaque, is_binary=True, **options)
    stats = store.stats()
    if args.json:
        import json

        print(json.dumps(None if stats is None else stats.as_dict()))
    elif stats is None:
        print(f"{store.lock_file}: no statistics yet (no lockstore transaction has ended since the lock file was "
              f"created, or its statistics were written in a format this lockstore cannot read)")
    else:
        print(f"{store.lock_file}: {stats.describe()}")
    if args.reset:
        store.reset_stats()
        if not args.json:
            print(f"{store.lock_file}: statistics reset, counting afresh from now")
    return EXIT_OK
