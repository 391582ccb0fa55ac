"""Dotted key paths and the CLI's edits, as plain functions (the CLI tests drive them end to end)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from lockstore import _keys


def ns(key: str, **kw: Any) -> argparse.Namespace:
    return argparse.Namespace(key=key.split("."), **kw)


def test_lookup_dicts_and_lists() -> None:
    root = {"jobs": [{"state": "new"}, {"state": "done"}]}
    assert _keys.lookup(root, ["jobs", "1", "state"]) == "done"
    assert _keys.lookup(root, ["jobs", "-1", "state"]) == "done"
    with pytest.raises(_keys.KeyPathError) as info:
        _keys.lookup(root, ["jobs", "2"])
    assert info.value.missing
    with pytest.raises(_keys.KeyPathError) as info:
        _keys.lookup(root, ["jobs", "0", "state", "x"])
    assert not info.value.missing  # a string is no container: a type error, not a missing key


def test_set_incr_append_create_missing_dicts() -> None:
    root: dict[str, Any] = {}
    _keys.do_set(root, ns("a.b", value=1))
    assert _keys.do_incr(root, ns("stats.runs", by=2)) == 2
    assert _keys.do_incr(root, ns("stats.runs", by=2)) == 4
    _keys.do_append(root, ns("log", value="x"))
    _keys.do_append(root, ns("log", value="y"))
    assert root == {"a": {"b": 1}, "stats": {"runs": 4}, "log": ["x", "y"]}
    with pytest.raises(_keys.KeyPathError):
        _keys.do_incr(root, ns("log", by=1))  # not a number
    with pytest.raises(_keys.KeyPathError):
        _keys.do_append(root, ns("a.b", value=1))  # not a list


def test_delete_and_missing_ok() -> None:
    root: dict[str, Any] = {"a": [1, 2, 3]}
    _keys.do_delete(root, ns("a.0", missing_ok=False))
    assert root == {"a": [2, 3]}
    with pytest.raises(_keys.KeyPathError):
        _keys.do_delete(root, ns("b", missing_ok=False))
    _keys.do_delete(root, ns("b", missing_ok=True))
    assert root == {"a": [2, 3]}
