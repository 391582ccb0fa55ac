"""fork() while another thread opens a Store with ``lock=<filelock instance>`` can leave the module-level
``_lock._INSTANCE_SLOTS_LOCK`` (a threading.Lock, not reset after fork) locked in the child: every later
``lockstore.open(..., lock=<filelock instance>)`` in the child hangs forever.

Thread T is paused (threading.settrace) inside ``with _INSTANCE_SLOTS_LOCK:`` in FileLockAdapter.__init__ -- the
body runs WeakKeyDictionary.get/__setitem__, Python code where a GIL switch can hand over to the forking thread.
"""
import inspect, os, sys, tempfile, threading, time
import filelock
import lockstore
from lockstore import _lock

d = tempfile.mkdtemp(dir=os.environ.get("REPRO_DIR"))
init = _lock.FileLockAdapter.__init__.__code__
src, first = inspect.getsourcelines(_lock.FileLockAdapter.__init__)
LINE = first + next(i for i, l in enumerate(src) if "_INSTANCE_SLOTS.get(lock)" in l)
paused, resume = threading.Event(), threading.Event()

def local(frame, event, arg):
    if event == "line" and frame.f_lineno == LINE and not resume.is_set():
        paused.set(); resume.wait(30)
    return local

def glob(frame, event, arg):
    return local if frame.f_code is init else None

def t():
    lockstore.open(os.path.join(d, "a.json"), default={}, lock=filelock.SoftFileLock(os.path.join(d, "a.lk")))

threading.settrace(glob)
th = threading.Thread(target=t); th.start()
assert paused.wait(30)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    store = lockstore.open(os.path.join(d, "b.json"), default={"n": 0}, lock=filelock.FileLock(os.path.join(d, "b.lk")))
    with store.transaction() as s:
        s.value["n"] += 1
    os.write(w, b"ok")
    os._exit(0)
os.close(w)
resume.set(); th.join()
threading.settrace(None)
import select
ready, _, _ = select.select([r], [], [], 10)
if ready and os.read(r, 2) == b"ok":
    os.waitpid(pid, 0)
    print("child opened a store with a filelock instance: PASS")
    sys.exit(0)
os.kill(pid, 9); os.waitpid(pid, 0)
print("FAIL: the child hangs in lockstore.open(..., lock=FileLock(...)) (still blocked after 10 s; killed)")
sys.exit(1)
