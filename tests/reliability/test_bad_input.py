"""Bad input: values a format cannot encode, damaged data files, the wrong format, odd paths, huge values."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

import lockstore

from ._harness import add, report, run_child, temp_files


def _state(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_ino


def _circular() -> dict[str, Any]:
    d: dict[str, Any] = {}
    d["self"] = d
    return d


UNENCODABLE: list[tuple[str, str, Any]] = [
    ("json", "object()", {"x": object()}),
    ("json", "set", {"x": {1, 2}}),
    ("json", "circular reference", _circular()),
    ("json", "NaN", {"x": math.nan}),
    ("json", "infinity", {"x": -math.inf}),
    ("json", "bytes", {"x": b"raw"}),
    ("pickle", "lambda", {"x": lambda: 1}),
    ("pickle", "generator", {"x": (i for i in range(3))}),
    ("bson", "list at top level", [1, 2, 3]),
    ("bson", "object() inside", {"x": object()}),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("fmt", "what", "value"), UNENCODABLE, ids=[f"{f}-{w}" for f, w, _ in UNENCODABLE])
def test_unencodable_value_changes_nothing(tmp_path: Path, fmt: str, what: str, value: Any) -> None:
    if fmt == "bson":
        pytest.importorskip("bson")
    path = tmp_path / f"store.{fmt}"
    store = lockstore.open(path, format=fmt, default={"ok": 1})
    store.commit()
    before = _state(path)
    violations: list[str] = []
    for how in ("commit", "transaction"):
        add("bad inputs tried")
        try:
            if how == "commit":
                store.value = value
                store.commit()
            else:
                with store.transaction() as s:
                    s.value = value
        except lockstore.SerializationError as exc:
            if exc.__cause__ is None:
                violations.append(f"{what} ({how}): SerializationError without the encoder's error as __cause__")
            if str(path) not in str(exc):
                violations.append(f"{what} ({how}): the error does not name the path: {exc}")
        except Exception as exc:
            violations.append(f"{what} ({how}): {exc!r} instead of SerializationError")
        else:
            violations.append(f"{what} ({how}): encoded without an error")
        if _state(path) != before:
            violations.append(f"{what} ({how}): the data file changed")
        if temp_files(tmp_path):
            violations.append(f"{what} ({how}): temp files left")
        if store.holder() is not None:
            violations.append(f"{what} ({how}): the lock is still held")
        store.value = lockstore.read(path, format=fmt)
    report(violations)
    assert violations == []


DAMAGED: list[tuple[str, str, bytes]] = [
    ("json", "empty", b""),
    ("json", "truncated", b'{"n": 1, "pad": "0000'),
    ("json", "garbage", bytes(range(256))),
    ("json", "BOM-prefixed", b'\xef\xbb\xbf{"n": 1}'),
    ("json", "trailing garbage", b'{"n": 1}\x00\x00junk'),
    ("json", "invalid UTF-8", b'{"n": "\xff"}'),
    ("pickle", "empty", b""),
    ("pickle", "truncated", b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94"),
    ("pickle", "garbage", b"not a pickle at all"),
    ("bson", "truncated", b"\x16\x00\x00\x00\x02hello\x00"),
    ("bson", "garbage", b"\xff" * 40),
    # the wrong format: a valid file of another format
    ("pickle", "a JSON file read as pickle", b'{"n": 1}'),
    ("json", "a pickle file read as JSON", b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01n\x94K\x01s."),
    ("bson", "a JSON file read as BSON", b'{"n": 1}'),
]


def damaged(tmp_path: Path, fmt: str, what: str, content: bytes, **options: Any) -> list[str]:
    """Every way of meeting a damaged file must raise CorruptStoreError and leave the file as it is."""
    path = tmp_path / "store.data"
    path.write_bytes(content)
    violations: list[str] = []
    where = path

    def expect_corrupt(label: str, fn: Any) -> None:
        add("bad inputs tried")
        try:
            fn()
        except lockstore.CorruptStoreError as exc:
            if str(where) not in str(exc) or exc.__cause__ is None:
                violations.append(f"{what}: {label}: CorruptStoreError lacks the path or the cause: {exc}")
        except Exception as exc:
            violations.append(f"{what}: {label}: {exc!r} instead of CorruptStoreError")
        else:
            violations.append(f"{what}: {label}: decoded without an error")

    expect_corrupt("open", lambda: lockstore.open(path, format=fmt, default={"fresh": 1}, **options))
    expect_corrupt("read", lambda: lockstore.read(path, format=fmt, default={"fresh": 1}))
    # A store opened while the file was still fine meets the damage at reload and in a transaction.
    good = tmp_path / "good.data"
    store = lockstore.open(good, format=fmt, default={"fresh": 1}, **options)
    store.commit()
    if not path.exists():  # moved aside by on_corrupt="backup" (the negative control)
        path.write_bytes(content)
    os.replace(path, good)
    before = _state(good)
    where = good

    def transact() -> None:
        with store.transaction() as s:
            s.value = {"fresh": 2}

    def commit_via_with() -> None:
        with lockstore.open(good, format=fmt, default={"fresh": 1}, **options) as s:
            s.value = {"fresh": 3}

    expect_corrupt("reload", store.reload)
    expect_corrupt("transaction", transact)
    expect_corrupt("with-block", commit_via_with)
    if not good.exists() or _state(good) != before:
        violations.append(f"{what}: the damaged file was replaced")
    if temp_files(tmp_path):
        violations.append(f"{what}: temp files left")
    return violations


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("fmt", "what", "content"), DAMAGED, ids=[f"{f}-{w}" for f, w, _ in DAMAGED])
def test_damaged_file_raises_and_is_never_replaced(tmp_path: Path, fmt: str, what: str, content: bytes) -> None:
    if fmt == "bson":
        pytest.importorskip("bson")
    violations = damaged(tmp_path, fmt, what, content)
    report(violations)
    assert violations == []


@pytest.mark.timeout(60)
def test_negative_control_backup_mode_is_caught(tmp_path: Path) -> None:
    """on_corrupt="backup" moves the damaged file aside and starts from the default: the check must object."""
    violations = damaged(tmp_path, "json", "truncated (backup mode)", b'{"n": 1, ', on_corrupt="backup")
    report(violations, negative=True)
    assert any("replaced" in v for v in violations) and any("without an error" in v for v in violations), violations


@pytest.mark.timeout(60)
def test_data_path_is_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    path.mkdir()
    add("bad inputs tried", 2)
    with pytest.raises(IsADirectoryError) as info:
        lockstore.open(path)
    assert info.value.filename == str(path)
    path.rmdir()
    store = lockstore.open(path, lock=False)
    path.mkdir()  # a store whose path became a directory after it was opened
    with pytest.raises(OSError) as err:
        store.commit()
    assert str(tmp_path) in str(err.value.filename)
    assert path.is_dir() and list(path.iterdir()) == []
    assert temp_files(tmp_path) == []


@pytest.mark.timeout(60)
def test_dangling_symlink_is_written_through(tmp_path: Path) -> None:
    target = tmp_path / "real" / "store.json"
    target.parent.mkdir()
    link = tmp_path / "link.json"
    link.symlink_to(target)
    add("bad inputs tried")
    store = lockstore.open(link, default={"n": 0})
    with store.transaction() as s:
        s.value["n"] += 1
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert lockstore.read(target) == {"n": 1} == lockstore.read(link)
    assert temp_files(tmp_path) == [] and temp_files(target.parent) == []


@pytest.mark.timeout(60)
def test_symlink_loop_raises_and_touches_nothing(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.symlink_to(b)
    b.symlink_to(a)
    add("bad inputs tried")
    with pytest.raises(OSError) as info:
        lockstore.open(a)
    assert info.value.filename == str(a)
    assert a.is_symlink() and b.is_symlink() and os.readlink(a) == str(b)


@pytest.mark.timeout(60)
def test_250_character_file_name(tmp_path: Path) -> None:
    path = tmp_path / ("n" * 245 + ".json")
    assert len(path.name) == 250
    add("bad inputs tried")
    store = lockstore.open(path, default={"n": 0})
    for _ in range(3):
        with store.transaction() as s:
            s.value["n"] += 1
    store.value = {"n": 10}
    store.commit()
    assert lockstore.read(path) == {"n": 10}
    assert temp_files(tmp_path) == []


@pytest.mark.stress
@pytest.mark.timeout(200)
@pytest.mark.parametrize("phase", ["commit", "load"])
@pytest.mark.parametrize("fmt", ["json", "pickle"])
def test_100_mb_value_peak_memory_under_3x(tmp_path: Path, fmt: str, phase: str) -> None:
    """Peak RSS growth of a child (the value itself included) while it commits or loads a 100 MB value."""
    path = tmp_path / f"big.{fmt}"
    if phase == "load":
        run_child("rss", str(path), "100", fmt, "commit", timeout=180)
    growth = int(run_child("rss", str(path), "100", fmt, phase, timeout=180))
    add("bad inputs tried")
    ratio = growth / 100e6
    print(f"{fmt} {phase}: peak RSS growth {growth} bytes = {ratio:.3f}x")
    violations = [] if ratio < 3 else [f"{fmt} {phase} of 100 MB peaked at {ratio:.2f}x the value size"]
    report(violations)
    assert violations == []
