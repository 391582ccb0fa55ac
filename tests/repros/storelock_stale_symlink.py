"""store.lock of a Store opened on a symlink keeps locking the lock file of the target it first saw: after the link
is switched, ``with store.lock:`` no longer keeps other processes' transactions on the file the store now names out
(README: store.lock is "a filelock.FileLock on the same lock file ... hold it to keep other processes out").
store.lock_file (the current one) and store.lock.lock_file disagree."""
import json, os, subprocess, sys, tempfile
import lockstore

d = tempfile.mkdtemp(dir=os.environ.get("REPRO_DIR"))
for name in ("A.json", "B.json"):
    with open(os.path.join(d, name), "w") as f:
        json.dump({"n": 0}, f)
link = os.path.join(d, "current.json")
os.symlink("A.json", link)
store = lockstore.open(link, default={"n": 0}, timeout=5)
store.lock  # first use (e.g. at start-up)
tmp = link + ".new"; os.symlink("B.json", tmp); os.replace(tmp, link)
with store.transaction() as s:     # the store follows the switch
    s.value["n"] += 1
print("store.lock_file     :", store.lock_file)
print("store.lock.lock_file:", store.lock.lock_file)
with store.lock:
    r = subprocess.run([sys.executable, "-c",
                        "import sys, lockstore\ns = lockstore.open(sys.argv[1], default={'n': 0}, timeout=1)\n"
                        "try:\n with s.transaction() as v: v.value['n'] += 1\n print('ran')\n"
                        "except lockstore.LockTimeout: print('kept out')", link], capture_output=True, text=True)
print("another process's transaction on current.json while we hold store.lock:", r.stdout.strip())
if r.stdout.strip() != "kept out":
    print("FAIL: store.lock does not keep other processes out after a symlink switch")
    sys.exit(1)
print("PASS")
