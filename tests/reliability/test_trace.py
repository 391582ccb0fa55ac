"""Guarantees 2 and 4 seen through strace: the durability protocol of one transaction and one commit, and a
SIGKILL at every write / fsync / rename / unlink / flock / close / openat of an operation (SQLite-style crash
points: K = 1, 2, ... until the operation completes)."""

from __future__ import annotations

import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import lockstore

from ._harness import Attached, add, bump, check_value, make_value, need_tool, report, temp_files

_LINE = re.compile(r"^(?:\[pid\s+)?(\d+)\]?\s+(\w+)\((.*)\)\s+=\s+(-?\d+|\?)")
_FD = re.compile(r"^(-?\d+|AT_FDCWD)<([^>]*)>")
_STR = re.compile(r'"((?:[^"\\]|\\.)*)"')
TRACED = "trace=openat,open,creat,write,pwrite64,writev,fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat," \
         "flock,ftruncate,truncate,newfstatat,statx,stat,lstat,read,pread64"


@dataclass
class Call:
    name: str
    fd_path: str | None  # the first argument's descriptor path (strace -y)
    strings: list[str]  # quoted path arguments
    args: str
    ret: int


def parse(trace: str) -> list[Call]:
    calls = []
    for line in trace.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        _, name, args, ret = m.groups()
        fd = _FD.match(args)
        calls.append(Call(name, fd.group(2) if fd else None, _STR.findall(args), args,
                          int(ret) if ret != "?" else -1))
    return calls


def check_protocol(calls: list[Call], data: str, *, reload: bool) -> list[str]:
    """The durability protocol of one locked write of ``data``; return the violations."""
    directory, name = os.path.split(data)
    lock = data + ".lock"
    temp_re = re.compile(re.escape(os.path.join(directory, "." + name)) + r"\.[0-9a-f]+\.tmp$")
    v: list[str] = []

    def first(pred: object, after: int = -1) -> int:
        for i, c in enumerate(calls):
            if i > after and pred(c):  # type: ignore[operator]
                return i
        return -1

    locked = first(lambda c: c.name == "flock" and c.fd_path == lock and "LOCK_EX" in c.args and c.ret == 0)
    unlocked = first(lambda c: c.name == "flock" and c.fd_path == lock and "LOCK_UN" in c.args, locked)
    opened = first(lambda c: c.name in ("openat", "open", "creat") and any(temp_re.match(s) for s in c.strings))
    if locked < 0:
        return ["the lock was never taken"]
    if unlocked < 0:
        v.append("the lock was never released")
        unlocked = len(calls)
    if opened < 0:
        return [*v, "no temp file was created beside the data file"]
    temp = next(s for s in calls[opened].strings if temp_re.match(s))
    if not ("O_CREAT" in calls[opened].args and "O_EXCL" in calls[opened].args):
        v.append(f"temp file opened without O_CREAT|O_EXCL: {calls[opened].args}")
    if not locked < opened < unlocked:
        v.append("temp file created outside the lock")
    looks = ("openat", "newfstatat", "statx", "stat", "lstat")
    if reload and not any(c.name in looks and data in (c.fd_path, *c.strings) for c in calls[locked:opened]):
        v.append("the data file was not re-read (or even stat'ed) under the lock before the write")
    writes = [i for i, c in enumerate(calls) if c.name in ("write", "pwrite64", "writev") and c.fd_path == temp]
    syncs = [i for i, c in enumerate(calls) if c.name in ("fsync", "fdatasync") and c.fd_path == temp]
    renames = [i for i, c in enumerate(calls) if c.name.startswith("rename") and c.strings[:2] == [temp, data]]
    dsyncs = [i for i, c in enumerate(calls) if c.name in ("fsync", "fdatasync") and c.fd_path == directory]
    if not writes:
        v.append("nothing was written to the temp file")
    if not syncs:
        v.append("the temp file was never fsynced")
    elif writes and max(writes) > min(syncs):
        v.append("a write to the temp file came after its fsync")
    if len(renames) != 1:
        v.append(f"expected one rename of the temp file onto the data file, saw {len(renames)}")
    else:
        r = renames[0]
        if syncs and r < max(syncs):
            v.append("rename before the temp file's fsync")
        if not r < unlocked:
            v.append("rename outside the lock")
        if not [d for d in dsyncs if r < d < unlocked]:
            v.append("no directory fsync between the rename and the unlock")
    for c in calls:
        on_data = data in (c.fd_path, *c.strings[:1])
        if c.name in ("write", "pwrite64", "writev", "ftruncate", "truncate") and on_data:
            v.append(f"in-place {c.name} of the data file")
        if c.name in ("openat", "open", "creat") and c.strings[:1] == [data] and \
                re.search(r"O_WRONLY|O_RDWR|O_TRUNC|O_CREAT", c.args):
            v.append(f"data file opened for writing: {c.args}")
        if c.name in ("unlink", "unlinkat") and data in c.strings:
            v.append("the data file was unlinked")
    return v


