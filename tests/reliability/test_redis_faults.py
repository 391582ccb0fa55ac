"""The Redis store under faults, at scale (stress tier) and across hosts (root tier).

- stress: holders killed at random moments (each kill: the counter holds exactly the acknowledged increments, or one
  more for a commit acknowledged to nobody, and the lock is free within the lease); servers killed under load
  (every acknowledged commit survives); holders paused past their lease again and again (never a lost update); a
  lock whose release failed while the server did not answer is released once it answers again (negative control:
  it is left to its lease).
- root: three namespace hosts, the server on host 0: workers on hosts 1 and 2 lose no update, ``holder()`` on host 1
  names host 2's holder; a host partitioned while it holds the lock past its lease gets LockLost after the link is
  back and writes nothing (negative control: without the fence its stale write lands).

Children are ``tests/test_redis.py`` run as a script (its ``Child``); counts go to the scorecard.
"""

from __future__ import annotations

import random
import signal
import sys
import time
from pathlib import Path

import _servers
import pytest
from _hosts import hosts
from test_redis import Child, wait_until  # skips this module too when redis-py is missing

import lockstore

from ._harness import add, report

pytestmark = pytest.mark.skipif(_servers.why_no_redis() is not None, reason=str(_servers.why_no_redis()))


# ===================================================================================================== stress
@pytest.mark.stress
@pytest.mark.timeout(180)
def test_killed_holders_lose_nothing_and_free_the_lock_within_the_lease(tmp_path: Path) -> None:
    rng = random.Random(7)
    lease = 1.0
    violations: list[str] = []
    with _servers.redis_server(tmp_path) as srv:
        target = f"{srv.url}#counter"
        acked = 0
        for i in range(12):
            add("processes")
            with Child("loop", target, str(lease)) as child:
                for _ in range(rng.randint(1, 20)):
                    assert child.line() == "ack"
                    acked += 1
                time.sleep(rng.uniform(0, 0.003))  # a random moment inside the next transaction or two
                child.proc.kill()
                acked += child.drain().count("ack")
            add("kills")
            t0 = time.monotonic()
            store = lockstore.open(target, default={"n": 0})
            with store.transaction(timeout=10) as s:
                waited = time.monotonic() - t0
                n = s.value["n"]
                if n not in (acked, acked + 1):
                    violations.append(f"kill {i}: the counter holds {n}, acknowledged {acked}")
                s.value["n"] = acked = n + 1  # the next round counts from what is there
            if waited > lease + 1.0:
                violations.append(f"kill {i}: the lock stayed {waited:.2f} s, longer than its lease")
            add("transactions checked", acked)
    report(violations)
    assert violations == []


@pytest.mark.stress
@pytest.mark.timeout(180)
def test_server_crashes_under_load_keep_every_acknowledged_commit(tmp_path: Path) -> None:
    violations: list[str] = []
    with _servers.redis_server(tmp_path) as srv:
        target = f"{srv.url}#counter"
        children = [Child("loop", target, "30") for _ in range(4)]
        acked = unknown = 0
        try:
            for _crash in range(3):
                for c in children:
                    for _ in range(5):
                        while (line := c.line()) != "ack":
                            unknown += line == "unknown"
                        acked += 1
                srv.kill9()
                add("kills")
                srv.start()
            for c in children:
                for line in c.rest("stop\n"):
                    acked += line == "ack"
                    unknown += line == "unknown"
        finally:
            for c in children:
                c.__exit__()
        add("processes", len(children))
        n = lockstore.read(target)["n"]
        add("transactions checked", acked)
        if not acked <= n <= acked + unknown:
            violations.append(f"counter {n}, acknowledged {acked}, of unknown outcome {unknown}")
    report(violations)
    assert violations == []


@pytest.mark.stress
@pytest.mark.timeout(180)
def test_paused_holders_never_lose_an_update(tmp_path: Path) -> None:
    """Workers with a 0.3 s lease; random ones are stopped for 0.5 s again and again."""
    rng = random.Random(11)
    with _servers.redis_server(tmp_path) as srv:
        target = f"{srv.url}#counter"
        children = [Child("loop", target, "0.3") for _ in range(4)]
        acked = failed = 0
        try:
            for c in children:
                assert c.line() == "ack"
                acked += 1
            for _ in range(12):
                victim = rng.choice(children)
                victim.proc.send_signal(signal.SIGSTOP)
                time.sleep(0.5)
                victim.proc.send_signal(signal.SIGCONT)
                add("kills")
                for c in children:  # everyone still makes progress
                    while (line := c.line()) != "ack":
                        failed += 1
                    acked += 1
            for c in children:
                for line in c.rest("stop\n"):
                    acked += line == "ack"
        finally:
            for c in children:
                c.__exit__()
        add("processes", len(children))
        add("transactions checked", acked)
        n = lockstore.read(target)["n"]
    violations = [] if n == acked else [f"counter {n}, acknowledged {acked} (lost updates)"]
    report(violations)
    assert violations == []


