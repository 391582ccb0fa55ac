"""A burst of three interrupts during a timed wait must not leave the lock held by this process (third review).

Before the fix the lock stayed held for good (seen from other processes), until this process happened to wait for
the same lock again.

Signal 1 lands while Waiter.wait blocks in request.done.acquire() (real SIGALRM, handler raises KeyboardInterrupt);
signal 2 at the start of Waiter._cancel (trace function); signal 3 at the start of its one retry (profile function).
The request is never marked cancelled, so the waiter thread, once the other process lets go, takes the flock on its
own descriptor and records a grant nobody will ever consume or drop."""
import fcntl, gc, os, signal, subprocess, sys, tempfile, time
import lockstore
from lockstore import _waiter

CANCEL = _waiter.Waiter._cancel.__code__
tmp = tempfile.mkdtemp(dir=os.environ.get("REPRO_DIR"))
path = os.path.join(tmp, "d.json")
lock_file = path + ".lock"
store = lockstore.open(path, default={"n": 0}, durable=False, timeout=10)
store.commit()
holder = subprocess.Popen([sys.executable, "-c", "import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDWR);"
                           "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.readline();"
                           "fcntl.flock(fd, fcntl.LOCK_UN); print('released', flush=True); sys.stdin.readline()",
                           lock_file], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
assert holder.stdout.readline().strip() == "held"

state = {"second": False}


def tracer(frame, event, arg):
    if event == "call" and frame.f_code is CANCEL:
        sys.settrace(None)
        state["second"] = True
        raise KeyboardInterrupt  # signal 2
    return None


def profiler(frame, event, arg):
    if event == "call" and frame.f_code is CANCEL and state["second"]:
        sys.setprofile(None)
        raise KeyboardInterrupt  # signal 3
    return None


def on_alarm(signum, frame):
    sys.settrace(tracer)      # arm the next two (set here: they apply to the interrupted thread from now on)
    sys.setprofile(profiler)
    raise KeyboardInterrupt   # signal 1


signal.signal(signal.SIGALRM, on_alarm)
signal.setitimer(signal.ITIMER_REAL, 0.3)
try:
    with store.transaction() as s:  # waits through the waiter thread (timeout=10)
        s.value["n"] += 1
except KeyboardInterrupt:
    print("transaction interrupted")
sys.settrace(None); sys.setprofile(None)
gc.collect()
store.reload()  # the next lockstore calls: release whatever was left
lockstore.read(path)
holder.stdin.write("\n"); holder.stdin.flush()
assert holder.stdout.readline().strip() == "released"
time.sleep(0.5)
store.reload()
fd = os.open(lock_file, os.O_RDONLY)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    free = True
except BlockingIOError:
    free = False
os.close(fd)
holder.stdin.write("\n"); holder.stdin.flush(); holder.wait()
r = subprocess.run([sys.executable, "-c", "import lockstore,sys; s=lockstore.open(sys.argv[1], default={'n':0}, timeout=2)\n"
                    "try:\n  s.commit(); print('other process: commit ok')\nexcept lockstore.LockTimeout as e: print('other process:', e)", path],
                   capture_output=True, text=True)
print(r.stdout.strip(), r.stderr.strip()[-300:])
print("lock free for other processes:", free)
if not free:
    print("FAIL: this process holds the lock (its waiter thread's descriptor) with no transaction running")
    sys.exit(1)
print("PASS")
