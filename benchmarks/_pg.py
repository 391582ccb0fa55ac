"""The PostgreSQL store against a hand-written psycopg loop: shared-counter increments, P = 1 and 8 processes.

Self-contained: it starts its own throwaway server (``initdb`` + ``postgres`` on a free port, as ``nobody`` when run
as root, its data directory on disk, never tmpfs) with ``fsync = on`` and ``synchronous_commit = on``, and stops it
at the end. Usage: ``python benchmarks/_pg.py [--quick] [--dir DIR]``; ``run(quick)`` returns the rows for
``benchmarks/run.py``.

Every increment is one read-modify-write of a JSON value ``{"n": ...}`` in one row:

- lockstore: ``with store.transaction() as s: s.value["n"] += 1`` (default options: 30 s timeout, durable);
- the baseline: ``SELECT value ... FOR UPDATE``, ``json.loads``, ``UPDATE ... SET value = ..., version = version + 1``,
  ``COMMIT`` on one psycopg connection, no timeout, no holder record, no version check;
- both again without waiting for the WAL flush (lockstore ``durable=False``; the baseline sets
  ``synchronous_commit = off``).

Workers are processes started once with ``sys.executable`` and reused; a run opens the competitor in P of them
(untimed), starts them together and measures first start to last end. Competitors run interleaved, the order rotating
per repeat; figures are medians of the repeats, ratios medians of per-repeat ratios, and the final count of every run
is checked.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COMPETITORS = ("lockstore", "psycopg loop", "lockstore durable=False", "psycopg loop, synchronous_commit=off")
PAIRS = (("lockstore", "psycopg loop"), ("lockstore durable=False", "psycopg loop, synchronous_commit=off"))
PROCESSES = (1, 8)


# ------------------------------------------------------------------------------------------------ the server
def _bindir() -> Path:
    candidates = []
    if env := os.environ.get("LOCKSTORE_PG_BINDIR"):
        candidates.append(Path(env))
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name, reverse=True)
    for c in candidates:
        if all(os.access(c / b, os.X_OK) for b in ("initdb", "postgres")):
            return c
    raise SystemExit("PostgreSQL server binaries not found (apt-get install postgresql, or set LOCKSTORE_PG_BINDIR)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def server(base: str | None) -> Iterator[str]:
    """A started throwaway server; yields its URL (superuser, trusted, TCP on 127.0.0.1)."""
    bindir = _bindir()
    as_user: list[str] = []
    uid = gid = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
        as_user = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--pdeathsig", "KILL"]
    if base is not None:
        os.makedirs(base, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lockstore-bench-pg-", dir=base or "/var/tmp"))
    proc = None
    try:
        if uid is not None:
            os.chown(work, uid, gid if gid is not None else -1)
        work.chmod(0o755)
        data = work / "data"
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E",
                        "UTF8", "--locale=C"], check=True, capture_output=True, timeout=120,
                       env={**os.environ, "LC_ALL": "C"})
        with (data / "postgresql.conf").open("a") as f:
            f.write("\nfsync = on\nsynchronous_commit = on\nfull_page_writes = on\nmax_connections = 60\n")
        port = _free_port()
        with (work / "postgres.log").open("ab") as log:
            proc = subprocess.Popen([*as_user, str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k",
                                     str(work), "-c", "listen_addresses=127.0.0.1"], stdout=log, stderr=log,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            lines = (data / "postmaster.pid").read_text().splitlines() if (data / "postmaster.pid").exists() else []
            if len(lines) >= 8 and lines[7].strip() == "ready":
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"postgres did not start:\n{(work / 'postgres.log').read_text()[-2000:]}")
            time.sleep(0.05)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ the workers
def _open(kind: str, url: str, key: str) -> tuple[Any, Any]:
    """The competitor's increment, opened as a long-running worker would (outside the timing), and its close."""
    if kind.startswith("lockstore"):
        import lockstore

        store = lockstore.open(f"{url}#{key}", default={"n": 0}, durable=kind == "lockstore")

        def op() -> None:
            with store.transaction() as s:
                s.value["n"] += 1

        return op, store.close
    import psycopg

    conn = psycopg.connect(url)
    if kind.endswith("synchronous_commit=off"):
        conn.execute("SET synchronous_commit = off")
        conn.commit()
    cur = conn.cursor()

    def op_baseline() -> None:
        cur.execute("SELECT value FROM lockstore WHERE key = %s FOR UPDATE", (key,))
        row = cur.fetchone()
        assert row is not None
        value = json.loads(row[0])
        value["n"] += 1
        cur.execute("UPDATE lockstore SET value = %s, version = version + 1, updated_at = now() WHERE key = %s",
                    (json.dumps(value).encode(), key))
        conn.commit()

    return op_baseline, conn.close


