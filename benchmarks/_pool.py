"""Persistent worker processes, started once with ``sys.executable`` (multiprocessing's spawn) and reused by every run.

A run sends one job to P workers; each opens the competitor (untimed), reports ready, waits for the go, runs its M
increments and sends back its start and end times (``perf_counter`` is CLOCK_MONOTONIC, one clock for all
processes on Linux) and what each increment waited for its lock and took in all.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import resource
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from time import perf_counter


@dataclass
class RunResult:
    """One run: P processes x M increments of one competitor."""

    processes: int
    per_process: int
    elapsed: float  # first start to last end, seconds
    waits: list[float]  # time to acquire the lock, every increment of every process
    durations: list[float]  # whole increment, every increment of every process
    cpu: float  # user + system seconds of all the processes during the run (all their threads)
    switches: int  # voluntary + involuntary context switches of all the processes during the run

    @property
    def ops(self) -> int:
        return self.processes * self.per_process

    @property
    def throughput(self) -> float:
        return self.ops / self.elapsed


def _serve(conn: Connection) -> None:
    from _jobs import BY_NAME

    while True:
        job = conn.recv()
        if job is None:
            return
        name, path, count = job
        try:
            op, close = BY_NAME[name].open(path)
        except BaseException:
            conn.send(("error", traceback.format_exc()))
            continue
        conn.send("ready")
        conn.recv()
        waits: list[float] = []
        durations: list[float] = []
        try:
            before = resource.getrusage(resource.RUSAGE_SELF)
            start = perf_counter()
            for _ in range(count):
                begin = perf_counter()
                waits.append(op())
                durations.append(perf_counter() - begin)
            end = perf_counter()
            after = resource.getrusage(resource.RUSAGE_SELF)
            close()
        except BaseException:
            conn.send(("error", traceback.format_exc()))
            continue
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        switches = after.ru_nvcsw + after.ru_nivcsw - before.ru_nvcsw - before.ru_nivcsw
        conn.send((start, end, waits, durations, cpu, switches))


class Pool:
    """``size`` idle workers; :meth:`run` uses the first P of them."""

    def __init__(self, size: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[BaseProcess] = []
        for _ in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child,), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    def run(self, name: str, path: str, processes: int, per_process: int) -> RunResult:
        conns = self._conns[:processes]
        for conn in conns:
            conn.send((name, path, per_process))
        opened = [conn.recv() for conn in conns]
        for conn, msg in zip(conns, opened, strict=True):
            if msg == "ready":
                conn.send("go")
        replies = [conn.recv() if msg == "ready" else msg for conn, msg in zip(conns, opened, strict=True)]
        failed = [r[1] for r in replies if r[0] == "error"]
        if failed:
            raise RuntimeError(f"{name}: a worker failed:\n{failed[0]}")
        starts = [r[0] for r in replies]
        ends = [r[1] for r in replies]
        return RunResult(
            processes=processes,
            per_process=per_process,
            elapsed=max(ends) - min(starts),
            waits=[w for r in replies for w in r[2]],
            durations=[d for r in replies for d in r[3]],
            cpu=sum(r[4] for r in replies),
            switches=sum(r[5] for r in replies),
        )

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
