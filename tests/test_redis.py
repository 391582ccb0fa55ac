"""The Redis store (``redis://HOST:PORT/DB#KEY``) against real servers: the Store's guarantees, the lease, fencing,
fair waiting, durability settings, errors without passwords, fork, asyncio, signals, the CLI.

Children are this file run as a script (``python test_redis.py CMD ...``, see ``_child_main``): they print ``ready``
(and JSON) on stdout and wait for a line on stdin, so tests synchronise on pipes, never on sleeps. Tests that crash or
reconfigure a server start their own (``_servers.redis_server``); the others share the session server, each under
its own key prefix (``redis_key``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.abspath(__file__)
ROOT = os.path.dirname(HERE)
DEADLINE = 60.0

if __name__ != "__main__":
    import _servers
    from _servers import RedisServer

    import lockstore

    pytestmark = [pytest.mark.timeout(60), pytest.mark.skipif(_servers.why_no_redis() is not None,
                                                              reason=str(_servers.why_no_redis()))]
    redis = pytest.importorskip("redis")


# ===================================================================================================== children
def child_env() -> dict[str, str]:
    """The children import the lockstore this test imports (the working tree or the installed wheel)."""
    import lockstore as ls

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(ls.__file__)), HERE,
                                                    env.get("PYTHONPATH", "")) if p)
    return env


class Child:
    """``python test_redis.py CMD ARGS`` (optionally on a namespace host through ``prefix``).

    Its stdout is read with ``os.read`` into our own buffer, never through a buffered file object, so that no line
    read ahead can be lost between ``line()`` and ``finish()``.
    """

    def __init__(self, *args: str, prefix: Sequence[str] = ()) -> None:
        self.proc = subprocess.Popen([*prefix, sys.executable, SCRIPT, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
        self.pid = self.proc.pid
        self._buf = b""

    def _more(self, deadline: float) -> bool:
        import select

        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError("no line from the child in time")
        chunk = os.read(fd, 65536)
        self._buf += chunk
        return bool(chunk)

    def line(self, timeout: float = DEADLINE) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            if not self._more(deadline):
                self.proc.wait(DEADLINE)
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"the child ended ({self.proc.returncode}) without a line:\n{err}")
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode().strip()

    def ready(self) -> Any:
        line = self.line()
        assert line.startswith("ready"), line
        rest = line[len("ready"):].strip()
        return json.loads(rest) if rest else None

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def rest(self, send: str = "go\n") -> list[str]:
        """Send a line and close stdin; every line the child prints until it ends (it must succeed)."""
        assert self.proc.stdin is not None
        try:
            self.send(send)
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        deadline = time.monotonic() + DEADLINE
        while self._more(deadline):
            pass
        self.proc.wait(DEADLINE)
        lines = [line.strip() for line in self._buf.decode().splitlines() if line.strip()]
        self._buf = b""
        if self.proc.returncode != 0:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise AssertionError(f"child failed ({self.proc.returncode}):\n{lines}\n{err}")
        return lines

    def drain(self) -> list[str]:
        """Every line left, once the child has ended (killed)."""
        self.proc.wait(DEADLINE)
        deadline = time.monotonic() + DEADLINE
        while self._more(deadline):
            pass
        lines = [line.strip() for line in self._buf.decode().splitlines() if line.strip()]
        self._buf = b""
        return lines

    def finish(self, send: str = "go\n") -> Any:
        """Send a line, wait for the end; the JSON of its last line."""
        lines = self.rest(send)
        assert lines, "the child printed nothing"
        return json.loads(lines[-1])

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(DEADLINE)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass


def run_child(*args: str, prefix: Sequence[str] = ()) -> Any:
    """Run a child to completion; the JSON of its last line."""
    proc = subprocess.run([*prefix, sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=DEADLINE,
                          env=child_env(), check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"child {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1])


def _holder_json(h: Any) -> Any:
    if h is None:
        return None
    return {"pid": h.pid, "host": h.host, "label": h.label, "alive": h.alive, "acquired_at": h.acquired_at,
            "waiting_since": h.waiting_since}


def _child_main(argv: list[str]) -> None:
    """The children's commands (see the module docstring)."""
    import lockstore as ls

    cmd, url = argv[0], argv[1]

    def say(obj: Any = None, word: str = "") -> None:
        print((word + " " if word else "") + json.dumps(obj), flush=True)

    if cmd == "hold":  # hold the lock with a label until a line arrives, commit +1, report, linger until EOF
        label, lease = argv[2], float(argv[3])
        if "no-background" in argv:  # the negative control: a failed release is left to the lease
            from lockstore._redis_renew import Renewer

            setattr(Renewer, "release_later", lambda self, held: None)  # noqa: B010
        store = ls.open(url, default={"n": 0}, lease=lease)
        try:
            with store.transaction(label=label) as s:
                s.value["n"] = s.value.get("n", 0) + 1
                say({"pid": os.getpid(), "host": os.uname().nodename, "n": s.value["n"]}, "ready")
                sys.stdin.readline()
        except (ls.LockLost, OSError) as exc:
            say({"ok": False, "type": type(exc).__name__, "str": str(exc)})
        else:
            say({"ok": True})
        sys.stdin.readline()
    elif cmd == "stale":  # the SIGSTOP / partition victim; "unfenced": the negative control without the fence
        lease, unfenced = float(argv[2]), argv[3] == "unfenced"
        if unfenced:
            from lockstore import _redis_lease, _redis_scripts

            unfenced_save = _redis_scripts._script("redis.call('SET', KEYS[2], ARGV[2]) return 1")
            setattr(_redis_scripts, "SAVE", unfenced_save)  # noqa: B010 - a Final, replaced on purpose
            setattr(_redis_lease.Lease, "check", lambda *args, **kwargs: None)  # noqa: B010
        store = ls.open(url, default={"n": 0}, lease=lease)
        try:
            with store.transaction(label="stale") as s:
                s.value["n"] = s.value.get("n", 0) + 1
                say({"pid": os.getpid(), "n": s.value["n"]}, "ready")
                sys.stdin.readline()
        except ls.LockLost as exc:
            say({"ok": False, "type": "LockLost", "str": str(exc)})
            return
        say({"ok": True})
    elif cmd == "incr":  # N increments; prints the count of acknowledged ones
        n, lease = int(argv[2]), float(argv[3]) if len(argv) > 3 else 30.0
        store = ls.open(url, default={"n": 0}, timeout=-1, lease=lease)
        for _ in range(n):
            with store.transaction(label="incr") as s:
                s.value["n"] = s.value.get("n", 0) + 1
        say({"acked": n, "pid": os.getpid(), "host": os.uname().nodename})
    elif cmd == "loop":  # increments until stdin closes; one line per outcome; survives server restarts
        import select

        store = ls.open(url, default={"n": 0}, timeout=-1, lease=float(argv[2]))
        while not select.select([sys.stdin], [], [], 0)[0]:
            try:
                with store.transaction() as s:
                    s.value["n"] = s.value.get("n", 0) + 1
            except OSError as exc:
                print("unknown" if "unknown" in str(exc) else "failed", flush=True)
                time.sleep(0.05)
                continue
            except ls.LockLost:
                print("lost", flush=True)
                continue
            print("ack", flush=True)
    elif cmd == "try":  # one attempt with a timeout; the LockTimeout's attributes
        store = ls.open(url, default={"n": 0})
        try:
            with store.transaction(float(argv[2])):
                pass
        except ls.LockTimeout as exc:
            say({"ok": False, "waited": exc.waited, "holder": _holder_json(exc.holder), "str": str(exc)})
            return
        say({"ok": True})
    elif cmd == "wait":  # announce, then wait for the lock (forever) and hold it until a line arrives
        store = ls.open(url, default={"n": 0})
        say({"pid": os.getpid()}, "ready")
        with store.transaction(timeout=-1, label=argv[2] if len(argv) > 2 else None) as s:
            s.value["n"] = s.value.get("n", 0) + 1
            say({"got": True})
            sys.stdin.readline()
        say({"ok": True})
    elif cmd == "sigint":  # wait for the lock until SIGINT; report what is left in Redis
        store = ls.open(url, default={"n": 0})
        say({"pid": os.getpid()}, "ready")
        try:
            with store.transaction(timeout=-1):
                say({"got": True})
        except KeyboardInterrupt:
            say({"interrupted": True, "waiters": len(store.waiters())})
    elif cmd == "holder":
        store = ls.open(url, default={"n": 0})
        say({"holder": _holder_json(store.holder()), "waiters": [_holder_json(w) for w in store.waiters()]})
    else:
        raise SystemExit(f"unknown command {cmd}")


