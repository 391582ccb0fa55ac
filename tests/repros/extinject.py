"""tests/_interrupt.Injector extended: also counts interrupt points in the stdlib / third-party Python frames that
lockstore runs through (threading, contextlib, atomicwrites, json, copy, ...), as a real SIGINT would."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _interrupt
from _interrupt import Injector, _in_finalizer, PACKAGE


class ExtInjector(Injector):
    def __init__(self, k, make=KeyboardInterrupt, extra=("threading.py", "contextlib.py", "atomicwrites")):
        super().__init__(k, make)
        self.extra = extra

    def _global(self, frame, event, arg):
        if event != "call" or _in_finalizer(frame):
            return None
        fn = frame.f_code.co_filename
        ours = fn.startswith(PACKAGE)
        if not ours:
            if not any(e in fn for e in self.extra):
                return None
            # only stdlib frames entered (directly or not) from lockstore
            f = frame.f_back
            while f is not None and not f.f_code.co_filename.startswith(PACKAGE):
                f = f.f_back
            if f is None:
                return None
        frame.f_trace_opcodes = True
        self._last.pop(id(frame), None)
        self._point(frame, "at the start")
        return self._local


def inject(k, operation, make=KeyboardInterrupt, **kw):
    injector = ExtInjector(k, make, **kw)
    raised = None
    try:
        with injector:
            operation()
    except BaseException as exc:
        raised = f"{type(exc).__name__}: {exc}"
    return injector.fired, raised, injector.where


def _in_real_finalizer(frame):
    """Only frames run by the garbage collector (a __del__, or weakref.finalize's __call__ from the collector);
    _let_slot_go called by store.close() is an ordinary call, with ordinary interrupt points."""
    while frame is not None:
        name, fn = frame.f_code.co_name, frame.f_code.co_filename
        if name == "__del__" or fn.endswith("weakref.py"):
            return True
        frame = frame.f_back
    return False


class CloseInjector(ExtInjector):
    def _global(self, frame, event, arg):
        if event != "call" or _in_real_finalizer(frame):
            return None
        if not frame.f_code.co_filename.startswith(PACKAGE):
            return None
        frame.f_trace_opcodes = True
        self._last.pop(id(frame), None)
        self._point(frame, "at the start")
        return self._local


def inject_close(k, operation, make=KeyboardInterrupt):
    injector = CloseInjector(k, make)
    raised = None
    try:
        with injector:
            operation()
    except BaseException as exc:
        raised = f"{type(exc).__name__}: {exc}"
    return injector.fired, raised, injector.where
