"""A Store opened on a symlink that is switched to new targets (a deploy's `current -> releases/N`) keeps a
descriptor (and waiter thread) open on the lock file of every target it ever saw, until the Store is closed."""
import os, sys, tempfile, threading, fcntl
import lockstore

d = tempfile.mkdtemp(dir=os.environ.get("REPRO_DIR"))
link = os.path.join(d, "current.json")

def fds_on_lock_files():
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            t = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if t.endswith(".lock") or t.endswith(".lock (deleted)"):
            n += 1
    return n

def waiters():
    return sum(t.name.startswith("lockstore-waiter") for t in threading.enumerate())

N = 50
store = lockstore.open(link, default={"n": 0}, durable=False)
for i in range(N):
    tgt = os.path.join(d, f"v{i}.json")
    with open(tgt, "w") as f:
        f.write('{"n": 0}')
    tmp = link + ".new"
    os.symlink(os.path.basename(tgt), tmp)
    os.replace(tmp, link)
    # contend once so that a waiter thread is started for this target's lock file
    hold = os.open(tgt + ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(hold, fcntl.LOCK_EX)
    t = threading.Timer(0.02, lambda: (fcntl.flock(hold, fcntl.LOCK_UN), os.close(hold)))
    t.start()
    with store.transaction(timeout=5) as s:
        s.value["n"] += 1
    t.join()
lock_fds, wt = fds_on_lock_files(), waiters()
print(f"after {N} switches: {lock_fds} descriptors on lock files, {wt} waiter threads (one Store, one current target)")
store.close()
print(f"after close: {fds_on_lock_files()} descriptors on lock files, {waiters()} waiter threads")
if lock_fds > 4 or wt > 2:
    print("FAIL: descriptors/threads accumulate per symlink target")
    sys.exit(1)
print("PASS")
