"""Ctrl-C in SidecarLock._find_slot between raising the slot's count of users (``_SLOTS``/``_slots.find``) and
adopting the slot: an exception at the start of ``_adopt`` (a point where CPython runs signal handlers; the
project's own injector lists it as "_adopt at the start") leaks the count: the slot is never closed, so its
lock-file descriptor (and waiter thread) stay open after every Store on the file is closed and collected.
Each repetition on a new lock file leaks one more descriptor."""
import gc, inspect, os, sys, tempfile, threading
import lockstore
from lockstore import _sidecar
from helpers import Foreign

code = _sidecar.SidecarLock._adopt.__code__

def lock_fds():
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            t = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if t.endswith(".lock"):
            out.append(t)
    return out

d = tempfile.mkdtemp(dir=os.environ.get("REPRO_DIR"))
ROUNDS = 5
for r in range(ROUNDS):
    path = os.path.join(d, f"d{r}.json")
    open(path + ".lock", "w").close()          # an existing lock file (another process made it)
    store = lockstore.open(path, default={"n": 0}, durable=False)
    fired = []
    def glob(frame, event, arg):
        if event == "call" and frame.f_code is code and not fired and frame.f_back.f_code.co_name == "_find_slot":
            fired.append(1)
            raise KeyboardInterrupt          # at the start of _adopt
        return None
    sys.settrace(glob)
    try:
        with store.transaction() as s:
            s.value["n"] += 1
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    with store.transaction() as s:           # works
        s.value["n"] += 1
    store.close()
    del store
    gc.collect()
print(f"after {ROUNDS} interrupted-then-closed Stores: {len(lock_fds())} lock-file descriptors still open:")
for t in lock_fds():
    print("   ", t)
if lock_fds():
    print("FAIL: descriptors leaked")
    sys.exit(1)
print("PASS")
