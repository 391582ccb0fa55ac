"""The Redis store against hand-written Redis recipes: counter increments at P=1 and P=8, and fairness.

Self-contained: starts its own ``redis-server`` (AOF on, ``appendfsync always``, no RDB) in a fresh directory on the
repository's disk (``benchmarks/results/work.tmp`` unless ``--dir``), and persistent worker processes (spawn) that
every run reuses. ``run(quick)`` returns the rows; ``python benchmarks/_redis.py [--quick]`` prints them.

Competitors, each incrementing ``{"n": ...}`` (JSON) at one key, durable (every write fsynced before the reply):

- ``lockstore``: ``lockstore.open("redis://...#key").transaction()`` with its defaults (lease lock, FIFO queue,
  fenced commit; the transaction's last write and its release are one script, ``save(..., last=True)``).
- ``lock+cas``: the recipe people write: ``SET lock token NX PX 30000`` polled every millisecond, ``GET``, then one
  Lua script that writes and unlocks only if ``lock`` still holds the token (fenced, three round trips, no queue).
- ``watch``: optimistic ``WATCH key`` / ``GET`` / ``MULTI SET EXEC``, retried on a conflict (no lock).
- ``INCR``: one ``INCR`` of an integer: the server-side floor, for scale (not a read-modify-write of a value).

Every competitor runs in every repeat, the order rotating; the table gives medians over repeats, ``(±x%)`` half the
range, ratios as medians of per-repeat ratios, and the final count next to the speed. Fairness: the longest time to
acquire of an 8-process run, counting the waits that ended while all 8 still contended (the first to finish then
exits, which costs the others CPU on a small machine), against the ideal, 8 x the median whole increment of a
1-process run of the same repeat.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ("lockstore", "lock+cas", "watch", "INCR")
_CAS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[1])
return 1
"""


# ------------------------------------------------------------------------------------------------ competitors
def _open(name: str, url: str, key: str) -> tuple[Callable[[], float], Callable[[], None]]:
    """``(increment, close)``; ``increment()`` returns how long it waited for its lock (0 without one)."""
    import redis

    if name == "lockstore":
        import lockstore

        store: Any = lockstore.open(f"{url}#{key}", default={"n": 0})
        with store.transaction():
            pass  # connected, scripts cached

        def incr_lockstore() -> float:
            t0 = time.perf_counter()
            with store.transaction() as s:
                waited = time.perf_counter() - t0
                s.value["n"] += 1
            return waited

        return incr_lockstore, store.close
    client = redis.Redis.from_url(url)
    client.ping()
    if name == "lock+cas":
        cas = client.register_script(_CAS)
        lock = key + ":lock"

        def incr_cas() -> float:
            token = os.urandom(16).hex()
            t0 = time.perf_counter()
            while not client.set(lock, token, nx=True, px=30000):
                time.sleep(0.001)
            waited = time.perf_counter() - t0
            raw = client.get(key)
            value = json.loads(raw) if raw else {"n": 0}
            value["n"] += 1
            if not cas(keys=[lock, key], args=[token, json.dumps(value)]):
                raise RuntimeError("lock lost")
            return waited

        return incr_cas, client.close
    if name == "watch":
        from redis.exceptions import WatchError

        def incr_watch() -> float:
            with client.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(key)  # type: ignore[no-untyped-call]
                        raw = pipe.get(key)
                        value = json.loads(raw) if raw else {"n": 0}
                        value["n"] += 1
                        pipe.multi()
                        pipe.set(key, json.dumps(value))
                        pipe.execute()
                        return 0.0
                    except WatchError:
                        continue

        return incr_watch, client.close

    def incr() -> float:
        client.incr(key)
        return 0.0

    return incr, client.close


def _count(name: str, url: str, key: str) -> int:
    import redis

    with redis.Redis.from_url(url) as client:
        raw = client.get(key)
    if raw is None:
        return 0
    return int(raw) if name == "INCR" else int(json.loads(raw)["n"])


