"""The ``lockstore`` command line (placeholder: only ``demo`` until the CLI issue lands)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = argparse.ArgumentParser(prog="lockstore", description="One value in one file, shared safely.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="several processes increment one counter, without and with transactions")
    demo.add_argument("--workers", type=int, default=8)
    demo.add_argument("--increments", type=int, default=200)
    args = parser.parse_args(argv)
    from . import _demo

    return _demo.main(args.workers, args.increments)


if __name__ == "__main__":
    sys.exit(main())
