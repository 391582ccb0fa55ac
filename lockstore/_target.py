"""Turning a Store's target into its storage: a file path, or a server URL (``postgresql://…#KEY``, ``redis://…#KEY``).

A server's driver is imported only here, only when a target needs it, so ``import lockstore`` imports neither.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from ._backend import Storage

#: URL schemes of the server stores and the module implementing each.
SERVER_SCHEMES: Final = {
    "postgresql": "_postgres",
    "postgres": "_postgres",
    "redis": "_redis",
    "rediss": "_redis",
    "unix": "_redis",
}


def scheme_of(target: str) -> str | None:
    """The server scheme of ``target``, or None for a file path (``C:/x`` and ``./a:b`` are paths)."""
    head, sep, _ = target.partition("://")
    if not sep:
        return None
    scheme = head.lower()
    return scheme if scheme in SERVER_SCHEMES else None


def make_storage(path: str | os.PathLike[str], *, lock: object, durable: bool, poll_interval: float,
                 options: dict[str, Any]) -> Storage:
    """The storage for ``path``; raises TypeError for options that do not apply to it."""
    if isinstance(path, str) and (scheme := scheme_of(path)) is not None:
        import importlib

        module = importlib.import_module(f"lockstore.{SERVER_SCHEMES[scheme]}")
        storage: Storage = module.make(path, lock=lock, durable=durable, poll_interval=poll_interval, **options)
        return storage
    if options:
        names = ", ".join(sorted(options))
        raise TypeError(f"unexpected option(s) for a file store: {names}")
    from ._file import FileStorage

    return FileStorage(os.fspath(path), lock=lock, durable=durable, poll_interval=poll_interval)


__all__ = ["SERVER_SCHEMES", "make_storage", "scheme_of"]
