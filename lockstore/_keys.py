"""Dotted key paths (``stats.runs``, ``jobs.0.state``) into a JSON-like value, and the edits the CLI makes there.

Integer parts index lists (negative ones count from the end); on a dict they are ordinary string keys. set, incr and
append create missing dicts along the way; a list index must already exist; append to a missing key starts a list.
Each ``do_*`` function changes ``root`` in place and takes the parsed command-line arguments (``key``, ``value``,
``by``, ``missing_ok``).
"""

from __future__ import annotations

import argparse
from typing import Any, Final


class KeyPathError(LookupError):
    """KEY is missing (``missing``) or its path crosses a value of the wrong type (exit code 3)."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


def _is_index(part: str) -> bool:
    return part.lstrip("-").isdigit() and part.count("-") <= 1


def _step(node: Any, part: str, where: str) -> Any:
    """``node[part]`` for a dict or list node; raise KeyPathError (missing, out of range, wrong type)."""
    if isinstance(node, dict):
        if part not in node:
            raise KeyPathError(f"{where}: no such key", missing=True)
        return node[part]
    if isinstance(node, list):
        if not _is_index(part):
            raise KeyPathError(f"{where}: {part!r} is not a list index")
        index = int(part)
        if not -len(node) <= index < len(node):
            raise KeyPathError(f"{where}: list index out of range (the list has {len(node)} items)", missing=True)
        return node[index]
    raise KeyPathError(f"{where}: cannot look inside a {_kind(node)}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def lookup(root: Any, parts: list[str]) -> Any:
    node = root
    for i, part in enumerate(parts):
        node = _step(node, part, ".".join(parts[: i + 1]))
    return node


def _parent(root: Any, parts: list[str], *, create: bool) -> tuple[dict[str, Any] | list[Any], str | int]:
    """The container holding KEY's last part and the last part as its key or index; with ``create``, dicts missing
    along the way are added. A list index must exist (out of range is an error, append extends lists)."""
    node = root
    for i, part in enumerate(parts[:-1]):
        if create and isinstance(node, dict) and part not in node:
            node[part] = {}
        node = _step(node, part, ".".join(parts[: i + 1]))
    last = parts[-1]
    where = ".".join(parts)
    if isinstance(node, dict):
        return node, last
    if isinstance(node, list):
        if not _is_index(last):
            raise KeyPathError(f"{where}: {last!r} is not a list index")
        index = int(last)
        if not -len(node) <= index < len(node):
            raise KeyPathError(f"{where}: list index out of range (the list has {len(node)} items)", missing=True)
        return node, index
    raise KeyPathError(f"{where}: cannot look inside a {_kind(node)}")


_MISSING: Final = object()


def _get_in(container: dict[str, Any] | list[Any], key: str | int) -> Any:
    """``container[key]``, or _MISSING for a key a dict lacks (``_parent`` already checked list indexes)."""
    if isinstance(container, dict):
        return container.get(str(key), _MISSING)
    return container[int(key)]


def _put(container: dict[str, Any] | list[Any], key: str | int, value: Any) -> None:
    if isinstance(container, dict):
        container[str(key)] = value
    else:
        container[int(key)] = value


# --------------------------------------------------------------------------------------------- the changes
def do_set(root: Any, args: argparse.Namespace) -> None:
    container, key = _parent(root, args.key, create=True)
    _put(container, key, args.value)


def do_incr(root: Any, args: argparse.Namespace) -> int | float:
    container, key = _parent(root, args.key, create=True)
    current = _get_in(container, key)
    if current is _MISSING:
        current = 0
    if isinstance(current, bool) or not isinstance(current, (int, float)):
        raise KeyPathError(f"{'.'.join(args.key)}: cannot increment a {_kind(current)}")
    new: int | float = current + args.by
    _put(container, key, new)
    return new


def do_append(root: Any, args: argparse.Namespace) -> None:
    container, key = _parent(root, args.key, create=True)
    current = _get_in(container, key)
    if current is _MISSING:
        _put(container, key, [args.value])
        return
    if not isinstance(current, list):
        raise KeyPathError(f"{'.'.join(args.key)}: cannot append to a {_kind(current)}")
    current.append(args.value)


def do_delete(root: Any, args: argparse.Namespace) -> None:
    try:
        container, key = _parent(root, args.key, create=False)
        if _get_in(container, key) is _MISSING:
            raise KeyPathError(f"{'.'.join(args.key)}: no such key", missing=True)
    except KeyPathError as exc:
        if args.missing_ok and exc.missing:
            return
        raise
    if isinstance(container, dict):
        del container[str(key)]
    else:
        del container[int(key)]


__all__ = ["KeyPathError", "do_append", "do_delete", "do_incr", "do_set", "lookup"]