# ------------------------------------------------------------------------------------------------ workers
_SENT = [0]


def _count_round_trips() -> None:
    """Count the commands (or pipelines) this worker sends: the round trips, which no load on the machine changes."""
    from redis.connection import AbstractConnection

    send: Any = AbstractConnection.send_packed_command

    def counted(self: Any, command: Any, check_health: bool = True) -> None:
        _SENT[0] += 1
        send(self, command, check_health)

    setattr(AbstractConnection, "send_packed_command", counted)  # noqa: B010


def _serve(conn: Connection) -> None:
    _count_round_trips()
    while True:
        job = conn.recv()
        if job is None:
            return
        name, url, key, count = job
        try:
            op, close = _open(name, url, key)
        except BaseException:
            conn.send(("error", traceback.format_exc()))
            continue
        conn.send("ready")
        conn.recv()
        waits: list[tuple[float, float]] = []
        durations: list[float] = []
        try:
            sent = _SENT[0]
            start = time.perf_counter()
            for _ in range(count):
                t0 = time.perf_counter()
                waited = op()
                t1 = time.perf_counter()
                waits.append((waited, t0 + waited))
                durations.append(t1 - t0)
            end = time.perf_counter()
            conn.send(("ok", start, end, waits, durations, _SENT[0] - sent))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
        finally:
            with contextlib.suppress(Exception):
                close()


class _Pool:
    def __init__(self, size: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        for _ in range(size):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(theirs,), daemon=True)
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)

    def run(self, name: str, url: str, key: str, processes: int, count: int) -> dict[str, Any]:
        conns = self.conns[:processes]
        for c in conns:
            c.send((name, url, key, count))
        opened = [c.recv() for c in conns]  # every reply read before raising: none is left for the next run
        failed = [reply[1] for reply in opened if reply != "ready"]
        for c, reply in zip(conns, opened, strict=True):
            if reply == "ready":
                c.send("go")
        if failed:
            for c, reply in zip(conns, opened, strict=True):
                if reply == "ready":
                    c.recv()
            raise RuntimeError(f"{name}: a worker failed to open:\n{failed[0]}")
        replies = [c.recv() for c in conns]
        for r in replies:
            if r[0] != "ok":
                raise RuntimeError(f"{name}: a worker failed:\n{r[1]}")
        first_done = min(r[2] for r in replies)
        return {
            "elapsed": max(r[2] for r in replies) - min(r[1] for r in replies),
            "ops": processes * count,
            # waits that ended while every process still contended
            "waits": [w for r in replies for w, ended in r[3] if ended <= first_done],
            "durations": [d for r in replies for d in r[4]],
            "round_trips": sum(r[5] for r in replies) / (processes * count),
        }

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(Exception):
                c.send(None)
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


# ------------------------------------------------------------------------------------------------ the server
class _Server:
    """A redis-server child: AOF always, a free port, its directory under ``base``; stopped by ``close()``."""

    def __init__(self, base: str) -> None:
        os.makedirs(base, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="redis-", dir=base)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
                "--logfile", os.path.join(self.dir, "redis.log")]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis

        deadline = time.monotonic() + 20
        while True:
            try:
                with redis.Redis.from_url(self.url, socket_timeout=1) as client:
                    client.ping()
                    return
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(20)
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ the cases
def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _half_range(xs: list[float]) -> float:
    m = _median(xs)
    return 50.0 * (max(xs) - min(xs)) / m if len(xs) > 1 and m else 0.0