def _worker() -> None:
    """Serve jobs from stdin: a JSON job -> open, say ready, wait for go, run, report start and end."""
    for line in sys.stdin:
        job = json.loads(line)
        op, close = _open(job["kind"], job["url"], job["key"])
        print("ready", flush=True)
        sys.stdin.readline()
        start = time.perf_counter()
        for _ in range(job["n"]):
            op()
        end = time.perf_counter()
        close()
        print(json.dumps([start, end]), flush=True)


class Pool:
    def __init__(self, size: int) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                                           if p)}
        self.procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env) for _ in range(size)]

    def run(self, kind: str, url: str, key: str, processes: int, per_process: int) -> float:
        """Increments per second of ``processes`` workers doing ``per_process`` increments each."""
        procs = self.procs[:processes]
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(json.dumps({"kind": kind, "url": url, "key": key, "n": per_process}) + "\n")
            p.stdin.flush()
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready", kind
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        times: list[list[float]] = []
        for p in procs:
            assert p.stdout is not None
            times.append(json.loads(p.stdout.readline()))
        return float(processes * per_process / (max(t[1] for t in times) - min(t[0] for t in times)))

    def close(self) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.close()
        for p in self.procs:
            p.wait(30)
            if p.stdout is not None:
                p.stdout.close()


# ------------------------------------------------------------------------------------------------ the runs
def run(quick: bool = False, directory: str | None = None) -> list[dict[str, Any]]:
    """Measure every competitor at P = 1 and 8; one row per competitor and P (see the module docstring)."""
    import psycopg

    repeats = 3 if quick else 7
    ops = {1: 150, 8: 240} if quick else {1: 600, 8: 960}
    rates: dict[tuple[str, int], list[float]] = {(k, p): [] for k in COMPETITORS for p in PROCESSES}
    exact: dict[tuple[str, int], bool] = dict.fromkeys(rates, True)
    with server(directory) as url, psycopg.connect(url, autocommit=True) as admin:
        import lockstore

        lockstore.open(f"{url}#warm-up", default={"n": 0}).commit()  # creates the table
        pool = Pool(max(PROCESSES))
        try:
            for rep in range(repeats):
                order = list(COMPETITORS[rep % len(COMPETITORS):] + COMPETITORS[: rep % len(COMPETITORS)])
                for processes in PROCESSES:
                    for kind in order:
                        key = f"{kind}/{processes}/{rep}"
                        admin.execute("INSERT INTO lockstore (key, value, version) VALUES (%s, %s, 1)",
                                      (key, b'{"n": 0}'))
                        rate = pool.run(kind, url, key, processes, ops[processes] // processes)
                        rates[kind, processes].append(rate)
                        got = admin.execute("SELECT value FROM lockstore WHERE key = %s", (key,)).fetchone()
                        if got is None or json.loads(got[0])["n"] != ops[processes] // processes * processes:
                            exact[kind, processes] = False
        finally:
            pool.close()
    rows: list[dict[str, Any]] = []
    for kind in COMPETITORS:
        for processes in PROCESSES:
            xs = rates[kind, processes]
            med = statistics.median(xs)
            row: dict[str, Any] = {"competitor": kind, "processes": processes, "ops_per_s": med,
                                   "spread_pct": 100 * (max(xs) - min(xs)) / med, "exact": exact[kind, processes],
                                   "repeats": len(xs)}
            for mine, base in PAIRS:
                if kind == mine:
                    pairs = [a / b for a, b in zip(xs, rates[base, processes], strict=True)]
                    row["ratio"] = statistics.median(pairs)
                    row["baseline"] = base
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| competitor | P=1 | P=8 | x baseline (P=1) | x baseline (P=8) | final count |",
             "|---|---|---|---|---|---|"]
    for kind in COMPETITORS:
        mine = {r["processes"]: r for r in rows if r["competitor"] == kind}
        ratio = [f"**{mine[p]['ratio']:.2f}**" if "ratio" in mine[p] else "1.00" for p in PROCESSES]
        rate = [f"{mine[p]['ops_per_s']:,.0f} (±{mine[p]['spread_pct'] / 2:.0f}%)" for p in PROCESSES]
        final = "exact" if all(mine[p]["exact"] for p in PROCESSES) else "**LOST UPDATES**"
        lines.append(f"| {kind} | {rate[0]} | {rate[1]} | {ratio[0]} | {ratio[1]} | {final} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and increments (a smoke run)")
    parser.add_argument("--dir", help="where the server's data directory goes (on disk; default /var/tmp)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker()
        return
    t0 = time.monotonic()
    rows = run(args.quick, args.dir)
    print(f"PostgreSQL store, shared counter (JSON {{\"n\": ...}}), increments per second; "
          f"{rows[0]['repeats']} interleaved repeats, medians ({time.monotonic() - t0:.0f} s)")
    print(table(rows))


if __name__ == "__main__":
    main()
