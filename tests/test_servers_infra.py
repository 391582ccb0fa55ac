"""The real-server and multi-host test helpers work: conftest's fixtures, ``_servers.py`` and ``_hosts.py``."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import _servers
import pytest
from _hosts import Host, hosts
from _servers import PgServer, RedisServer, postgres_server, redis_server

pytestmark = pytest.mark.timeout(30)


def _gone(pid: int | None) -> bool:
    assert pid is not None
    return not _servers._alive(pid)


# ---------------------------------------------------------------------------------------------------- PostgreSQL


def test_pg_session_server_tcp_and_socket(pg_server: PgServer, pg_url: str) -> None:
    psycopg = pytest.importorskip("psycopg")
    db = pg_url.rsplit("/", 1)[1]
    assert db.startswith("test_")
    with psycopg.connect(pg_url, connect_timeout=5, autocommit=True) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (db,)
        assert conn.execute("SHOW fsync").fetchone() == ("on",)
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        assert conn.execute("SELECT inet_server_addr()::text").fetchone() == ("127.0.0.1/32",)
    with psycopg.connect(pg_server.socket_url_for(db), connect_timeout=5) as conn:
        assert conn.execute("SELECT current_database(), inet_server_addr()").fetchone() == (db, None)
    assert pg_server.url == f"postgresql://postgres@127.0.0.1:{pg_server.port}/postgres"
    with psycopg.connect(pg_server.socket_url, connect_timeout=5) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


def test_pg_password_role(pg_server: PgServer) -> None:
    psycopg = pytest.importorskip("psycopg")
    role = f"app_{os.urandom(4).hex()}"
    url = pg_server.create_role(role, "pa'ss:w@rd")
    with psycopg.connect(url, connect_timeout=5) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg_server.url_for(user=role, password="wrong"), connect_timeout=5)
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(pg_server.socket_url_for(user=role), connect_timeout=5)  # the socket asks for it too


def test_pg_restart_kill9_and_config(tmp_path: Path) -> None:
    psycopg = pytest.importorskip("psycopg")
    with postgres_server(tmp_path) as pg:
        port, first_pid = pg.port, pg.pid

        def rows() -> list[tuple[int]]:
            with psycopg.connect(pg.url, connect_timeout=5) as conn:
                return list(conn.execute("SELECT n FROM t ORDER BY n").fetchall())

        with psycopg.connect(pg.url, connect_timeout=5) as conn:
            conn.execute("CREATE TABLE t (n int)")
            conn.execute("INSERT INTO t VALUES (1)")
        pg.stop("fast")
        assert not pg.running and _gone(first_pid)
        pg.start()
        assert pg.port == port and rows() == [(1,)]

        with psycopg.connect(pg.url, connect_timeout=5, autocommit=True) as conn:
            conn.execute("INSERT INTO t VALUES (2)")  # acknowledged: committed and flushed (fsync on)
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            before_kill = pg.pid
            pg.kill9()
        assert _gone(before_kill) and _gone(backend)  # the postmaster and its children
        pg.start()  # crash recovery, same port and data directory
        assert pg.port == port and rows() == [(1,), (2,)]

        pg.stop("immediate")
        pg.start()
        assert rows() == [(1,), (2,)]

        assert pg.show("fsync") == "on"
        pg.set_config("fsync", False)  # the negative-control switch; ALTER SYSTEM wins over postgresql.conf
        with psycopg.connect(pg.url, connect_timeout=5) as conn:
            assert conn.execute("SHOW fsync").fetchone() == ("off",)
        pg.stop()
        pg.start()
        assert pg.show("fsync") == "off"  # ALTER SYSTEM persists
        last_pid = pg.pid
    assert _gone(last_pid)


def test_pg_start_retries_on_a_port_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]
        real = _servers.free_port
        monkeypatch.setattr(_servers, "free_port", lambda host="127.0.0.1": ports.pop() if ports else real(host))
        with postgres_server(tmp_path) as pg:
            assert pg.port != taken.getsockname()[1]
            assert "Address already in use" in pg.log_path.read_text()
            assert pg.show("port") == str(pg.port)


# ---------------------------------------------------------------------------------------------------- Redis


def test_redis_session_server(redis_server: RedisServer, redis_url: str, redis_key: str) -> None:
    redis = pytest.importorskip("redis")
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_key.startswith("test:")
    with redis.Redis.from_url(redis_url, socket_timeout=5) as r:
        assert r.ping() is True
        assert r.config_get("appendfsync") == {"appendfsync": "always"}
        assert r.config_get("appendonly") == {"appendonly": "yes"}
        r.set(redis_key + "a", "1")
    with redis.Redis.from_url(redis_server.unix_url, socket_timeout=5) as r:
        assert r.get(redis_key + "a") == b"1"
    assert redis_server.config_get("appendfsync") == "always"
    assert redis_server.execute("PING") == "PONG"


def test_redis_kill9_keeps_acknowledged_set(tmp_path: Path) -> None:
    redis = pytest.importorskip("redis")
    with redis_server(tmp_path) as srv:
        port = srv.port
        with redis.Redis.from_url(srv.url, socket_timeout=5) as r:
            assert r.set("k", "acknowledged") is True
        pid = srv.pid
        srv.kill9()
        assert not srv.running and _gone(pid)
        srv.start()
        assert srv.port == port and srv.pid != pid
        with redis.Redis.from_url(srv.url, socket_timeout=5) as r:
            assert r.get("k") == b"acknowledged"
        srv.config_set("appendfsync", "everysec")  # the negative-control switch
        assert srv.config_get("appendfsync") == "everysec"
        srv.stop()
        srv.start()
        assert srv.execute("GET", "k") == b"acknowledged"
        assert srv.delete_prefix("k") == 1
        last_pid = srv.pid
    assert _gone(last_pid)
    assert not srv.socket_path.exists()


def test_redis_password_and_port_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    redis = pytest.importorskip("redis")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]
        real = _servers.free_port
        monkeypatch.setattr(_servers, "free_port", lambda host="127.0.0.1": ports.pop() if ports else real(host))
        with redis_server(tmp_path, password="s3cr:t", unixsocket=False) as srv:
            assert srv.port != taken.getsockname()[1]
            assert srv.url == f"redis://:s3cr%3At@127.0.0.1:{srv.port}/0"
            with redis.Redis.from_url(srv.url, socket_timeout=5) as r:
                assert r.ping() is True
            with (
                redis.Redis.from_url(f"redis://:wrong@127.0.0.1:{srv.port}/0", socket_timeout=5) as r,
                pytest.raises(redis.AuthenticationError),
            ):
                r.ping()
            with pytest.raises(RuntimeError, match="unixsocket=False"):
                _ = srv.unix_url


def test_have_servers() -> None:
    assert _servers.have_postgres() is (_servers.why_no_postgres() is None)
    assert _servers.have_redis() is (_servers.why_no_redis() is None)


# ---------------------------------------------------------------------------------------------------- hosts

REDIS_CLIENT = r"""
import os, sys, redis, redis.backoff, redis.retry
no_retry = redis.retry.Retry(redis.backoff.NoBackoff(), 0)
r = redis.Redis.from_url(sys.argv[1], socket_timeout=1, socket_connect_timeout=1, retry=no_retry)
r.set(sys.argv[2] + os.uname().nodename, os.uname().nodename)
print(os.uname().nodename)
"""


@pytest.fixture
def three_hosts() -> Iterator[list[Host]]:
    with hosts(3) as hs:
        yield hs


def _wait_reachable(host: Host, url: str, key: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        res = host.run([sys.executable, "-c", REDIS_CLIENT, url, key], timeout=20)
        if res.returncode == 0:
            return res.stdout.strip()
        assert time.monotonic() < deadline, res.stderr
        time.sleep(0.2)


@pytest.mark.root
def test_hosts_redis_reachable_and_partition(three_hosts: list[Host], tmp_path: Path) -> None:
    pytest.importorskip("redis")
    h0, h1, h2 = three_hosts
    assert len({h.name for h in three_hosts}) == 3 and len({h.addr for h in three_hosts}) == 3
    with redis_server(tmp_path, bind=[h0.addr], prefix=h0.prefix) as srv:
        url = srv.url_for(h0.addr)
        assert srv.server_pid() == srv.pid  # the pid of the namespaced redis-server itself
        assert _wait_reachable(h1, url, "from:") == h1.name
        assert _wait_reachable(h2, url, "from:") == h2.name
        assert srv.execute("GET", f"from:{h1.name}") == h1.name.encode()
        assert srv.execute("GET", f"from:{h2.name}") == h2.name.encode()
        assert h0.run(["hostname"]).stdout.strip() == h0.name != os.uname().nodename

        h0.link_down()
        for h in (h1, h2):
            t0 = time.monotonic()
            res = h.run([sys.executable, "-c", REDIS_CLIENT, url, "down:"], timeout=20)
            assert res.returncode != 0 and ("Timeout" in res.stderr or "ConnectionError" in res.stderr), res.stderr
            assert time.monotonic() - t0 < 5  # one 1 s connect time-out (or ARP giving up), no retries
        assert srv.execute("PING") == "PONG"  # the server itself is fine: only the link is down

        h0.link_up()
        assert _wait_reachable(h1, url, "up:") == h1.name
        assert _wait_reachable(h2, url, "up:") == h2.name
        pid = srv.pid
    assert _gone(pid)


PG_CLIENT = r"""
import os, sys, psycopg
with psycopg.connect(sys.argv[1], connect_timeout=5) as conn:
    print(conn.execute("SELECT inet_server_addr()::text").fetchone()[0], os.uname().nodename)
"""


@pytest.mark.root
def test_hosts_postgres_reachable(three_hosts: list[Host], tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    h0, h1, _ = three_hosts
    with postgres_server(tmp_path, bind=[h0.addr], prefix=h0.prefix) as pg:
        assert pg.show("fsync") == "on"  # administration still works, through the Unix socket
        res = h1.run([sys.executable, "-c", PG_CLIENT, pg.url_for(host=h0.addr)], timeout=20)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == [f"{h0.addr}/32", h1.name]
