"""``lockstore/_atomic.py``: guarantees 2 (complete old or new), 3 (file metadata) and 4 (fsync errors).

Real files, real processes; faults are injected into a child's system calls with strace, never mocked.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _children import Child, run
from atomicwrites import atomic_write

import lockstore
from lockstore import _atomic

STRACE = shutil.which("strace")
CHATTR = shutil.which("chattr")
needs_strace = pytest.mark.skipif(STRACE is None, reason="strace is not installed: cannot inject fsync errors")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown and to drop privileges")


def snapshot(path: Path) -> tuple[bytes, int, int]:
    st = os.stat(path)
    return path.read_bytes(), st.st_ino, st.st_mode


def temps(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------- guarantee 2
def test_temp_file_in_target_directory_then_replace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "d.json"
    seen: list[tuple[str, str]] = []
    real_replace: Callable[..., None] = os.replace

    def observe(src: str, dst: str) -> None:  # observes the call, then does it for real
        seen.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", observe)
    store = lockstore.open(p, default=0, durable=False)
    store.value = 1
    store.commit()
    store.value = 2
    store.commit()
    assert len(seen) == 2
    (src1, dst1), (src2, _) = seen
    assert os.path.dirname(src1) == str(tmp_path)
    assert dst1 == str(p)
    assert src1 != src2  # unique names
    assert temps(tmp_path) == []


def test_long_file_name(tmp_path: Path) -> None:
    name = "n" * 245 + ".json"
    assert len(name) == 250
    p = tmp_path / name
    store = lockstore.open(p, default=0, lock=False)
    store.value = 1
    store.commit()
    assert lockstore.read(p) == 1
    prefix = os.path.basename(_atomic.temp_prefix(str(p)))
    assert len(os.fsencode(prefix)) + 8 + len(".tmp") <= 255
    assert temps(tmp_path) == []


def test_long_file_name_with_lock(tmp_path: Path) -> None:
    # the sidecar adds ".lock" (5 bytes): a 250-byte name still fits NAME_MAX
    p = tmp_path / ("n" * 245 + ".json")
    store = lockstore.open(p, default=0, durable=False)
    with store.transaction() as s:
        s.value = 1
    assert lockstore.read(p) == 1


def test_serialization_error_leaves_old_file(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store: lockstore.Store[Any] = lockstore.open(p, default={"a": 1}, durable=False)
    store.commit()
    before = snapshot(p)
    store.value = {"a": {1, 2}}
    with pytest.raises(lockstore.SerializationError):
        store.commit()
    assert snapshot(p) == before
    assert temps(tmp_path) == []


@needs_root
def test_unwritable_directory_as_non_root_leaves_old_file(tmp_path: Path) -> None:
    d = tmp_path / "ro"
    d.mkdir(mode=0o755)  # owned by root: nobody may not create files in it
    p = d / "d.json"
    p.write_text('{"old": true}')
    os.chmod(p, 0o666)  # the file itself is writable by anyone: only an in-place write would succeed
    lock = d / "d.json.lock"
    lock.touch(mode=0o666)
    os.chmod(lock, 0o666)
    before = snapshot(p)
    out = run("commit_as_nobody", str(d), "d.json", json.dumps({"new": True}))
    assert out["ok"] is False
    assert out["type"] == "PermissionError"
    assert out["filename"] is not None
    assert snapshot(p) == before
    assert temps(d) == []
    # negative control: root may write there, so the harness itself does not fail
    assert run("commit", str(p), json.dumps({"new": True}))["ok"] is True
    assert json.loads(p.read_bytes()) == {"new": True}


@needs_root
@pytest.mark.skipif(CHATTR is None, reason="chattr is not installed")
def test_immutable_directory_leaves_old_file(tmp_path: Path) -> None:
    # a directory that even root may not change (chattr +i): the temp file cannot be created
    d = tmp_path / "imm"
    d.mkdir()
    p = d / "d.json"
    p.write_text("1")
    store = lockstore.open(p, default=0, lock=False)
    before = snapshot(p)
    assert CHATTR is not None
    if subprocess.run([CHATTR, "+i", str(d)], capture_output=True, check=False).returncode != 0:
        pytest.skip("chattr +i is not permitted here")
    try:
        store.value = 2
        with pytest.raises(PermissionError):
            store.commit()
        assert snapshot(p) == before
        assert temps(d) == []
    finally:
        subprocess.run([CHATTR, "-i", str(d)], check=True)
    # negative control: once the directory is writable, the same commit goes through
    store.commit()
    assert lockstore.read(p) == 2


def test_killed_writer_temp_is_swept_by_next_writer_under_lock(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    store = lockstore.open(p, default="old", durable=False)
    store.commit()
    before = snapshot(p)
    with Child("hold_in_write", str(p)) as child:
        temp = json.loads(child.wait_ready().split(" ", 1)[1])["temp"]
        assert os.path.dirname(temp) == str(tmp_path)
        assert os.path.exists(temp)
        # while the writer lives and holds the lock, its temp file is never touched by others
        assert store.reload() == "old"
        with pytest.raises(lockstore.LockTimeout), store.transaction(blocking=False):
            pass
        other = lockstore.open(p, default="x", durable=False)
        assert other.value == "old"
        assert os.path.exists(temp)
        os.kill(child.pid, signal.SIGKILL)
        child.proc.wait(60)
    assert child.proc.returncode == -signal.SIGKILL
    assert os.path.exists(temp)  # the leftover
    assert snapshot(p) == before  # complete old version
    assert store.reload() == "old"
    with store.transaction() as s:  # the next writer, under the lock, removes it
        s.value = "new"
    assert not os.path.exists(temp)
    assert temps(tmp_path) == []
    assert lockstore.read(p) == "new"


def test_sweep_keeps_unrelated_files(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    keep = [tmp_path / ".d.json.notatoken.tmp", tmp_path / ".other.json.0123abcd.tmp", tmp_path / "d.json.bak"]
    for k in keep:
        k.write_text("x")
    leftover = Path(_atomic.temp_prefix(str(p)) + "0123abcd.tmp")
    leftover.write_text("x")
    store = lockstore.open(p, default=0, durable=False)
    with store.transaction() as s:
        s.value = 1
    assert not leftover.exists()
    assert all(k.exists() for k in keep)


# ----------------------------------------------------------------------------------- guarantee 3
def test_new_file_mode_follows_umask(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    old = os.umask(0o027)
    try:
        store = lockstore.open(p, default=0, durable=False)
        store.value = 1
        store.commit()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~0o027
    q = tmp_path / "e.json"
    s2 = lockstore.open(q, default=0, lock=False, durable=False)
    s2.commit()
    assert stat.S_IMODE(os.stat(q).st_mode) == 0o666 & ~umask()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o600, 0o666, 0o444])
def test_existing_mode_kept(tmp_path: Path, mode: int) -> None:
    p = tmp_path / "d.json"
    p.write_text("0")
    os.chmod(p, mode)
    store = lockstore.open(p, default=0, durable=False)
    with store.transaction() as s:
        s.value = 1
    store.value = 2
    store.commit()
    assert stat.S_IMODE(os.stat(p).st_mode) == mode
    assert lockstore.read(p) == 2


def test_negative_control_atomicwrites_makes_0600(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_text("0")
    os.chmod(p, 0o640)
    with atomic_write(str(p), overwrite=True) as f:
        f.write("1")
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600  # what the test above would detect


@needs_root
def test_owner_and_group_kept(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    p = tmp_path / "d.json"
    p.write_text("0")
    os.chown(p, nobody.pw_uid, nobody.pw_gid)
    os.chmod(p, 0o640)
    store = lockstore.open(p, default=0, durable=False)
    with store.transaction() as s:
        s.value = 1
    st = os.stat(p)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (nobody.pw_uid, nobody.pw_gid, 0o640)
    assert lockstore.read(p) == 1
    # negative control: a plain atomic replace by root makes the file root's
    with atomic_write(str(p), overwrite=True) as f:
        f.write("2")
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (0, 0)


def test_symlink_written_through(tmp_path: Path) -> None:
    target = tmp_path / "real" / "d.json"
    target.parent.mkdir()
    target.write_text("0")
    os.chmod(target, 0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    store = lockstore.open(link, default=0, durable=False)
    with store.transaction() as s:
        s.value += 1
    store.value = 5
    store.commit()
    assert link.is_symlink()
    assert os.readlink(link) == str(target)
    assert target.read_text() == "5"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    assert temps(tmp_path) == [] and temps(target.parent) == []
    # negative control: atomicwrites replaces the link itself with a regular file
    with atomic_write(str(link), overwrite=True) as f:
        f.write("9")
    assert not link.is_symlink()
    assert target.read_text() == "5"


def test_relative_symlink_chain(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text("1")
    (tmp_path / "a").symlink_to("d.json")
    (tmp_path / "b").symlink_to("a")
    store = lockstore.open(tmp_path / "b", default=0, durable=False)
    with store.transaction() as s:
        s.value = 2
    assert (tmp_path / "b").is_symlink() and (tmp_path / "a").is_symlink()
    assert (tmp_path / "d.json").read_text() == "2"


def test_dangling_symlink_creates_target(tmp_path: Path) -> None:
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "target.json")
    store = lockstore.open(link, default=0, durable=False)
    store.value = 3
    store.commit()
    assert link.is_symlink()
    assert (tmp_path / "target.json").read_text() == "3"


# ----------------------------------------------------------------------------------- guarantee 4
def strace_commit(tmp_path: Path, inject: str | None, *, durable: bool = True) -> tuple[dict[str, Any], int]:
    """Commit in a child under strace; return the child's outcome and how many fsync calls it made."""
    assert STRACE is not None
    log = tmp_path / "strace.log"
    prefix = [STRACE, "-f", "-qq", "-o", str(log), "-e", "trace=fsync,fdatasync"]
    if inject:
        prefix += ["-e", f"inject=fsync:{inject}"]
    out = run("commit", str(tmp_path / "d.json"), json.dumps({"v": "new"}), "1" if durable else "0", prefix=prefix)
    calls = sum(1 for line in log.read_text().splitlines() if "fsync(" in line)
    return out, calls


