"""fork() while another thread is starting its waiter thread leaks the waiter's lock-file descriptor into the child;
the lock then outlives its holder: after the holder is killed, the lock stays held (by the child's copy of the
open file description) and every other process waits (LockTimeout, or forever).

Victim process: thread T starts the first contended transaction on a lock file. Waiter.__init__ opens its descriptor
and starts its thread (Thread.start waits for the new thread to run, with the GIL released: a natural window). The
main thread forks right then (a pre-forking server starting a worker). The descriptor is in no list that
_sidecar._after_fork closes (the Waiter is not yet in slot.waiters), so the child keeps it. T then gets the lock
through that descriptor; the victim is kill -9'd inside its transaction.
README: "when its holder dies, the OS releases it at once". Here it is not released until the child exits.
The window is widened deterministically with threading.settrace (pause T at the Thread.start line).
MODE=control forks while T is already waiting (the waiter is registered): the lock is released at the kill.
"""
import os, signal, subprocess, sys, tempfile, time
import lockstore
from helpers import Foreign, lock_free

MODE = os.environ.get("MODE", "attack")
d = tempfile.mkdtemp(dir=os.environ.get("REPRO_DIR"))
path = os.path.join(d, "d.json")
lf = path + ".lock"
lockstore.open(path, default={"n": 0}).commit()

VICTIM = r"""
import inspect, os, sys, threading, time
import lockstore
from lockstore import _waiter
path, mode = sys.argv[1], sys.argv[2]
store = lockstore.open(path, default={"n": 0}, durable=False, timeout=60)
init = _waiter.Waiter.__init__.__code__
src, first = inspect.getsourcelines(_waiter.Waiter.__init__)
LINE = first + next(i for i, l in enumerate(src) if ".start()" in l)
paused, resume = threading.Event(), threading.Event()
def local(frame, event, arg):
    if event == "line" and frame.f_lineno == LINE and mode == "attack":
        paused.set(); resume.wait(30)
    return local
def glob(frame, event, arg):
    return local if frame.f_code is init else None
def t():
    with store.transaction() as s:
        s.value["n"] += 1
        print("inside", flush=True)
        time.sleep(120)
threading.settrace(glob)
threading.Thread(target=t, daemon=True).start()
if mode == "attack":
    assert paused.wait(30)
else:
    ino = os.stat(path + ".lock").st_ino
    while not any("->" in l and l.split()[-3].endswith(f":{ino}") for l in open("/proc/locks")):
        time.sleep(0.001)
pid = os.fork()
if pid == 0:                       # a worker: does its own thing for a while
    n = sum(1 for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(path + ".lock"))
    print("child", os.getpid(), "lock-file descriptors", n, flush=True)
    time.sleep(60)
    os._exit(0)
resume.set()
print("forked", pid, flush=True)
time.sleep(120)
"""
foreign = Foreign(lf)
foreign.hold()
v = subprocess.Popen([sys.executable, "-c", VICTIM, path, MODE], stdout=subprocess.PIPE, text=True,
                     cwd=os.path.dirname(os.path.abspath(__file__)))
child = None
try:
    lines = [v.stdout.readline().strip() for _ in range(2)]
    for l in lines:
        if l.startswith("child"):
            child = int(l.split()[1])
    print("victim:", lines)
    foreign.release()                      # the victim's transaction gets the lock
    print("victim:", v.stdout.readline().strip())
    v.kill(); v.wait()                     # kill -9 the holder inside its transaction
    print("holder killed; its forked child (a bystander) is alive:", child is not None and os.path.exists(f"/proc/{child}"))
    other = lockstore.open(path, default={"n": 0}, timeout=5)
    t0 = time.monotonic()
    try:
        with other.transaction() as s:
            s.value["n"] += 1
        print(f"another process got the lock after {time.monotonic() - t0:.2f} s")
        ok = True
    except lockstore.LockTimeout as exc:
        print("another process:", str(exc)[:300])
        ok = False
finally:
    if child:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    foreign.close()
print("PASS" if ok else "FAIL: the dead holder's lock is kept by a descriptor leaked into a forked child")
sys.exit(0 if ok else 1)
