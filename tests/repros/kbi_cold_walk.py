"""The project's own injector (tests/_interrupt.py, unmodified) walked over a *cold* transaction: the first
transaction of a fresh Store (the lock file exists, this process has no slot for it yet), and the first *contended*
one (no waiter thread yet). tests/test_signals.py always warms the store up first, so these paths are never walked.
After each interrupted run: the Store is closed and collected; no lock-file descriptor and no waiter thread may be
left, the lock must be free."""
import gc, os, sys, tempfile, threading, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _interrupt import inject
import lockstore
from helpers import Foreign, lock_free, waiter_threads

def lock_fds():
    out = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".lock"):
                out += 1
        except OSError:
            pass
    return out

d = tempfile.mkdtemp(dir=os.environ.get("REPRO_DIR"))
problems = []
base = [0, 0]
for contended in (False, True):
    path = os.path.join(d, f"c{int(contended)}.json")
    lf = path + ".lock"
    open(lf, "w").close()
    foreign = Foreign(lf) if contended else None
    for k in range(1, 3000):
        if k == 1: base[:] = [lock_fds(), waiter_threads()]
        store = lockstore.open(path, default={"n": 0}, durable=False, timeout=10)
        def op():
            if contended:
                foreign.hold()
                threading.Timer(0.05, foreign.release).start()
            with store.transaction() as s:
                s.value["n"] += 1
        fired, raised, where = inject(k, op)
        if contended:
            time.sleep(0.1)  # the timer released the foreign lock
        with store.transaction(timeout=5) as s:   # the next lockstore call releases anything dropped
            s.value["n"] += 1
        store.close()
        del store
        gc.collect()
        for _ in range(100):                      # a closed waiter thread ends when it leaves the kernel
            if not waiter_threads():
                break
            time.sleep(0.01)
        bad = []
        if lock_fds() > base[0]:
            bad.append(f"+{lock_fds() - base[0]} lock-file descriptors")
        if waiter_threads() > base[1]:
            bad.append(f"+{waiter_threads() - base[1]} waiter threads (orphaned: never end)")
        if not lock_free(lf):
            bad.append("lock held")
        if bad:
            problems.append(f"{'contended' if contended else 'first'} k={k} {where} -> {raised}: " + ", ".join(bad))
            # clean the slate for the next k: forget the leaked slots
            import lockstore._sidecar as _sc
            slots = getattr(_sc, "_SLOTS", None)
            if slots is None:
                import lockstore._slots as _sl
                slots = _sl.SLOTS
            for slot in list(slots.values()):
                slot.close_files()
            slots.clear()
            time.sleep(0.05)
            base[:] = [lock_fds(), waiter_threads()]
        if not fired:
            print(f"{'contended' if contended else 'first'} transaction: {k - 1} points walked")
            break
    if foreign:
        foreign.close()
for p in problems:
    print("  ", p)
print("FAIL" if problems else "PASS")
sys.exit(1 if problems else 0)
