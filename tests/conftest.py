"""Shared fixtures.

Servers: one real PostgreSQL and one real Redis per test session (``pg_server``, ``redis_server``; see
``_servers.py``), and per test its own PostgreSQL database (``pg_url``) and its own Redis key prefix (``redis_key``,
with ``redis_url``). Tests that stop, crash or reconfigure a server start their own instead
(``with _servers.postgres_server(tmp_path) as pg:``, ``with _servers.redis_server(tmp_path) as r:``).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import _servers
import pytest

_RELIABILITY = __file__.rsplit("/", 1)[0] + "/reliability/"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep the default run fast: the signal walks first, and without ``-m``, skip the stress tier everywhere and the
    reliability suite's root tier (the cheap root tests elsewhere, network-namespace hosts and loop mounts, stay in
    the default run), each with a reason.

    The walks run an operation thousands of times under ``sys.settrace``; at the end of a full run they took more
    than twice as long as in a fresh interpreter, so they come first."""
    items.sort(key=lambda item: not str(item.path).endswith("/test_signals.py"))  # stable: the rest keep their order
    if config.option.markexpr:
        return
    for item in items:
        in_reliability = str(item.path).startswith(_RELIABILITY)
        for tier in ("stress", "root"):
            if item.get_closest_marker(tier) and (tier == "stress" or in_reliability):
                item.add_marker(pytest.mark.skip(reason=f"{tier} tier: run with -m \"stress or root\" (tox -e stress)"))
                break


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_servers.PgServer]:
    """A PostgreSQL server for the whole session (skips the test when the binaries are missing)."""
    if reason := _servers.why_no_postgres():
        pytest.skip(reason)
    with _servers.postgres_server(tmp_path_factory) as srv:
        yield srv


@pytest.fixture
def pg_url(pg_server: _servers.PgServer) -> Iterator[str]:
    """TCP URL of a new database ``test_<random>`` for this test alone; dropped afterwards (WITH FORCE)."""
    name = f"test_{secrets.token_hex(6)}"
    url = pg_server.create_database(name)
    yield url
    pg_server.drop_database(name)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_servers.RedisServer]:
    """A Redis server for the whole session (skips the test when redis-server is missing)."""
    if reason := _servers.why_no_redis():
        pytest.skip(reason)
    with _servers.redis_server(tmp_path_factory) as srv:
        yield srv


@pytest.fixture
def redis_url(redis_server: _servers.RedisServer) -> str:
    """URL of the session's Redis server (db 0, shared: keep to the ``redis_key`` prefix, never FLUSHDB)."""
    return redis_server.url


@pytest.fixture
def redis_key(redis_server: _servers.RedisServer) -> Iterator[str]:
    """A key prefix ``test:<random>:`` for this test alone; its keys are deleted afterwards."""
    prefix = f"test:{secrets.token_hex(6)}:"
    yield prefix
    if redis_server.running:
        redis_server.delete_prefix(prefix)