def trace_op(tmp_path: Path, kind: str, *, patch: str | None = None, eatmydata: bool = False) -> list[str]:
    """Trace one ``kind`` operation of a child (the file changed by another process after it opened the store)."""
    data = tmp_path / "store.json"
    out = tmp_path / f"{kind}.trace"
    store = lockstore.open(data, default=make_value(0))
    store.value = make_value(1)
    store.commit()
    child = Attached(["op", str(data), kind, *([patch] if patch else [])],
                     ["-o", str(out), "-y", "-e", TRACED, "-e", "signal=none"], eatmydata=eatmydata)
    with store.transaction() as s:  # another process changes the file after the child loaded it
        s.value = bump(s.value)
    code, stdout, err = child.go()
    assert code == 0 and stdout.strip() == "ok", (code, stdout, err)
    final = check_value(lockstore.read(data))
    violations = check_protocol(parse(out.read_text()), str(data), reload=kind == "transaction")
    if kind == "transaction" and final != 3:
        violations.append(f"the transaction did not build on the other process's value: {final} != 3")
    return violations


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["transaction", "commit"])
def test_durability_protocol(tmp_path: Path, kind: str) -> None:
    need_tool("strace")
    violations = trace_op(tmp_path, kind)
    add("transactions checked")
    report(violations)
    assert violations == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("control", ["eatmydata", "--nofsync", "--inplace"])
@pytest.mark.parametrize("kind", ["transaction", "commit"])
def test_negative_control_protocol_check_fails(tmp_path: Path, kind: str, control: str) -> None:
    """Without fsync (eatmydata, or os.fsync patched in the child) or with an in-place writer the check must fail."""
    need_tool("strace")
    if control == "eatmydata":
        violations = trace_op(tmp_path, kind, eatmydata=True)
    else:
        violations = trace_op(tmp_path, kind, patch=control)
    report(violations, negative=True)
    assert violations, f"the protocol check passed a writer with {control}"
    if control != "--inplace":
        assert any("fsync" in v for v in violations), violations


# ----------------------------------------------------------------------------------------------- crash points
CRASH_SYSCALLS = ["write", "fsync", "rename", "unlink", "flock", "close", "openat"]
MORE_SYSCALLS = ["pwrite64", "ftruncate", "newfstatat", "read", "fcntl", "getdents64"]


def _plant_leftovers(data: Path) -> None:
    """What a killed writer leaves: a temp file beside the data file and its holder record in the lock file."""
    (data.parent / f".{data.name}.deadbeef.tmp").write_bytes(b'{"torn": ')
    with open(f"{data}.lock", "wb") as f:
        f.write(b'{"pid": 999999, "start": 1.0, "host": "gone", "cmd": ["killed"], "at": 1.0}\n')


def _lock_free(data: Path) -> bool:
    fd = os.open(f"{data}.lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def crash_points(tmp_path: Path, kind: str, syscall: str, limit: int = 200,
                 patch: tuple[str, ...] = ()) -> tuple[int, list[str]]:
    """Kill an operation at its K-th ``syscall`` for K = 1.. until it completes; return (points, violations)."""
    data = tmp_path / f"{kind}-{syscall}.json"
    store = lockstore.open(data, default=make_value(0))
    store.commit()
    before = 0
    violations: list[str] = []
    for k in range(1, limit + 1):
        _plant_leftovers(data)
        child = Attached(["op", str(data), kind, *patch],
                         ["-o", "/dev/null", "-e", f"trace={syscall}",
                          "-e", f"inject={syscall}:signal=SIGKILL:when={k}"])
        code, out, err = child.go()
        done = out.strip() == "ok"
        if not done and code != -9:
            violations.append(f"{syscall}#{k}: child neither completed nor was killed: {code} {out} {err[-300:]}")
            break
        try:
            now = check_value(lockstore.read(data))
        except (ValueError, OSError) as exc:
            violations.append(f"{kind} killed at {syscall}#{k}: {exc!r}")
            data.unlink()
            lockstore.open(data, default=make_value(before)).commit()
            if done:
                return k, violations
            continue
        if now not in ((before + 1,) if done else (before, before + 1)):
            violations.append(f"{kind} killed at {syscall}#{k}: file holds {now}, before {before}, done {done}")
        if not _lock_free(data):
            violations.append(f"{kind} killed at {syscall}#{k}: lock still held")
        # The next writer (this process) must sweep the leftovers of the killed one.
        with lockstore.open(data, default=make_value(before)).transaction(timeout=0) as s:
            s.value = bump(s.value)
        before = check_value(s.value)
        if temp_files(tmp_path):
            violations.append(f"{kind} killed at {syscall}#{k}: temp files left after the next writer")
        if done:
            return k, violations
    return limit, [*violations, f"{kind} never completed within {limit} {syscall} calls"]


def _crash_test(tmp_path: Path, kind: str, syscalls: list[str]) -> None:
    need_tool("strace")
    all_violations: list[str] = []
    for syscall in syscalls:
        points, violations = crash_points(tmp_path, kind, syscall)
        add("crash points enumerated", points)
        add("kills", points - 1)
        all_violations += violations
    report(all_violations)
    assert all_violations == []


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["transaction", "commit"])
def test_crash_at_every_syscall(tmp_path: Path, kind: str) -> None:
    _crash_test(tmp_path, kind, CRASH_SYSCALLS)


@pytest.mark.stress
@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["transaction", "commit"])
def test_crash_at_every_other_syscall(tmp_path: Path, kind: str) -> None:
    _crash_test(tmp_path, kind, MORE_SYSCALLS)


@pytest.mark.timeout(120)
def test_negative_control_in_place_writer_crash_points(tmp_path: Path) -> None:
    """The crash-point harness must catch a child patched to rewrite the data file in place."""
    need_tool("strace")
    _, violations = crash_points(tmp_path, "transaction", "write", patch=("--inplace", "--pad", "4096"))
    report(violations, negative=True)
    assert any("hash" in v or "Corrupt" in v or "self-checking" in v for v in violations), violations