def prepare(tmp_path: Path) -> tuple[bytes, int, int]:
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"v": "old"}))
    return snapshot(p)


@needs_strace
def test_fsync_harness_control(tmp_path: Path) -> None:
    # negative control for the harness: without injection the same child succeeds with two fsyncs
    prepare(tmp_path)
    out, calls = strace_commit(tmp_path, None)
    assert out == {"ok": True}
    assert calls == 2
    assert json.loads((tmp_path / "d.json").read_bytes()) == {"v": "new"}


@needs_strace
def test_fsync_error_before_rename_aborts(tmp_path: Path) -> None:
    before = prepare(tmp_path)
    out, calls = strace_commit(tmp_path, "error=EIO:when=1")
    assert out["ok"] is False
    assert "OSError" in out["mro"]
    assert "DurabilityUnknownError" not in out["mro"]
    assert "Input/output error" in out["str"]
    assert calls == 1  # never retried
    assert snapshot(tmp_path / "d.json") == before
    assert temps(tmp_path) == []
    assert out["open"] == []  # the temp file's descriptor closed with the failure, not at the store's next use


@needs_strace
def test_directory_fsync_error_after_rename(tmp_path: Path) -> None:
    prepare(tmp_path)
    out, calls = strace_commit(tmp_path, "error=EIO:when=2")
    assert out["ok"] is False
    assert out["type"] == "DurabilityUnknownError"
    assert "OSError" in out["mro"] and "LockstoreError" in out["mro"]
    assert "in place" in out["str"]
    assert "d.json" in out["str"]
    assert calls == 2  # never retried
    assert json.loads((tmp_path / "d.json").read_bytes()) == {"v": "new"}  # the new value is in place
    assert temps(tmp_path) == []


