"""``lockstore/_store.py``: open/read, the atomic_store-compatible API, transactions, locks, corrupt files."""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import filelock
import pytest
from _children import holding, run

import lockstore


def ino(path: Path) -> int:
    return os.stat(path).st_ino


# ----------------------------------------------------------------------------------- atomic_store compatibility
def test_value_loaded_at_open(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_text('{"a": 1}')
    assert lockstore.open(p).value == {"a": 1}


def test_missing_file_gives_default_deep_copy_never_mutated(tmp_path: Path) -> None:
    default: dict[str, Any] = {"items": [1, 2]}
    pristine = copy.deepcopy(default)
    s1 = lockstore.open(tmp_path / "d.json", default=default)
    assert s1.value == default
    assert s1.value is not default
    s1.value["items"].append(3)
    s1.value["new"] = True
    assert default == pristine
    s2 = lockstore.open(tmp_path / "d.json", default=default)
    assert s2.value == pristine
    assert not (tmp_path / "d.json").exists()  # opening never writes


def test_default_not_mutated_by_transactions_and_reset(tmp_path: Path) -> None:
    default: dict[str, Any] = {"items": []}
    store = lockstore.open(tmp_path / "d.json", default=default, durable=False)
    with pytest.raises(KeyError), store.transaction() as s:
        s.value["items"].append(1)
        raise KeyError("boom")
    assert store.value == {"items": []}
    assert store.value is not default
    with store.transaction() as s:
        s.value["items"].append(2)
    assert default == {"items": []}
    assert lockstore.read(tmp_path / "d.json") == {"items": [2]}


def test_commit_writes_value(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store: lockstore.Store[Any] = lockstore.open(p, default={}, durable=False)
    store.value["x"] = [1, "é"]
    store.commit()
    assert json.loads(p.read_bytes()) == {"x": [1, "é"]}
    assert lockstore.open(p).value == {"x": [1, "é"]}


def test_with_store_commits_on_exit(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    s: lockstore.Store[Any]
    with lockstore.open(p, default={}, durable=False) as s:
        assert isinstance(s, lockstore.Store)
        s.value["a"] = 1
        assert not p.exists()
    assert lockstore.read(p) == {"a": 1}


def test_nested_with_commits_on_every_exit(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store: lockstore.Store[Any] = lockstore.open(p, default={}, durable=False)
    with store:
        with store:
            store.value["a"] = 1
        assert lockstore.read(p) == {"a": 1}
        store.value["a"] = 2
    assert lockstore.read(p) == {"a": 2}


def test_nested_with_ignore_inner_exits_commits_only_outermost(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store: lockstore.Store[Any] = lockstore.open(p, default={}, ignore_inner_exits=True, durable=False)
    with store:
        with store, store:
            store.value["a"] = 1
        assert not p.exists()
    assert lockstore.read(p) == {"a": 1}


def test_exception_in_with_writes_nothing(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store: lockstore.Store[Any] = lockstore.open(p, default={}, durable=False)
    with pytest.raises(RuntimeError), store:
        store.value["a"] = 1
        raise RuntimeError
    assert not p.exists()
    store.value = {"a": 0}
    store.commit()
    before = (p.read_bytes(), ino(p))
    with pytest.raises(RuntimeError), store:
        store.value["a"] = 99
        raise RuntimeError
    assert (p.read_bytes(), ino(p)) == before


# ----------------------------------------------------------------------------------- transactions
def test_transaction_reloads_under_lock(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    a = lockstore.open(p, default=0, durable=False)
    b = lockstore.open(p, default=0, durable=False)
    b.value = 41
    b.commit()
    assert a.value == 0
    with a.transaction() as s:
        assert s is a
        assert s.value == 41
        s.value += 1
    assert lockstore.read(p) == 42


def test_transaction_reload_sees_foreign_in_place_edit(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, default=0, durable=False)
    with store.transaction() as s:
        s.value = 1
    with open(p, "r+b") as f:  # a foreign writer editing in place (same inode)
        f.write(b"7")
    with store.transaction() as s:
        assert s.value == 7


def test_transaction_reload_discards_uncommitted_in_memory_change(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, default=0, durable=False)
    with store.transaction() as s:
        s.value = 1
    store.value = 100  # never committed
    with store.transaction() as s:
        assert s.value == 1


def test_transaction_unchanged_writes_nothing(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, default={"a": 1}, durable=False)
    with store.transaction() as s:
        s.value["a"] = 2
    before = (ino(p), os.stat(p).st_mtime_ns)
    with store.transaction() as s:
        s.value["a"] = 2  # same value
    assert (ino(p), os.stat(p).st_mtime_ns) == before
    # negative control: a change does replace the file (a new inode)
    with store.transaction() as s:
        s.value["a"] = 3
    assert ino(p) != before[0]


def test_transaction_on_missing_file_unchanged_default_writes_nothing(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, default={"a": 1}, durable=False)
    with store.transaction():
        pass
    # issue 2: "A transaction whose value did not change writes nothing" -- the file did not exist, so none is made
    assert not p.exists()


def test_transaction_exception_resets_writes_nothing_releases(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store: lockstore.Store[Any] = lockstore.open(p, default={"a": 1}, durable=False)
    with store.transaction() as s:
        s.value["a"] = 2
    before = (p.read_bytes(), ino(p))
    with pytest.raises(ValueError, match="inside"), store.transaction() as s:
        s.value["a"] = 3
        s.value["b"] = []
        raise ValueError("inside")
    assert store.value == {"a": 2}
    assert (p.read_bytes(), ino(p)) == before
    assert store.holder() is None
    other = lockstore.open(p, durable=False)
    with other.transaction(blocking=False) as o:  # the lock is free again
        assert o.value == {"a": 2}


def test_transaction_exception_on_missing_file_resets_to_default(tmp_path: Path) -> None:
    store = lockstore.open(tmp_path / "d.json", default=[0], durable=False)
    with pytest.raises(ZeroDivisionError), store.transaction() as s:
        s.value.append(1)
        _ = 1 / 0
    assert store.value == [0]
    assert not (tmp_path / "d.json").exists()


def test_nested_transaction_joins_outer(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, default=0, durable=False)
    with store.transaction() as outer:
        outer.value = 1
        with store.transaction() as inner:
            assert inner is outer
            inner.value += 1
        assert not p.exists()  # only the outermost writes
        outer.value += 1
    assert lockstore.read(p) == 3


def test_nested_transaction_exception_propagates_and_outer_writes_nothing(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, default=0, durable=False)
    with pytest.raises(KeyError), store.transaction() as outer:
        outer.value = 5
        with store.transaction() as inner:
            inner.value = 6
            raise KeyError
    assert not p.exists()
    assert store.value == 0


def test_nested_transaction_is_a_savepoint_when_the_outer_block_catches(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, default={"a": 0}, durable=False)
    with store.transaction() as outer:
        outer.value["a"] = 5
        try:
            with store.transaction() as inner:
                inner.value["a"] = 6
                inner.value["b"] = 1
                raise KeyError
        except KeyError:
            pass
        assert outer.value == {"a": 5}  # back to the savepoint, not to the file
    assert lockstore.read(p) == {"a": 5}


def test_symlink_and_target_share_one_lock(tmp_path: Path) -> None:
    target = tmp_path / "d.json"
    link = tmp_path / "link.json"
    link.symlink_to(target)
    via_link = lockstore.open(link, default=0, durable=False)
    direct = lockstore.open(target, default=0, durable=False)
    assert via_link.lock_file == direct.lock_file == str(target) + ".lock"
    with via_link.transaction(), pytest.raises(lockstore.LockReentryError), direct.transaction():
        pass


def test_commit_inside_transaction_does_not_deadlock(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, default=0, durable=False)
    with store.transaction() as s:
        s.value = 9
        s.commit()
        assert lockstore.read(p) == 9


def test_transaction_timeout_and_blocking_false(tmp_path: Path) -> None:
    p = str(tmp_path / "d.json")
    store = lockstore.open(p, default=0, durable=False, timeout=-1)
    with holding(p):
        with pytest.raises(lockstore.LockTimeout) as info, store.transaction(0.05):
            pass
        assert info.value.waited >= 0.05
        with pytest.raises(lockstore.LockTimeout), store.transaction(blocking=False):
            pass
        with pytest.raises(lockstore.LockTimeout), store.transaction(0):
            pass
        assert store.holder() is not None
    with store.transaction(blocking=False) as s:  # released by the child
        assert s.value == 1


def test_store_timeout_used_by_transaction_and_commit(tmp_path: Path) -> None:
    p = str(tmp_path / "d.json")
    store = lockstore.open(p, default=0, durable=False, timeout=0.05)
    with holding(p):
        with pytest.raises(lockstore.LockTimeout), store.transaction():
            pass
        store.value = 5
        with pytest.raises(lockstore.LockTimeout):
            store.commit()  # commit on a locked store takes the lock
    assert lockstore.read(p) == 1  # the holder's write, not ours


def test_reads_are_lock_free(tmp_path: Path) -> None:
    p = str(tmp_path / "d.json")
    store = lockstore.open(p, default=0, durable=False, timeout=0)
    store.value = 3
    store.commit()
    with holding(p):
        assert store.reload() == 3
        assert store.value == 3
        assert lockstore.read(p) == 3
        assert lockstore.open(p, timeout=0).value == 3
    assert store.reload() == 4


def test_read_missing_returns_default_copy(tmp_path: Path) -> None:
    default = {"a": [1]}
    v = lockstore.read(tmp_path / "nope.json", default)
    assert v == default
    assert v is not default
    assert v["a"] is not default["a"]


def test_lock_false_transaction_raises(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, default=0, lock=False, durable=False)
    with pytest.raises(lockstore.LockstoreError, match="transactions need a lock") as info, store.transaction():
        pass
    assert isinstance(info.value, lockstore.TransactionLockError)
    assert str(p) in str(info.value)
    store.value = 1
    store.commit()
    assert lockstore.read(p) == 1
    assert store.lock is None
    assert store.lock_file is None
    assert store.holder() is None
    assert sorted(os.listdir(tmp_path)) == ["d.json"]  # no lock file


def test_lock_other_path(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    other = tmp_path / "locks" / "other.lock"
    other.parent.mkdir()
    for lock in (str(other), other):
        store = lockstore.open(p, default=0, lock=lock, durable=False)
        assert store.lock_file == str(other)
        with store.transaction() as s:
            s.value += 1
            assert other.read_bytes()  # the holder record is in the chosen lock file
        assert not other.read_bytes()[:4096].strip()  # the record (its 4 KiB) is blanked before release
    assert not (tmp_path / "d.json.lock").exists()
    assert lockstore.read(p) == 2


def test_lock_other_path_excludes(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    other = tmp_path / "other.lock"
    a = lockstore.open(p, default=0, lock=other, durable=False)
    b = lockstore.open(p, default=0, lock=other, durable=False)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with a.transaction():
            held.set()
            release.wait(60)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(60)
        with pytest.raises(lockstore.LockTimeout), b.transaction(blocking=False):
            pass
    finally:
        release.set()
        t.join(60)


@pytest.mark.parametrize("kind", ["FileLock", "SoftFileLock"])
def test_lock_filelock_instance(tmp_path: Path, kind: str) -> None:
    p = tmp_path / "d.json"
    lock: filelock.BaseFileLock = getattr(filelock, kind)(str(tmp_path / "x.lock"))
    store = lockstore.open(p, default=0, lock=lock, durable=False)
    assert store.lock is lock
    assert store.lock_file == lock.lock_file
    for _ in range(3):
        with store.transaction() as s:
            assert lock.is_locked
            s.value += 1
    assert not lock.is_locked
    assert lockstore.read(p) == 3
    store.value = 10
    store.commit()
    assert lockstore.read(p) == 10
    assert not lock.is_locked


def test_lock_bad_type(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        lockstore.open(tmp_path / "d.json", lock=3.5)


def test_path_lock_lockfile_repr(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, durable=False)
    assert store.path == str(p)
    assert isinstance(store.path, str)
    assert store.lock_file == str(p) + ".lock"
    assert isinstance(store.lock, filelock.BaseFileLock)
    assert store.lock.lock_file == store.lock_file
    r = repr(store)
    assert "lockstore.Store" in r
    assert str(p) in r
    assert "json" in r
    assert store.lock_file in r
    assert "no lock" in repr(lockstore.open(p, lock=False))


def test_transactions_and_commits_run_inside_a_held_store_lock(tmp_path: Path) -> None:
    p = str(tmp_path / "d.json")
    a = lockstore.open(p, default=0, durable=False)
    b = lockstore.open(p, default=0, durable=False)
    with a.lock:  # e.g. to hold the lock around something else
        with a.transaction(timeout=-1) as s:  # joins: no wait for itself
            s.value += 1
        with b.transaction(timeout=-1) as s:  # a second Store on the file too
            s.value += 1
        a.value = 5
        a.commit()
        assert run("try", p, "0.1")["type"] == "LockTimeout"  # another process is kept out meanwhile
    with b.transaction() as s:  # usable afterwards
        s.value += 1
    assert lockstore.read(p) == 6




def test_lock_file_never_deleted(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, default=0, durable=False)
    with store.transaction() as s:
        s.value = 1
    lock_ino = ino(tmp_path / "d.json.lock")
    store.commit()
    with store.transaction() as s:
        s.value = 2
    assert ino(tmp_path / "d.json.lock") == lock_ino


def test_sidecar_lock_file_mode_new(tmp_path: Path) -> None:
    store = lockstore.open(tmp_path / "d.json", default=0, durable=False)
    with store.transaction() as s:
        s.value = 1
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "d.json.lock").st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------------- corrupt files
def test_corrupt_raise_everywhere_never_overwritten(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_bytes(b"{not json")
    with pytest.raises(lockstore.CorruptStoreError) as info:
        lockstore.open(p)
    assert isinstance(info.value.__cause__, json.JSONDecodeError)
    assert str(p) in str(info.value)
    assert info.value.path == str(p)
    with pytest.raises(lockstore.CorruptStoreError):
        lockstore.read(p)
    p.write_bytes(b"1")
    store = lockstore.open(p, durable=False)
    p.write_bytes(b"{not json")
    with pytest.raises(lockstore.CorruptStoreError):
        store.reload()
    with pytest.raises(lockstore.CorruptStoreError), store.transaction() as s:
        s.value = 2
    store.value = 3
    with pytest.raises(lockstore.CorruptStoreError), store.transaction():
        pass
    assert p.read_bytes() == b"{not json"
    assert store.holder() is None  # released after the failure


def test_corrupt_backup(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "d.json"
    p.write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING, logger="lockstore"):
        store: lockstore.Store[Any] = lockstore.open(p, default={"fresh": True}, on_corrupt="backup", durable=False)
    assert store.value == {"fresh": True}
    aside = [n for n in os.listdir(tmp_path) if n.startswith("d.json.corrupt-")]
    assert len(aside) == 1
    assert not aside[0].startswith(".")  # visible
    assert (tmp_path / aside[0]).read_bytes() == b"\x00garbage"
    assert not p.exists()
    records = [r for r in caplog.records if r.name == "lockstore" and r.levelno == logging.WARNING]
    assert records
    assert aside[0] in records[0].getMessage()
    # again inside a transaction, with a second corrupt file: a second, distinct sibling
    p.write_bytes(b"[[[")
    with store.transaction() as s:
        assert s.value == {"fresh": True}
        s.value["n"] = 1
    assert lockstore.read(p) == {"fresh": True, "n": 1}
    aside2 = sorted(n for n in os.listdir(tmp_path) if n.startswith("d.json.corrupt-"))
    assert len(aside2) == 2


def test_on_corrupt_invalid(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_corrupt"):
        lockstore.open(tmp_path / "d.json", on_corrupt="ignore")  # type: ignore[call-overload]


# ----------------------------------------------------------------------------------- OS errors
def test_missing_directory_error_names_path(tmp_path: Path) -> None:
    p = tmp_path / "no" / "such" / "d.json"
    store = lockstore.open(p, default=0, lock=False)
    store.value = 1
    with pytest.raises(FileNotFoundError) as info:
        store.commit()
    assert str(p) in str(info.value)


def test_unreadable_path_error_names_path(tmp_path: Path) -> None:
    p = tmp_path / "dir.json"
    p.mkdir()
    with pytest.raises(IsADirectoryError) as info:
        lockstore.open(p, lock=False)
    assert str(p) in str(info.value)


def test_commit_waits_for_another_process_transaction(tmp_path: Path) -> None:
    # commit() on a locked store is never interleaved inside another process's transaction: last writer wins
    p = str(tmp_path / "d.json")
    store = lockstore.open(p, default=0, durable=False, timeout=-1)
    errors: list[BaseException] = []

    def commit() -> None:
        try:
            store.value = 5
            store.commit()
        except BaseException as exc:
            errors.append(exc)

    with holding(p) as child:
        t = threading.Thread(target=commit)
        t.start()
        child.release()  # the child's transaction writes 1 as it ends
        t.join(60)
    assert not t.is_alive() and errors == []
    assert lockstore.read(p) == 5  # ours came after the child's write, not inside its transaction


def test_negative_control_unlocked_commit_lands_inside_transaction(tmp_path: Path) -> None:
    p = str(tmp_path / "d.json")
    store = lockstore.open(p, default=0, durable=False, lock=False)
    with holding(p) as child:
        store.value = 5
        store.commit()  # no lock: written while the child is inside its transaction
        child.release()
    assert lockstore.read(p) == 1  # the child's transaction overwrote it: the test above can fail


def test_reads_create_no_lock_file(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_text("1")
    store = lockstore.open(p)
    assert store.reload() == 1
    assert lockstore.read(p) == 1
    assert sorted(os.listdir(tmp_path)) == ["d.json"]


def test_default_timeout_is_finite() -> None:
    assert 0 < lockstore.DEFAULT_TIMEOUT < float("inf")
    assert 0 < lockstore.DEFAULT_POLL_INTERVAL <= lockstore.DEFAULT_TIMEOUT
    store = lockstore.open("/nonexistent/d.json", lock=False)
    assert store.timeout == lockstore.DEFAULT_TIMEOUT
    assert store.durable is True


def test_references_taken_before_a_failed_savepoint_still_reach_the_value(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store: lockstore.Store[Any] = lockstore.open(p, default={}, durable=False)
    with store.transaction() as s:
        d = s.value
        d["a"] = 1
        with pytest.raises(KeyError), store.transaction() as inner:
            inner.value["b"] = 2
            raise KeyError
        d["c"] = 3  # the outer block keeps using its reference
    assert lockstore.read(p) == {"a": 1, "c": 3}


def test_backup_through_a_symlink_moves_the_target_and_keeps_the_link(tmp_path: Path) -> None:
    target = tmp_path / "real.json"
    link = tmp_path / "link.json"
    target.write_text("{not json")
    link.symlink_to(target)
    store = lockstore.open(link, default={"n": 0}, on_corrupt="backup", durable=False)
    assert store.value == {"n": 0}
    with store.transaction() as s:
        s.value["n"] = 5
    assert link.is_symlink()
    assert lockstore.read(target) == {"n": 5}
    assert [q.name for q in tmp_path.glob("real.json.corrupt-*")]


def test_read_of_a_directory_names_it_and_leaks_no_descriptor(tmp_path: Path) -> None:
    # A user error: the error names the path, and every call closes what it opened (the third review: the file
    # object that wraps a probe's descriptor refuses a directory without closing it).
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(IsADirectoryError) as info:
            lockstore.read(tmp_path)
        assert info.value.filename == str(tmp_path)
    assert len(os.listdir("/proc/self/fd")) == before
