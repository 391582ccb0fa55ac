"""Ctrl-C during a contended wait, as the other process releases, must not leave a phantom grant.

The review's original schedule (0.2.0 before the fix): the interrupt landed right after threading.Condition.wait's
``_release_save()`` (outside its try), the waiter's lock was left released, the caller's withdrawal raced the waiter
thread's grant, and ``_granted`` stayed True with nothing holding the flock: the next contended wait returned True at
once (a lost update), and the waiter thread later took the flock and kept it. Waiter no longer uses Condition.wait on
the caller's side; this version forces the same race on the new structure:

 1. a foreign process holds the lock; our transaction waits in Waiter.wait (``request.done.acquire``);
 2. the foreign process releases; the waiter thread gets the flock and is paused right before it decides whether
    the request was cancelled;
 3. a real SIGINT interrupts the caller's acquire: the request is cancelled;
 4. the thread resumes: it must drop the grant (lock free for others), and the next transaction of this process must
    really wait while another lockstore process is inside its transaction (no phantom grant, no lost update).
"""
import inspect, os, signal, subprocess, sys, tempfile, threading, time
import lockstore
from lockstore import _waiter
from helpers import Foreign, lock_free

d = tempfile.mkdtemp(dir=os.environ.get("REPRO_DIR"))
path = os.path.join(d, "d.json")
lock_file = path + ".lock"
store = lockstore.open(path, default={"n": 0}, durable=False, timeout=10)
store.commit()
foreign = Foreign(lock_file)

run_code = _waiter.Waiter._run.__code__
src, first = inspect.getsourcelines(_waiter.Waiter._run)
DECIDE = first + next(i for i, l in enumerate(src) if "dropped = request.cancelled" in l)
waiter_paused, waiter_resume = threading.Event(), threading.Event()


def waiter_local(frame, event, arg):
    if event == "line" and frame.f_lineno == DECIDE and not waiter_resume.is_set():
        waiter_paused.set()
        waiter_resume.wait(30)
    return waiter_local


def waiter_global(frame, event, arg):
    return waiter_local if frame.f_code is run_code else None


def conductor():
    time.sleep(0.2)                 # the caller is waiting in request.done.acquire
    foreign.release()               # the other process lets go: the waiter thread gets the flock ...
    assert waiter_paused.wait(30), "waiter never got the flock"
    os.kill(os.getpid(), signal.SIGINT)   # ... and the user presses Ctrl-C before it hands the grant over
    time.sleep(0.2)
    waiter_resume.set()


threading.settrace(waiter_global)   # the waiter thread is started by the first contended wait
foreign.hold()
threading.Thread(target=conductor).start()
try:
    with store.transaction() as s:
        s.value["n"] += 1
    got = None
except BaseException as exc:
    got = exc
threading.settrace(None)
print("step 3: the interrupted transaction raised", type(got).__name__, got)
time.sleep(0.3)
free = lock_free(lock_file)
print(f"step 4: lock free for others after the waiter dropped the grant: {free}")

CHILD = r"""
import sys, lockstore
store = lockstore.open(sys.argv[1], default={"n": 0}, durable=False, timeout=30)
with store.transaction() as s:
    s.value["n"] += 1
    print("inside", s.value["n"], flush=True)
    sys.stdin.readline()
print("done", flush=True)
"""
child = subprocess.Popen([sys.executable, "-c", CHILD, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
print("        child process", child.stdout.readline().strip(), "(holds the lock, value not yet written)")
overlap = False
try:
    with store.transaction(timeout=3) as s:
        overlap = True
        s.value["n"] += 1
    print("        this process ran a transaction while the child held the lock")
except lockstore.LockTimeout:
    print("        this process waited (correct)")
child.stdin.write("go\n"); child.stdin.flush()
child.stdout.readline()
child.wait(30)
final = lockstore.read(path)["n"]
print(f"        final n = {final} after 1 acknowledged increment (the child's)")
foreign.close()
bad = overlap or final != 1 or not free or not isinstance(got, KeyboardInterrupt)
print("FAIL" if bad else "PASS")
sys.exit(1 if bad else 0)
