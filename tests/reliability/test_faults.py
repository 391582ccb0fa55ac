"""Guarantee: a failing disk gives the documented error and loses nothing.

Each fault checks: the documented error (an OSError subclass naming the path, or DurabilityUnknownError once the
new file is renamed in place); the data file byte-identical with the same inode (or the new value after a
DurabilityUnknownError); no temp file left; the lock released (holder() is None and another process can take
it); the store usable again once the fault is gone."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import lockstore

from ._harness import (
    Attached,
    add,
    bind_ro,
    bump,
    check_value,
    make_value,
    need_root,
    need_tool,
    report,
    run_child,
    temp_files,
    tmpfs,
)


@dataclass
class Outcome:
    ok: bool
    cls: str = ""
    errno: int | None = None
    is_os: bool = False
    filename: str | None = None

    @classmethod
    def from_child(cls, out: str) -> Outcome:
        words = out.split()
        if words[:1] == ["ok"]:
            return cls(True)
        assert words[:1] == ["error"], out
        no = None if words[2] == "None" else int(words[2])
        return cls(False, words[1], no, words[3] == "1", None if words[4] == "None" else " ".join(words[4:]))

    @classmethod
    def from_exc(cls, exc: BaseException | None) -> Outcome:
        if exc is None:
            return cls(True)
        name = getattr(exc, "filename", None) or getattr(exc, "path", None)
        return cls(False, type(exc).__name__, getattr(exc, "errno", None), isinstance(exc, OSError),
                   None if name is None else str(name))


@dataclass
class Snapshot:
    content: bytes | None
    ino: int | None
    n: int | None

    @classmethod
    def of(cls, data: Path) -> Snapshot:
        try:
            content = data.read_bytes()
        except FileNotFoundError:
            return cls(None, None, None)
        return cls(content, data.stat().st_ino, check_value(lockstore.read(data)))


def other_process_can_lock(data: Path) -> bool:
    return run_child("trylock", str(data)).strip() == "free"


def check_fault(data: Path, before: Snapshot, outcome: Outcome, *, site: str, lock_from_child: bool = True,
                expect_error: bool = True) -> list[str]:
    """The invariants every fault must keep; return the violations (``site`` labels them)."""
    v: list[str] = []
    add("fault x site combinations")
    after = Snapshot.of(data)
    if outcome.ok:
        if expect_error:
            v.append(f"{site}: the operation reported success under the fault")
        if after.n != (before.n or 0) + 1:
            v.append(f"{site}: reported success but the file holds {after.n}, not {(before.n or 0) + 1}")
    elif outcome.cls == "DurabilityUnknownError":
        if after.n != (before.n or 0) + 1:
            v.append(f"{site}: DurabilityUnknownError but the new value is not in place ({after.n})")
    else:
        if not outcome.is_os:
            v.append(f"{site}: {outcome.cls} is not an OSError")
        allowed = {str(data), f"{data}.lock", str(data.parent)}
        if outcome.filename not in allowed and not (outcome.filename or "").startswith(f"{data.parent}/.{data.name}."):
            v.append(f"{site}: {outcome.cls}(errno {outcome.errno}) names {outcome.filename!r}, not the store's path")
        if (after.content, after.ino) != (before.content, before.ino):
            v.append(f"{site}: {outcome.cls} was raised but the data file changed "
                     f"(n {before.n} -> {after.n}, inode {before.ino} -> {after.ino})")
    if data.parent.exists() and temp_files(data.parent):
        v.append(f"{site}: temp files left: {temp_files(data.parent)}")
    if Path(f"{data}.lock").is_file():
        holder = lockstore.open(data, default=make_value(0), lock=f"{data}.lock", on_corrupt="raise").holder() \
            if after.content is not None or before.content is None else None
        if holder is not None:
            v.append(f"{site}: holder() still reports {holder}")
        if lock_from_child and not other_process_can_lock(data):
            v.append(f"{site}: another process cannot take the lock")
    return v


def usable(data: Path, **kwargs: Any) -> list[str]:
    """After the fault is gone, a transaction works and builds on the old value."""
    before = Snapshot.of(data)
    store = lockstore.open(data, default=make_value(0), **kwargs)
    with store.transaction(timeout=5) as s:
        s.value = bump(s.value)
    after = Snapshot.of(data)
    return [] if after.n == (before.n or 0) + 1 else [f"store not usable after the fault: {before.n} -> {after.n}"]


def attempt(fn: Callable[[], None]) -> Outcome:
    try:
        fn()
    except Exception as exc:
        return Outcome.from_exc(exc)
    return Outcome(True)


def transact(data: Path, **kwargs: Any) -> Callable[[], None]:
    def run() -> None:
        store = lockstore.open(data, default=make_value(0), timeout=5, **kwargs)
        with store.transaction() as s:
            s.value = bump(s.value, 64 * 1024)

    return run


def _seed(data: Path) -> None:
    store = lockstore.open(data, default=make_value(0))
    store.value = make_value(1)
    store.commit()
    store.close()


# ----------------------------------------------------------------------------------------------- strace injection
def inject(tmp_path: Path, kind: str, syscall: str, err: str, k: int,
           patch: tuple[str, ...] = ()) -> tuple[Outcome, bool, list[str]]:
    """Fail the K-th ``syscall`` of one operation of a child with ``err``.

    Return the outcome, whether the fault was hit (the operation made at least K such calls), and the violations.
    """
    data = tmp_path / f"{syscall}-{err}.json"
    trace = tmp_path / f"{syscall}-{err}.trace"
    if not data.exists():
        _seed(data)
    before = Snapshot.of(data)
    child = Attached(["op", str(data), kind, *patch],
                     ["-o", str(trace), "-e", f"trace={syscall}", "-e", f"inject={syscall}:error={err}:when={k}"])
    code, out, stderr = child.go()
    assert out.strip(), (code, out, stderr)  # the report is written before any exit-time failure
    hit = "(INJECTED)" in trace.read_text()
    outcome = Outcome.from_child(out)
    site = f"{kind}: {syscall}#{k} fails with {err}"
    # An fsync error must always reach the caller; other failures (e.g. in the sweep of leftovers) may be absorbed
    # as long as the result is right.
    return outcome, hit, check_fault(data, before, outcome, site=site, expect_error=hit and syscall == "fsync")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("err", ["EIO", "ENOSPC"])
def test_fsync_error_is_reported_never_retried(tmp_path: Path, err: str) -> None:
    """fsync #1 (the temp file) aborts the write; fsync #2 (the directory) raises DurabilityUnknownError."""
    need_tool("strace")
    violations: list[str] = []
    first, _, v1 = inject(tmp_path, "transaction", "fsync", err, 1)
    second, _, v2 = inject(tmp_path, "transaction", "fsync", err, 2)
    violations += v1 + v2
    if first.ok or first.cls == "DurabilityUnknownError" or first.errno != getattr(errno, err):
        violations.append(f"temp fsync {err}: expected an OSError with errno {err}, got {first}")
    if second.cls != "DurabilityUnknownError":
        violations.append(f"directory fsync {err}: expected DurabilityUnknownError, got {second}")
    violations += usable(tmp_path / f"fsync-{err}.json")
    report(violations)
    assert violations == []