# ===================================================================================================== helpers
@pytest.fixture
def url(redis_url: str, redis_key: str) -> str:
    return f"{redis_url}#{redis_key}counter"


@pytest.fixture
def raw(redis_url: str) -> Iterator[Any]:
    with redis.Redis.from_url(redis_url, socket_timeout=10) as client:
        yield client


def key_of(target: str) -> str:
    return target.partition("#")[2]


def increment(target: str, n: int) -> None:
    """multiprocessing target: ``n`` increments."""
    store = lockstore.open(target, default={"n": 0}, timeout=-1)
    for _ in range(n):
        with store.transaction() as s:
            s.value["n"] += 1


def increment_inherited(store: Any, n: int) -> None:
    for _ in range(n):
        with store.transaction() as s:
            s.value["n"] += 1


def run_procs(procs: list[Any]) -> None:
    for p in procs:
        p.start()
    for p in procs:
        p.join(DEADLINE)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * len(procs)


def wait_until(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


# ===================================================================================================== basics
def test_open_options_and_repr(url: str, redis_server: RedisServer) -> None:
    store = lockstore.open(url, default={"n": 0})
    assert store.path == url and store.lock_file == key_of(url) + ":lock"
    assert repr(store) == f"<lockstore.Store {url!r} format=json lock={key_of(url) + ':lock'!r} durable>"
    assert store.lock is None and store.holder() is None and store.waiters() == []
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lease"):
            lockstore.open(url, lease=bad)
    for wrong in ("30", True, None):
        with pytest.raises(TypeError, match="lease"):
            lockstore.open(url, lease=wrong)
    with pytest.raises(TypeError, match="table"):
        lockstore.open(url, table="x")
    with pytest.raises(ValueError, match="lock= must be True"):
        lockstore.open(url, lock=False)
    with pytest.raises(ValueError, match="#KEY"):
        lockstore.open(url.partition("#")[0])
    unix = lockstore.open(f"{redis_server.unix_url}#{key_of(url)}", default={"n": 0})
    with unix.transaction() as s:
        s.value["n"] += 1
    assert lockstore.read(url) == {"n": 1}


def test_values_are_plain_json_and_writes_only_if_changed(url: str, raw: Any) -> None:
    key = key_of(url)
    store = lockstore.open(url, default={"n": 0})
    assert store.value == {"n": 0} and raw.exists(key) == 0
    with store.transaction():
        pass
    assert raw.exists(key) == 0  # nothing changed: nothing written, not even the default
    with store.transaction() as s:
        s.value["n"] = 1
    assert json.loads(raw.get(key)) == {"n": 1}  # redis-cli GET KEY shows the JSON
    raw.set(key, json.dumps({"n": 5}), px=600_000)  # another client; a TTL that any write by us would clear
    with store.transaction() as s:
        assert s.value == {"n": 5}  # re-read: the server's SHA-1 told it changed
    assert raw.pttl(key) > 0  # no change: not written
    with store.transaction() as s:
        s.value["n"] += 1
    assert raw.pttl(key) == -1 and json.loads(raw.get(key)) == {"n": 6}  # the control: a change is written
    store.value = {"n": 7}
    store.commit()
    assert lockstore.read(url) == {"n": 7} == store.reload()
    assert asyncio.run(lockstore.aread(url)) == {"n": 7}
    assert lockstore.read(url + "-missing", default=[1]) == [1]


def test_savepoints_and_rollback(url: str) -> None:
    store: lockstore.Store[dict[str, list[str]]] = lockstore.open(url, default={"log": []})
    with store.transaction() as s:
        s.value["log"].append("a")
        with pytest.raises(RuntimeError), store.transaction() as inner:
            inner.value["log"].append("b")
            raise RuntimeError("inner fails")
        assert s.value["log"] == ["a"]
        with store.transaction() as inner:
            inner.value["log"].append("c")
    assert lockstore.read(url) == {"log": ["a", "c"]}
    with pytest.raises(KeyError), store.transaction() as s:
        s.value["log"].append("d")
        raise KeyError("outer fails")
    assert store.value == {"log": ["a", "c"]} == lockstore.read(url)


def test_hash_tag_keeps_every_key_in_one_slot(redis_url: str, redis_key: str, raw: Any) -> None:
    from redis.crc import key_slot

    from lockstore._redis_scripts import Keys

    key = f"{redis_key}{{app}}:counter"  # Redis Cluster hashes only "app": every key of the store in one slot
    store = lockstore.open(f"{redis_url}#{key}", default={"n": 0})
    with store.transaction() as s:
        s.value["n"] += 1
        names = {k.decode() for k in raw.scan_iter(match=f"{redis_key}*")}
    names |= {k.decode() for k in raw.scan_iter(match=f"{redis_key}*")}
    assert names == {key, key + ":lock"}
    keys = Keys.of(key)
    assert len({key_slot(k.encode()) for k in (*keys[:5], keys.wake + "token", key + ".corrupt-x")}) == 1


# ===================================================================================================== no lost updates
def test_processes_exact_counts(url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    run_procs([ctx.Process(target=increment, args=(url, 50)) for _ in range(8)])
    assert lockstore.read(url) == {"n": 400}


def test_fork_inherited_store_and_transaction(url: str, raw: Any) -> None:
    ctx = multiprocessing.get_context("fork")
    store = lockstore.open(url, default={"n": 0})
    with store.transaction() as s:
        s.value["n"] += 1
    run_procs([ctx.Process(target=increment_inherited, args=(store, 25)) for _ in range(3)])  # the parent's pool
    assert lockstore.read(url) == {"n": 76}
    # A transaction open at the fork is the parent's: the child's exit writes nothing and releases nothing.
    pid = -1
    with store.transaction() as s:
        s.value["n"] += 100
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child leaves the block below, as the parent would
            s.value["n"] += 1000
        else:
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert store.holder() is not None and store.holder().pid == os.getpid()  # type: ignore[union-attr]
    if pid == 0:  # pragma: no cover
        try:
            ok = lockstore.read(url) == {"n": 76} and raw.exists(key_of(url) + ":lock") == 1
        except BaseException:
            ok = False
        os._exit(0 if ok else 3)
    assert lockstore.read(url) == {"n": 176}


def test_threads_share_one_store(url: str) -> None:
    store = lockstore.open(url, default={"n": 0})
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(50):
                with store.transaction() as s:
                    s.value["n"] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert errors == [] and lockstore.read(url) == {"n": 200}


def test_asyncio_100_tasks_and_cancellation(url: str, raw: Any) -> None:
    store = lockstore.open(url, default={"n": 0})
    key = key_of(url)

    async def one() -> None:
        async with store.atransaction(timeout=30, label="task") as s:
            s.value["n"] += 1

    async def main() -> None:
        await asyncio.gather(*(one() for _ in range(100)))
        # A task waiting for a lock held by another process is cancelled: nothing of it stays behind.
        with Child("hold", url, "holder", "30") as holder:
            holder.ready()
            waiting = asyncio.ensure_future(one())
            for _ in range(500):
                await asyncio.sleep(0.01)
                if raw.zcard(key + ":queue"):
                    break
            assert raw.zcard(key + ":queue") == 1
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert raw.zcard(key + ":queue") == 0 and raw.hlen(key + ":waiters") == 0
            assert holder.finish() == {"ok": True}
        await one()

    asyncio.run(main())
    assert lockstore.read(url) == {"n": 102}
    assert raw.exists(key + ":lock") == 0


def test_asyncio_timeout_renewal_and_reentry(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = lockstore.open(url, default={"n": 0}, lease=0.4)
    other = lockstore.open(url, default={"n": 0})

    async def main() -> None:
        with Child("hold", url, "async-holder", "30") as holder:
            info = holder.ready()
            with pytest.raises(lockstore.LockTimeout) as caught:
                async with store.atransaction(timeout=0.3):
                    pass
            assert caught.value.holder is not None and caught.value.holder.pid == info["pid"]
            assert caught.value.holder.label == "async-holder"
            assert holder.finish() == {"ok": True}
        async with store.atransaction() as s:
            await asyncio.sleep(1.3)  # three leases: the renewal task keeps it
            s.value["n"] += 1
            with pytest.raises(lockstore.LockReentryError):
                async with other.atransaction():
                    pass
            with pytest.raises(lockstore.LockReentryError), other.transaction():  # would block the loop
                pass

    asyncio.run(main())
    assert lockstore.read(url) == {"n": 2}

    async def no_renewal(*args: Any) -> None:
        return None

    from lockstore import _redis_aio

    monkeypatch.setattr(_redis_aio, "_renew", no_renewal)  # the control

    async def lapse() -> None:
        async with store.atransaction() as s:
            await asyncio.sleep(1.0)
            s.value["n"] += 1

    with pytest.raises(lockstore.LockLost):
        asyncio.run(lapse())
    assert lockstore.read(url) == {"n": 2}


def test_cli_loops_and_commands(url: str) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lockstore", *args], capture_output=True, text=True,
                              timeout=DEADLINE, env=child_env(), check=False)

    loop = "import subprocess, sys\nfor _ in range(8): subprocess.run([sys.executable, '-m', 'lockstore', 'incr', " \
           "sys.argv[1], 'runs'], check=True, stdout=subprocess.DEVNULL)"
    procs = [subprocess.Popen([sys.executable, "-c", loop, url], env=child_env()) for _ in range(3)]
    assert [p.wait(DEADLINE) for p in procs] == [0, 0, 0]
    got = cli("get", url, "runs")
    assert got.returncode == 0 and got.stdout.strip() == "24"
    assert cli("set", url, "job.state", "done").returncode == 0
    assert cli("append", url, "log", '{"ok": true}').returncode == 0
    assert cli("get", url, "job.state", "--raw").stdout.strip() == "done"
    assert cli("delete", url, "job").returncode == 0
    assert json.loads(cli("get", url).stdout) == {"runs": 24, "log": [{"ok": True}]}
    free = cli("holder", url)
    assert free.returncode == 0 and "free" in free.stdout
    with Child("hold", url, "cli-holder", "30") as holder:
        info = holder.ready()
        shown = json.loads(cli("holder", url, "--json").stdout)
        assert shown["held"] and shown["holder"]["pid"] == info["pid"] and shown["holder"]["label"] == "cli-holder"
        busy = cli("incr", url, "runs", "-w", "0.2")
        assert busy.returncode == 1 and "cli-holder" in busy.stderr and f"pid {info['pid']}" in busy.stderr
        assert cli("incr", url, "runs", "-n", "-E", "75").returncode == 75
        holder.finish()


def test_lock_free_readers_see_whole_values_that_never_go_back(url: str) -> None:
    pad = "x" * 4096
    stop = threading.Event()
    seen: list[int] = []
    bad: list[str] = []

    def reader() -> None:
        last = -1
        while not stop.is_set():
            v = lockstore.read(url)
            if v is None:
                continue
            if v["n"] != v["check"] or v["pad"] != pad:
                bad.append(f"torn: {str(v)[:60]}")
            if v["n"] < last:
                bad.append(f"went back from {last} to {v['n']}")
            last = v["n"]
            seen.append(last)

    t = threading.Thread(target=reader)
    t.start()
    try:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_self_checking_increments, args=(url, 60, pad)) for _ in range(3)]
        run_procs(procs)
    finally:
        stop.set()
        t.join(DEADLINE)
    assert bad == [] and len(seen) > 10
    assert lockstore.read(url)["n"] == 180


