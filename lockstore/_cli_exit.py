"""How a command ends: the exit codes, and an error raised by a command turned into its code and a one-line message
on stderr.

What each code means is the table in ``cli.py``'s docstring, which ``--help`` prints as its epilog; the constants are
here so that the command modules can use them without importing ``cli.py`` (which imports them).
"""

from __future__ import annotations

import argparse
import sys
from typing import Final

from . import _keys

EXIT_OK: Final = 0
EXIT_CONFLICT: Final = 1
EXIT_USAGE: Final = 2
EXIT_KEY: Final = 3
EXIT_DATA: Final = 4
EXIT_IO: Final = 5
EXIT_MISSING: Final = 6
EXIT_INTERRUPTED: Final = 130


def run(args: argparse.Namespace) -> int:
    """Run the parsed command (``args.func``) and return its exit code; an error it raises becomes its code and a
    one-line message on stderr (see ``cli.py``'s docstring)."""
    from . import CorruptStoreError, LockLost, LockTimeout, NotDurableError, SerializationError

    try:
        code: int = args.func(args)
        sys.stdout.flush()
    except (LockTimeout, LockLost) as exc:  # both mean: run it again later
        error(str(exc))
        return int(getattr(args, "conflict_exit_code", EXIT_CONFLICT))
    except NotDurableError as exc:
        error(f"{exc} (on the command line: --no-durable)")
        return EXIT_IO
    except _keys.KeyPathError as exc:
        error(f"key error: {exc}")
        return EXIT_KEY
    except (CorruptStoreError, SerializationError) as exc:
        error(str(exc))
        return EXIT_DATA
    except ImportError as exc:
        error(str(exc))
        return EXIT_MISSING
    except (TypeError, ValueError) as exc:  # an option the target does not take, a target without #KEY...
        error(str(exc))
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (``lockstore get f | head``); silence the interpreter's flush at exit too.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_IO
    except OSError as exc:
        error(str(exc))
        return EXIT_IO
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return code


def one_line(text: str) -> str:
    """A recorded command line may hold newlines (``python -c`` scripts): keep each message on one line."""
    return " ".join(text.splitlines())


def error(message: str) -> None:
    import contextlib

    with contextlib.suppress(OSError):  # stderr is gone (a closed terminal or pipe): the exit code still tells
        print(f"lockstore: {one_line(message)}", file=sys.stderr, flush=True)
