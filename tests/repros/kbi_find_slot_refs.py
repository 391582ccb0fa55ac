"""Ctrl-C while a Store first looks up its lock file's slot must not leak the slot's count of users.

The review's original: an exception at the start of ``SidecarLock._adopt`` (between ``_slots.find`` raising the
slot's count and the Store recording it) leaked the count, so the slot and its lock-file descriptor stayed open after
every Store on the file was closed and collected, one more per repetition. The count and its record now change
together under one lock (``_slots.find(key, box)``). This version walks the project's injector (tests/_interrupt.py)
over every interrupt point of the first transaction of a fresh Store on an existing lock file, closes and collects
the Store after each run, and checks that no lock-file descriptor is left.
"""
import gc, os, sys, tempfile
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _interrupt import inject
import lockstore


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
leaks = []
for k in range(1, 2000):
    os.mkdir(os.path.join(d, str(k)))  # a directory each: the first write sweeps it, and its size must not grow
    path = os.path.join(d, str(k), "d.json")
    open(path + ".lock", "w").close()          # an existing lock file (another process made it)
    store = lockstore.open(path, default={"n": 0}, durable=False)

    def first():
        with store.transaction() as s:
            s.value["n"] += 1

    fired, raised, where = inject(k, first)
    with store.transaction() as s:             # the store works afterwards
        s.value["n"] += 1
    store.close()
    del store
    gc.collect()
    if lock_fds():
        leaks.append(f"k={k} {where}: {lock_fds()}")
        break
    if not fired:
        print(f"walked {k - 1} interrupt points of a first transaction")
        break
for leak in leaks:
    print("  ", leak)
if leaks:
    print("FAIL: lock-file descriptors leaked")
    sys.exit(1)
print("PASS")