def run(quick: bool, base: str | None = None) -> list[dict[str, Any]]:
    """Every competitor at P=1 and P=8, interleaved over the repeats; one row per (competitor, P) and per fairness
    figure. Counter rows: ``case``, ``competitor``, ``processes``, ``ops_per_s``, ``spread_pct``, ``vs_lock_cas``,
    ``round_trips`` (commands or pipelines sent per increment, BLPOP included), ``final`` ("ok (k/k runs)" or what
    was lost). Fairness rows: ``max_wait_ms``, ``p99_wait_ms``, ``ideal_ms``, ``ratio``."""
    repeats, per_run = (2, 160) if quick else (5, 480)
    procs = (1, 8)
    server = _Server(base or os.path.join(HERE, "results", "work.tmp"))
    pool = _Pool(max(procs))
    results: dict[tuple[str, int], list[dict[str, Any]]] = {(n, p): [] for n in NAMES for p in procs}
    wrong: dict[tuple[str, int], list[tuple[int, int]]] = {(n, p): [] for n in NAMES for p in procs}
    try:
        run_id = 0
        for name in NAMES:  # warm-up: connections, scripts, the workers' imports
            pool.run(name, server.url, f"warm:{name}", max(procs), 2)
        for r in range(repeats):
            for p in procs:
                k = (r + p) % len(NAMES)
                for name in NAMES[k:] + NAMES[:k]:
                    run_id += 1
                    key = f"bench:{run_id}"
                    count = per_run // p
                    res = pool.run(name, server.url, key, p, count)
                    final = _count(name, server.url, key)
                    results[name, p].append(res)
                    if final != p * count:
                        wrong[name, p].append((final, p * count))
    finally:
        pool.close()
        server.close()
    rows: list[dict[str, Any]] = []
    for p in procs:
        base_rates = [x["ops"] / x["elapsed"] for x in results["lock+cas", p]]
        for name in NAMES:
            rates = [x["ops"] / x["elapsed"] for x in results[name, p]]
            bad = wrong[name, p]
            verdict = (f"ok ({repeats}/{repeats} runs)" if not bad else
                       f"LOST up to {max(e - f for f, e in bad)} ({len(bad)}/{repeats} runs)")
            rows.append({"case": "counter", "competitor": name, "processes": p, "ops_per_s": _median(rates),
                         "spread_pct": _half_range(rates),
                         "vs_lock_cas": _median([a / b for a, b in zip(rates, base_rates, strict=True)]),
                         "round_trips": _median([x["round_trips"] for x in results[name, p]]), "final": verdict})
    for name in ("lockstore", "lock+cas"):
        ratios, worst, ideal = [], [], []
        for single, busy in zip(results[name, 1], results[name, 8], strict=True):
            i = 8 * _median(single["durations"])
            w = max(busy["waits"])
            ratios.append(w / i)
            worst.append(w)
            ideal.append(i)
        rows.append({"case": "fairness", "competitor": name, "processes": 8, "max_wait_ms": 1000 * _median(worst),
                     "ideal_ms": 1000 * _median(ideal), "ratio": _median(ratios),
                     "p99_wait_ms": 1000 * _median([sorted(b["waits"])[int(0.99 * (len(b["waits"]) - 1))]
                                                    for b in results[name, 8]])})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| competitor | P | increments/s | vs lock+cas | round trips per increment | final count |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["case"] == "counter":
            out.append(f"| {r['competitor']} | {r['processes']} | {r['ops_per_s']:,.0f} (±{r['spread_pct']:.0f}%) | "
                       f"{r['vs_lock_cas']:.2f}x | {r['round_trips']:.2f} | {r['final']} |")
    out += ["", "| fairness, 8 processes | longest wait | p99 wait | ideal (8 x median txn, P=1) | longest / ideal |",
            "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["case"] == "fairness":
            out.append(f"| {r['competitor']} | {r['max_wait_ms']:.1f} ms | {r['p99_wait_ms']:.1f} ms | "
                       f"{r['ideal_ms']:.1f} ms | {r['ratio']:.1f}x |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats (a smoke run)")
    parser.add_argument("--dir", help="where the server keeps its AOF (never tmpfs: fsync must cost what it costs)")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    rows = run(args.quick, args.dir)
    print(f"Redis store: {len(NAMES)} competitors, P = 1 and 8, durable (AOF, appendfsync always); "
          f"{time.monotonic() - t0:.0f} s on {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
