"""Ctrl-C while waiting for a lock another process holds: the interrupted waiter's cleanup (_let_go) still finds
slot.flocked set to its waiter thread's descriptor (set before the wait, never cleared on an exception) and
writes blanks + its stale statistics area over the lock file, wiping the real holder's record (store.holder()
says the lock is free while it is held) and counting a phantom acquisition in the statistics."""
import os, signal, subprocess, sys, tempfile, threading, time
import lockstore

d = tempfile.mkdtemp(prefix="kbiw-", dir=os.environ.get("REPRO_DIR"))
path = os.path.join(d, "c.json")
store = lockstore.open(path, default={"n": 0}, durable=False)
with store.transaction() as s:  # this process has held the lock once (slot.area is set)
    s.value["n"] += 1
acq0 = store.stats().acquisitions

child_code = f"""
import lockstore, sys, time
s = lockstore.open({path!r}, default={{"n": 0}}, durable=False)
with s.transaction(label="the-holder") as v:
    print("held", flush=True)
    time.sleep(4)
"""
p = subprocess.Popen([sys.executable, "-c", child_code], stdout=subprocess.PIPE, text=True)
assert p.stdout.readline().strip() == "held"
before = store.holder()
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
interrupted = False
try:
    with store.transaction(timeout=10) as s:
        s.value["n"] += 1
except KeyboardInterrupt:
    interrupted = True
after = store.holder()
with open(path + ".lock", "rb") as f:
    raw = f.read(80)
st = store.stats()
child_alive = p.poll() is None
p.wait()
print(f"interrupted={interrupted} child still holding={child_alive}")
print(f"holder before Ctrl-C: {before and (before.pid, before.label)}; after: {after and (after.pid, after.label)}")
print(f"lock file's first bytes now: {raw!r}")
print(f"acquisitions in stats: before={acq0} after Ctrl-C (child still holding)={st.acquisitions if st else None}")
if interrupted and child_alive and (after is None or after.label != "the-holder" or not raw.strip(b" ")):
    print("FAIL: an interrupted waiter wiped the live holder's record from the lock file")
    sys.exit(1)
print("PASS")
