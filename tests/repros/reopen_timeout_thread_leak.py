"""A process that opens a Store per attempt (`lockstore.open(path).transaction(timeout=...)`, as the README's
one-liner does) and times out while another process holds the flock leaks one waiter thread and two descriptors
per attempt for as long as the holder keeps the lock: dropping the Store closes the slot, but its waiter thread is
stuck in a blocking flock() on its own descriptor, and the next Store starts a new one."""
import fcntl, gc, os, subprocess, sys, tempfile, threading, time
import lockstore

d = tempfile.mkdtemp(prefix="leak-", dir=os.environ.get("REPRO_DIR"))
path = os.path.join(d, "c.json")
lockstore.open(path, default={"n": 0}).commit()
# a foreign process (flock(1)-style) holds the lock
holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, sys, time
fd = os.open({path + '.lock'!r}, os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
assert holder.stdout.readline().strip() == "held"

def counts():
    return threading.active_count(), len(os.listdir("/proc/self/fd"))

def attempt():
    try:
        with lockstore.open(path, default={"n": 0}).transaction(timeout=0.02) as s:
            s.value["n"] += 1
    except lockstore.LockTimeout:
        pass

attempt(); gc.collect()
t0, f0 = counts()
for _ in range(200):
    attempt()
    gc.collect()
attempt()  # runs deferred cleanups
t1, f1 = counts()
holder.stdin.close(); holder.wait()
time.sleep(0.5)
attempt(); gc.collect(); attempt(); time.sleep(0.2)
t2, f2 = counts()
print(f"threads/fds after 1 attempt: {t0}/{f0}; after 200 more timed-out attempts: {t1}/{f1}; "
      f"after the holder quit: {t2}/{f2}")
if t1 - t0 > 20 or f1 - f0 > 20:
    print("FAIL: every timed-out attempt through a new Store leaves a waiter thread and descriptors behind "
          "while the foreign holder keeps the lock")
    sys.exit(1)
print("PASS")
