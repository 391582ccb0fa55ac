"""Savepoints of a nested transaction: the exact in-memory state of a value, restored in place.

A savepoint records, for every mutable container reachable from the value (dicts, lists, sets, bytearrays, and
the ``__dict__`` of plain objects), a shallow copy of its contents, keyed by the container's identity. A rollback
writes those contents back into the very same containers. So after a rollback:

- the value is exactly what it was (integer dict keys stay integers, a set stays a set, an unencodable value is
  restored as well as an encodable one; nothing goes through the format);
- every reference the caller took to any part of the value before the savepoint reaches the restored value;
- containers created after the savepoint are simply no longer reachable from it.

Objects of other types (a class with ``__slots__`` only, C types) are kept by identity and not restored; values
that a format can store are made of the types above. Costs one walk of the value per nested transaction; the
outermost transaction needs none (a failure there goes back to the stored value).
"""

from __future__ import annotations

from typing import Any

_ATOMS = (str, bytes, int, float, complex, bool, type(None), range, type)


class Savepoint:
    """The state of ``value`` now; :meth:`restore` puts it back in place and returns the root to use."""

    __slots__ = ("_contents", "_root")

    def __init__(self, value: Any) -> None:
        self._root = value
        self._contents: dict[int, tuple[Any, Any]] = {}
        stack = [value]
        contents = self._contents
        while stack:
            obj = stack.pop()
            if isinstance(obj, _ATOMS) or id(obj) in contents:
                continue
            if isinstance(obj, dict):
                items = list(obj.items())
                contents[id(obj)] = (obj, items)
                for key, item in items:
                    stack.append(key)
                    stack.append(item)
            elif isinstance(obj, list):
                copy = list(obj)
                contents[id(obj)] = (obj, copy)
                stack.extend(copy)
            elif isinstance(obj, (set, bytearray)):
                copy_ = obj.copy()
                contents[id(obj)] = (obj, copy_)
                if isinstance(obj, set):
                    stack.extend(copy_)
            elif isinstance(obj, (tuple, frozenset)):
                contents[id(obj)] = (obj, None)  # immutable, but it may hold mutable containers
                stack.extend(obj)
            elif hasattr(obj, "__dict__") and not isinstance(obj, type):
                attrs = dict(vars(obj))
                contents[id(obj)] = (obj, attrs)
                stack.extend(attrs.values())
            else:
                contents[id(obj)] = (obj, None)  # kept by identity (see the module docstring)

    def restore(self) -> Any:
        """Put every recorded container's contents back; return the root value as it was."""
        for obj, saved in self._contents.values():
            if saved is None:
                continue
            if isinstance(obj, dict):
                obj.clear()
                obj.update(saved)
            elif isinstance(obj, list):
                obj[:] = saved
            elif isinstance(obj, set):
                obj.clear()
                obj.update(saved)
            elif isinstance(obj, bytearray):
                obj[:] = saved
            else:
                attrs = vars(obj)
                attrs.clear()
                attrs.update(saved)
        return self._root


__all__ = ["Savepoint"]
