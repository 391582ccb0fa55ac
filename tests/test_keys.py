"""Dotted key paths and the CLI's edits, as plain functions (the CLI tests drive them end to end)."""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
from typing import Any

import pytest

from lockstore import _keys


def ns(key: str, **kw: Any) -> argparse.Namespace:
    return argparse.Namespace(key=key.split("."), **kw)


def refused(edit: Any, root: Any, args: argparse.Namespace) -> _keys.KeyPathError:
    """Run an edit that must fail with a KeyPathError and leave ``root`` exactly as it was; return the error."""
    before = copy.deepcopy(root)
    with pytest.raises(_keys.KeyPathError) as info:
        edit(root, args)
    assert root == before
    return info.value


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
    refused(_keys.do_incr, root, ns("log", by=1))  # not a number
    refused(_keys.do_append, root, ns("a.b", value=1))  # not a list


def test_delete_and_missing_ok() -> None:
    root: dict[str, Any] = {"a": [1, 2, 3]}
    _keys.do_delete(root, ns("a.0", missing_ok=False))
    assert root == {"a": [2, 3]}
    with pytest.raises(_keys.KeyPathError):
        _keys.do_delete(root, ns("b", missing_ok=False))
    _keys.do_delete(root, ns("b", missing_ok=True))
    assert root == {"a": [2, 3]}


# ------------------------------------------------------------------------------------ lists created as jq does
def test_integer_part_where_nothing_exists_creates_a_list() -> None:
    root: dict[str, Any] = {}
    _keys.do_set(root, ns("jobs.0.state", value="done"))  # jq: null | .jobs[0].state = "done"
    assert root == {"jobs": [{"state": "done"}]}
    _keys.do_set(root, ns("jobs.1.state", value="new"))
    _keys.do_set(root, ns("jobs.0.tries.0", value=3))
    assert root == {"jobs": [{"state": "done", "tries": [3]}, {"state": "new"}]}
    # a null counts as nothing: it is replaced by what the next part needs
    root = {"a": None, "l": [None]}
    _keys.do_set(root, ns("a.b", value=1))
    _keys.do_set(root, ns("l.0.0", value=2))
    assert root == {"a": {"b": 1}, "l": [[2]]}


def test_index_past_the_end_pads_with_nulls() -> None:
    root: dict[str, Any] = {"l": [1]}
    _keys.do_set(root, ns("l.3", value=5))  # jq: [1] | .[3] = 5
    assert root == {"l": [1, None, None, 5]}
    _keys.do_set(root, ns("l.4", value=6))  # the index just past the end appends
    _keys.do_set(root, ns("l.1.name", value="x"))  # a padding slot is nothing: a dict is created in it
    assert root == {"l": [1, {"name": "x"}, None, 5, 6]}
    _keys.do_set(root, ns("l.-1", value=7))  # negative indexes inside the list count from the end, as before
    assert root["l"][-1] == 7


def test_negative_index_before_the_start_is_an_error_not_missing() -> None:
    root: dict[str, Any] = {"l": [1, 2]}
    error = refused(_keys.do_set, root, ns("l.-3", value=5))  # jq: Out of bounds negative array index
    assert not error.missing
    assert "l.-3: list index out of range" in str(error)
    assert not refused(_keys.do_incr, root, ns("l.-3", by=1)).missing
    assert not refused(_keys.do_append, root, ns("new.-1", value=1)).missing  # on a new list too
    # negative control: the same edits in range succeed
    _keys.do_set(root, ns("l.-2", value=5))
    assert root == {"l": [5, 2]}


def test_integer_looking_parts_on_an_existing_dict_are_keys() -> None:
    root: dict[str, Any] = {"a": {}, "c": {"0": 1}}
    _keys.do_set(root, ns("a.0", value="x"))
    assert _keys.do_incr(root, ns("c.0", by=1)) == 2
    assert _keys.lookup(root, ["c", "0"]) == 2
    assert root == {"a": {"0": "x"}, "c": {"0": 2}}
    # negative control: where nothing exists the same part makes a list
    _keys.do_set(root, ns("b.0", value="x"))
    assert root["b"] == ["x"]


