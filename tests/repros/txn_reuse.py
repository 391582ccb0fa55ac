"""A transaction object used twice: first nested inside another transaction, then as an outermost one.

``t = store.transaction(timeout=5)`` is a plain context-manager object; nothing says it is single-use, and using it
twice raises nothing. After a nested use, ``t.outer`` stays set, so its second (outermost) use takes the lock and
runs the block, but its __exit__ takes the nested path: the change is silently NOT written, and the lock is NOT
released (another process times out) until the object happens to be garbage-collected and another lockstore call
runs. The reverse (used outermost, then again outermost) leaves ``t.done`` set, so a nested transaction inside the
second use raises LockReentryError instead of joining it.
"""
import os, subprocess, sys, tempfile
import lockstore

d = tempfile.mkdtemp(dir=os.environ.get("REPRO_DIR"))
p = os.path.join(d, "d.json")
store = lockstore.open(p, default={"n": 0}, timeout=1)
problems = []

t = store.transaction(timeout=5)
with store.transaction() as s:
    with t:                           # nested: joins the outer transaction
        s.value["n"] += 1
with t as s:                          # the same object, now outermost
    s.value["n"] += 1
on_disk = lockstore.read(p)
print("after two increments:", on_disk, "| store.value:", store.value)
if on_disk != {"n": 2}:
    problems.append(f"acknowledged increment not written: file {on_disk}")
r = subprocess.run([sys.executable, "-c", "import sys,lockstore\ns=lockstore.open(sys.argv[1],timeout=1)\ntry:\n"
                    " with s.transaction(): print('lock free')\nexcept lockstore.LockTimeout: print('lock still held')",
                    p], capture_output=True, text=True)
print("another process:", r.stdout.strip())
if "still held" in r.stdout:
    problems.append("the lock is still held after the block ended")

p2 = os.path.join(d, "e.json")
store2 = lockstore.open(p2, default={"n": 0}, timeout=1)
t2 = store2.transaction()
with t2 as s:
    s.value["n"] += 1
try:
    with t2 as s:
        with store2.transaction() as inner:     # README: joins the outer one
            inner.value["n"] += 1
    print("second use with a nested transaction:", lockstore.read(p2))
except lockstore.LockReentryError as exc:
    print("second use with a nested transaction: LockReentryError:", exc)
    problems.append("nested transaction of the same store in the same thread raised LockReentryError")

for x in problems:
    print("  ", x)
print("FAIL" if problems else "PASS")
sys.exit(1 if problems else 0)