def _self_checking_increments(target: str, n: int, pad: str) -> None:
    store: lockstore.Store[dict[str, Any]] = lockstore.open(target, default={"n": 0, "check": 0, "pad": pad},
                                                            timeout=-1)
    for _ in range(n):
        with store.transaction() as s:
            s.value["n"] += 1
            s.value["check"] = s.value["n"]


# ================================================================================================ who holds, who waits
def test_timeout_names_the_holder_and_waiters_are_listed(url: str) -> None:
    with Child("hold", url, "nightly-rollup", "30") as holder:
        info = holder.ready()
        t0 = time.monotonic()
        with pytest.raises(lockstore.LockTimeout) as caught, lockstore.open(url, default=0).transaction(timeout=0.3):
            pass
        assert 0.3 <= time.monotonic() - t0 < 5
        exc = caught.value
        assert exc.holder is not None and exc.holder.pid == info["pid"] and exc.holder.label == "nightly-rollup"
        assert exc.holder.host == os.uname().nodename and exc.holder.alive is True
        assert exc.holder.acquired_at is not None and exc.holder.acquired_at <= time.time()
        assert "nightly-rollup" in str(exc) and f"pid {info['pid']}" in str(exc)
        assert exc.path == url and exc.lock_file == key_of(url) + ":lock"
        with pytest.raises(lockstore.LockTimeout), lockstore.open(url).transaction(blocking=False):
            pass  # blocking=False tries once
        # From other processes: holder() and waiters(), oldest first, with since when.
        store = lockstore.open(url, default={"n": 0})
        with Child("wait", url, "first") as w1:
            p1 = w1.ready()["pid"]
            wait_until(lambda: [w.pid for w in store.waiters()] == [p1], what="the first waiter")
            with Child("wait", url, "second") as w2:
                p2 = w2.ready()["pid"]
                wait_until(lambda: [w.pid for w in store.waiters()] == [p1, p2], what="both waiters")
                seen = run_child("holder", url)
                assert seen["holder"]["pid"] == info["pid"] and seen["holder"]["label"] == "nightly-rollup"
                assert [w["pid"] for w in seen["waiters"]] == [p1, p2]
                first, second = seen["waiters"]
                assert first["waiting_since"] <= second["waiting_since"] <= time.time()
                assert holder.finish() == {"ok": True}
                assert w1.line() == '{"got": true}'  # first come, first served
                assert w1.finish() == {"ok": True} and w2.line() == '{"got": true}'
                assert w2.finish() == {"ok": True}
    assert lockstore.read(url) == {"n": 3}


