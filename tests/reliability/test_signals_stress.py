"""Real SIGINT bursts at a process in a transaction loop (stress tier): nothing lost, leaked, left held or hung.

The deterministic counterpart (an exception at every interrupt point, one by one) is ``tests/test_signals.py``.
Here a child runs transactions in its main thread and catches each KeyboardInterrupt, while the test sends SIGINT
bursts at random moments and a second process keeps taking the same lock with a timeout. The child's handler
raises only while a transaction runs (the harness's own bookkeeping is not under test); several signals may land
in one transaction, cleanup included. Afterwards: the counter is at least the acknowledged increments and at most
the attempted ones (an interrupt after the rename may come before the acknowledgement), the second process never
timed out, the child's descriptors and threads are what they were, no temp file is left, and the lock is free.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lockstore

from ._harness import add, report

_LOOP = r"""
import gc, json, os, signal, sys, threading, time, lockstore
path, seconds = sys.argv[1], float(sys.argv[2])
store = lockstore.open(path, default={"n": 0}, durable=sys.argv[3] == "1", timeout=10)
with store.transaction() as s:
    s.value["n"] += 1
attempted = acked = 1
interrupted = 0
armed = False


def interrupt(signum, frame):
    # Only while lockstore runs: the harness's own bookkeeping must not be what the signals break.
    if armed:
        raise KeyboardInterrupt


signal.signal(signal.SIGINT, interrupt)
# Measured with the store closed, before and after: a closed Store keeps no descriptor and no waiter thread, so
# anything more at the end was leaked by an interrupt.
store.close()
gc.collect()
fds0 = len(os.listdir("/proc/self/fd"))
threads0 = threading.active_count()
print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        attempted += 1
        armed = True
        with store.transaction() as s:
            s.value["n"] += 1
        armed = False
        acked += 1
    except KeyboardInterrupt:
        armed = False
        interrupted += 1
signal.signal(signal.SIGINT, signal.SIG_IGN)
time.sleep(0.2)
gc.collect()
with store.transaction(timeout=0) as s:  # our own slot and the lock are free, and the next write works
    s.value["n"] += 1
attempted += 1
acked += 1
store.close()
gc.collect()
deadline = time.monotonic() + 5
while threading.active_count() > threads0 and time.monotonic() < deadline:
    time.sleep(0.01)  # a closed Store's waiter thread ends on its own
print(json.dumps({"acked": acked, "attempted": attempted, "interrupted": interrupted,
                  "fds": len(os.listdir("/proc/self/fd")) - fds0, "threads": threading.active_count() - threads0}),
      flush=True)
"""

_OTHER = r"""
import json, sys, time, lockstore
store = lockstore.open(sys.argv[1], default={"n": 0}, durable=False, timeout=5)
end = time.monotonic() + float(sys.argv[2])
done = timeouts = 0
while time.monotonic() < end:
    try:
        with store.transaction() as s:
            s.value["n"] += 1
        done += 1
    except lockstore.LockTimeout:
        timeouts += 1
print(json.dumps({"done": done, "timeouts": timeouts}), flush=True)
"""


@pytest.mark.stress
@pytest.mark.timeout(300)
@pytest.mark.parametrize("durable", [False, True])
def test_sigint_bursts_lose_and_leak_nothing(tmp_path: Path, durable: bool) -> None:
    path = tmp_path / "counter.json"
    seconds = 8.0
    rng = random.Random(1234)
    child = subprocess.Popen([sys.executable, "-c", _LOOP, str(path), str(seconds), "1" if durable else "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    other = subprocess.Popen([sys.executable, "-c", _OTHER, str(path), str(seconds - 1)], stdout=subprocess.PIPE,
                             text=True)
    sent = 0
    end = time.monotonic() + seconds - 1
    while time.monotonic() < end:
        for _ in range(rng.randint(1, 5)):  # a burst
            os.kill(child.pid, signal.SIGINT)
            sent += 1
            time.sleep(rng.uniform(0, 0.0005))
        time.sleep(rng.uniform(0.0005, 0.01))
    out, err = child.communicate(timeout=120)
    other_out, _ = other.communicate(timeout=120)
    assert child.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    others = json.loads(other_out)
    n = lockstore.read(path)["n"]
    mine = n - others["done"]
    violations: list[str] = []
    if not result["acked"] <= mine <= result["attempted"]:
        violations.append(f"counter {mine} outside [{result['acked']} acknowledged, {result['attempted']} tried]")
    if others["timeouts"]:
        violations.append(f"the other process timed out {others['timeouts']} times: a lock left held")
    if result["fds"] != 0:
        violations.append(f"{result['fds']:+d} descriptors in the interrupted process")
    if result["threads"] != 0:
        violations.append(f"{result['threads']:+d} threads in the interrupted process")
    temps = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    if temps:
        violations.append(f"temp files left: {temps}")
    add("processes", 2)
    add("transactions checked", result["acked"] + others["done"])
    add("SIGINTs sent", sent)
    report(violations)
    assert result["interrupted"] > 50, result  # the signals really landed inside transactions
    assert violations == []