@needs_strace
def test_directory_fsync_einval_tolerated(tmp_path: Path) -> None:
    prepare(tmp_path)
    out, calls = strace_commit(tmp_path, "error=EINVAL:when=2")
    assert out == {"ok": True}
    assert calls == 2
    assert json.loads((tmp_path / "d.json").read_bytes()) == {"v": "new"}


@needs_strace
def test_file_fsync_einval_not_tolerated(tmp_path: Path) -> None:
    before = prepare(tmp_path)
    out, _ = strace_commit(tmp_path, "error=EINVAL:when=1")
    assert out["ok"] is False
    assert snapshot(tmp_path / "d.json") == before
    assert temps(tmp_path) == []


@needs_strace
def test_not_durable_makes_no_fsync(tmp_path: Path) -> None:
    prepare(tmp_path)
    out, calls = strace_commit(tmp_path, "error=EIO:when=1", durable=False)
    assert out == {"ok": True}
    assert calls == 0


def test_long_multibyte_file_name(tmp_path: Path) -> None:
    # a legal name of 253 bytes (NAME_MAX is 255) made mostly of 4-byte characters
    name = "\U0001f600" * 62 + ".json"
    assert len(os.fsencode(name)) == 253
    p = tmp_path / name
    p.write_text("0")
    store = lockstore.open(p, default=0, lock=False, durable=False)
    store.value = 1
    store.commit()
    assert lockstore.read(p) == 1
    assert temps(tmp_path) == []


def test_negative_control_in_place_write_tears_the_file(tmp_path: Path) -> None:
    # what the atomic write protects against: a failing encoder halfway through an in-place write
    p = tmp_path / "d.json"
    p.write_text('{"a": 1}')
    with pytest.raises(TypeError), open(p, "w") as f:
        json.dump({"a": 2, "b": object()}, f)
    assert p.read_text() == '{"a": 2, "b": '  # neither old nor new: the check in the tests above can fail
