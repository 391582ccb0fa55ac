"""Natural (untraced) version: P processes x T threads sharing one Store opened on a symlink that a switcher flips
between A.json and B.json every few ms. Every acknowledged increment must be in A or B: sum(A, B) == acks."""
import json, multiprocessing as mp, os, sys, tempfile, threading, time
import lockstore

SECONDS = float(os.environ.get("SECONDS_", "20"))
P, T = int(os.environ.get("P", "3")), int(os.environ.get("T", "3"))


def worker(link, q):
    store = lockstore.open(link, default={"n": 0}, durable=False, timeout=-1)
    acks = [0] * T
    end = time.monotonic() + SECONDS
    def run(i):
        while time.monotonic() < end:
            with store.transaction() as s:
                s.value["n"] += 1
            acks[i] += 1
    ts = [threading.Thread(target=run, args=(i,)) for i in range(T)]
    for t in ts: t.start()
    for t in ts: t.join()
    q.put(sum(acks))


if __name__ == "__main__":
    d = tempfile.mkdtemp(dir=os.environ.get("REPRO_DIR"))
    for n in ("A.json", "B.json"):
        with open(os.path.join(d, n), "w") as f: json.dump({"n": 0}, f)
    link = os.path.join(d, "cur.json"); os.symlink("A.json", link)
    ctx = mp.get_context("fork"); q = ctx.Queue()
    ps = [ctx.Process(target=worker, args=(link, q)) for _ in range(P)]
    for p in ps: p.start()
    end = time.monotonic() + SECONDS; flips = 0
    while time.monotonic() < end:
        tmp = link + ".new"
        os.symlink("B.json" if flips % 2 == 0 else "A.json", tmp); os.replace(tmp, link); flips += 1
        time.sleep(0.003)
    acks = sum(q.get(timeout=120) for _ in ps)
    for p in ps: p.join(60)
    a = json.load(open(os.path.join(d, "A.json")))["n"]; b = json.load(open(os.path.join(d, "B.json")))["n"]
    print(f"{flips} switches; acknowledged {acks}; A={a} B={b} sum={a + b}")
    if a + b != acks:
        print(f"FAIL: {acks - (a + b)} updates lost")
        sys.exit(1)
    print("PASS")
