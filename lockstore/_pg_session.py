"""Opening a PostgreSQL storage's sessions: connect arguments, the session's settings, the durability check.

- Connecting: libpq's ``connect_timeout`` unless the URL gives one (see :func:`connect_timeout`), client-side TCP
  keepalives unless the URL gives them, ``autocommit`` (lockstore sends BEGIN itself) and the holder record as
  ``application_name`` (``_pg_holder``).
- Settings: server-side keepalives and ``client_connection_check_interval`` where the server still has its
  built-in 0; ``synchronous_commit = off`` with ``durable=False``; the session's own ``statement_timeout`` is
  remembered, to be restored once a row is locked.
- Durability: with ``durable=True`` a server that acknowledges commits before flushing them is refused
  (NotDurableError); one whose settings cannot be read is used, with one warning per target.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Final

import psycopg

from ._error import NotDurableError
from ._pg_holder import application_name
from ._pg_io import Prepared, Steps, as_oserror, as_text, literal, scrub, secrets_in
from ._target import ServerTarget

log = logging.getLogger("lockstore")

#: libpq's connect_timeout (seconds) unless the URL gives one: an unreachable server is reported in that time.
CONNECT_TIMEOUT: Final = 10
#: Client-side TCP keepalives (libpq parameters) unless the URL gives them: a vanished server is noticed in ~1 min.
_CLIENT_KEEPALIVES: Final = {"keepalives": "1", "keepalives_idle": "30", "keepalives_interval": "10",
                             "keepalives_count": "3"}
#: Server-side session settings, applied where the server still has its built-in 0 (= OS default, or off): a
#: vanished client's row lock is freed in ~1 min, not after the OS's 2 hours of keepalive silence.
_SERVER_SETTINGS: Final = (("tcp_keepalives_idle", "30"), ("tcp_keepalives_interval", "10"),
                           ("tcp_keepalives_count", "3"), ("client_connection_check_interval", "2000"))
_WARNED: set[str] = set()


def connect_timeout(timeout: float) -> int:
    """The connect_timeout for a Store whose lock timeout is ``timeout`` (-1.0: none): an unreachable server is
    reported within about that timeout (whole seconds, at least 1), never later than :data:`CONNECT_TIMEOUT`."""
    if timeout < 0:
        return CONNECT_TIMEOUT
    return min(CONNECT_TIMEOUT, max(1, math.ceil(timeout)))


class PgSession:
    """The server side of a PostgreSQL storage: its URL, its sessions' setup, its statements and its errors."""

    def __init__(self, server: ServerTarget, *, durable: bool, connect_timeout: int,
                 statements: dict[bytes, bytes]) -> None:
        self.target = server.display
        self.durable = durable
        self._url = server.url
        try:
            params = psycopg.conninfo.conninfo_to_dict(server.url)
        except psycopg.Error as exc:
            raise ValueError(f"{self.target}: not a valid PostgreSQL URL: {self._scrub(str(exc))}") from None
        self._secrets = secrets_in(server.url, params)
        self._params = params
        self._connect_timeout = connect_timeout
        self._io = Prepared(statements)
        self._statement_timeout = b"0"

    # ------------------------------------------------------------------------------------------- errors
    def _scrub(self, text: str) -> str:
        return scrub(text, getattr(self, "_secrets", ()))

    def error(self, exc: psycopg.Error, doing: str, *, unknown: bool = False) -> OSError:
        """``exc`` as the OSError to raise, naming the target without its password (psycopg's error is its cause
        only when its text showed no secret). ``unknown``: a commit was sent and its reply lost."""
        return as_oserror(exc, doing, target=self.target, secrets=getattr(self, "_secrets", ()), unknown=unknown)

    # ------------------------------------------------------------------------------------------- sessions
    def _connect_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"autocommit": True, "application_name": application_name(None),
                                  "client_encoding": "utf8"}
        if "connect_timeout" not in self._params:
            kwargs["connect_timeout"] = self._connect_timeout
        for name, value in _CLIENT_KEEPALIVES.items():
            if name not in self._params:
                kwargs[name] = value
        return kwargs

    def _setup_query(self) -> str:
        settings = ", ".join(f"({literal(n)}, {literal(v)})" for n, v in _SERVER_SETTINGS)
        parts = [] if self.durable else ["SET synchronous_commit = off"]
        parts.append(f"SELECT set_config(s.name, w.v, false) FROM (VALUES {settings}) AS w(name, v) "
                     "JOIN pg_settings s ON s.name = w.name WHERE s.setting = '0'")
        parts.append("SELECT current_setting('fsync', true), current_setting('synchronous_commit', true), "
                     "current_setting('statement_timeout')")
        return "; ".join(parts)

    def _setup_steps(self) -> Steps[None]:
        try:
            result = yield self._setup_query()
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.OperationalError):
                raise self.error(exc, "connecting") from None
            self._warn(f"cannot apply its session settings ({self._scrub(str(exc))})")
            return
        row = (result.rows(len(result.sets) - 1) or [(None, None)])[0]
        if len(row) > 2 and row[2] is not None:
            self._statement_timeout = row[2]  # the session's own, restored once the row is locked
        if self.durable:
            self._check_durable(as_text(row[0]), as_text(row[1]))

    def _check_durable(self, fsync: str | None, sync_commit: str | None) -> None:
        if fsync is None or sync_commit is None:
            self._warn("cannot read its fsync and synchronous_commit settings")
            return
        wrong = []
        if fsync != "on":
            wrong.append(f"fsync = {fsync}: the server does not flush its write-ahead log; set fsync = on in "
                         "postgresql.conf")
        if sync_commit == "off":
            wrong.append("synchronous_commit = off: set it to on for the server, database or role (ALTER ROLE ... "
                         "SET synchronous_commit = on), or add ?options=-csynchronous_commit%3Don to the URL")
        if wrong:
            raise NotDurableError(self.target, "; ".join(wrong))

    def _warn(self, what: str) -> None:
        if self.target not in _WARNED:
            _WARNED.add(self.target)
            log.warning("lockstore: %s: %s; cannot tell whether its commits are durable (make sure the server runs "
                        "with fsync = on and synchronous_commit = on, or pass durable=False)", self.target, what)

    def _new_connection(self) -> psycopg.Connection[Any]:
        failure: OSError | None = None
        try:
            conn = psycopg.Connection.connect(self._url, **self._connect_kwargs())
        except psycopg.Error as exc:
            failure = self.error(exc, "connecting")
        if failure is not None:
            raise failure  # outside the except block: psycopg's error is attached only if it showed no secret
        try:
            self._io.drive(conn, self._setup_steps())
        except BaseException:
            conn.close()
            raise
        return conn

    async def _anew_connection(self) -> psycopg.AsyncConnection[Any]:
        failure: OSError | None = None
        try:
            conn = await psycopg.AsyncConnection.connect(self._url, **self._connect_kwargs())
        except psycopg.Error as exc:
            failure = self.error(exc, "connecting")
        if failure is not None:
            raise failure
        try:
            await self._io.adrive(conn, self._setup_steps())
        except BaseException:
            conn.pgconn.finish()
            raise
        return conn


__all__ = ["CONNECT_TIMEOUT", "PgSession", "connect_timeout"]
