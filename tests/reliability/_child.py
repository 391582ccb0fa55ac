"""Child processes of the reliability suite, run as ``sys.executable _child.py MODE ARGS...``.

Modes
- ``loop PATH [--inplace] [--pad N]``: transaction loop; after each transaction returns, print its counter (ack).
- ``op PATH KIND [--inplace] [--nofsync] [--pad N]``: print ``ready``, wait for ``go`` on stdin, run one operation
  (KIND = transaction | commit), print ``ok`` or ``error <class> <errno> <is OSError> <filename>``.
- ``server PATH``: for each JSON value read from stdin, write it in a transaction and print ``ok``.
- ``trylock PATH``: print ``free`` when the store's sidecar lock can be taken at once, else ``busy``.
- ``nobody PATH``: drop privileges to nobody, try a transaction, print the outcome like ``op``.
- ``fsize PATH LIMIT``: commit a value larger than RLIMIT_FSIZE allows (a real short write, then EFBIG).
- ``shortwrites PATH``: every os.write writes at most 7 bytes; commit and print ``ok``.
- ``rss PATH MB FORMAT PHASE``: commit (PHASE=commit) or load (PHASE=load) an MB-sized value; print the peak
  RSS growth in bytes over the process's baseline (the value itself included).

Negative-control patches (applied in this process only): ``--inplace`` replaces the atomic writer by one that
truncates and rewrites the data file in place; ``--nofsync`` turns os.fsync into a no-op.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import resource
import signal
import sys
from typing import Any

import lockstore
import lockstore._atomic
from reliability._harness import bump, make_value


def _inplace_write(target: str, data: bytes, *, durable: bool, like: os.stat_result | None, into: list[int],
                   scratch: list[int], name: str | None = None, prefix: str | None = None) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    into.append(fd)
    view = memoryview(data)
    # Small writes make the torn window wide enough for a random kill to land in it.
    while view:
        view = view[os.write(fd, view[:512]) :]
    if durable:
        os.fsync(fd)


def _patch(argv: list[str]) -> None:
    if "--inplace" in argv:
        lockstore._atomic.write = _inplace_write  # the file storage calls it as _atomic.write: this reaches commits
    if "--nofsync" in argv:
        os.fsync = lambda fd: None


def _pad(argv: list[str]) -> int:
    return int(argv[argv.index("--pad") + 1]) if "--pad" in argv else 64


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    no = getattr(exc, "errno", None)
    name = getattr(exc, "filename", None) or getattr(exc, "path", None)
    return f"error {type(exc).__name__} {no} {int(isinstance(exc, OSError))} {name}"


def _prepare(path: str, kind: str, pad: int) -> Any:
    """Open the store (and, for a commit, compute the new value) before the traced part starts."""
    store = lockstore.open(path, default=make_value(0, pad))
    if kind == "commit":
        store.value = bump(store.value, pad)
    elif kind != "transaction":
        raise ValueError(kind)
    return store


def _run(store: Any, kind: str, pad: int) -> None:
    if kind == "transaction":
        with store.transaction() as s:
            s.value = bump(s.value, pad)
    else:
        store.commit()


def _say(line: str) -> None:
    # writev, not write: a fault loop that fails the N-th write must not fail the report itself.
    os.writev(1, [line.encode() + b"\n"])


def _one(path: str, kind: str, pad: int) -> None:
    _run(_prepare(path, kind, pad), kind, pad)


def main(argv: list[str]) -> int:
    mode, path = argv[0], argv[1]
    _patch(argv)
    if mode == "loop":
        pad = _pad(argv)
        store = lockstore.open(path, default=make_value(0, pad))
        while True:
            with store.transaction() as s:
                s.value = bump(s.value, pad)
                n = s.value["n"]
            os.write(1, f"{n}\n".encode())
    if mode == "op":
        store = _prepare(path, argv[2], _pad(argv))
        print("ready", flush=True)
        # readv, not read: a fault loop that fails the N-th read must reach the operation, not this handshake.
        go = bytearray(3)
        if os.readv(0, [go]) != 3 or go != b"go\n":
            return 2
        try:
            _run(store, argv[2], _pad(argv))
        except Exception as exc:
            _say(_outcome(exc))
            return 0
        _say("ok")
        return 0
    if mode == "server":
        # External writer for the state-machine test: one JSON value per line, each written in a transaction.
        store = lockstore.open(path, default=None)
        for line in sys.stdin:
            with store.transaction() as s:
                s.value = json.loads(line)
            _say("ok")
        return 0
    if mode == "trylock":
        fd = os.open(path + ".lock", os.O_RDONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("busy")
        else:
            print("free")
        return 0
    if mode == "nobody":
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        try:
            _one(path, "transaction", 64)
        except Exception as exc:
            print(_outcome(exc), flush=True)
            return 0
        print("ok", flush=True)
        return 0
    if mode == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = int(argv[2])
        store = lockstore.open(path, default=make_value(0))
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        store.value = bump(store.value, 4 * limit)
        try:
            store.commit()
        except Exception as exc:
            print(_outcome(exc), flush=True)
            return 0
        print("ok", flush=True)
        return 0
    if mode == "shortwrites":
        real = os.write
        calls = [0]

        def short(fd: int, data: Any) -> int:
            calls[0] += 1
            return real(fd, bytes(memoryview(data)[:7]))

        os.write = short
        store = lockstore.open(path, default=make_value(0))
        store.value = bump(store.value, 1000)
        store.commit()
        os.write = real
        print(f"ok {calls[0]}", flush=True)
        return 0
    if mode == "rss":
        size = int(argv[2]) * 1_000_000
        fmt, phase = argv[3], argv[4]
        # Warm up first, so that lazy imports and first-use caches are not counted against the value.
        warm = lockstore.open(path + ".warm", format=fmt, default={"blob": "x"}, lock=False)
        warm.commit()
        warm.reload()
        warm.close()
        os.unlink(path + ".warm")
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if phase == "commit":
            store = lockstore.open(path, format=fmt, default={}, lock=False)
            store.value = {"blob": "x" * size} if fmt == "json" else {"blob": b"x" * size}
            store.commit()
        else:
            store = lockstore.open(path, format=fmt, default={}, lock=False)
            assert len(store.value["blob"]) == size
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(peak - base, flush=True)
        return 0
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            sys.exit(0)
        raise
