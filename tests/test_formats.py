"""``lockstore/_formats.py``: every format through one behaviour suite, plus format-specific options."""

from __future__ import annotations

import json
import math
import pickle
import sys
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any

import pytest

import lockstore


class JsonFile(lockstore.AbstractFormatFile):
    """A file-object format (text)."""

    def dump(self, value: Any, fp: IO[Any], **kwargs: Any) -> None:
        json.dump(value, fp, **kwargs)

    def load(self, fp: IO[Any], **kwargs: Any) -> Any:
        return json.load(fp, **kwargs)


class PickleBstr(lockstore.AbstractFormatBstr):
    """A bytes format."""

    def dumps(self, value: Any, **kwargs: Any) -> bytes:
        return pickle.dumps(value, **kwargs)

    def loads(self, data: bytes | str, **kwargs: Any) -> Any:
        assert isinstance(data, bytes)
        return pickle.loads(data, **kwargs)


class ReprStr(lockstore.AbstractFormatBstr):
    """A text format returning str."""

    def dumps(self, value: Any, **kwargs: Any) -> str:
        return json.dumps(value)

    def loads(self, data: bytes | str, **kwargs: Any) -> Any:
        assert isinstance(data, str)
        return json.loads(data)


class PickleFileModuleLike:
    """An object with only dump/load on binary files."""

    dump = staticmethod(pickle.dump)
    load = staticmethod(pickle.load)


FORMATS: dict[str, dict[str, Any]] = {
    "default": {},
    "json": {"format": "json"},
    "json-binary": {"format": "json", "is_binary": True},
    "json-module": {"format": json, "is_binary": False},
    "pickle": {"format": "pickle"},
    "pickle-module": {"format": pickle},
    "bson": {"format": "bson"},
    "file-subclass-instance": {"format": JsonFile(), "is_binary": False},
    "file-subclass-class": {"format": JsonFile, "is_binary": False},
    "bstr-subclass": {"format": PickleBstr()},
    "bstr-str-subclass": {"format": ReprStr(), "is_binary": False},
    "dump-load-binary-object": {"format": PickleFileModuleLike()},
}


@pytest.fixture(params=sorted(FORMATS))
def fmt(request: pytest.FixtureRequest) -> dict[str, Any]:
    value: dict[str, Any] = FORMATS[request.param]
    return value


def test_round_trip_commit_open_read(tmp_path: Path, fmt: dict[str, Any]) -> None:
    p = tmp_path / "d.bin"
    value = {"name": "é✓", "n": 3, "items": [1, 2, {"x": None}]}
    store: lockstore.Store[Any] = lockstore.open(p, default={}, durable=False, **fmt)
    store.value = value
    store.commit()
    assert lockstore.open(p, **fmt).value == value
    assert lockstore.read(p, None, fmt.get("format"), fmt.get("is_binary")) == value


def test_transactions_and_with(tmp_path: Path, fmt: dict[str, Any]) -> None:
    p = tmp_path / "d.bin"
    store = lockstore.open(p, default={"n": 0}, durable=False, **fmt)
    for _ in range(3):
        with store.transaction() as s:
            s.value["n"] += 1
    with store as s:
        s.value["n"] += 10
    other = lockstore.open(p, default={"n": 0}, durable=False, **fmt)
    with other.transaction() as s:
        assert s.value == {"n": 13}
    before = p.stat().st_ino
    with other.transaction():
        pass
    assert p.stat().st_ino == before


def test_corrupt_file_raises(tmp_path: Path, fmt: dict[str, Any]) -> None:
    p = tmp_path / "d.bin"
    p.write_bytes(b"\xff\x00 definitely not valid in any of these formats")
    with pytest.raises(lockstore.CorruptStoreError) as info:
        lockstore.open(p, **fmt)
    assert info.value.__cause__ is not None
    assert p.read_bytes().startswith(b"\xff\x00")


def test_unencodable_value_raises_serialization_error(tmp_path: Path, fmt: dict[str, Any]) -> None:
    p = tmp_path / "d.bin"
    store: lockstore.Store[Any] = lockstore.open(p, default={"ok": 1}, durable=False, **fmt)
    store.commit()
    before = p.read_bytes()
    store.value = {"bad": lambda: None}  # neither JSON, pickle nor BSON can encode a lambda
    with pytest.raises(lockstore.SerializationError) as info:
        store.commit()
    assert info.value.__cause__ is not None
    assert p.read_bytes() == before