def test_reentry_through_another_store_or_url(url: str, redis_server: RedisServer) -> None:
    store = lockstore.open(url, default={"n": 0})
    other = lockstore.open(url, default={"n": 0})
    by_socket = lockstore.open(f"{redis_server.unix_url}#{key_of(url)}", default={"n": 0})
    with store.transaction():
        with pytest.raises(lockstore.LockReentryError), other.transaction():
            pass
        with pytest.raises(lockstore.LockReentryError), by_socket.transaction():
            pass
        with store.transaction():  # the same Store joins
            pass
    with other.transaction() as s:  # nothing was left held
        s.value["n"] += 1
    assert lockstore.read(url) == {"n": 1}


def test_keyboard_interrupt_while_waiting_leaves_nothing(url: str, raw: Any) -> None:
    key = key_of(url)
    store = lockstore.open(url, default={"n": 0})
    with store.transaction():
        with Child("sigint", url) as child:
            child.ready()
            wait_until(lambda: raw.zcard(key + ":queue") == 1, what="the child to queue")
            child.proc.send_signal(signal.SIGINT)
            assert child.finish("") == {"interrupted": True, "waiters": 0}
        assert raw.zcard(key + ":queue") == 0 and raw.hlen(key + ":waiters") == 0
        assert store.holder() is not None and store.holder().pid == os.getpid()  # type: ignore[union-attr]
    assert raw.exists(key + ":lock") == 0


