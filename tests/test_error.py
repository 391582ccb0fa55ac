"""``lockstore/_error.py``: one base, builtin also-classes, attributes, useful ``str()``, pickling."""

from __future__ import annotations

import errno
import json
import multiprocessing
import pickle
from pathlib import Path

import filelock
import pytest

import lockstore
from lockstore import Holder


def make_holder(alive: bool | None = True) -> Holder:
    return Holder(pid=1234, host="hosta", user="ann", cmdline=["python", "nightly.py", "--full"],
                  acquired_at=1.0, label="nightly-rollup", alive=alive)


ERRORS: list[tuple[BaseException, tuple[type[BaseException], ...]]] = [
    (lockstore.LockTimeout("/x/c.json.lock", 10.0, path="/x/c.json", holder=make_holder()),
     (TimeoutError, filelock.Timeout)),
    (lockstore.CorruptStoreError("/x/c.json", "cannot be decoded as json"), (ValueError,)),
    (lockstore.SerializationError("/x/c.json", "cannot encode"), (ValueError,)),
    (lockstore.DurabilityUnknownError("/x/c.json", OSError(errno.EIO, "Input/output error")), (OSError,)),
    (lockstore.TransactionLockError("/x/c.json"), (TypeError,)),
    (lockstore.LockReentryError("/x/c.json.lock"), (RuntimeError,)),
]


@pytest.mark.parametrize(("exc", "builtins"), ERRORS, ids=lambda v: type(v).__name__ if isinstance(v, Exception)
                         else "")
def test_hierarchy_and_pickling(exc: BaseException, builtins: tuple[type[BaseException], ...]) -> None:
    assert isinstance(exc, lockstore.LockstoreError)
    for b in builtins:
        assert isinstance(exc, b)
    assert "/x/c.json" in str(exc)
    clone = pickle.loads(pickle.dumps(exc))
    assert type(clone) is type(exc)
    assert str(clone) == str(exc)
    assert clone.__dict__ == exc.__dict__


def test_lock_timeout_attributes_and_message() -> None:
    exc = lockstore.LockTimeout("/x/counter.json.lock", 10.0, path="/x/counter.json", holder=make_holder())
    assert exc.lock_file == "/x/counter.json.lock"
    assert exc.path == "/x/counter.json"
    assert exc.waited == 10.0
    assert exc.holder == make_holder()
    text = str(exc)
    assert text.startswith("timed out after 10.0 s waiting for lock on /x/counter.json (/x/counter.json.lock)")
    for part in ("pid 1234", "host hosta", "(alive)", "python nightly.py --full", "[label: nightly-rollup]",
                 "deleting the lock file does not help"):
        assert part in text
    clone = pickle.loads(pickle.dumps(exc))
    assert clone.holder == exc.holder
    assert clone.waited == 10.0


def test_lock_timeout_without_holder() -> None:
    text = str(lockstore.LockTimeout("/x/c.lock", 0.5))
    assert "/x/c.lock" in text
    assert "no record" in text
    assert "deleting the lock file does not help" in text


def test_lock_timeout_stale() -> None:
    exc = lockstore.LockTimeout("/x/c.lock", 1.0, holder=make_holder(alive=False), holder_stale=True)
    assert "stale" in str(exc)
    assert pickle.loads(pickle.dumps(exc)).holder_stale is True


def test_durability_unknown_error() -> None:
    exc = lockstore.DurabilityUnknownError("/x/c.json", OSError(errno.EIO, "Input/output error"))
    assert exc.errno == errno.EIO
    assert exc.path == "/x/c.json"
    assert "in place" in str(exc)
    clone = pickle.loads(pickle.dumps(exc))
    assert clone.errno == errno.EIO
    assert str(clone) == str(exc)


def _raise_in_child(path: str) -> None:
    lockstore.read(path)


def test_errors_cross_a_process_boundary(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_bytes(b"{")
    with multiprocessing.get_context("spawn").Pool(1) as pool, pytest.raises(lockstore.CorruptStoreError) as info:
        pool.apply(_raise_in_child, (str(p),))
    assert info.value.path == str(p)


def test_real_errors_carry_cause(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_bytes(b"{")
    with pytest.raises(lockstore.CorruptStoreError) as c:
        lockstore.open(p)
    assert isinstance(c.value.__cause__, json.JSONDecodeError)
    assert c.value.path == str(p)
    store = lockstore.open(tmp_path / "e.json", default=None, lock=False)
    store.value = object()
    with pytest.raises(lockstore.SerializationError) as s:
        store.commit()
    assert isinstance(s.value.__cause__, TypeError)
    assert str(tmp_path / "e.json") in str(s.value)
    assert pickle.loads(pickle.dumps(s.value)).path == s.value.path