@pytest.mark.timeout(60)
def test_negative_control_writer_without_fsync_is_caught(tmp_path: Path) -> None:
    """A child whose os.fsync is patched away never meets the injected fsync error: the check must object."""
    need_tool("strace")
    first, hit, violations = inject(tmp_path, "transaction", "fsync", "EIO", 1, patch=("--nofsync",))
    if first.ok or first.errno != errno.EIO:
        violations.append(f"temp fsync EIO: expected an OSError with errno EIO, got {first}")
    report(violations, negative=True)
    assert violations and not hit


NTH_SYSCALLS = ["openat", "write", "fsync", "rename", "close", "flock", "pwrite64", "ftruncate", "newfstatat",
                "read", "fcntl", "getdents64"]


@pytest.mark.stress
@pytest.mark.timeout(280)
@pytest.mark.parametrize("kind", ["transaction", "commit"])
def test_nth_call_fails_until_operation_completes(tmp_path: Path, kind: str) -> None:
    """SQLite's fault loop: fail the N-th call of each syscall (EIO, ENOSPC), N = 1.. until the operation completes
    with no injected error reaching it."""
    need_tool("strace")
    violations: list[str] = []
    for syscall in NTH_SYSCALLS:
        for err in ["EIO", "ENOSPC"] if syscall in ("write", "fsync", "pwrite64", "openat") else ["EIO"]:
            for k in range(1, 60):
                _, hit, v = inject(tmp_path, kind, syscall, err, k)
                violations += v
                if not hit:
                    break  # the operation makes fewer than K such calls: it completed untouched
    report(violations)
    assert violations == [], "\n".join(violations)