# ===================================================================================================== the lease
def test_killed_holder_frees_the_lock_when_its_lease_ends(url: str, raw: Any) -> None:
    key = key_of(url)
    store = lockstore.open(url, default={"n": 0})
    with Child("hold", url, "doomed", "1.5") as holder:
        holder.ready()
        holder.proc.kill()
        holder.proc.wait(DEADLINE)
        left = raw.pttl(key + ":lock") / 1000
        t0 = time.monotonic()
        assert left > 0.5  # the lease, not the death, is the rule
        with store.transaction(timeout=10) as s:
            waited = time.monotonic() - t0
            s.value["n"] += 1
    assert left - 0.05 <= waited <= left + 1.0
    assert lockstore.read(url) == {"n": 1}  # the killed holder's +1 was never committed
    # The control: a holder that releases hands over at once.
    with Child("hold", url, "polite", "1.5") as holder:
        holder.ready()
        t0 = time.monotonic()
        holder.send("go\n")
        with store.transaction(timeout=10) as s:
            s.value["n"] += 1
        assert time.monotonic() - t0 < 0.5
        assert holder.finish("") == {"ok": True}
    assert lockstore.read(url) == {"n": 3}


def test_lease_is_renewed_while_the_block_runs(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = lockstore.open(url, default={"n": 0}, lease=0.4)
    with store.transaction() as s:
        time.sleep(1.3)  # three leases
        s.value["n"] += 1
    assert lockstore.read(url) == {"n": 1}
    # The control: without renewal the lease lapses and the commit is refused.
    from lockstore._redis_renew import Renewer

    monkeypatch.setattr(Renewer, "add", lambda self, held, first: None)
    with pytest.raises(lockstore.LockLost, match="nothing was written"), store.transaction() as s:
        time.sleep(1.0)
        s.value["n"] += 1
    assert lockstore.read(url) == {"n": 1} and store.value == {"n": 1}


@pytest.mark.parametrize("fenced", [True, False], ids=["fenced", "negative-control-unfenced"])
def test_sigstopped_holder_gets_lock_lost_and_writes_nothing(url: str, raw: Any, fenced: bool) -> None:
    key = key_of(url)
    store = lockstore.open(url, default={"n": 0})
    with store.transaction() as s:
        s.value["n"] = 10
    with Child("stale", url, "0.5", "fenced" if fenced else "unfenced") as victim:
        assert victim.ready()["n"] == 11
        victim.proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: raw.exists(key + ":lock") == 0, what="the stopped holder's lease to end")
            with store.transaction(timeout=10) as s:  # acknowledged: 10 -> 11
                s.value["n"] += 1
        finally:
            victim.proc.send_signal(signal.SIGCONT)
        outcome = victim.finish()
    if fenced:
        assert outcome["type"] == "LockLost" and "nothing was written" in outcome["str"]
        assert lockstore.read(url) == {"n": 11}  # exactly the acknowledged increments
    else:
        assert outcome == {"ok": True}
        assert lockstore.read(url) == {"n": 11}  # 11 again: the stale holder's write hid ours: one update lost