def test_dump_kwargs_separators(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store: lockstore.Store[Any] = lockstore.open(p, default={}, dump_kwargs={"separators": (",", ":")}, durable=False)
    store.value = {"a": 1, "b": [1, 2]}
    store.commit()
    assert p.read_bytes() == b'{"a":1,"b":[1,2]}'


def test_dump_kwargs_for_file_format(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store: lockstore.Store[Any] = lockstore.open(p, default={}, format=JsonFile(), is_binary=False,
                                                 dump_kwargs={"indent": 1}, durable=False)
    store.value = {"a": 1}
    store.commit()
    assert p.read_bytes() == b'{\n "a": 1\n}'


def test_load_kwargs(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_text('{"b": 1, "a": 2}')
    v = lockstore.open(p, load_kwargs={"object_pairs_hook": OrderedDict}).value
    assert isinstance(v, OrderedDict)
    assert list(v) == ["b", "a"]
    assert isinstance(lockstore.read(p, load_kwargs={"object_pairs_hook": OrderedDict}), OrderedDict)


def test_default_json_is_text_utf8(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, default=None, dump_kwargs={"ensure_ascii": False}, durable=False)
    store.value = {"k": "é✓"}
    store.commit()
    assert p.read_bytes() == '{"k": "é✓"}'.encode()
    assert json.loads(p.read_bytes().decode("utf-8")) == {"k": "é✓"}


def test_json_default_is_ascii_escaped_standard(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, default=None, durable=False)
    store.value = {"k": "é"}
    store.commit()
    assert p.read_bytes() == b'{"k": "\\u00e9"}'


def _reject(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_json_rejects_nan_and_infinities(tmp_path: Path, bad: float) -> None:
    p = tmp_path / "d.json"
    store: lockstore.Store[Any] = lockstore.open(p, default={"x": 1}, durable=False)
    store.commit()
    before = p.read_bytes()
    store.value = {"x": bad}
    with pytest.raises(lockstore.SerializationError):
        store.commit()
    with pytest.raises(lockstore.SerializationError), store.transaction() as s:
        s.value = [bad]
    assert p.read_bytes() == before
    # negative control: Python's json module writes these by default, so the check above is lockstore's doing
    assert json.dumps(bad) in ("NaN", "Infinity", "-Infinity")


@pytest.mark.parametrize("extra", [{}, {"separators": (",", ":")}, {"indent": 2}])
def test_json_allow_nan_opt_in(tmp_path: Path, extra: dict[str, Any]) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, default=None, dump_kwargs={"allow_nan": True, **extra}, durable=False)
    store.value = [math.inf]
    store.commit()
    assert b"Infinity" in p.read_bytes()
    # without the opt-in, what lockstore writes parses as strict JSON
    strict = lockstore.open(tmp_path / "s.json", default=None, dump_kwargs=extra, durable=False)
    strict.value = [1.5, "x"]
    strict.commit()
    json.loads((tmp_path / "s.json").read_bytes(), parse_constant=_reject)


def test_json_separators_still_rejects_nan(tmp_path: Path) -> None:
    store = lockstore.open(tmp_path / "d.json", default=None, dump_kwargs={"separators": (",", ":")},
                           durable=False)
    store.value = [math.nan]
    with pytest.raises(lockstore.SerializationError):
        store.commit()


def test_unknown_format_string() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        lockstore.open("/nonexistent/x", format="yaml", lock=False)


def test_format_without_methods() -> None:
    with pytest.raises(TypeError, match="neither"):
        lockstore.open("/nonexistent/x", format=object(), lock=False)


def test_bson_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bson", None)
    with pytest.raises(ImportError, match=r"lockstore\[bson\]"):
        lockstore.open("/nonexistent/x", format="bson", lock=False)


def test_is_binary_override_for_dumps_loads(tmp_path: Path) -> None:
    # is_binary=False hands loads() a str; a binary format handed bytes works with is_binary=True
    p = tmp_path / "d.json"
    s = lockstore.open(p, default=None, format=ReprStr(), is_binary=False, durable=False)
    s.value = [1]
    s.commit()
    assert lockstore.open(p, format=ReprStr(), is_binary=False).value == [1]
    with pytest.raises(lockstore.CorruptStoreError):  # ReprStr asserts it receives str
        lockstore.open(p, format=ReprStr(), is_binary=True)