# ----------------------------------------------------------------------------------------------- no root needed
@pytest.mark.timeout(60)
def test_missing_directory(tmp_path: Path) -> None:
    data = tmp_path / "missing" / "store.json"
    store = lockstore.open(data, default=make_value(0))
    outcome = attempt(lambda: store.commit())
    violations = check_fault(data, Snapshot(None, None, None), outcome, site="missing directory: commit",
                             lock_from_child=False)
    outcome = attempt(transact(data))
    violations += check_fault(data, Snapshot(None, None, None), outcome, site="missing directory: transaction",
                              lock_from_child=False)
    if outcome.cls != "FileNotFoundError":
        violations.append(f"missing directory: expected FileNotFoundError, got {outcome}")
    if data.parent.exists():
        violations.append("the missing directory was created")
    data.parent.mkdir()
    violations += usable(data)
    report(violations)
    assert violations == []


@pytest.mark.timeout(60)
def test_lock_path_is_a_directory(tmp_path: Path) -> None:
    data = tmp_path / "store.json"
    # Seeded without a lock: this process would otherwise keep a descriptor on the sidecar it replaces below.
    seed = lockstore.open(data, lock=False)
    seed.value = make_value(1)
    seed.commit()
    Path(f"{data}.lock").mkdir()
    before = Snapshot.of(data)
    outcome = attempt(transact(data))
    violations = check_fault(data, before, outcome, site="lock path is a directory", lock_from_child=False)
    if outcome.cls != "IsADirectoryError":
        violations.append(f"lock path is a directory: expected IsADirectoryError, got {outcome}")
    Path(f"{data}.lock").rmdir()
    violations += usable(data)
    report(violations)
    assert violations == []


