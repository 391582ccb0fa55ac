"""``lockstore/_holder.py`` and issue 3's diagnostics, with real processes holding real locks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import filelock
import pytest
from _children import Child, holding, run

import lockstore
from lockstore import _holder


def own_start() -> float:
    import psutil

    return float(psutil.Process().create_time())


def fake_record(pid: int, *, start: float | None, host: str | None = None, label: str | None = None) -> bytes:
    raw: dict[str, Any] = {
        "pid": pid, "start": start, "pidns": os.readlink("/proc/self/ns/pid"),
        "host": host if host is not None else os.uname().nodename, "user": "someone",
        "cmd": ["python", "ghost.py"], "at": 1.0,
    }
    if label is not None:
        raw["label"] = label
    return (json.dumps(raw) + "\n").encode()


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True, timeout=60)
    return int(proc.stdout)


# ----------------------------------------------------------------------------------- parsing and liveness
def test_record_round_trip_is_this_process() -> None:
    h = _holder.parse(_holder.record("my-label"))
    assert h is not None
    assert h.pid == os.getpid()
    assert h.host == os.uname().nodename
    assert h.alive is True
    assert h.label == "my-label"
    assert h.cmdline
    assert abs(h.acquired_at - __import__("time").time()) < 3600
    assert cast(float, h.held_for) >= 0  # a parsed record has acquired_at, so held_for is not None


def test_parse_empty_and_garbage() -> None:
    assert _holder.parse(b"") is None
    assert _holder.parse(b"\n") is None
    assert _holder.parse(b'{"pid": 1') is None  # torn
    assert _holder.parse(b"12345\nhost\n") is None  # not ours


def test_pid_reuse_wrong_start_time_is_not_alive() -> None:
    h = _holder.parse(fake_record(os.getpid(), start=own_start() - 1000))
    assert h is not None
    assert h.alive is False
    # negative control: the right start time makes the same pid alive
    right = _holder.parse(fake_record(os.getpid(), start=own_start()))
    assert right is not None
    assert right.alive is True


def test_dead_pid_is_not_alive() -> None:
    h = _holder.parse(fake_record(dead_pid(), start=1.0))
    assert h is not None
    assert h.alive is False


def test_other_host_liveness_unknown() -> None:
    h = _holder.parse(fake_record(os.getpid(), start=own_start(), host="elsewhere.example"))
    assert h is not None
    assert h.alive is None
    assert "liveness unknown" in h.describe()


def test_other_pid_namespace_liveness_unknown() -> None:
    raw = json.loads(fake_record(os.getpid(), start=own_start()))
    raw["pidns"] = "pid:[1]"
    h = _holder.parse(json.dumps(raw).encode())
    assert h is not None
    assert h.alive is None


def test_holder_is_frozen() -> None:
    h = _holder.parse(_holder.record(None))
    assert h is not None
    with pytest.raises(AttributeError):
        h.pid = 1  # type: ignore[misc]


# ----------------------------------------------------------------------------------- real processes
def test_record_appears_while_held_and_disappears(tmp_path: Path) -> None:
    p = str(tmp_path / "d.json")
    store = lockstore.open(p, default=0)
    assert store.holder() is None
    with holding(p, "nightly-rollup", "") as child:
        h = store.holder()
        assert h is not None
        assert h.pid == child.pid
        assert h.alive is True
        assert h.label == "nightly-rollup"
        assert h.host == os.uname().nodename
        assert any(a.endswith("_children.py") for a in h.cmdline)
        assert "hold" in h.cmdline and "nightly-rollup" in h.cmdline
        with open(p + ".lock", "rb") as f:
            assert f.read().strip()
        # from another process too
        seen = run("holder", p)
        assert seen["pid"] == child.pid and seen["alive"] is True and seen["label"] == "nightly-rollup"
    assert store.holder() is None
    with open(p + ".lock", "rb") as f:
        assert not f.read(4096).strip()  # the record is blanked before the release
    assert run("holder", p) is None


def test_holder_inside_own_transaction(tmp_path: Path) -> None:
    store = lockstore.open(tmp_path / "d.json", default=0, durable=False)
    with store.transaction(label="mine"):
        h = store.holder()
        assert h is not None
        assert h.pid == os.getpid()
        assert h.label == "mine"
        assert h.alive is True
    assert store.holder() is None


def test_lock_timeout_in_second_process_names_holder(tmp_path: Path) -> None:
    p = str(tmp_path / "counter.json")
    with holding(p, "nightly-rollup") as child:
        out = run("try", p, "0.2")
    assert out["type"] == "LockTimeout"
    assert out["holder"]["pid"] == child.pid
    assert out["holder"]["alive"] is True
    assert out["holder"]["label"] == "nightly-rollup"
    assert "hold" in out["holder"]["cmdline"]
    assert out["stale"] is False
    assert out["waited"] >= 0.2
    assert out["lock_file"] == p + ".lock"
    text = out["str"]
    assert f"pid {child.pid}" in text
    assert "(alive)" in text
    assert "_children.py hold" in text
    assert "[label: nightly-rollup]" in text
    assert "counter.json" in text
    assert "deleting the lock file does not help" in text


def test_killed_holder(tmp_path: Path) -> None:
    p = str(tmp_path / "d.json")
    store = lockstore.open(p, default=0, durable=False)
    with Child("hold", p, "doomed") as child:
        child.wait_ready()
        assert store.holder() is not None
        os.kill(child.pid, signal.SIGKILL)
        child.proc.wait(60)
    record = _holder.parse(Path(p + ".lock").read_bytes())
    assert record is not None  # the OS freed the lock, the record remains
    assert record.pid == child.pid
    assert record.alive is False
    assert store.holder() is None  # the lock is free
    with store.transaction(timeout=0) as s:
        s.value += 1
    assert lockstore.read(p) == 1  # the killed holder's change was never written
    assert not Path(p + ".lock").read_bytes()[:4096].strip()  # the record (its 4 KiB) is blanked before release


def test_stale_record_while_lock_held_by_a_process_without_record(tmp_path: Path) -> None:
    p = str(tmp_path / "d.json")
    lock_file = p + ".lock"
    ghost = dead_pid()
    with open(lock_file, "wb") as f:
        f.write(fake_record(ghost, start=1.0, label="ghost"))
    with Child("flock", lock_file) as child:
        child.wait_ready()
        store = lockstore.open(p, default=0, durable=False)
        h = store.holder()
        assert h is not None
        assert h.pid == child.pid  # the kernel's holder, never the dead pid of the stale record
        assert h.recorded is False and h.alive is True and h.label is None and h.held_for is None
        with pytest.raises(lockstore.LockTimeout) as info, store.transaction(0.1):
            pass
        child.release()
    exc = info.value
    assert exc.holder is not None and exc.holder.pid == child.pid
    assert exc.holder_stale is True
    assert f"pid {child.pid}" in str(exc) and "stale" in str(exc)
    assert str(ghost) not in str(exc)
    # once the raw holder is gone, the next transaction succeeds and replaces the stale record
    with store.transaction(timeout=0) as s:
        s.value = 1
    assert not Path(lock_file).read_bytes()[:4096].strip()  # the record (its 4 KiB) is blanked before release


def test_lock_held_without_any_record(tmp_path: Path) -> None:
    p = str(tmp_path / "d.json")
    with Child("flock", p + ".lock") as child:
        child.wait_ready()
        store = lockstore.open(p, default=0, durable=False)
        h = store.holder()
        assert h is not None and h.pid == child.pid and h.recorded is False  # named from the OS
        with pytest.raises(lockstore.LockTimeout) as info, store.transaction(0.05):
            pass
        child.release()
    assert info.value.holder is not None and info.value.holder.pid == child.pid
    assert "no record" in str(info.value)
    assert store.holder() is None


def test_pid_reuse_live_process_is_not_the_holder(tmp_path: Path) -> None:
    # the lock is held by a live process; the record carries that live pid but another start time: it was written
    # by an earlier process with the same pid, so the holder is named from the OS, not from the record
    p = str(tmp_path / "d.json")
    lock_file = p + ".lock"
    with Child("flock", lock_file) as child:
        child.wait_ready()
        with open(lock_file, "wb") as f:
            f.write(fake_record(child.pid, start=1.0, label="old incarnation"))
        h = lockstore.open(p, default=0).holder()
        assert h is not None
        assert h.pid == child.pid
        assert h.recorded is False and h.label is None
        child.release()


def test_other_host_record_is_shown_as_unknown(tmp_path: Path) -> None:
    # A record written on another host (a network file system): this host's kernel cannot see that holder, so the
    # record is all there is; it is shown with liveness unknown and never broken.
    p = str(tmp_path / "d.json")
    lock_file = p + ".lock"
    with open(lock_file, "wb") as f:
        f.write(fake_record(12345, start=1.0, host="elsewhere.example"))
    h = lockstore.open(p, default=0, durable=False).holder()
    assert h is not None and h.host == "elsewhere.example" and h.alive is None
    # and while a local process holds the flock, the local holder is the one named
    with Child("flock", lock_file) as child:
        child.wait_ready()
        store = lockstore.open(p, default=0, durable=False)
        with pytest.raises(lockstore.LockTimeout) as info, store.transaction(0.05):
            pass
        assert info.value.holder is not None and info.value.holder.pid == child.pid
        child.release()


# ----------------------------------------------------------------------------------- soft locks
def test_soft_lock_holder_and_timeout(tmp_path: Path) -> None:
    p = str(tmp_path / "d.json")
    store = lockstore.open(p, default=0, durable=False, lock=filelock.SoftFileLock(p + ".soft"))
    with store.transaction() as s:
        s.value += 1
        h = store.holder()
        assert h is not None
        assert h.pid == os.getpid()
        assert h.alive is True
    assert store.holder() is None
    with holding(p, "soft-holder", "soft") as child:
        h = store.holder()
        assert h is not None
        assert h.pid == child.pid
        assert h.alive is True
        assert h.host == socket.gethostname() or h.host == os.uname().nodename
        out = run("try", p, "0.1", "soft")
        assert out["type"] == "LockTimeout"
        assert out["holder"]["pid"] == child.pid
        assert f"pid {child.pid}" in out["str"]
    with store.transaction(timeout=0) as s:
        assert s.value == 2
        s.value += 1
    assert lockstore.read(p) == 3


def test_soft_lock_killed_holder_does_not_block(tmp_path: Path) -> None:
    p = str(tmp_path / "d.json")
    store = lockstore.open(p, default=0, durable=False, lock=filelock.SoftFileLock(p + ".soft"))
    with Child("hold", p, "doomed", "soft") as child:
        child.wait_ready()
        os.kill(child.pid, signal.SIGKILL)
        child.proc.wait(60)
    assert os.path.exists(p + ".soft")  # the marker remains
    h = store.holder()
    assert h is not None and h.alive is False
    with store.transaction(timeout=30) as s:  # filelock reclaims a marker whose owner is provably dead
        s.value += 1
    assert lockstore.read(p) == 1


def test_long_label_still_names_holder(tmp_path: Path) -> None:
    store = lockstore.open(tmp_path / "d.json", default=0, durable=False)
    label = "rollup " * 1000
    with store.transaction(label=label):
        h = store.holder()
        assert h is not None, "a held lock was reported free because its record is long"
        assert h.pid == os.getpid()
        assert h.label is not None and h.label.startswith("rollup")


def test_soft_lock_holder_on_other_host_is_never_broken(tmp_path: Path) -> None:
    p = str(tmp_path / "d.json")
    marker = Path(p + ".soft")
    with Child("hold", p, "far-away", "soft") as child:
        child.wait_ready()
        os.kill(child.pid, signal.SIGKILL)
        child.proc.wait(60)
    lines = marker.read_text().splitlines()  # filelock's marker: pid, host, token
    assert lines[0] == str(child.pid)
    lines[1] = "elsewhere.example"
    far = "\n".join(lines)
    marker.write_text(far + "\n")
    store = lockstore.open(p, default=0, durable=False, lock=filelock.SoftFileLock(p + ".soft"))
    h = store.holder()
    assert h is not None
    assert h.pid == child.pid
    assert h.alive is None
    with pytest.raises(lockstore.LockTimeout) as info, store.transaction(0.3):
        pass
    assert info.value.holder is not None and info.value.holder.alive is None
    assert marker.read_text() == far + "\n"  # never broken automatically


def test_long_command_line_is_shortened(tmp_path: Path) -> None:
    p = str(tmp_path / "d.json")
    padding = ["x" * 500, "y" * 500]
    with holding(p, "short", "", *padding) as child:
        h = lockstore.open(p).holder()
        assert h is not None
        assert h.pid == child.pid
        assert "hold" in h.cmdline
        assert sum(len(a) for a in h.cmdline) < 400  # shortened, not 1000+ characters
        assert h.label == "short"


def test_a_record_of_wide_characters_stays_within_its_4_kib_and_spares_the_statistics(tmp_path: Path) -> None:
    # Labels and command lines are cut by characters, but JSON writes a character outside the BMP as 12 bytes: a
    # holder with 200 of them in its label and its command line wrote a record past 4 KiB, over the statistics
    # area, which a killed holder then left torn (the statistics started afresh).
    import subprocess
    import sys

    path = str(tmp_path / "d.json")
    store = lockstore.open(path, default=0, durable=False)
    for _ in range(5):
        with store.transaction() as s:
            s.value += 1
    wide = "\U0001f600" * 250
    code = (f"#{wide}\nimport sys, lockstore\ns = lockstore.open(sys.argv[1], default=0, durable=False)\n"
            "with s.transaction(label=sys.argv[2]):\n    print('ready', flush=True)\n    sys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", code, path, wide], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
        record = Path(path + ".lock").read_bytes().split(b"\n", 1)[0]
        assert len(record) < 4096, len(record)
        stats = store.stats()
        assert stats is not None and stats.acquisitions == 5, stats
        holder = store.holder()
        assert holder is not None and holder.pid == child.pid
        assert holder.label is not None and holder.label.startswith("\U0001f600" * 10) and holder.label.endswith("...")
    finally:
        child.kill()  # killed while it holds: its record stays, as a killed holder's does
        child.wait()
        child.stdin.close()
        child.stdout.close()
    with store.transaction() as s:
        s.value += 1
    stats = store.stats()
    assert stats is not None and stats.acquisitions == 6, stats
