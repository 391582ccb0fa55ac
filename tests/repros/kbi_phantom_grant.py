"""Ctrl-C during a contended wait, as the other process releases, leaves a phantom grant: lost update + held lock.

Deterministic schedule (forced with sys.settrace / threading.settrace, each step a point the OS may schedule):
 1. a foreign process holds the lock; our transaction waits in Waiter.wait -> threading.Condition.wait;
 2. Ctrl-C arrives right after Condition.wait's ``self._release_save()`` returned (outside its try): the waiter's
    RLock is released and never re-acquired, so Waiter.wait's except-handler ``_withdraw()`` runs WITHOUT the lock;
 3. meanwhile the foreign process releases; the waiter thread gets the flock, sees ``_requested`` and sets
    ``_requested = False``; _withdraw then sees ``_granted`` still False and does nothing; the waiter sets
    ``_granted = True`` afterwards. The caller's release unlocks the waiter's descriptor. Result: ``_granted`` is
    True, nothing holds the flock.
 4. next transaction in this process while another lockstore process is inside its transaction: flock NB fails,
    Waiter.wait returns True at once (the stale grant): both processes are inside a transaction -> lost update.
 5. the waiter thread, still requested, later takes the flock and keeps it: no one in this process uses it,
    every other process now waits for a lock nobody holds in a transaction.
"""
import inspect, os, subprocess, sys, tempfile, threading, time
import lockstore
from lockstore import _waiter
from helpers import Foreign, lock_free

d = tempfile.mkdtemp(dir=os.environ.get("REPRO_DIR"))
path = os.path.join(d, "d.json")
lock_file = path + ".lock"
store = lockstore.open(path, default={"n": 0}, durable=False, timeout=10)
store.commit()
foreign = Foreign(lock_file)

cond_wait = threading.Condition.wait.__code__
src, first = inspect.getsourcelines(threading.Condition.wait)
GOTIT = first + next(i for i, l in enumerate(src) if "gotit = False" in l)
run_code = _waiter.Waiter._run.__code__
src, first = inspect.getsourcelines(_waiter.Waiter._run)
GRANT = first + next(i for i, l in enumerate(src) if "self._granted = True" in l)

waiter_paused = threading.Event()
waiter_resume = threading.Event()
armed = [True]
waiter_armed = [True]


def waiter_local(frame, event, arg):
    if event == "line" and frame.f_lineno == GRANT and waiter_armed[0] and not waiter_resume.is_set():
        waiter_paused.set()
        waiter_resume.wait(30)
    return waiter_local


def waiter_global(frame, event, arg):
    return waiter_local if frame.f_code is run_code else None


def main_local(frame, event, arg):
    if event == "line" and frame.f_lineno == GOTIT and armed[0] and "_waiter.py" in frame.f_back.f_back.f_code.co_filename:
        armed[0] = None  # fire once
        foreign.release()                       # the other process lets go right now ...
        assert waiter_paused.wait(30), "waiter never got the flock"
        raise KeyboardInterrupt                 # ... and the user presses Ctrl-C
    return main_local


def main_global(frame, event, arg):
    return main_local if frame.f_code is cond_wait else None


threading.settrace(waiter_global)   # the waiter thread is started by the first contended wait
foreign.hold()
sys.settrace(main_global)
try:
    with store.transaction() as s:
        s.value["n"] += 1
    got = None
except BaseException as exc:
    got = exc
finally:
    sys.settrace(None)
print("step 2: the interrupted transaction raised", type(got).__name__, got)
waiter_resume.set()
threading.settrace(None)
import gc
w = next(o for o in gc.get_objects() if type(o) is _waiter.Waiter)
for _ in range(1000):
    if w._granted:
        break
    time.sleep(0.01)
print(f"step 3: waiter._granted={w._granted}, lock free for others: {lock_free(lock_file)}")

# step 4: another lockstore process inside its transaction
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
line = child.stdout.readline().strip()
print("step 4: child process", line, "(holds the lock, value not yet written)")
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
print(f"        final n = {final} after 2 acknowledged increments from n=0 (plus 0 from step 2)")
# step 5: is the lock held by nobody-in-a-transaction?
time.sleep(0.2)
stuck = not lock_free(lock_file)
print(f"step 5: lock free for other processes now (no transaction running anywhere): {not stuck}")
if stuck:
    other = subprocess.run([sys.executable, "-c", "import sys,lockstore; s=lockstore.open(sys.argv[1], timeout=2)\n"
                            "try:\n with s.transaction(): pass\n print('ok')\nexcept lockstore.LockTimeout as e: print('LockTimeout:', e)",
                            path], capture_output=True, text=True, env=dict(os.environ))
    print("        another process' transaction:", other.stdout.strip()[:200])
foreign.close()
bad = overlap or final != 2 or stuck or not isinstance(got, KeyboardInterrupt)
print("FAIL" if bad else "PASS")
sys.exit(1 if bad else 0)