@pytest.mark.timeout(60)
def test_short_write_then_file_size_limit(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes a real short write and then EFBIG: the commit fails and the old file stays."""
    data = tmp_path / "store.json"
    _seed(data)
    before = Snapshot.of(data)
    outcome = Outcome.from_child(run_child("fsize", str(data), "8192"))
    violations = check_fault(data, before, outcome, site="short write then EFBIG")
    if outcome.errno != errno.EFBIG:
        violations.append(f"expected EFBIG, got {outcome}")
    violations += usable(data)
    report(violations)
    assert violations == []


@pytest.mark.timeout(60)
def test_short_writes_are_completed(tmp_path: Path) -> None:
    """os.write that writes at most 7 bytes per call (real partial writes): the value still lands whole."""
    data = tmp_path / "store.json"
    _seed(data)
    out = run_child("shortwrites", str(data)).split()
    add("fault x site combinations")
    violations = [] if out[0] == "ok" and int(out[1]) > 100 else [f"short writes: {out}"]
    try:
        if check_value(lockstore.read(data)) != 2:
            violations.append("short writes: the value is not the new one")
    except ValueError as exc:
        violations.append(f"short writes: {exc}")
    report(violations)
    assert violations == []


# ----------------------------------------------------------------------------------------------- root tier
@pytest.mark.root
@pytest.mark.timeout(60)
@pytest.mark.parametrize("room", [0, 8192], ids=["full-at-lock", "full-at-write"])
def test_disk_full(tmp_path: Path, room: int) -> None:
    with tmpfs(tmp_path / "mnt", "size=1m") as mnt:
        data = mnt / "store.json"
        _seed(data)
        filler = mnt / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        os.truncate(filler, max(0, filler.stat().st_size - room))
        before = Snapshot.of(data)
        outcome = attempt(transact(data))
        violations = check_fault(data, before, outcome, site=f"disk full ({room} bytes free)")
        if outcome.errno != errno.ENOSPC:
            violations.append(f"disk full: expected ENOSPC, got {outcome}")
        filler.unlink()
        violations += usable(data)
    report(violations)
    assert violations == []


@pytest.mark.root
@pytest.mark.timeout(60)
def test_inodes_exhausted(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "size=4m,nr_inodes=16") as mnt:
        data = mnt / "store.json"
        _seed(data)
        fillers = []
        try:
            for i in range(100):
                (mnt / f"f{i}").touch()
                fillers.append(mnt / f"f{i}")
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        before = Snapshot.of(data)
        outcome = attempt(transact(data))
        violations = check_fault(data, before, outcome, site="inodes exhausted")
        if outcome.errno != errno.ENOSPC:
            violations.append(f"inodes exhausted: expected ENOSPC, got {outcome}")
        for f in fillers:
            f.unlink()
        violations += usable(data)
    report(violations)
    assert violations == []


@pytest.mark.root
@pytest.mark.timeout(60)
@pytest.mark.parametrize("lock_elsewhere", [False, True], ids=["lock-on-ro", "lock-writable"])
def test_read_only_file_system(tmp_path: Path, lock_elsewhere: bool) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _seed(src / "store.json")
    with bind_ro(src, tmp_path / "ro") as ro:
        data = ro / "store.json"
        kwargs: dict[str, object] = {"lock": str(tmp_path / "store.lock")} if lock_elsewhere else {}
        before = Snapshot.of(data)
        outcome = attempt(transact(data, **kwargs))
        violations = check_fault(data, before, outcome, site=f"EROFS ({'lock writable' if lock_elsewhere else 'all'})",
                                 lock_from_child=not lock_elsewhere)
        if outcome.errno != errno.EROFS:
            violations.append(f"EROFS: expected EROFS, got {outcome}")
        if lockstore.read(data) != lockstore.read(src / "store.json"):
            violations.append("EROFS: the read-only view disagrees with the source")
    violations += usable(src / "store.json")
    report(violations)
    assert violations == []


@pytest.mark.root
@pytest.mark.timeout(60)
def test_permission_denied_as_nobody() -> None:
    """Root ignores mode bits, so the child drops to nobody. The directory is a fresh 0755 one under the system
    temp dir (not tmp_path: pytest makes its base directory 0700, which nobody cannot even traverse)."""
    need_root()
    top = Path(tempfile.mkdtemp(prefix="lockstore-perm-"))
    try:
        top.chmod(0o755)
        data = top / "store.json"
        _seed(data)
        before = Snapshot.of(data)
        outcome = Outcome.from_child(run_child("nobody", str(data)))
        violations = check_fault(data, before, outcome, site="permission denied (nobody)")
        if outcome.cls != "PermissionError":
            violations.append(f"permission denied: expected PermissionError, got {outcome}")
        violations += usable(data)
    finally:
        shutil.rmtree(top)
    report(violations)
    assert violations == []


@pytest.mark.timeout(60)
def test_negative_control_fault_check_catches_a_changed_file(tmp_path: Path) -> None:
    """check_fault must flag an error raised after the data file changed, and a leftover temp file."""
    data = tmp_path / "store.json"
    _seed(data)
    before = Snapshot.of(data)
    lockstore.open(data, default=make_value(0)).commit()  # a new inode, as a botched write would leave
    (tmp_path / ".store.json.0badc0de.tmp").write_bytes(b"x")
    outcome = Outcome(False, "OSError", errno.EIO, True, str(data))
    violations = check_fault(data, before, outcome, site="control", lock_from_child=False)
    report(violations, negative=True)
    assert any("changed" in v for v in violations) and any("temp" in v for v in violations), violations
