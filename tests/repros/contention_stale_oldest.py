"""No kill needed: ordinary contention between a few processes leaves a stale 'oldest wait' in the lock file's
waiter header (withdraw() re-computes the oldest from a read of the slots, then writes it back without any lock, so
a waiter that read another waiter's slot just before that waiter withdrew writes back a start nobody waits from).
Afterwards every release 'hands over' to nobody and every next acquisition of every process idles ~2 ms, forever."""
import os, struct, subprocess, sys, tempfile, time
import lockstore
from lockstore import _sidecar

if len(sys.argv) > 1 and sys.argv[1] == "child":
    s = lockstore.open(sys.argv[2], default={"n": 0}, durable=False)
    for _ in range(int(sys.argv[3])):
        with s.transaction(timeout=30) as v:
            v.value["n"] += 1
    sys.exit(0)

_orig = _sidecar.SidecarLock._hand_over
spent = [0, 0.0]
def _observed(slot):  # observes, does not change, the hand-over
    t = time.perf_counter()
    try:
        return _orig(slot)
    finally:
        spent[0] += 1
        spent[1] += time.perf_counter() - t
_sidecar.SidecarLock._hand_over = staticmethod(_observed)

def header(path):
    with open(path + ".lock", "rb") as f:
        f.seek(6144)
        return struct.unpack("<4sId", f.read(16))

d = tempfile.mkdtemp(prefix="cso-", dir=os.environ.get("REPRO_DIR"))
path = os.path.join(d, "c.json")
total = 0
since = 0.0
for rnd in range(10):
    ps = [subprocess.Popen([sys.executable, __file__, "child", path, "300"]) for _ in range(3)]
    for p in ps:
        p.wait()
    total += 900
    since = header(path)[2]
    if since:
        break
assert lockstore.read(path)["n"] == total
print(f"after {rnd + 1} rounds of 3 contending processes (all exited): header's oldest wait = "
      f"{since and f'{time.time() - since:.2f} s ago'}")
store = lockstore.open(path, default={"n": 0}, durable=False)
N = 300
t = time.perf_counter()
for _ in range(N):
    with store.transaction() as s:
        s.value["n"] += 1
per = (time.perf_counter() - t) / N
print(f"then one process alone, {N} transactions: {per*1e3:.3f} ms each; {spent[0]} hand-overs to nobody, "
      f"{spent[1]*1e3:.0f} ms idle in them; waiters now: {store.waiters()}")
if since and spent[0] > N // 2:
    print("FAIL: a stale oldest-wait left by ordinary contention makes every later transaction idle ~2 ms")
    sys.exit(1)
print("PASS")
