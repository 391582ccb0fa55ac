"""Operating-system constants and small helpers shared by the file store's modules, defined once.

``open_into`` and ``dup_into`` exist for signal safety. CPython runs signal handlers (a KeyboardInterrupt) between
bytecodes, including right after a call returns and before its result is stored: ``fd = os.open(...)`` can lose
the descriptor it just opened. Here the descriptor is appended to the caller's list by C code (``list.extend``
consuming ``map``), with no bytecode in between, so whatever is interrupted, the caller's cleanup finds it.
"""

from __future__ import annotations

import collections
import errno
import functools
import io
import itertools
import os
from typing import Final

O_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)
O_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
O_DIRECTORY: Final = getattr(os, "O_DIRECTORY", 0)
O_NONBLOCK: Final = getattr(os, "O_NONBLOCK", 0)


def open_into(fds: list[int], path: str, flags: int, mode: int = 0o777) -> int:
    """``os.open`` whose descriptor lands in ``fds`` before any signal handler can run; returns it."""
    fds.extend(map(os.open, (path,), (flags,), (mode,)))
    return fds[-1]


def dup_into(fds: list[int], fd: int) -> int:
    """``os.dup`` whose descriptor lands in ``fds`` before any signal handler can run; returns it."""
    fds.extend(map(os.dup, (fd,)))
    return fds[-1]


def close_all(fds: list[int]) -> None:
    """Close and forget every descriptor in ``fds``, each exactly once, ignoring errors (cleanup only).

    C code pops each descriptor and closes it (``islice(iter(fds.pop, None), n)`` feeding ``map(os.close, ...)``),
    so an interrupt can neither leave a closed descriptor in the list (a second cleanup would close a number that
    another thread may have been given since) nor drop one from the list unclosed. ``islice`` stops after the
    descriptors there are, so no IndexError is raised (and paid for) on the way.
    """
    while fds:
        try:
            collections.deque(map(os.close, itertools.islice(iter(fds.pop, None), len(fds))), maxlen=0)
        except OSError:  # that descriptor was popped; on Linux close() releases it even when it reports an error
            continue


#: Wraps a descriptor in a file object that closes it when collected (C code, no Python frame in between).
_closing_file = functools.partial(io.FileIO, mode="r", closefd=True)


def open_probe(files: list[io.FileIO], path: str, flags: int) -> int:
    """``os.open`` for a short read, landing in ``files`` as a file object before any signal handler can run.

    For descriptors that live only as long as one call: if interrupts cut every cleanup short (a burst of signals),
    the descriptor is still closed when the call's frame, and so ``files``, is gone. Close with
    :func:`close_probes`."""
    fds: list[int] = []
    count = len(files)
    try:
        open_into(fds, path, flags)
        files.extend(map(_closing_file, fds))  # from here the file object owns the descriptor
    except BaseException:
        if len(files) == count:
            close_all(fds)  # not taken by a file object: a directory (FileIO refuses one), or an interrupt
        raise
    return files[-1].fileno()


def close_probes(files: list[io.FileIO]) -> None:
    """Close every file of ``files`` (C code: an interrupt can only come before or after all of them)."""
    collections.deque(map(io.FileIO.close, files), maxlen=0)
    files.clear()


def read_bytes(path: str, limit: int = -1) -> bytes:
    """The bytes of the file at ``path`` (at most ``limit``): an interrupt anywhere leaves no descriptor open once
    this call's frame is gone (see :func:`open_probe`)."""
    files: list[io.FileIO] = []
    try:
        fd = open_probe(files, path, os.O_RDONLY | O_CLOEXEC)
        chunks = []
        left = limit
        while left:
            chunk = os.read(fd, 65536 if left < 0 else min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise named(exc, path) from None  # a directory's EISDIR comes from FileIO or read(), naming nothing
    finally:
        try:
            close_probes(files)
        except BaseException:
            close_probes(files)  # an interrupt cut the first call short
            raise


def named(exc: OSError, path: str) -> OSError:
    """The same error naming ``path`` (flock's, fstat's and pwrite's errors name no file)."""
    if exc.filename is not None and not isinstance(exc.filename, int):  # FileIO(fd) names the descriptor
        return exc
    err = OSError(exc.errno, exc.strerror or os.strerror(exc.errno or errno.EIO), path)
    err.__cause__ = exc
    return err


def with_path(exc: OSError, path: str) -> OSError:
    """Return ``exc`` naming ``path``: a new error of the same errno-mapped class when it named another file
    (a temp file that no longer exists means nothing to the caller) or nothing."""
    if exc.filename == path:
        return exc
    reason = exc.strerror or os.strerror(exc.errno or errno.EIO)
    if exc.filename is not None:
        name = os.fsdecode(exc.filename)
        temp = os.path.basename(name)
        # A temp file that is gone means nothing to the caller beyond its name; any other file (a directory on the
        # way) is named in full.
        reason += f" (on the temp file {temp})" if temp.startswith(".") and temp.endswith(".tmp") else f" (on {name})"
    return OSError(exc.errno, reason, path)


__all__ = ["O_CLOEXEC", "O_DIRECTORY", "O_NOFOLLOW", "O_NONBLOCK", "close_all", "dup_into", "named", "open_into",
           "read_bytes", "with_path"]