def test_save_last_writes_releases_and_is_fenced(url: str, raw: Any) -> None:
    """The merged last write (waiting for the engine change that says which write is the last)."""
    key = key_of(url)
    storage = lockstore.open(url, default={"n": 0})._core.storage
    held = storage.held(threading.get_ident(), None)
    try:
        storage.acquire(held, timeout=5, blocking=True, label="merged")
        assert storage.fetch(held, None) is None  # nothing stored, nothing known
        storage.save_last(held, b'{"n": 5}')  # type: ignore[attr-defined]
        assert raw.exists(key + ":lock") == 0 and json.loads(raw.get(key)) == {"n": 5}
        with pytest.raises(lockstore.LockLost):  # the control: the token no longer holds the lock
            storage.save_last(held, b'{"n": 6}')  # type: ignore[attr-defined]
    finally:
        storage.release(held)
    assert json.loads(raw.get(key)) == {"n": 5}
    held = storage.held(threading.get_ident(), None)
    storage.acquire(held, timeout=5, blocking=True, label="merged")
    with Child("wait", url, "next") as waiter:  # it hands over like a release
        waiter.ready()
        wait_until(lambda: raw.zcard(key + ":queue") == 1, what="the waiter to queue")
        storage.save_last(held, b'{"n": 7}')  # type: ignore[attr-defined]
        storage.release(held)
        assert waiter.line() == '{"got": true}'
        assert waiter.finish() == {"ok": True}
    assert lockstore.read(url) == {"n": 8}

    async def merged() -> None:
        held = storage.held(asyncio.current_task(), None)
        try:
            await storage.aacquire(held, timeout=5, blocking=True, label="merged")
            await storage.asave_last(held, b'{"n": 9}')  # type: ignore[attr-defined]
            assert raw.exists(key + ":lock") == 0
        finally:
            await storage.arelease(held)

    asyncio.run(merged())
    assert lockstore.read(url) == {"n": 9}


# ===================================================================================================== faults
def test_server_kill9_keeps_every_acknowledged_transaction(tmp_path: Path) -> None:
    with _servers.redis_server(tmp_path) as srv:
        target = f"{srv.url}#counter"
        acked = unknown = 0
        children = [Child("loop", target, "30") for _ in range(3)]
        try:
            for c in children:
                assert c.line() == "ack"
                acked += 1
            srv.kill9()
            srv.start()
            t0 = time.monotonic()
            for c in children:  # each child reconnects and commits again
                while (line := c.line()) != "ack":
                    unknown += line == "unknown"
                acked += 1
            # No lock survives the crash (the lock is never written to the AOF): nobody waits for a 30 s lease.
            assert time.monotonic() - t0 < 15
            for c in children:
                for line in c.rest("stop\n"):
                    acked += line == "ack"
                    unknown += line == "unknown"
        finally:
            for c in children:
                c.__exit__()
        n = lockstore.read(target)["n"]
        assert acked <= n <= acked + unknown


