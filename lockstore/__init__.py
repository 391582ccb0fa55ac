"""lockstore: one value in one file, shared safely by many processes.

Atomic replace keeps the file whole; a sidecar lock and read-modify-write transactions keep every update. The same
Store can keep its value in PostgreSQL or Redis when the processes run on several hosts.
"""

from __future__ import annotations

import os
from typing import Any

from ._error import (
    CorruptStoreError,
    DurabilityUnknownError,
    LockLost,
    LockReentryError,
    LockstoreError,
    LockTimeout,
    NotDurableError,
    SerializationError,
    TransactionLockError,
)
from ._formats import AbstractFormatBstr, AbstractFormatFile
from ._holder import Holder
from ._stats_report import LockStats
from ._store import DEFAULT_POLL_INTERVAL, DEFAULT_TIMEOUT, Store, open, read

__version__ = "0.2.0"


async def aread(path: str | os.PathLike[str], default: Any = None, **kwargs: Any) -> Any:
    """``await lockstore.aread(path, ...)``: :func:`read` without blocking the event loop (same arguments)."""
    from ._aio import aread as _aread

    return await _aread(path, default, **kwargs)


__all__ = [
    "DEFAULT_POLL_INTERVAL",
    "DEFAULT_TIMEOUT",
    "AbstractFormatBstr",
    "AbstractFormatFile",
    "CorruptStoreError",
    "DurabilityUnknownError",
    "Holder",
    "LockLost",
    "LockReentryError",
    "LockStats",
    "LockTimeout",
    "LockstoreError",
    "NotDurableError",
    "SerializationError",
    "Store",
    "TransactionLockError",
    "__version__",
    "aread",
    "open",
    "read",
]
