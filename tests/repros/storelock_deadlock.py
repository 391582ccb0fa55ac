"""store.lock held by one thread around two transactions deadlocks with a second thread's transaction.

README: "store.lock ... hold it to keep other processes out around something else; while a thread holds it, that
thread's transactions and commits run inside it". Thread A holds store.lock and runs transaction 1 inside it.
Thread B starts a transaction: it takes this process's slot for the lock file and waits for the flock (held by A's
FileLock). Thread A's transaction 2 then queues for the slot behind B, and B waits for A: neither can proceed.
With timeout=-1 ("waits forever") this never ends; with a finite timeout, A gets a LockTimeout naming itself.
"""
import os, sys, tempfile, threading, time
import lockstore

d = tempfile.mkdtemp(dir=os.environ.get("REPRO_DIR"))
path = os.path.join(d, "d.json")
store = lockstore.open(path, default={"n": 0}, durable=False, timeout=-1)
store.commit()
lf = path + ".lock"
ino = os.stat(lf).st_ino


def pending_flock_waits():
    """Blocked flock requests on our lock file, from /proc/locks ('->' lines)."""
    n = 0
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "->" in parts and parts[parts.index("->") + 1] == "FLOCK" and parts[-3].endswith(f":{ino}"):
                n += 1
    return n


between = threading.Event()
b_started = threading.Event()
a_done = threading.Event()
log = []


def thread_a():
    with store.lock:
        with store.transaction() as s:
            s.value["n"] += 1
        log.append("A: transaction 1 done inside store.lock")
        between.set()
        # wait until B is blocked in the kernel on the flock our FileLock holds
        deadline = time.monotonic() + 30
        while pending_flock_waits() == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        log.append(f"A: B is waiting in the kernel ({pending_flock_waits()} pending flock request)")
        with store.transaction() as s:      # our own second transaction, still inside store.lock
            s.value["n"] += 1
        log.append("A: transaction 2 done")
    a_done.set()


def thread_b():
    between.wait()
    b_started.set()
    with store.transaction() as s:
        s.value["n"] += 1
    log.append("B: transaction done")


ta = threading.Thread(target=thread_a, daemon=True)
tb = threading.Thread(target=thread_b, daemon=True)
ta.start(); tb.start()
finished = a_done.wait(15)
tb.join(5)
for line in log:
    print(line)
if not finished or tb.is_alive():
    print("FAIL: deadlock: thread A (holding store.lock) waits for thread B, which waits for A's store.lock "
          f"(still stuck after 15 s; timeout=-1 waits forever); file: {lockstore.read(path)}")
    os._exit(1)
print("PASS", lockstore.read(path))
