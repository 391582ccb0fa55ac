"""One PostgreSQL store's row and the SQL a transaction speaks to it, as steps (``_pg_io``) that either half runs.

What a transaction promises (two round trips, versions as (version, xmin), the two timeouts) is in the
``_postgres`` docstring; here is how:

- The statements are prepared once per connection (:func:`_statements`): BEGIN and the time limits, the lock
  (``SELECT ... FOR UPDATE [NOWAIT]``, which restores the session's statement_timeout as it runs and returns the
  value only when its version is not the one this Store last saw), then ``UPDATE ... RETURNING`` and COMMIT.
- A missing row: a placeholder is inserted and locked in the same SQL transaction, with an advisory lock that
  names its holder meanwhile (``_pg_holder``). A missing table: ROLLBACK, create it under an advisory lock, retry.
- A value larger than ``_SPLIT`` is read by a statement of its own after the lock's, so that sending it never
  counts against the wait's statement_timeout.
- A second commit in one transaction (``commit()`` inside it) locks the row again and writes only if nobody wrote
  since. A value set aside (``on_corrupt="backup"``) is copied to ``KEY.corrupt-TIME-RANDOM`` and its row deleted
  in the transaction; the commit recreates the row with the next version.
"""

from __future__ import annotations

import errno
import math
import os
import secrets
import time
import zlib
from typing import TYPE_CHECKING, Any, Final

import psycopg
from psycopg import sql

from ._backend import Stored
from ._error import LockLost, LockTimeout
from ._holder import Holder
from ._owners import OwnerLock, Ticket
from ._pg_holder import PG_HINT, application_name, holder_query, holder_steps, waiters_steps
from ._pg_io import Cmd, Steps, Token, bytea, literal
from ._pg_session import PgSession
from ._target import ServerTarget, mask

if TYPE_CHECKING:
    from ._pg_aio import LoopState, Turn

#: Values larger than this are read by a statement of their own after the lock's (see ``_statements``).
_SPLIT: Final = 256 * 1024


def _int4(text: str) -> int:
    """A stable signed 32-bit number for ``text`` (advisory lock keys)."""
    n = zlib.crc32(text.encode())
    return n - (1 << 32) if n >= 1 << 31 else n


def time_left(start: float, wait: float) -> float:
    """Seconds left of a wait begun at ``start`` (-1.0: forever)."""
    return -1.0 if wait < 0 else max(0.0, start + wait - time.monotonic())


def _statements(t: str) -> dict[bytes, bytes]:
    """The prepared statements of a transaction (prepared on each connection at its first use)."""
    # The lock restores the session's statement_timeout as it runs (for the statements after it), and returns
    # the value unless it is the version this Store last saw ($3, $4). For a large value (_SPLIT) the value is
    # read by a statement of its own, so that sending it never counts against the wait's statement_timeout.
    same = "version = $3::bigint AND xmin = $4::xid"
    same2 = "version = $2::bigint AND xmin = $3::xid"
    bare = f"SELECT version, xmin::text, set_config('statement_timeout', $2, true) FROM {t} WHERE key = $1"
    lock = bare.replace(" FROM ", f", CASE WHEN {same} THEN NULL ELSE value END, {same} FROM ")
    tag = lock.replace(" FROM ", ", pg_try_advisory_xact_lock($5::int4, $6::int4) FROM ")  # see holder_query
    returning = "RETURNING version, xmin::text"
    texts = {  # those that need no table first: a missing table fails the others, not these
        "begin": "BEGIN", "commit": "COMMIT", "rollback": "ROLLBACK",
        "timeouts": "SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $2, true)",
        "timeouts_named": "SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $2, true), "
                          "set_config('application_name', $3, true)",
        "lock": f"{lock} FOR UPDATE", "lock_nowait": f"{lock} FOR UPDATE NOWAIT",
        "lock_tag": f"{tag} FOR UPDATE", "lock_tag_nowait": f"{tag} FOR UPDATE NOWAIT",
        "lock_bare": f"{bare} FOR UPDATE", "lock_bare_nowait": f"{bare} FOR UPDATE NOWAIT",
        "read": f"SELECT CASE WHEN {same2} THEN NULL ELSE value END, {same2} FROM {t} WHERE key = $1",
        "insert": f"INSERT INTO {t} (key, value, version, updated_at) VALUES ($1, NULL, 0, now()) "
                  "ON CONFLICT (key) DO NOTHING",
        "update": f"UPDATE {t} SET value = $1, version = version + 1, updated_at = now() WHERE key = $2 "
                  f"{returning}",
        "recreate": f"INSERT INTO {t} (key, value, version, updated_at) VALUES ($2, $1, $3::bigint, now()) "
                    f"{returning}",
        "load": f"SELECT value, version, xmin::text FROM {t} WHERE key = $1",
        "value": f"SELECT value FROM {t} WHERE key = $1",
    }
    return {f"lockstore_{name}".encode(): text.encode() for name, text in texts.items()}


