"""A transaction dropped by Ctrl-C at the very start of its __exit__ (the "deferred" point: it is released by the
process's next lockstore call) races with two other threads: one whose lockstore call releases the dropped
transaction (release_abandoned -> SidecarLock.release -> _let_go), and one that starts a transaction and takes
the slot over from the abandoned ticket (OwnerLock.take -> _pass_on). The taker sees ``slot.flocked`` still set
("a holder that vanished without releasing left it to us") and skips the flock; the releaser then unlocks that very
flock. The taker is inside its transaction holding no OS lock: another process's transaction runs at the same time.

The schedule is forced with per-thread sys.settrace pauses (each at a point the OS scheduler may choose).
"""
import os, subprocess, sys, tempfile, threading, time
import lockstore
from lockstore import _txn, _sidecar

d = tempfile.mkdtemp(dir=os.environ.get("REPRO_DIR"))
path = os.path.join(d, "d.json")
store = lockstore.open(path, default={"n": 0}, durable=False, timeout=30)
store.commit()
EXIT = _txn.Transaction.__exit__.__code__
LET_GO = _sidecar.SidecarLock._let_go.__code__
STILL = _sidecar.SidecarLock._still_the_lock_file.__code__

x_paused, y_past, y_inside, y_go = (threading.Event() for _ in range(4))


def t0():
    fired = []
    def tr(frame, event, arg):
        if event == "call" and frame.f_code is EXIT and not fired:
            fired.append(1)
            raise KeyboardInterrupt                 # Ctrl-C at the first instruction of __exit__
        return None
    sys.settrace(tr)
    try:
        with store.transaction() as s:
            s.value["n"] += 1
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)


def x():
    def tr(frame, event, arg):
        if event == "call" and frame.f_code is LET_GO and not x_paused.is_set():
            # Wait for Y to pass its check, but not forever: with the take-over made exclusive, Y cannot get there
            # before X has let go, and the schedule goes on after a moment.
            x_paused.set(); y_past.wait(2)
        return None
    sys.settrace(tr)
    store.reload()                                   # any lockstore call: releases the dropped transaction


def y():
    def tr(frame, event, arg):
        if event == "call" and frame.f_code is STILL:
            y_past.set()                              # past the "slot.flocked is None" check
        return None
    sys.settrace(tr)
    with store.transaction() as s:
        sys.settrace(None)
        s.value["n"] += 1
        y_inside.set(); y_go.wait(30)


a = threading.Thread(target=t0); a.start(); a.join()
import gc; gc.collect()
print("T0: Ctrl-C at the start of __exit__; its transaction is dropped (lock still held until the next call)")
tx = threading.Thread(target=x); tx.start()
assert x_paused.wait(30), "X never reached _let_go"
ty = threading.Thread(target=y); ty.start()
assert y_inside.wait(30), "Y never got inside"
time.sleep(0.05)  # X finishes its release (it was only waiting for Y to pass the check)
r = subprocess.run([sys.executable, "-c",
                    "import sys, lockstore\ns = lockstore.open(sys.argv[1], default={'n': 0}, timeout=2)\n"
                    "try:\n with s.transaction() as v: v.value['n'] += 1\n print('ran')\n"
                    "except lockstore.LockTimeout: print('waited (timed out)')", path], capture_output=True, text=True)
print("Y is inside its transaction; another process's transaction:", r.stdout.strip(), r.stderr[-300:])
y_go.set(); ty.join(); tx.join()
n = lockstore.read(path)["n"]
expected = 1 + (r.stdout.strip() == "ran")    # T0's increment was never written (interrupted); Y's; the other's
print(f"file n = {n}, acknowledged increments = {expected}")
if r.stdout.strip() == "ran" or n != expected:
    print("FAIL: two transactions at once" + (f", {expected - n} update lost" if n != expected else ""))
    sys.exit(1)
print("PASS")
