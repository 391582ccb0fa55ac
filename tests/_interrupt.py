"""Deterministic interrupts: raise an exception at the k-th point where CPython could run a signal handler.

CPython runs signal handlers (and so raises a handler's KeyboardInterrupt) only at its "eval breaker" checks: at
the start of a Python function, right after a call returns, and at a loop's backward jump. :func:`inject` traces
the frames of the ``lockstore`` package (``sys.settrace`` with opcode events) and raises at the k-th such point,
counting from 1, so that a test can walk k over every point of an operation, one run each, until the operation
completes without the exception firing. ``deep`` also counts the points of the Python code lockstore calls (the
standard library's: a real signal lands there just as well); ``within`` counts only the points inside one function
(by qualified name), for a walk that must cover that function whatever timing does to the points before it, and
``own`` only that function's own points, not those of what it calls (whose number timing may change).

A trace function can only raise before an instruction, so "right after a call" is modelled as "before the next
instruction". CPython attributes the real exception to the call instruction itself, so the two agree only when
both instructions are covered by the same exception handler; where they are not (the call ends a ``try`` body
and the next instruction already belongs to the code after it), the point is modelled by the call's own handler
range and not counted twice.
"""

from __future__ import annotations

import dis
import os
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import lockstore

PACKAGE = os.path.dirname(os.path.abspath(lockstore.__file__))
_CALLS = frozenset(name for name in dis.opname if name.startswith("CALL") or name == "PRECALL")
_BACK = frozenset(name for name in dis.opname if name.startswith("JUMP_BACKWARD"))


#: lockstore's functions that only the garbage collector calls (weak-reference callbacks and finalizers).
_FINALIZERS = frozenset({"__del__", "_let_slot_go"})


def _in_finalizer(frame: FrameType | None) -> bool:
    """Whether a garbage collector's finalizer runs this frame: Python prints and drops any exception there (it
    cannot reach the interrupted program), so those frames are not the operation's own points."""
    while frame is not None:
        if frame.f_code.co_name in _FINALIZERS or frame.f_code.co_filename.endswith("weakref.py"):
            return True
        frame = frame.f_back
    return False


_HANDLERS: dict[Any, list[tuple[int, int, int]]] = {}


def _handler(code: Any, offset: int) -> int:
    """The exception handler (its target offset, or -1) covering the instruction at ``offset`` of ``code``."""
    entries = _HANDLERS.get(code)
    if entries is None:
        # exception_entries exists at runtime on 3.11+ but is missing from typeshed's dis.Bytecode
        table = dis.Bytecode(code).exception_entries  # type: ignore[attr-defined]
        entries = _HANDLERS[code] = [(e.start, e.end, e.target) for e in table]
    for start, end, target in entries:
        if start <= offset < end:
            return target
    return -1


class Injector:
    """Counts the interrupt points in ``lockstore`` frames and raises ``make()`` at point ``k``."""

    def __init__(self, k: int, make: Callable[[], BaseException] = KeyboardInterrupt, *, deep: bool = False,
                 within: str | None = None, own: bool = False) -> None:
        self.k = k
        self.deep = deep
        self.within = within
        self.own = own
        self.make = make
        self.count = 0
        self.fired = False
        self.where = ""
        self._last: dict[int, tuple[str, int]] = {}

    def _point(self, frame: FrameType, what: str) -> None:
        if self.within is not None and not self._inside(frame):
            return
        self.count += 1
        if self.count == self.k and not self.fired:
            self.fired = True
            self.where = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name} {what}"
            raise self.make()

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if self.fired:
            return None  # nothing more to count: the rest of the operation (its cleanup) runs untraced
        if event == "opcode":
            code = frame.f_code
            here = frame.f_lasti
            op = dis.opname[code.co_code[here]]
            previous = self._last.get(id(frame))
            self._last[id(frame)] = (op, here)
            if previous is None:
                return self._local
            before, at = previous
            after_call = (before in _CALLS and op not in _CALLS) or before in _BACK
            if after_call and _handler(code, at) == _handler(code, here):
                self._point(frame, f"after {before.lower()}, before {op}")
        elif event == "return":
            self._last.pop(id(frame), None)
        return self._local

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        if self.fired or event != "call" or not self._traced(frame) or _in_finalizer(frame):
            return None
        frame.f_trace_opcodes = True
        self._last.pop(id(frame), None)
        self._point(frame, "at the start")
        return self._local

    def _inside(self, frame: FrameType | None) -> bool:
        """Whether ``frame`` runs inside a call of the function named ``within`` (its qualified name)."""
        while frame is not None:
            if frame.f_code.co_qualname == self.within:
                return True
            if self.own:
                return False
            frame = frame.f_back
        return False

    def _traced(self, frame: FrameType) -> bool:
        """lockstore's frames; with ``deep``, also the Python code lockstore calls (the standard library's, its
        dependencies'), where a real signal lands just as well, except the import system (an interrupted import
        is the program's to retry, not lockstore's)."""
        name = frame.f_code.co_filename
        if name.startswith(PACKAGE):
            return True
        if not self.deep or name.startswith("<frozen"):
            return False
        caller = frame.f_back
        while caller is not None:
            if caller.f_code.co_filename.startswith(PACKAGE):
                return True
            caller = caller.f_back
        return False

    def __enter__(self) -> Injector:
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)


def inject(k: int, operation: Callable[[], object], make: Callable[[], BaseException] = KeyboardInterrupt, *,
           deep: bool = False, within: str | None = None, own: bool = False) -> tuple[bool, str | None, str]:
    """Run ``operation`` with the k-th interrupt point raising; return (fired, the type name of what the operation
    raised or None, where it fired).

    The exception itself is dropped before returning, as a caller's ``except KeyboardInterrupt:`` would drop it:
    its traceback keeps the interrupted frames alive until then.
    """
    injector = Injector(k, make, deep=deep, within=within, own=own)
    raised: str | None = None
    try:
        with injector:
            operation()
    except BaseException as exc:  # the injected exception, or what the operation made of it
        raised = f"{type(exc).__name__}: {exc}"
    return injector.fired, raised, injector.where


__all__ = ["Injector", "inject"]
