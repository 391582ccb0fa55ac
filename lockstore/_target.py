"""Turning a Store's target into its storage: a file path, or a server URL (``postgresql://…#KEY``, ``redis://…#KEY``).

A server's driver is imported only here, only when a target needs it, so ``import lockstore`` imports neither.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from ._file import FileStorage

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


class ServerTarget(NamedTuple):
    """A server target split up: what the driver gets, the key, and a form safe to show (no password)."""

    scheme: str
    url: str  # the target without ``#KEY``, handed to the driver as it is (password included)
    key: str  # the part after ``#``: which store on that server
    display: str  # ``url`` with any password replaced by ``***``, then ``#KEY``: for repr, errors, logs


def mask(url: str) -> str:
    """``url`` with the password of its user part and any ``password=`` query parameter replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{hostinfo}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if any(name.lower() == "password" for name, _ in pairs):
            query = "&".join(f"{name}={'***' if name.lower() == 'password' else value}" for name, value in pairs)
    # Rebuilt by hand: urlunsplit drops the "//" of an empty host (postgresql:///db names a socket directory).
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def parse_server(target: str) -> ServerTarget:
    """Split a server target; ValueError (showing it without its password) when ``#KEY`` is missing or empty."""
    scheme = scheme_of(target)
    if scheme is None:
        raise ValueError(f"not a server target: {mask(target)!r}")
    url, sep, key = target.partition("#")
    if not sep or not key:
        raise ValueError(f"{mask(url)}: a server target needs '#KEY' at its end to name the store, e.g. "
                         f"{mask(url)}#counter")
    key = urllib.parse.unquote(key)
    return ServerTarget(scheme, url, key, f"{mask(url)}#{key}")


def make_storage(path: str | os.PathLike[str], *, lock: object, durable: bool, poll_interval: float,
                 timeout: float, options: dict[str, Any]) -> Storage:
    """The storage for ``path``; raises TypeError for options that do not apply to it. ``timeout`` is the Store's
    lock timeout (-1.0: none), which a server store may use to bound a connection attempt."""
    if isinstance(path, str) and (scheme := scheme_of(path)) is not None:
        import importlib

        module = importlib.import_module(f"lockstore.{SERVER_SCHEMES[scheme]}")
        storage: Storage = module.make(path, lock=lock, durable=durable, poll_interval=poll_interval, timeout=timeout,
                                       **options)
        return storage
    if options:
        names = ", ".join(sorted(options))
        raise TypeError(f"unexpected option(s) for a file store: {names}")
    return FileStorage(os.fspath(path), lock=lock, durable=durable, poll_interval=poll_interval)


__all__ = ["SERVER_SCHEMES", "ServerTarget", "make_storage", "mask", "parse_server", "scheme_of"]
