"""Dotted key paths (``stats.runs``, ``jobs.0.state``) into a JSON-like value, and the edits the CLI makes there.

Reading (``lookup``) and ``do_delete`` never create anything: a missing key or list index is a missing-key error.
On a list, an integer part is an index (negative ones count from the end); on an existing dict, every part is a
string key, integer-looking or not (``a.0`` is the key ``"0"``: a dotted path cannot tell ``.0`` from ``."0"``).

``do_set``, ``do_incr`` and ``do_append`` create what is missing along the path, as jq's assignment does:

- where nothing exists yet (or the value is null), the next part decides what is created: a list when it is a
  non-negative integer, a dict otherwise (on ``{}``, ``set jobs.0.state done`` gives
  ``{"jobs": [{"state": "done"}]}``);
- an index at or past the end of a list extends the list, padding with nulls (``set l.3 5`` on ``[1]`` gives
  ``[1, null, null, 5]``);
- a negative index before the start of a list is an error (KeyPathError, not missing);
- an index that would add more than 10,000 items to a list is an error (KeyPathError, not missing), so that a typo
  such as ``jobs.1000000000`` cannot allocate gigabytes;
- null counts as nothing: ``incr`` of a null (a padding slot, say) starts at 0, as jq's ``null + 1`` is 1, and
  ``append`` to a null starts a list.

An edit that raises has changed nothing. Each ``do_*`` function changes ``root`` in place (the root itself is never
replaced: a null root is an error) and takes the parsed command-line arguments (``key``, ``value``, ``by``,
``missing_ok``).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any, Final

MAX_EXTEND: Final = 10_000
"""The most items one edit may add to a list by indexing past its end."""


class KeyPathError(LookupError):
    """KEY is missing (``missing``) or its path crosses a value of the wrong type (exit code 3)."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


def _is_index(part: str) -> bool:
    return part.lstrip("-").isdigit() and part.count("-") <= 1


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _list_index(node: list[Any], part: str, where: str, *, create: bool) -> int:
    """``part`` as an index of ``node``, checked. With ``create``, an index at or past the end is allowed up to
    MAX_EXTEND new items; without it, an index outside the list is a missing key."""
    if not _is_index(part):
        raise KeyPathError(f"{where}: {part!r} is not a list index")
    index = int(part)
    size = len(node)
    if -size <= index < size:
        return index
    if not create or index < 0:
        raise KeyPathError(f"{where}: list index out of range (the list has {size} items)", missing=not create)
    if index + 1 - size > MAX_EXTEND:
        raise KeyPathError(
            f"{where}: index {index} would add {index + 1 - size} items to a list of {size} (at most {MAX_EXTEND})"
        )
    return index


def _step(node: Any, part: str, where: str) -> Any:
    """``node[part]`` for a dict or list node; raise KeyPathError (missing, out of range, wrong type)."""
    if isinstance(node, dict):
        if part not in node:
            raise KeyPathError(f"{where}: no such key", missing=True)
        return node[part]
    if isinstance(node, list):
        return node[_list_index(node, part, where, create=False)]
    raise KeyPathError(f"{where}: cannot look inside a {_kind(node)}")


def lookup(root: Any, parts: list[str]) -> Any:
    node = root
    for i, part in enumerate(parts):
        node = _step(node, part, ".".join(parts[: i + 1]))
    return node


def _place(container: dict[str, Any] | list[Any], key: str | int, value: Any) -> None:
    """``container[key] = value``, extending a list with nulls up to ``key`` first."""
    if isinstance(container, dict):
        container[str(key)] = value
        return
    index = int(key)
    if index >= len(container):
        container.extend([None] * (index + 1 - len(container)))
    container[index] = value


def _slot(node: Any, part: str, where: str) -> tuple[dict[str, Any] | list[Any], str | int]:
    """The container and key (or index) ``part`` names in ``node``, for an edit that may create it."""
    if isinstance(node, dict):
        return node, part
    if isinstance(node, list):
        return node, _list_index(node, part, where, create=True)
    raise KeyPathError(f"{where}: cannot look inside a {_kind(node)}")


def _parent(root: Any, parts: list[str], *, create: bool) -> tuple[dict[str, Any] | list[Any], str | int]:
    """The container holding KEY's last part and the last part as its key or index.

    Without ``create`` every part but the last must exist, and a list index must be in range. With ``create``, what
    is missing is created (see the module docstring); the whole path is checked before anything is changed, so an
    error leaves ``root`` as it was.
    """
    if not create:
        node = lookup(root, parts[:-1])
        where = ".".join(parts)
        if isinstance(node, list):
            return node, _list_index(node, parts[-1], where, create=False)
        return _slot(node, parts[-1], where)
    # New containers are built detached and hooked in at the end: a later part may still be refused, and the
    # value that existed must then be left untouched.
    hooks: list[Callable[[], None]] = []
    node = root
    for i, part in enumerate(parts[:-1]):
        container, key = _slot(node, part, ".".join(parts[: i + 1]))
        child = _existing(container, key)
        if child is None:
            child = [] if _is_index(parts[i + 1]) else {}
            hooks.append(functools.partial(_place, container, key, child))
        node = child
    container, key = _slot(node, parts[-1], ".".join(parts))
    if isinstance(container, list) and int(key) >= len(container):
        hooks.append(functools.partial(_place, container, key, None))
    for hook in hooks:
        hook()
    return container, key


def _existing(container: dict[str, Any] | list[Any], key: str | int) -> Any:
    """``container[key]``, or None when a dict lacks the key or the index is past the end of a list."""
    if isinstance(container, dict):
        return container.get(str(key))
    index = int(key)
    return container[index] if index < len(container) else None


_MISSING: Final = object()


def _get_in(container: dict[str, Any] | list[Any], key: str | int) -> Any:
    """``container[key]``, or _MISSING for a key a dict lacks (``_parent`` already checked list indexes)."""
    if isinstance(container, dict):
        return container.get(str(key), _MISSING)
    return container[int(key)]


# --------------------------------------------------------------------------------------------- the changes
def do_set(root: Any, args: argparse.Namespace) -> None:
    container, key = _parent(root, args.key, create=True)
    _place(container, key, args.value)


def do_incr(root: Any, args: argparse.Namespace) -> int | float:
    container, key = _parent(root, args.key, create=True)
    current = _get_in(container, key)
    if current is _MISSING or current is None:
        current = 0
    if isinstance(current, bool) or not isinstance(current, (int, float)):
        raise KeyPathError(f"{'.'.join(args.key)}: cannot increment a {_kind(current)}")
    new: int | float = current + args.by
    _place(container, key, new)
    return new


def do_append(root: Any, args: argparse.Namespace) -> None:
    container, key = _parent(root, args.key, create=True)
    current = _get_in(container, key)
    if current is _MISSING or current is None:
        _place(container, key, [args.value])
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


__all__ = ["MAX_EXTEND", "KeyPathError", "do_append", "do_delete", "do_incr", "do_set", "lookup"]