def test_server_without_persistence_loses_acknowledged_transactions(tmp_path: Path) -> None:
    # The negative control of the test above: appendonly no (durable=False) and a crash.
    with _servers.redis_server(tmp_path, extra_args=["--appendonly", "no"]) as srv:
        target = f"{srv.url}#counter"
        with pytest.raises(lockstore.NotDurableError, match="appendonly no"):
            lockstore.open(target)
        store = lockstore.open(target, default={"n": 0}, durable=False)
        for _ in range(5):
            with store.transaction() as s:
                s.value["n"] += 1
        srv.kill9()
        srv.start()
        assert lockstore.read(target) is None


def test_garbage_from_another_client_is_never_overwritten(url: str, raw: Any, caplog: pytest.LogCaptureFixture) -> None:
    key = key_of(url)
    store = lockstore.open(url, default={"n": 0})
    with store.transaction() as s:
        s.value["n"] = 1
    raw.set(key, b'{"n": 2, oops')
    with pytest.raises(lockstore.CorruptStoreError, match="cannot be decoded"), store.transaction() as s:
        s.value["n"] += 1
    assert raw.get(key) == b'{"n": 2, oops'
    with pytest.raises(lockstore.CorruptStoreError):
        lockstore.open(url)
    with caplog.at_level(logging.WARNING, logger="lockstore"):
        backup = lockstore.open(url, default={"n": 0}, on_corrupt="backup")
    assert backup.value == {"n": 0} and raw.exists(key) == 0
    aside = [k.decode() for k in raw.scan_iter(match=key + ".corrupt-*")]
    assert len(aside) == 1 and raw.get(aside[0]) == b'{"n": 2, oops'
    assert "moved it aside" in caplog.text and aside[0] in caplog.text
    # The control: a valid value from another client is picked up, never hidden by the cached one.
    raw.set(key, b'{"n": 40}')
    with store.transaction() as s:
        s.value["n"] += 2
    assert lockstore.read(url) == {"n": 42}


def test_wrong_password_and_unreachable_servers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cr:t-pw"
    with _servers.redis_server(tmp_path, password=secret, unixsocket=False) as srv:
        good = f"{srv.url}#k"
        assert lockstore.open(good, default=0).value == 0  # the control
        wrong = f"redis://:wrong-{secret}@127.0.0.1:{srv.port}/0#k"
        none = f"redis://127.0.0.1:{srv.port}/0#k"
        closed_port = _servers.free_port()
        cases: list[tuple[str, type[OSError]]] = [
            (wrong, PermissionError),
            (none, PermissionError),
            (f"redis://:{secret}@127.0.0.1:{closed_port}/0#k", ConnectionError),
            (f"unix://{tmp_path}/missing.sock?db=0&password={secret}#k", ConnectionError),
        ]
        with caplog.at_level(logging.DEBUG):
            for target, kind in cases:
                t0 = time.monotonic()
                with pytest.raises(kind) as caught:
                    lockstore.open(target, default=0)
                assert time.monotonic() - t0 < 20
                exc = caught.value
                shown = "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)
                assert secret not in shown and "wrong-" not in shown
                assert lockstore._target.mask(target.partition("#")[0]) in str(exc)
                assert isinstance(exc, OSError)
            with pytest.raises(PermissionError):
                lockstore.read(wrong)
        assert secret not in caplog.text
        store = lockstore.open(good, default=0)
        assert secret not in repr(store) and secret not in store.path and ":***@" in store.path


def test_durability_settings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with _servers.redis_server(tmp_path, appendfsync="everysec") as srv:
        target = f"{srv.url}#k"
        with pytest.raises(lockstore.NotDurableError, match="appendfsync everysec") as caught:
            lockstore.open(target)
        assert "durable=False" in str(caught.value)
        store = lockstore.open(target, default={"n": 0}, durable=False)
        with store.transaction() as s:
            s.value["n"] += 1
        srv.config_set("appendfsync", "always")
        assert lockstore.open(target).value == {"n": 1}  # the control
    with _servers.redis_server(tmp_path, extra_args=["--rename-command", "CONFIG", ""]) as srv:
        target = f"{srv.url}#k"
        with caplog.at_level(logging.WARNING, logger="lockstore"):
            for _ in range(3):
                lockstore.open(target, default=0)
        warned = [r for r in caplog.records if "appendfsync always" in r.getMessage()]
        assert len(warned) == 1 and warned[0].name == "lockstore"


# ================================================================================================== imports, fairness
def test_import_lockstore_does_not_import_redis() -> None:
    code = "import sys, lockstore; print('redis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), check=True)
    assert out.stdout.strip() == "False"


def test_missing_driver_names_the_extra(url: str) -> None:
    code = ("import sys; sys.modules['redis'] = None\nimport lockstore\n"
            "try:\n    lockstore.open(sys.argv[1])\nexcept ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, env=child_env(),
                         check=True)
    assert 'pip install "lockstore[redis]"' in out.stdout
    cli = ("import sys; sys.modules['redis'] = None\nfrom lockstore.cli import main\n"
           "sys.exit(main(['incr', sys.argv[1], 'n']))")
    res = subprocess.run([sys.executable, "-c", cli, url], capture_output=True, text=True, env=child_env(), check=False)
    assert res.returncode == 6 and 'pip install "lockstore[redis]"' in res.stderr


