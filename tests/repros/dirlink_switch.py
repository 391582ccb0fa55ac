"""A directory symlink switched while a transaction runs: the transaction locks and reads one file and writes another.

The common deploy layout: ``current -> releases/A``, stores opened as ``current/state.json``. The lock file is
``current/state.json.lock`` and the data path is only re-resolved when its *last* component is a symlink
(_file._resolve uses lstat), so a process that locked and read releases/A/state.json, after ``current`` is switched
to releases/B, writes its value into releases/B/state.json -- while another process holds releases/B's lock and
updates it. B's update is lost, A's increment is never stored, and B's file is overwritten with A's data.
"""
import json, os, subprocess, sys, tempfile
import lockstore

d = tempfile.mkdtemp(dir=os.environ.get("REPRO_DIR"))
for rel, n in (("A", 100), ("B", 0)):
    os.makedirs(os.path.join(d, rel))
    with open(os.path.join(d, rel, "state.json"), "w") as f:
        json.dump({"n": n}, f)
cur = os.path.join(d, "current")
os.symlink("A", cur)
path = os.path.join(cur, "state.json")

SLOW = r"""
import sys, lockstore
store = lockstore.open(sys.argv[1], default={"n": 0}, durable=False, timeout=30)
with store.transaction() as s:
    s.value["n"] += 1
    print("read", s.value["n"] - 1, flush=True)
    sys.stdin.readline()          # the orchestrator switches the link here
print("written", flush=True)
"""
slow = subprocess.Popen([sys.executable, "-c", SLOW, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
print("process 1 (opened current/state.json, current -> A):", slow.stdout.readline().strip())

tmp = cur + ".new"
os.symlink("B", tmp)
os.replace(tmp, cur)            # atomic switch: current -> B
print("switched current -> B")

fast = lockstore.open(path, default={"n": 0}, durable=False, timeout=5)
for _ in range(5):
    with fast.transaction() as s:   # process 2 (here): B's lock is free, so it proceeds
        s.value["n"] += 1
print("process 2: 5 increments on current/state.json (now B):", lockstore.read(os.path.join(d, "B", "state.json")))

slow.stdin.write("go\n"); slow.stdin.flush()
print("process 1:", slow.stdout.readline().strip())
slow.wait(30)
a = lockstore.read(os.path.join(d, "A", "state.json"))
b = lockstore.read(os.path.join(d, "B", "state.json"))
print(f"A/state.json = {a}  (expected {{'n': 101}}: process 1 locked and read A)")
print(f"B/state.json = {b}  (expected {{'n': 5}}: process 2's 5 acknowledged increments)")
if a != {"n": 101} or b != {"n": 5}:
    print("FAIL: process 1 wrote A's value into B: B's updates lost, A's increment lost")
    sys.exit(1)
print("PASS")
