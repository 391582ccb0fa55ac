"""The error hierarchy: every error lockstore raises on purpose derives from :class:`LockstoreError`.

Each subclass also inherits the builtin a caller would naturally catch (``LockTimeout`` is a ``TimeoutError``,
``CorruptStoreError`` a ``ValueError``), carries its context as attributes, and survives pickling so that it can
cross a ``multiprocessing`` boundary intact.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from filelock import Timeout

if TYPE_CHECKING:
    from ._holder import Holder


class LockstoreError(Exception):
    """Base class of every error lockstore raises on purpose."""


class LockReentryError(LockstoreError, RuntimeError):
    """A thread or task asked for a lock that it (or a task of the event loop running on its thread) already holds
    through another Store object or ``store.lock``: waiting would never end."""

    def __init__(self, lock_file: str, reason: str | None = None) -> None:
        super().__init__(lock_file)
        self.lock_file = lock_file
        self.reason = reason  # when it is not "held through another object" (see __str__)

    def __str__(self) -> str:
        if self.reason is not None:
            return f"{self.reason} ({self.lock_file})"
        return (
            f"this thread or task already holds the lock {self.lock_file} (through another Store object on the same "
            "file or key, or store.lock), or a task of the event loop running on this thread does, so waiting for it "
            "would never end; nest transactions of one Store object instead (a nested transaction joins the outer "
            "one)"
        )


#: What a LockTimeout tells operators about a file store's lock (server stores pass their own ``hint``).
FILE_HINT = "deleting the lock file does not help (it breaks mutual exclusion, it does not free the lock)"


class LockTimeout(LockstoreError, Timeout):
    """The lock could not be acquired within the timeout.

    Attributes: ``lock_file`` (the sidecar path, or a server's lock key), ``path`` (the data file or target, or
    None), ``waited`` (seconds), ``holder`` (a :class:`lockstore.Holder`: who held the lock when the timeout fired,
    or None when not visible from here), ``holder_stale`` (a stale record of a killed holder is in the lock file),
    ``hint`` (what to do, and not to do, about it), ``blocked_by`` (what kept the lock from this caller when no
    holder can be named, e.g. another thread of this process using the same Store; or None).
    """

    def __init__(
        self, lock_file: str, waited: float, *, path: str | None = None, holder: Holder | None = None,
        holder_stale: bool = False, hint: str | None = None, blocked_by: str | None = None,
    ) -> None:
        Timeout.__init__(self, lock_file)
        self.waited = waited
        self.blocked_by = blocked_by
        self.path = path
        self.holder = holder
        self.holder_stale = holder_stale
        self.hint = FILE_HINT if hint is None else hint

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.__dict__))

    def __str__(self) -> str:
        target = f"{self.path} ({self.lock_file})" if self.path else self.lock_file
        text = f"timed out after {self.waited:.1f} s waiting for lock on {target}"
        if self.holder is not None:
            text += ": " + self.holder.describe()
        elif self.blocked_by is not None:
            text += ": " + self.blocked_by
        else:
            text += ": the holder is not visible from here (another host or PID namespace) and left no record"
        if self.holder_stale:
            text += "; the lock file also holds a stale record left by a killed holder (ignored)"
        return f"{text}; {self.hint}" if self.hint else text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.lock_file!r}, waited={self.waited!r})"


def _rebuild(cls: type[LockTimeout], state: dict[str, Any]) -> LockTimeout:
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


class _PathError(LockstoreError):
    """An error about one data file; ``path`` names it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class CorruptStoreError(_PathError, ValueError):
    """The data file exists but cannot be decoded; it is never overwritten. The decoder's error is ``__cause__``."""


class SerializationError(_PathError, ValueError):
    """The value could not be encoded; nothing on disk changed. The encoder's error is ``__cause__``."""


class DurabilityUnknownError(LockstoreError, OSError):
    """The new value is in place, but fsync of its directory failed: whether it survives a power loss is unknown.

    Never retried: an fsync error may have dropped dirty pages, so a second fsync that succeeds proves nothing.
    """

    def __init__(self, path: str, cause: OSError) -> None:
        OSError.__init__(self, cause.errno or errno.EIO, cause.strerror or str(cause), path)
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_os, (type(self), self.args, self.__dict__))

    def __str__(self) -> str:
        return (
            f"{self.path}: the new value is in place, but syncing its directory failed "
            f"({self.strerror}); its durability after a power loss is unknown"
        )


def _rebuild_os(cls: type[OSError], args: tuple[Any, ...], state: dict[str, Any]) -> OSError:
    obj = cls.__new__(cls, *args)
    OSError.__init__(obj, *args)
    obj.__dict__.update(state)
    return obj


class LockLost(LockstoreError, RuntimeError):
    """A lease-based lock (Redis) lapsed before the commit: the server refused the write, so nothing was written.

    The holder paused or was cut off longer than its lease, and another process may have taken the lock and
    committed meanwhile. ``target`` names the store; ``waited`` is unused (0). Retry the whole transaction.
    """

    def __init__(self, target: str, reason: str = "") -> None:
        super().__init__(target, reason)
        self.target = target
        self.reason = reason

    def __str__(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return (f"{self.target}: the lock's lease lapsed before the commit{why}; the server refused the write, so "
                "nothing was written: run the transaction again")


class NotDurableError(LockstoreError, RuntimeError):
    """``durable=True`` on a server that acknowledges commits before making them durable; ``setting`` says what."""

    def __init__(self, target: str, setting: str) -> None:
        super().__init__(target, setting)
        self.target = target
        self.setting = setting

    def __str__(self) -> str:
        return (f"{self.target}: the server acknowledges commits before they are durable ({self.setting}); "
                "configure it to sync each commit, or pass durable=False to accept losing acknowledged commits in "
                "a crash")


class TransactionLockError(LockstoreError, TypeError):
    """``transaction()`` was called on a store opened with ``lock=False``."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: transactions need a lock; this store was opened with lock=False"


__all__ = [
    "CorruptStoreError",
    "DurabilityUnknownError",
    "LockLost",
    "LockReentryError",
    "LockTimeout",
    "LockstoreError",
    "NotDurableError",
    "SerializationError",
    "TransactionLockError",
]