def fifo_worker(target: str, n: int, start: Any, out: Any, barging: bool) -> None:
    """``n`` transactions; for each: its grant number, its token, and the queue seen while holding the lock."""
    if barging:  # the negative control: a free lock goes to whoever asks first, queue or not
        from lockstore import _redis_scripts as scripts

        take = scripts.ACQUIRE.text.replace("if head == nil or head == tok then", "if true then")
        hand = ("if head then hand_over(head, KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[2], ARGV[3], "
                "ARGV[4], t) end")
        wake = "if head then redis.call('RPUSH', ARGV[2] .. head, 'w') end"
        free = scripts.RELEASE.text.replace(hand, wake)
        # A transaction that wrote releases in the same script as its write: no hand-over there either.
        save_hand = hand.replace("ARGV[2], ARGV[3], ARGV[4]", "ARGV[3], ARGV[4], ARGV[5]")
        save_wake = wake.replace("ARGV[2]", "ARGV[3]")
        save = scripts.SAVE_RELEASE.text.replace(save_hand, save_wake)
        assert take != scripts.ACQUIRE.text and free != scripts.RELEASE.text and save != scripts.SAVE_RELEASE.text
        setattr(scripts, "ACQUIRE", scripts._script(take))  # noqa: B010 - a Final, replaced on purpose
        setattr(scripts, "RELEASE", scripts._script(free))  # noqa: B010
        setattr(scripts, "SAVE_RELEASE", scripts._script(save))  # noqa: B010
    store: lockstore.Store[dict[str, int]] = lockstore.open(target, default={"n": 0}, timeout=-1)
    queue = key_of(target) + ":queue"
    with redis.Redis.from_url(target.partition("#")[0]) as raw:
        with store.transaction():
            pass  # connected, scripts cached
        out.put("ready")
        start.wait(DEADLINE)
        log, waits, whole = [], [], []
        for _ in range(n):
            t0 = time.perf_counter()
            with store.transaction() as s:
                t1 = time.perf_counter()
                s.value["n"] += 1
                active = store._core.active
                assert active is not None
                token = active.held.token  # type: ignore[attr-defined]
                log.append((s.value["n"], token, [t.decode() for t in raw.zrange(queue, 0, -1)]))
            whole.append(time.perf_counter() - t0)
            waits.append((t0, t1))
    out.put((log, waits, whole))


def fifo_run(target: str, processes: int, n: int, *, barging: bool = False) -> tuple[int, int, float]:
    """(grants checked, grants that did not go to the queue's head, longest wait / (P x median single txn))."""
    ctx = multiprocessing.get_context("spawn")
    start, q = ctx.Event(), ctx.Queue()
    start.set()
    solo = ctx.Process(target=fifo_worker, args=(target, n, start, q, False))
    solo.start()
    assert q.get(timeout=DEADLINE) == "ready"
    single = sorted(q.get(timeout=DEADLINE)[2])
    solo.join(DEADLINE)
    start = ctx.Event()
    procs = [ctx.Process(target=fifo_worker, args=(target, n, start, q, barging)) for _ in range(processes)]
    for p in procs:
        p.start()
    assert [q.get(timeout=DEADLINE) for _ in procs] == ["ready"] * processes  # every warm-up is over
    start.set()
    results = [q.get(timeout=DEADLINE) for _ in procs]
    for p in procs:
        p.join(DEADLINE)
    grants = {number: (token, queue) for log, _, _ in results for number, token, queue in log}
    checked = skipped = 0
    for number, (_, queue) in grants.items():
        if queue and number + 1 in grants:
            checked += 1
            skipped += grants[number + 1][0] != queue[0]
    # Waits that ended while every process still contended (the first to finish then exits, which costs CPU)
    done = min(waits[-1][1] for _, waits, _ in results)
    longest = max(t1 - t0 for _, waits, _ in results for t0, t1 in waits if t1 <= done)
    return checked, skipped, longest / (processes * single[len(single) // 2])


def test_fairness_first_come_first_served(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    checked, skipped, ratio = fifo_run(url, 8, 30)
    assert lockstore.read(url) == {"n": 270}  # 30 by one process, then 8 x 30
    assert checked > 100 and skipped == 0  # every grant went to the first waiter in the queue
    with capsys.disabled():
        print(f"\n8 processes: longest wait / (8 x median single-process transaction) = {ratio:.1f}x")
    # The negative control: a free lock to whoever asks first (no hand-over): releasers barge in ahead of the woken
    # waiter.
    for _ in range(5):  # barging shows up by chance: give it a few rounds, but it must show up
        checked, skipped, _ = fifo_run(url, 8, 15, barging=True)
        if skipped:
            break
    assert checked > 15 and skipped > 0


if __name__ == "__main__":
    _child_main(sys.argv[1:])
