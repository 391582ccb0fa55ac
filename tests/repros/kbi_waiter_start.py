"""Ctrl-C during the first contended wait of a lock file, right as the waiter thread starts, orphans that thread.

Waiter.__init__ starts its thread with threading.Thread.start (pure Python). A KeyboardInterrupt right after
``_start_new_thread`` returned (before ``self._started.wait()``) leaves the thread running, while Waiter.__init__'s
except-handler closes the thread's descriptor and the Waiter never reaches ``slot.waiters``: nobody will ever set
``_closing``, so the thread waits on its condition forever (store.close() does not end it). Every such interrupt
leaks one more thread. Injected deterministically with sys.settrace at that line.
"""
import inspect, os, sys, tempfile, threading, gc
import lockstore
from helpers import Foreign, waiter_threads

d = tempfile.mkdtemp(dir=os.environ.get("REPRO_DIR"))
start_code = threading.Thread.start.__code__
src, first = inspect.getsourcelines(threading.Thread.start)
LINE = first + next(i for i, l in enumerate(src) if "self._started.wait()" in l)

ROUNDS = 5
for r in range(ROUNDS):
    path = os.path.join(d, f"d{r}.json")
    store = lockstore.open(path, default={"n": 0}, durable=False, timeout=10)
    store.commit()
    foreign = Foreign(path + ".lock")
    foreign.hold()
    fired = []

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == LINE and not fired and frame.f_back.f_code.co_name == "__init__" \
                and frame.f_back.f_code.co_filename.endswith("_waiter.py"):
            fired.append(1)
            raise KeyboardInterrupt
        return local

    def glob(frame, event, arg):
        return local if frame.f_code is start_code else None

    sys.settrace(glob)
    try:
        with store.transaction() as s:
            s.value["n"] += 1
        got = None
    except BaseException as exc:
        got = exc
    finally:
        sys.settrace(None)
    foreign.release()
    foreign.close()
    with store.transaction() as s:   # the store still works (a new waiter is made when needed)
        s.value["n"] += 1
    store.close()
    del store
    gc.collect()
    print(f"round {r}: fired={bool(fired)} raised={type(got).__name__}; lockstore-waiter threads alive after "
          f"store.close(): {waiter_threads()}")
n = waiter_threads()
if n:
    print(f"FAIL: {n} orphaned waiter threads (one per interrupt), never ended")
    sys.exit(1)
print("PASS")