@pytest.mark.stress
@pytest.mark.timeout(120)
@pytest.mark.parametrize("background", [True, False], ids=["background-release", "negative-control-lease-only"])
def test_release_that_failed_while_the_server_was_unreachable_is_retried(tmp_path: Path, background: bool) -> None:
    lease = 12.0
    with _servers.redis_server(tmp_path) as srv:
        target = f"{srv.url}?socket_timeout=0.3&socket_connect_timeout=0.3#counter"  # the holder gives up fast
        with Child("hold", target, "unreachable", str(lease), *([] if background else ["no-background"])) as holder:
            holder.ready()
            srv.execute("CLIENT", "PAUSE", 4000, "ALL")  # unreachable for 4 s: the commit and the release time out
            t0 = time.monotonic()
            holder.send("go\n")
            assert '"ok": false' in holder.line()  # it lingers: its background release lives with it
            with lockstore.open(f"{srv.url}#counter", default={"n": 0}).transaction(timeout=30):
                waited = time.monotonic() - t0
        add("processes")
    if background:
        assert waited < 6.0  # released once the server answered again (the pause ends at 4 s)
    else:
        assert waited > 7.0  # the lock stayed until its lease ran out (at least 12 - 12 / 3 s)
        report(["left to its lease"], negative=True)


# ===================================================================================================== root
@pytest.mark.root
@pytest.mark.timeout(180)
def test_three_hosts_no_lost_update_and_holder_across_hosts(tmp_path: Path) -> None:
    with hosts(3) as (h0, h1, h2), _servers.redis_server(tmp_path, bind=[h0.addr], prefix=h0.prefix) as srv:
        target = f"{srv.url_for(h0.addr)}#counter"
        workers = [Child("incr", target, "50", prefix=h.prefix) for h in (h1, h1, h2, h2)]
        try:
            done = [w.finish("") for w in workers]
        finally:
            for w in workers:
                w.__exit__()
        assert {d["host"] for d in done} == {h1.name, h2.name}
        add("processes", len(workers))
        add("transactions checked", 200)
        local = f"{srv.unix_url}#counter"
        assert lockstore.read(local) == {"n": 200}
        with Child("hold", target, "on-host-2", "30", prefix=h2.prefix) as holder:
            info = holder.ready()
            assert info["host"] == h2.name
            with Child("holder", target, prefix=h1.prefix) as seen_from_h1:
                seen = seen_from_h1.finish("")["holder"]
            assert seen["pid"] == info["pid"] and seen["host"] == h2.name and seen["label"] == "on-host-2"
            assert seen["alive"] is None  # another host: liveness cannot be told from here
            assert holder.finish() == {"ok": True}
        assert lockstore.read(local) == {"n": 201}


@pytest.mark.root
@pytest.mark.timeout(180)
@pytest.mark.parametrize("fenced", [True, False], ids=["fenced", "negative-control-unfenced"])
def test_partitioned_holder_gets_lock_lost_and_writes_nothing(tmp_path: Path, fenced: bool) -> None:
    with hosts(3) as (h0, h1, h2), _servers.redis_server(tmp_path, bind=[h0.addr], prefix=h0.prefix) as srv:
        target = f"{srv.url_for(h0.addr)}#counter"
        local = f"{srv.unix_url}#counter"
        store = lockstore.open(local, default={"n": 0})
        with store.transaction() as s:
            s.value["n"] = 10
        with Child("stale", target, "2", "fenced" if fenced else "unfenced", prefix=h1.prefix) as victim:
            assert victim.ready()["n"] == 11
            h1.link_down()
            try:
                wait_until(lambda: srv.execute("EXISTS", "counter:lock") == 0, timeout=30, what="the lease to end")
                with Child("incr", target, "1", prefix=h2.prefix) as other:  # acknowledged: 10 -> 11
                    assert other.finish("")["acked"] == 1
            finally:
                h1.link_up()
            outcome = victim.finish()
        add("processes", 2)
        add("transactions checked", 1)
        n = lockstore.read(local)["n"]
    if fenced:
        violations = [] if outcome.get("type") == "LockLost" and n == 11 else [f"{outcome}, counter {n}"]
        report(violations)
        assert violations == []
    else:
        assert outcome == {"ok": True} and n == 11  # the stale write replaced the acknowledged one
        report(["the partitioned holder's stale write landed"], negative=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-m", "stress or root"]))
