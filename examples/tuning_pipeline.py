"""The README's "Tuning lock timeouts" example: four ingest workers (short transactions) and a nightly rollup that
holds the same lock for 1.5 s, three times. Run it in an empty directory:

    python examples/tuning_pipeline.py 1    # the ingests' timeout: 1 s (some time out)
    lockstore holder state.json             # (from another shell while it runs) the holder and the queue
    lockstore stats state.json              # afterwards: the evidence, and a suggested timeout
"""

from __future__ import annotations

import random
import subprocess
import sys
import time

import lockstore


def ingest(timeout: float) -> None:
    store = lockstore.open("state.json", default={"rows": 0, "rollups": 0}, timeout=timeout)
    end = time.monotonic() + 12
    while time.monotonic() < end:
        try:
            with store.transaction(label="ingest") as s:
                s.value["rows"] += 1
                time.sleep(random.uniform(0.002, 0.02))
        except lockstore.LockTimeout as exc:
            print("ingest:", exc, file=sys.stderr)
        time.sleep(0.01)


def rollup() -> None:
    store = lockstore.open("state.json", default={"rows": 0, "rollups": 0}, warn_hold=2.0)
    for _ in range(3):
        time.sleep(3)
        with store.transaction(label="nightly-rollup") as s:
            s.value["rollups"] += 1
            time.sleep(1.5)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--ingest"]:
        ingest(float(sys.argv[2]))
    elif sys.argv[1:2] == ["--rollup"]:
        rollup()
    else:
        timeout = sys.argv[1] if len(sys.argv) > 1 else "1"
        jobs = [[sys.executable, __file__, "--ingest", timeout] for _ in range(4)]
        jobs.append([sys.executable, __file__, "--rollup"])
        for proc in [subprocess.Popen(job) for job in jobs]:
            proc.wait()
        print(lockstore.read("state.json"))
