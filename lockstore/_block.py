"""Whether the block of a ``with`` statement still runs, judged from the frame that entered it.

CPython may raise a signal handler's KeyboardInterrupt at the very first instruction of ``__exit__``, before any of
its body runs: the transaction is then left without its end, and while that exception lives (its traceback holds
``__exit__``'s frame, and so the transaction: an ``except`` block, or an exception kept for later) the Store would
take it for this thread's running transaction, and a later ``transaction()`` would join it as a savepoint whose
write never comes. A block that still runs is recognised from the frame of its ``with`` statement: that frame's
current instruction lies inside the statement's block, i.e. the chain of exception handlers from it (innermost
first, each handler's own code covered by the next outer one) reaches the statement's own handler. A frame that is
suspended inside the block (a ``contextlib.contextmanager`` generator at its ``yield``) counts as running.

Only a transaction entered by a ``with`` statement is judged (one entered through a manual ``__enter__()`` call,
``ExitStack`` included, always counts as running), and only when a Store has an active transaction of the caller's
owner, so the usual path costs one ``sys._getframe`` per transaction. Where the bytecode cannot be read as
expected, the answer is "running": never end a block that may still run.
"""

from __future__ import annotations

import functools
import itertools
import opcode
from types import CodeType, FrameType

#: The opcode a ``with`` statement enters with (3.11 to 3.13; later versions fall back to "running").
_WITH = opcode.opmap.get("BEFORE_WITH", -1)
#: Handler chains are short (one step per enclosing try/with); more steps than this means the table was misread.
_STEPS = 64


def entered_by_with(frame: FrameType) -> bool:
    """Whether ``frame`` is calling ``__enter__`` from a ``with`` statement (not a manual call, ``ExitStack``).

    Only those frames are kept: a frame kept by a transaction that a local variable of that frame refers to is a
    reference cycle, and a manually entered, dropped transaction must be freed (and so released) as soon as its
    caller's frame goes, not at the next cyclic garbage collection."""
    try:
        return frame.f_code.co_code[frame.f_lasti] == _WITH
    except IndexError:
        return False


@functools.lru_cache(maxsize=512)
def _layout(code: CodeType) -> tuple[dict[int, tuple[int, int]], tuple[tuple[int, int, int], ...]]:
    """For ``code``: {offset: (opcode, next offset)} and its exception table as (start, end, target)."""
    import dis  # only when a dropped transaction is suspected

    instructions = list(dis.get_instructions(code))
    steps = {ins.offset: (ins.opcode, nxt.offset) for ins, nxt in itertools.pairwise(instructions)}
    # exception_entries exists at runtime on 3.11+ but is missing from typeshed's dis.Bytecode
    table = tuple((e.start, e.end, e.target) for e in dis.Bytecode(code).exception_entries)  # type: ignore[attr-defined]
    return steps, table


def _handler(table: tuple[tuple[int, int, int], ...], offset: int) -> int:
    for start, end, target in table:
        if start <= offset < end:
            return target
    return -1


def running(frame: FrameType, entry: int) -> bool:
    """Whether the ``with`` statement at offset ``entry`` of ``frame`` is still inside its block."""
    try:
        steps, table = _layout(frame.f_code)
        op, after = steps.get(entry, (-1, -1))
        if op != _WITH:
            return True  # not entered by a with statement we can read: assume it runs
        own = _handler(table, after)
        if own < 0:
            return True
        offset = frame.f_lasti
        for _ in range(_STEPS):
            offset = _handler(table, offset)
            if offset == own:
                return True
            if offset < 0:
                return False
    except Exception:  # a bytecode this version of the check cannot read
        return True
    return True


__all__ = ["entered_by_with", "running"]
