"""Threads sharing a Store opened on a symlink that is switched: a transaction can run on the new target while
holding only the OLD target's lock, so another process's transaction on the new target runs at the same time.

FileStorage.settle checks "is the lock I hold the new target's?" only when ``self._last_target`` differs from the
resolved target -- but ``_last_target`` is shared by every thread (and task) using the Store. T2 and T3 both queue
for A's lock; T2 gets it, sees the switch, sets ``_last_target = B``, lets A go and takes B's lock. T3 then gets A's
lock, finds ``_last_target == B`` and skips the check: it reads and writes B holding A's lock.
"""
import json, os, subprocess, sys, tempfile, threading, time
import lockstore

d = tempfile.mkdtemp(dir=os.environ.get("REPRO_DIR"))
for name in ("A.json", "B.json"):
    with open(os.path.join(d, name), "w") as f:
        json.dump({"n": 0}, f)
link = os.path.join(d, "current.json")
os.symlink("A.json", link)
store = lockstore.open(link, default={"n": 0}, durable=False, timeout=30)

t1_in, t1_go, t3_in, t3_go = (threading.Event() for _ in range(4))


def t1():
    with store.transaction() as s:
        s.value["n"] += 1
        t1_in.set(); t1_go.wait(30)


t2_done = threading.Event()


def tn(name):
    if name == "T3":
        # schedule: T3 takes the Store's own guard only after T2 finished (the order the OS may well choose).
        # (Amended after the fix: a T3 that noticed the switch goes for B's lock, and waits for T2 to be done before
        # asking for it; had it got B's lock first and then waited for T2 in _guarded, the two would wait for each
        # other, which is this script's schedule, not lockstore's.)
        took_b = []

        def tr(frame, event, arg):
            if event == "call":
                name_ = frame.f_code.co_name
                me = frame.f_locals.get("self")
                if name_ == "acquire" and str(getattr(me, "lock_file", "")).endswith("B.json.lock"):
                    t2_done.wait(30)
                    took_b.append(True)
                elif name_ == "_guarded" and not took_b:
                    t2_done.wait(30)
            return None
        sys.settrace(tr)
    with store.transaction() as s:
        s.value["n"] += 1
        if name == "T3":
            t3_in.set(); t3_go.wait(30)
    if name == "T2":
        t2_done.set()


def slot_queue_len(lock_file):
    """How many threads of this process wait for lock_file's in-process slot (for orchestration only)."""
    import gc
    st = os.stat(lock_file)
    for o in gc.get_objects():
        if type(o).__name__ in ("_Slot", "Slot") and getattr(o, "key", None) == (st.st_dev, st.st_ino):
            return len(o._queue)
    return 0


th1 = threading.Thread(target=t1); th1.start()
assert t1_in.wait(30)                                   # T1 holds A's lock
tmp = link + ".new"; os.symlink("B.json", tmp); os.replace(tmp, link)     # switch: current -> B
th2 = threading.Thread(target=tn, args=("T2",)); th2.start()
while slot_queue_len(os.path.join(d, "A.json.lock")) < 1: time.sleep(0.001)
th3 = threading.Thread(target=tn, args=("T3",)); th3.start()
while slot_queue_len(os.path.join(d, "A.json.lock")) < 2: time.sleep(0.001)
print("T2 and T3 queued for A's lock (in that order); T1 finishes")
t1_go.set(); th1.join()
assert t3_in.wait(30)
print("T3 is inside its transaction on", os.path.realpath(link), "(T2 done)")
r = subprocess.run([sys.executable, "-c",
                    "import sys, lockstore\ns = lockstore.open(sys.argv[1], default={'n': 0}, timeout=2)\n"
                    "try:\n with s.transaction() as v: v.value['n'] += 1\n print('ran')\n"
                    "except lockstore.LockTimeout: print('waited (timed out)')", os.path.join(d, "B.json")],
                   capture_output=True, text=True)
print("another process's transaction on B.json while T3 is inside one on B:", r.stdout.strip(), r.stderr[-300:])
t3_go.set(); th2.join(); th3.join()
a, b = (lockstore.read(os.path.join(d, n))["n"] for n in ("A.json", "B.json"))
acked_b = 2 + (r.stdout.strip() == "ran")
print(f"A.json n={a} (expected 1), B.json n={b} (expected {acked_b}: T2, T3" + (", the other process)" if acked_b == 3 else ")"))
if r.stdout.strip() == "ran" or b != acked_b:
    print("FAIL: two transactions on B.json at once" + (f"; {acked_b - b} update lost" if b != acked_b else ""))
    sys.exit(1)
print("PASS")
