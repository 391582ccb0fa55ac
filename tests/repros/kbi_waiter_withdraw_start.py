"""An interrupt at the first instruction of the Python step a release runs for a lock taken through the waiter
thread must not leave the lock held (fourth review).

The review's schedule, on the commit it attacked: the release forgot ``slot.flocked`` and then called
``Waiter.unlock()``, a Python function, to withdraw the waiter's latest request and unlock; an interrupt at its first
instruction skipped the unlock, and other processes found the lock held for as long as this process did not lock
the same file again. The withdrawal (``Waiter.withdraw``) now runs before the forget-and-unlock pair, which stays
one C call; this script interrupts the start of every Python function of the waiter the release calls."""
import os, subprocess, sys, tempfile, time
import lockstore
from lockstore import _waiter

d = tempfile.mkdtemp(dir=os.environ.get("REPRO_DIR"))
path = os.path.join(d, "d.json")
lock_file = path + ".lock"
store = lockstore.open(path, default={"n": 0}, durable=False)
store.commit()


def free_from_other_process():
    return subprocess.run([sys.executable, "-c", "import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDONLY);"
                           "fcntl.flock(fd, fcntl.LOCK_EX|fcntl.LOCK_NB)", lock_file], capture_output=True).returncode == 0


targets = [f.__code__ for name, f in vars(_waiter.Waiter).items() if callable(f) and hasattr(f, "__code__")
           and name not in ("__init__", "_run", "wait", "_cancel", "close")]
bad = []
for target in targets:
    # Another process holds the lock for a moment, so our transaction waits through the waiter thread.
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl,os,sys,time; fd=os.open(sys.argv[1], os.O_RDWR);"
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(0.3)", lock_file],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    fired = []

    def tracer(frame, event, arg, target=target):
        if event == "call" and frame.f_code is target:
            sys.settrace(None)
            fired.append(1)
            raise KeyboardInterrupt  # the signal handler's exception, at the function's first instruction
        return None

    try:
        with store.transaction(timeout=10) as s:
            s.value["n"] += 1
            sys.settrace(tracer)
    except KeyboardInterrupt:
        pass
    sys.settrace(None)
    holder.wait()
    free = free_from_other_process()
    print(target.co_name, "interrupted:", bool(fired), "lock free for another process:", free)
    if fired and not free:
        bad.append(target.co_name)
    with store.transaction(timeout=5) as s:  # and this process goes on normally
        s.value["n"] += 1
if not any(t.co_name == "withdraw" for t in targets):
    bad.append("Waiter.withdraw not found")
print("FAIL" if bad else "PASS", bad)
sys.exit(1 if bad else 0)