class PgHeld:
    """One acquisition, made before acquiring: what :meth:`PgStorage.release` must undo, wherever it stopped."""

    __slots__ = ("__weakref__", "aside", "committed", "conn", "deleted", "label", "owner", "pid", "row", "slot",
                 "state", "ticket", "turn", "use", "wait", "written")

    def __init__(self, owner: object, holder: object) -> None:
        self.owner = owner
        self.ticket = Ticket(owner, holder)  # this row's OwnerLock in this process
        self.use = Ticket(owner, holder)  # this Store's connection
        self.pid = os.getpid()
        self.slot: OwnerLock | None = None  # set before taking it
        self.conn: Any = None  # the connection whose SQL transaction this is, set before BEGIN is sent
        self.state: LoopState | None = None  # asyncio: the loop's connections
        self.turn: Turn | None = None  # asyncio: this loop's turn for the row
        self.row: tuple[bytes | None, int, int, bool] | None = None  # FOR UPDATE: value, version, xmin, skipped
        self.wait = 0.0
        self.label: str | None = None
        self.committed = False
        self.written: Token | None = None  # our commit's version
        self.aside = False  # set_aside moved the value away: commit that even when nothing else is written
        self.deleted: int | None = None  # set_aside deleted the row: its version


class PgRow(PgSession):
    """One row of a PostgreSQL table: its names, and the steps of a transaction on it (see the module docstring)."""

    def __init__(self, server: ServerTarget, *, table: tuple[str, ...], durable: bool, connect_timeout: int) -> None:
        t = sql.Identifier(*table).as_string(None)
        super().__init__(server, durable=durable, connect_timeout=connect_timeout, statements=_statements(t))
        self.key = server.key
        self.table = ".".join(table)
        self._base_display = mask(server.url)
        self._t = t
        self._k = literal(server.key)
        self._kb = server.key.encode()
        self._size = 0  # of the value this Store last read or wrote
        self._tag = (_int4(f"lockstore:{self.table}"), _int4(server.key))
        params = self._params
        self._identity: tuple[object, ...] = (
            params.get("host") or os.environ.get("PGHOST", ""), params.get("port") or os.environ.get("PGPORT", ""),
            params.get("dbname") or os.environ.get("PGDATABASE") or params.get("user") or os.environ.get("PGUSER"),
            self.table, server.key)
        self._hint: Token | None = None  # the version this Store last read or wrote (its value need not be sent)

    @property
    def lock_name(self) -> str:
        return f"row {self.key!r} of table {self.table}"

    # ------------------------------------------------------------------------------------------- SQL
    def _lock_query(self, start: float, wait: float, label: str | None, *, insert: bool) -> list[Cmd]:
        """BEGIN, the time limits (and the label), then lock the row (inserting a placeholder first with ``insert``)
        and read its value unless it is the version this Store last saw (see :func:`_statements`)."""
        left = time_left(start, wait)
        nowait = left == 0
        if nowait:
            limits = (b"1", self._statement_timeout)  # the table's own lock, if DDL holds it; the row: NOWAIT
        elif left < 0:
            limits = (b"0", b"0")
        else:
            ms = max(1, math.ceil(left * 1000))
            # A waiter queued behind another waits for the row's tuple lock, then for the holder's transaction:
            # two lock waits of up to lock_timeout each in one statement, so the statement's own limit bounds both.
            limits = (str(ms).encode(), str(ms + max(50, ms // 10)).encode())
        key = self._kb
        query: list[Cmd] = [] if insert else [(b"lockstore_begin", (), None)]
        if label is None or insert:
            query.append((b"lockstore_timeouts", limits, None))
        else:
            query.append((b"lockstore_timeouts_named", (*limits, application_name(label).encode()), None))
        hint = None if insert else self._hint
        params: tuple[bytes | None, ...] = (key, self._statement_timeout,
                  *((b"-1", b"0") if hint is None else (str(hint[0]).encode(), str(hint[1]).encode())))
        lock, split = b"lockstore_lock", self._size > _SPLIT
        if insert:
            query.append((b"lockstore_insert", (key,), None))
            lock, split = b"lockstore_lock_tag", False
            params += (str(self._tag[0]).encode(), str(self._tag[1]).encode())
        elif split:
            lock = b"lockstore_lock_bare"
        query.append((lock + (b"_nowait" if nowait else b""), params[:2] if split else params, None))
        if split:
            query.append((b"lockstore_read", (key, *params[2:]), None))
        return query

    def _create_query(self) -> str:
        return ("BEGIN; "
                f"SELECT pg_advisory_xact_lock({_int4('lockstore:create')}, {_int4(self.table)}); "
                f"CREATE TABLE IF NOT EXISTS {self._t} (key text PRIMARY KEY, value bytea, version bigint NOT NULL, "
                "updated_at timestamptz NOT NULL DEFAULT now()); COMMIT")

    def _save_query(self, held: PgHeld, data: bytes) -> list[Cmd]:
        """The commit, in one round trip: the new value (a binary parameter) and COMMIT."""
        write: Cmd = (b"lockstore_update", (data, self._kb), (1, 0))
        if held.deleted is not None:  # set aside in this transaction: the row is gone
            write = (b"lockstore_recreate", (data, self._kb, str(held.deleted + 1).encode()), (1, 0, 0))
        return [write, (b"lockstore_commit", (), None)]

    # ------------------------------------------------------------------------------------------- steps
    def _load_steps(self) -> Steps[Stored]:
        try:
            result = yield [(b"lockstore_load", (self._kb,), None)]
        except psycopg.errors.UndefinedTable:
            return Stored(None, None)
        except psycopg.Error as exc:
            raise self.error(exc, "reading") from None
        rows = result.rows()
        if not rows or rows[0][0] is None:
            return Stored(None, None)
        data = bytea(rows[0][0])
        token = (int(rows[0][1]), int(rows[0][2]))
        self._hint, self._size = token, len(data or b"")
        return Stored(data, token)

    def _lock_steps(self, held: PgHeld, start: float) -> Steps[None]:
        created = False
        while True:
            try:
                result = yield self._lock_query(start, held.wait, held.label, insert=False)
                if not result.rows(2):  # no row yet: insert a placeholder and lock that
                    result = yield self._lock_query(start, held.wait, None, insert=True)
            except psycopg.errors.UndefinedTable:
                if created:
                    raise
                yield [(b"lockstore_rollback", (), None)]
                try:
                    yield self._create_query()
                except psycopg.Error as exc:
                    raise self.error(exc, f"creating table {self.table} (CREATE TABLE {self._t} (key text PRIMARY "
                                          "KEY, value bytea, version bigint NOT NULL, updated_at timestamptz NOT "
                                          "NULL DEFAULT now()))") from None
                created = True
                continue
            except psycopg.Error as exc:
                state = exc.sqlstate
                waited = time.monotonic() - start
                if state == "55P03" or (state == "57014" and 0 <= held.wait <= waited + 0.001):
                    yield [(b"lockstore_rollback", (), None)]  # then this connection can read who holds it
                    holder = yield from self._holder_steps(quiet=True)
                    raise LockTimeout(self.lock_name, waited, path=self.target, holder=holder, hint=PG_HINT) from None
                raise self.error(exc, "locking") from None
            locked = result.rows(2)
            read = [row[3:] for row in locked] if len(result.sets) == 3 else result.rows(3)  # see _statements
            if locked and read:
                data = bytea(read[0][0])
                held.row = (data, int(locked[0][0]), int(locked[0][1]), read[0][1] == b"t")
                if data is not None:
                    self._size = len(data)
            return

    def _fetched(self, held: PgHeld, known: object) -> tuple[Stored | None, bool]:
        """What :meth:`fetch` returns, and whether the value must still be read (the lock's SELECT skipped it)."""
        row = held.row
        if row is None or (row[0] is None and not row[3]):
            return (None if known is None else Stored(None, None)), False
        data, version, xmin, skipped = row
        token = (version, xmin)
        if token == known:
            return None, False
        if skipped:
            return Stored(None, token), True
        self._hint = token
        return Stored(data, token), False

    def _value_steps(self, token: Token) -> Steps[Stored]:
        try:
            result = yield [(b"lockstore_value", (self._kb,), None)]
        except psycopg.Error as exc:
            raise self.error(exc, "reading") from None
        rows = result.rows()
        if not rows or rows[0][0] is None:
            return Stored(None, None)
        data = bytea(rows[0][0])
        self._hint, self._size = token, len(data or b"")
        return Stored(data, token)

    def _save_steps(self, held: PgHeld, data: bytes) -> Steps[Token]:
        if held.committed:
            yield from self._relock_steps(held)
        try:
            result = yield self._save_query(held, data)
        except psycopg.Error as exc:
            state = exc.sqlstate or ""
            if state == "25P03":
                raise LockLost(self.target, "the server ended the idle session (idle_in_transaction_session_"
                                            "timeout) before the commit") from None
            raise self.error(exc, "committing", unknown=True) from None
        rows = result.rows()
        if not rows or result.status != "COMMIT":
            yield [(b"lockstore_rollback", (), None)]
            err = OSError(f"{self.target}: writing: the row was not written ({result.status})")
            err.errno = errno.EIO
            raise err
        token = (int(rows[0][0]), int(rows[0][1]))
        held.committed, held.written, held.aside, held.deleted = True, token, False, None
        self._hint, self._size = token, len(data)
        return token

    def _relock_steps(self, held: PgHeld) -> Steps[None]:
        """A second save in one transaction (``commit()`` inside it): our first COMMIT let the row go, so lock it
        again and write only if nobody wrote since."""
        try:
            result = yield self._lock_query(time.monotonic(), held.wait, held.label, insert=False)
        except psycopg.Error as exc:
            raise self.error(exc, "locking again") from None
        rows = result.rows(2)
        if not rows or (int(rows[0][0]), int(rows[0][1])) != held.written:
            yield [(b"lockstore_rollback", (), None)]
            raise LockLost(self.target, "another process wrote between two commits of one transaction")
        held.committed = False

    def _set_aside_steps(self, held: PgHeld) -> Steps[str]:
        aside = f"{self.key}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"
        try:
            result = yield (f"INSERT INTO {self._t} (key, value, version, updated_at) SELECT {literal(aside)}, "
                            f"value, version, now() FROM {self._t} WHERE key = {self._k}; "
                            f"DELETE FROM {self._t} WHERE key = {self._k} RETURNING version")
        except psycopg.Error as exc:
            raise self.error(exc, "moving the undecodable value aside") from None
        rows = result.rows()
        held.deleted = int(rows[0][0]) if rows else 0
        held.aside = True
        return f"{self._base_display}#{aside}"

    def _holder_steps(self, *, quiet: bool = False) -> Steps[Holder | None]:
        return holder_steps(holder_query(self._t, self._k, self._tag), self.error, quiet=quiet)

    def _waiters_steps(self) -> Steps[list[Holder]]:
        return waiters_steps(holder_query(self._t, self._k, self._tag), self.error)


__all__ = ["PgHeld", "PgRow", "time_left"]