def test_incr_and_append_on_new_list_elements() -> None:
    root: dict[str, Any] = {}
    assert _keys.do_incr(root, ns("counts.2", by=1)) == 1
    assert root == {"counts": [None, None, 1]}
    assert _keys.do_incr(root, ns("counts.0", by=5)) == 5  # a null padding slot starts at 0 (jq: null + 5 == 5)
    assert root == {"counts": [5, None, 1]}
    _keys.do_append(root, ns("lists.1", value="x"))
    _keys.do_append(root, ns("lists.0", value="y"))  # append to a null padding slot starts a list
    _keys.do_append(root, ns("lists.0", value="z"))
    assert root["lists"] == [["y", "z"], ["x"]]
    root = {"n": None}
    assert _keys.do_incr(root, ns("n", by=1)) == 1  # any null, not only padding: a file cannot tell them apart
    refused(_keys.do_incr, {"s": "text"}, ns("s", by=1))  # control: other types still refuse


def test_extension_cap() -> None:
    root: dict[str, Any] = {"l": [0] * 5}
    for key in ("new.10000", "l.10005", "new.0.10000", "l.7.10000"):
        error = refused(_keys.do_set, root, ns(key, value=1))
        assert not error.missing
        assert "would add" in str(error)
    refused(_keys.do_incr, root, ns("new.10000", by=1))
    refused(_keys.do_append, root, ns("l.1000000000", value=1))
    # negative control: exactly the cap is allowed, on a new list and on an existing one
    _keys.do_set(root, ns("new.9999", value=1))
    _keys.do_set(root, ns("l.10004", value=1))
    assert len(root["new"]) == _keys.MAX_EXTEND
    assert len(root["l"]) == 5 + _keys.MAX_EXTEND


def test_a_refused_edit_creates_nothing_on_the_way() -> None:
    # the path is checked to its end before anything is created or padded
    root: dict[str, Any] = {"l": [1], "s": "text"}
    refused(_keys.do_set, root, ns("a.b.0.-1", value=1))
    refused(_keys.do_set, root, ns("l.5.-1", value=1))
    refused(_keys.do_set, root, ns("l.5.x.20000", value=1))
    # negative control: the same paths without the bad last part do create
    _keys.do_set(root, ns("a.b.0.0", value=1))
    _keys.do_set(root, ns("l.5.0", value=1))
    assert root == {"l": [1, None, None, None, None, [1]], "s": "text", "a": {"b": [[1]]}}


def test_lookup_and_delete_never_create() -> None:
    root: dict[str, Any] = {"l": [1], "d": {}}
    before = copy.deepcopy(root)
    for key in ("l.5", "l.-2", "new.0.x", "d.0", "l.3.x"):
        with pytest.raises(_keys.KeyPathError) as info:
            _keys.lookup(root, key.split("."))
        assert info.value.missing
        with pytest.raises(_keys.KeyPathError) as info:
            _keys.do_delete(root, ns(key, missing_ok=False))
        assert info.value.missing
        _keys.do_delete(root, ns(key, missing_ok=True))
    assert root == before
    # negative control: the same paths can be created by set
    for key in ("l.5", "new.0.x", "d.0"):
        _keys.do_set(root, ns(key, value=1))
    assert root == {"l": [1, None, None, None, None, 1], "d": {"0": 1}, "new": [{"x": 1}]}


# ---------------------------------------------------------------------------------------- jq as the oracle
def _jq_path(parts: list[str]) -> str:
    return "." + "".join(f"[{p}]" if p.lstrip("-").isdigit() else f"[{json.dumps(p)}]" for p in parts)


@pytest.mark.skipif(shutil.which("jq") is None, reason="needs jq")
@pytest.mark.parametrize(
    ("root", "key", "op"),
    [
        ({}, "jobs.0.state", "set"),
        ([1], "3", "set"),
        ({"a": None}, "a.b", "set"),
        ({"l": [1, 2]}, "l.-1", "set"),
        ({"l": [1, 2]}, "l.-3", "set"),
        ({}, "a.-1", "set"),
        ({"l": [{"x": 1}]}, "l.0.y", "set"),
        ({}, "m.1.0.k", "set"),
        ({}, "counts.2", "incr"),
        ([None, 4], "0", "incr"),
        ([None, 4], "1", "incr"),
        ({}, "q.1", "append"),
        ({"q": [[1]]}, "q.0", "append"),
    ],
)
def test_same_result_as_jq(root: Any, key: str, op: str) -> None:
    parts = key.split(".")
    program = {"set": "{} = $v", "incr": "{} += 1", "append": "{} += [$v]"}[op].format(_jq_path(parts))
    jq = subprocess.run(
        ["jq", "-c", "--argjson", "v", '"v"', program], input=json.dumps(root), capture_output=True, text=True
    )
    args = ns(key, value="v", by=1)
    edit = {"set": _keys.do_set, "incr": _keys.do_incr, "append": _keys.do_append}[op]
    if jq.returncode != 0:
        refused(edit, root, args)
        return
    edit(root, args)
    assert root == json.loads(jq.stdout)
