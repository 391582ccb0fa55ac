"""The PostgreSQL storage: one value in one row of a table, locked by ``SELECT ... FOR UPDATE`` in one SQL transaction.

``lockstore.open("postgresql://USER@HOST:PORT/DB#KEY", table="lockstore")`` (also ``postgres://``; libpq's URL
parameters work, e.g. ``?sslmode=require&connect_timeout=5``).

- Schema: ``key text PRIMARY KEY, value bytea, version bigint, updated_at timestamptz``, created by the first
  transaction that finds it missing (under an advisory lock, so concurrent creators never fail). ``value`` holds the
  encoded bytes of any format; a JSON store reads in psql as ``convert_from(value, 'UTF8')``.
- A transaction is one SQL transaction on the Store's connection, in two round trips: ``BEGIN; SET LOCAL
  lock_timeout ...; SELECT ... FOR UPDATE`` (which skips the value when it is the one this Store last saw), then
  ``UPDATE ...; COMMIT`` when the value changed, else ``ROLLBACK``. A missing row is inserted as a placeholder in
  the same SQL transaction, so a transaction that changes nothing leaves no row behind.
- Versions are (version, xmin): every write of the row, lockstore's or another client's, changes its xmin, so a
  value written behind lockstore's back (psql) is always re-read, never overwritten unseen.
- Timeouts: ``lock_timeout`` (0 tries once: ``NOWAIT``; negative: no limit), plus a slightly longer
  ``statement_timeout``, because a waiter queued behind another waiter waits for two locks in one statement.
  SQLSTATE 55P03 (or that statement timeout) becomes a LockTimeout naming the holder.
- Holder: each session's ``application_name`` is ``lockstore PID@HOST``, plus `` LABEL`` during a labelled
  transaction (cut to PostgreSQL's 63 bytes). ``holder()`` reads the row's ``xmax`` (the locking transaction), the
  backend holding that transaction's lock in ``pg_locks`` and its ``pg_stat_activity`` row: no waiting, no lock. A
  holder still inserting the row (it did not exist) is found through an advisory lock it takes for that purpose.
  ``waiters()`` follows ``pg_blocking_pids()`` back to the holder.
- In one process, threads and tasks first queue on an OwnerLock per row (first come, first served;
  LockReentryError for a second Store of the same owner), so one connection per Store serves its transactions;
  lock-free reads use it when it is idle and a second connection while a transaction holds it. asyncio uses one
  ``AsyncConnection`` per Store and event loop.
- Durability: with ``durable=True`` every new session checks ``fsync`` and ``synchronous_commit`` and refuses a
  server that acknowledges commits before flushing them (NotDurableError); ``durable=False`` sets
  ``synchronous_commit = off`` for its sessions (a server crash may lose the last commits, never tear one).
- Errors: the server's and the network's failures are OSErrors naming the target without its password
  (ConnectionError: unreachable, refused, timed out, lost; PermissionError: authentication, privileges;
  FileNotFoundError: no such database; OSError: anything else). A commit whose reply was lost says so: it may or
  may not be stored.
- Fork: a child never uses, closes or ends its parent's sessions. Right after the fork its copies of their sockets
  are replaced by /dev/null (psycopg's close would send the server a goodbye on the shared socket, ending the
  parent's session), so a parent's session ends when the parent's own socket closes; the child connects anew.
- Dead clients: a killed process's socket closes, its session ends and the row is free at once. For a client host
  that vanishes, sessions ask the server for TCP keepalives (30 s idle, 3 probes 10 s apart) unless the URL, role or
  server sets them, and check for a vanished client every 2 s while a statement waits.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import re
import secrets
import threading
import time
import urllib.parse
import weakref
import zlib
from collections.abc import Generator
from typing import Any, Final, TypeAlias, TypeVar

try:
    import psycopg
    from psycopg import pq, sql
except ImportError as exc:  # pragma: no cover - tested in a subprocess
    raise ImportError('a PostgreSQL store (postgresql://, postgres:// targets) needs the psycopg package: '
                      'pip install "lockstore[postgres]"', name="psycopg") from exc

from . import _holder
from ._backend import Stored
from ._holder import Holder
from ._error import LockLost, LockReentryError, LockTimeout, NotDurableError
from ._owners import OwnerLock, Ticket, at_fork, blocks_this_loop, current_owner, generation
from ._target import ServerTarget, mask, parse_server

log = logging.getLogger("lockstore")
_T = TypeVar("_T")

DEFAULT_TABLE: Final = "lockstore"
#: libpq's connect_timeout (seconds) unless the URL gives one: an unreachable server is reported in that time.
CONNECT_TIMEOUT: Final = 10
#: Client-side TCP keepalives (libpq parameters) unless the URL gives them: a vanished server is noticed in ~1 min.
_CLIENT_KEEPALIVES: Final = {"keepalives": "1", "keepalives_idle": "30", "keepalives_interval": "10",
                             "keepalives_count": "3"}
#: Server-side session settings, applied where the server still has its built-in 0 (= OS default, or off): a
#: vanished client's row lock is freed in ~1 min, not after the OS's 2 hours of keepalive silence.
_SERVER_SETTINGS: Final = (("tcp_keepalives_idle", "30"), ("tcp_keepalives_interval", "10"),
                           ("tcp_keepalives_count", "3"), ("client_connection_check_interval", "2000"))
#: Values up to this size are sent inline (hex) with the COMMIT in one round trip; larger ones as a binary parameter.
INLINE_MAX: Final = 65536
#: PostgreSQL keeps this many bytes of application_name (NAMEDATALEN - 1).
_APP_NAME_MAX: Final = 63
#: Longest blocking wait of an asyncio task in a helper thread (for this process's other threads): how long a
#: cancelled task may take to notice.
_SLICE: Final = 0.25
_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*\Z")
_RECORD: Final = re.compile(r"lockstore (\d+)@(\S*)(?: (.*))?\Z", re.S)
#: SQLSTATEs of a session the server ended (admin shutdown, crash, terminated backend, idle-in-transaction timeout).
_SESSION_ENDED: Final = ("57P01", "57P02", "57P03", "25P03", "57P05")
_WARNED: set[str] = set()

_Query: TypeAlias = "str | tuple[str, tuple[Any, ...]]"
_Steps: TypeAlias = Generator[_Query, "_Result", _T]
_Row: TypeAlias = tuple[Any, ...]
_Token: TypeAlias = tuple[int, int]


def make(path: str, *, lock: object, durable: bool, poll_interval: float, table: object = DEFAULT_TABLE,
         **options: Any) -> PgStorage:
    """The storage of a ``postgresql://`` or ``postgres://`` target (see the module docstring)."""
    server = parse_server(path)
    if options:
        raise TypeError(f"unexpected option(s) for a PostgreSQL store: {', '.join(sorted(options))} (it takes "
                        "table=)")
    if lock is not True:
        raise ValueError(f"{server.display}: a PostgreSQL store is always locked (by its row, FOR UPDATE); lock= "
                         f"must be True, not {lock!r}")
    if "\0" in server.key:
        raise ValueError(f"{server.display}: a key cannot contain a NUL character")
    return PgStorage(server, table=_table(table), durable=durable)


def _table(table: object) -> tuple[str, ...]:
    """``table=`` as identifier parts: ``name`` or ``schema.name``, each a plain SQL identifier (quoted as given)."""
    if not isinstance(table, str):
        raise TypeError(f"table must be a string, not {type(table).__name__}")
    parts = tuple(table.split("."))
    if len(parts) > 2 or not all(_IDENT.match(p) and len(p.encode()) <= 63 for p in parts):
        raise ValueError(f"table must be a plain SQL identifier (letters, digits, _ and $, at most 63 bytes), "
                         f"optionally schema-qualified, not {table!r}")
    return parts


def _literal(text: str) -> str:
    """A SQL string literal, right whatever standard_conforming_strings says (E'' when it holds a backslash)."""
    quoted = text.replace("'", "''")
    return f"E'{quoted.replace(chr(92), chr(92) * 2)}'" if "\\" in quoted else f"'{quoted}'"


def _bytea(data: bytes) -> str:
    return f"E'\\\\x{data.hex()}'::bytea"


def _int4(text: str) -> int:
    """A stable signed 32-bit number for ``text`` (advisory lock keys)."""
    n = zlib.crc32(text.encode())
    return n - (1 << 32) if n >= 1 << 31 else n


def _ascii(text: str) -> str:
    """What PostgreSQL keeps of an application_name: printable ASCII (anything else becomes ``?``)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def application_name(label: str | None) -> str:
    """This process's holder record as an application_name (at most 63 bytes; the label is cut to fit)."""
    name = f"lockstore {os.getpid()}@{_ascii(_holder._host_name())[:40].replace(' ', '?')}"
    if label:
        room = _APP_NAME_MAX - len(name) - 1
        text = _ascii(label)
        if len(text) > room:
            text = text[: max(0, room - 3)] + "..."
        name = f"{name} {text}"[:_APP_NAME_MAX]
    return name


def _left(start: float, wait: float) -> float:
    """Seconds left of a wait begun at ``start`` (-1.0: forever)."""
    return -1.0 if wait < 0 else max(0.0, start + wait - time.monotonic())


def _conflicts(holder: object, owner: object) -> bool:
    """Whether ``owner`` waiting for what ``holder`` holds would wait for itself (see ``_owners``)."""
    return holder is not None and (holder == owner or holder == threading.get_ident() or blocks_this_loop(holder))


class _Result:
    """What one round trip returned: the rows of each row-returning statement, and the last command's status."""

    __slots__ = ("sets", "status")

    def __init__(self, sets: list[list[_Row]], status: str | None) -> None:
        self.sets = sets
        self.status = status


def _run(conn: psycopg.Connection[Any], query: _Query) -> _Result:
    cur = conn.cursor()
    if isinstance(query, tuple):
        cur.execute(query[0].encode(), query[1])
    else:
        cur.execute(query.encode())
    sets: list[list[_Row]] = []
    while True:
        if cur.description is not None:
            sets.append(cur.fetchall())
        status = cur.statusmessage
        if not cur.nextset():
            return _Result(sets, status)


async def _arun(conn: psycopg.AsyncConnection[Any], query: _Query) -> _Result:
    cur = conn.cursor()
    if isinstance(query, tuple):
        await cur.execute(query[0].encode(), query[1])
    else:
        await cur.execute(query.encode())
    sets: list[list[_Row]] = []
    while True:
        if cur.description is not None:
            sets.append(await cur.fetchall())
        status = cur.statusmessage
        if not cur.nextset():
            return _Result(sets, status)


def _drive(conn: psycopg.Connection[Any], steps: _Steps[_T]) -> _T:
    """Run ``steps`` (a generator of queries that receives their results, or their psycopg errors) on ``conn``."""
    try:
        query = next(steps)
        while True:
            try:
                result = _run(conn, query)
            except psycopg.Error as exc:
                query = steps.throw(exc)
            else:
                query = steps.send(result)
    except StopIteration as stop:
        value: _T = stop.value
        return value


async def _adrive(conn: psycopg.AsyncConnection[Any], steps: _Steps[_T]) -> _T:
    """:func:`_drive` on an AsyncConnection: the same steps, awaited."""
    try:
        query = next(steps)
        while True:
            try:
                result = await _arun(conn, query)
            except psycopg.Error as exc:
                query = steps.throw(exc)
            else:
                query = steps.send(result)
    except StopIteration as stop:
        value: _T = stop.value
        return value


def lost(exc: psycopg.Error) -> bool:
    """Whether ``exc`` means the session is gone (unreachable, refused, cut, or ended by the server)."""
    state = exc.sqlstate or ""
    return isinstance(exc, psycopg.OperationalError) and (not state or state.startswith("08")
                                                          or state in _SESSION_ENDED)


def _drop_inherited(pgconn: Any) -> None:
    """In a forked child: let go of an inherited session without a word to the server on the shared socket."""
    try:
        fd = pgconn.socket
    except psycopg.Error:
        fd = -1
    if fd >= 0:
        nul = os.open(os.devnull, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        try:
            os.dup2(nul, fd)  # our copy of the socket is closed; libpq's goodbye now goes to /dev/null
        finally:
            os.close(nul)
    pgconn.finish()


# ------------------------------------------------------------------------------------------------ per process
_SLOTS: weakref.WeakValueDictionary[tuple[object, ...], OwnerLock] = weakref.WeakValueDictionary()
_SLOTS_LOCK = threading.Lock()


def _slot(identity: tuple[object, ...]) -> OwnerLock:
    """The OwnerLock of one row in this process (shared by every Store on it)."""
    with _SLOTS_LOCK:
        found = _SLOTS.get(identity)
        if found is None:
            found = _SLOTS[identity] = OwnerLock()
        return found


class _Turn(asyncio.Lock):
    """The tasks of one event loop that want one row take turns; ``owner`` is the task whose turn it is."""

    owner: object = None


_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[object, ...], _Turn]] = (
    weakref.WeakKeyDictionary())


def _turn(identity: tuple[object, ...]) -> _Turn:
    for loop in [loop for loop in _TURNS if loop.is_closed()]:  # a waiting turn keeps its loop alive: let it go
        del _TURNS[loop]
    turns = _TURNS.setdefault(asyncio.get_running_loop(), {})
    turn = turns.get(identity)
    if turn is None:
        turn = turns[identity] = _Turn()
    return turn


_LIVE: weakref.WeakSet[PgStorage] = weakref.WeakSet()


def _after_fork() -> None:
    global _SLOTS_LOCK
    _SLOTS_LOCK = threading.Lock()
    _TURNS.clear()
    for storage in list(_LIVE):
        storage.forked()


at_fork(_after_fork)


class _LoopState:
    """A Store's asyncio connections on one event loop: one for transactions, one for lock-free reads during one."""

    __slots__ = ("conn", "loop", "read", "read_lock", "tx_lock", "tx_owner")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = weakref.ref(loop)
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.read: psycopg.AsyncConnection[Any] | None = None
        self.tx_lock = asyncio.Lock()  # who uses ``conn``: a transaction, or a short lock-free read
        self.tx_owner: object = None
        self.read_lock = asyncio.Lock()

    def gone(self) -> bool:
        loop = self.loop()
        return loop is None or loop.is_closed()

    def finish(self) -> None:
        """Close both connections from any thread (a closed loop cannot run their coroutines any more)."""
        for conn in (self.conn, self.read):
            if conn is not None:
                try:
                    conn.pgconn.finish()
                except Exception:
                    pass
        self.conn = self.read = None


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
        self.state: _LoopState | None = None  # asyncio: the loop's connections
        self.turn: _Turn | None = None  # asyncio: this loop's turn for the row
        self.row: _Row | None = None  # what SELECT ... FOR UPDATE returned
        self.wait = 0.0
        self.label: str | None = None
        self.committed = False
        self.written: _Token | None = None  # our commit's version
        self.aside = False  # set_aside moved the value away: commit that even when nothing else is written
        self.deleted: int | None = None  # set_aside deleted the row: its version


class PgStorage:
    """One row of a PostgreSQL table, locked FOR UPDATE (see the module docstring)."""

    cheap_versions = True

    def __init__(self, server: ServerTarget, *, table: tuple[str, ...], durable: bool) -> None:
        self.target = server.display
        self.key = server.key
        self.durable = durable
        self.table = ".".join(table)
        self._url = server.url
        self._base_display = mask(server.url)
        try:
            params = psycopg.conninfo.conninfo_to_dict(server.url)
        except psycopg.Error as exc:
            raise ValueError(f"{self.target}: not a valid PostgreSQL URL: {self._scrub(str(exc))}") from None
        self._secrets = _secrets(server.url, params)
        self._params = params
        self._t = sql.Identifier(*table).as_string(None)
        self._k = _literal(server.key)
        self._tag = (_int4(f"lockstore:{self.table}"), _int4(server.key))
        self._identity: tuple[object, ...] = (
            params.get("host") or os.environ.get("PGHOST", ""), params.get("port") or os.environ.get("PGPORT", ""),
            params.get("dbname") or os.environ.get("PGDATABASE") or params.get("user") or os.environ.get("PGUSER"),
            self.table, server.key)
        self._slot = _slot(self._identity)
        self._hint: _Token | None = None  # the version this Store last read or wrote (its value need not be sent)
        self._pid = os.getpid()
        self._conn: psycopg.Connection[Any] | None = None
        self._read: psycopg.Connection[Any] | None = None
        self._use = OwnerLock()  # who uses ``_conn``: a transaction, or a short lock-free read
        self._read_lock = threading.Lock()
        self._loops: dict[int, _LoopState] = {}
        _LIVE.add(self)

    def __repr__(self) -> str:
        return f"<PgStorage {self.target!r} table={self.table}>"

    # ------------------------------------------------------------------------------------------- properties
    @property
    def lock_name(self) -> str:
        return f"row {self.key!r} of table {self.table}"

    @property
    def locked(self) -> bool:
        return True

    # ------------------------------------------------------------------------------------------- errors
    def _scrub(self, text: str) -> str:
        for secret in getattr(self, "_secrets", ()):
            text = text.replace(secret, "***")
        return " ".join(text.split())

    def error(self, exc: psycopg.Error, doing: str, *, unknown: bool = False) -> OSError:
        """``exc`` as the OSError to raise, naming the target without its password (psycopg's error is its cause
        only when its text showed no secret). ``unknown``: a commit was sent and its reply lost."""
        text = self._scrub(str(exc))
        state = exc.sqlstate or ""
        err: OSError
        if state.startswith("28") or state == "42501":
            err, code = PermissionError(f"{self.target}: {doing}: the server refused us: {text}"), errno.EACCES
        elif state == "3D000":
            err, code = FileNotFoundError(f"{self.target}: {doing}: {text}"), errno.ENOENT
        elif lost(exc):
            lower = text.lower()
            code = errno.ETIMEDOUT if "timeout" in lower else errno.ECONNREFUSED if "refused" in lower else (
                errno.ECONNABORTED)
            if unknown:
                text = ("the connection was lost before the server confirmed the commit, so the new value may or may "
                        f"not be stored: {text}")
            else:
                text = f"cannot reach the PostgreSQL server: {text}"
            err = ConnectionError(f"{self.target}: {doing}: {text}")
        else:
            err, code = OSError(f"{self.target}: {doing}: PostgreSQL error {state or type(exc).__name__}: {text}"), (
                errno.EIO)
        err.errno = code
        err.__cause__ = exc if text.endswith(" ".join(str(exc).split())) else None
        err.__suppress_context__ = True
        return err

    # ------------------------------------------------------------------------------------------- connections
    def _connect_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"autocommit": True, "application_name": application_name(None),
                                  "client_encoding": "utf8"}
        if "connect_timeout" not in self._params:
            kwargs["connect_timeout"] = CONNECT_TIMEOUT
        for name, value in _CLIENT_KEEPALIVES.items():
            if name not in self._params:
                kwargs[name] = value
        return kwargs

    def _setup_query(self) -> str:
        settings = ", ".join(f"({_literal(n)}, {_literal(v)})" for n, v in _SERVER_SETTINGS)
        parts = [] if self.durable else ["SET synchronous_commit = off"]
        parts.append(f"SELECT set_config(s.name, w.v, false) FROM (VALUES {settings}) AS w(name, v) "
                     "JOIN pg_settings s ON s.name = w.name WHERE s.setting = '0'")
        parts.append("SELECT current_setting('fsync', true), current_setting('synchronous_commit', true)")
        return "; ".join(parts)

    def _setup_steps(self) -> _Steps[None]:
        try:
            result = yield self._setup_query()
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.OperationalError):
                raise self.error(exc, "connecting") from None
            self._warn(f"cannot apply its session settings ({self._scrub(str(exc))})")
            return
        if self.durable:
            row = result.sets[-1][0] if result.sets and result.sets[-1] else (None, None)
            self._check_durable(row[0], row[1])

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
            _drive(conn, self._setup_steps())
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self.forked()

    def forked(self) -> None:
        """In a forked child (an at-fork hook): drop every inherited session without ending it for the parent."""
        conns: list[Any] = [self._conn, self._read]
        for state in self._loops.values():
            conns += [state.conn, state.read]
        self._conn = self._read = None
        self._loops = {}
        self._use = OwnerLock()
        self._read_lock = threading.Lock()
        self._pid = os.getpid()
        for conn in conns:
            if conn is not None:
                try:
                    _drop_inherited(conn.pgconn)
                except Exception:
                    pass

    def _connection(self) -> psycopg.Connection[Any]:
        """The Store's connection (reconnecting when it is new, broken or was closed)."""
        self._check_fork()
        conn = self._conn
        if conn is None or conn.closed:
            conn = self._conn = self._new_connection()
        return conn

    def _reading(self, steps: _Steps[_T]) -> _T:
        """Run lock-free ``steps`` on the Store's connection when no transaction uses it, else on a second one."""
        self._check_fork()
        ticket = Ticket(current_owner())
        try:
            if self._use.try_take(ticket):
                return _drive(self._connection(), steps)
        finally:
            self._use.give(ticket)
        with self._read_lock:
            conn = self._read
            if conn is None or conn.closed:
                conn = self._read = self._new_connection()
            return _drive(conn, steps)

    @staticmethod
    def _discard(conn: psycopg.Connection[Any]) -> None:
        """Close a connection in an unknown state: the server rolls back its transaction."""
        try:
            conn.close()
        except Exception:
            pass

    # ------------------------------------------------------------------------------------------- SQL
    def _select(self, hint: _Token | None) -> str:
        if hint is None:
            return "value, version, xmin::text, false"
        same = f"(version = {int(hint[0])} AND xmin = '{int(hint[1])}'::xid)"
        return f"CASE WHEN {same} THEN NULL ELSE value END, version, xmin::text, {same}"

    def _lock_query(self, start: float, wait: float, label: str | None, *, insert: bool) -> str:
        left = _left(start, wait)
        nowait = left == 0
        parts = [] if insert else ["BEGIN"]
        if nowait:
            parts.append("SET LOCAL lock_timeout = 1")  # the table's own lock, if DDL holds it; the row: NOWAIT
        elif left < 0:
            parts += ["SET LOCAL lock_timeout = 0", "SET LOCAL statement_timeout = 0"]
        else:
            ms = max(1, math.ceil(left * 1000))
            # A waiter queued behind another waits for the row's tuple lock, then for the holder's transaction:
            # two lock waits in one statement, so the statement's own limit bounds the whole wait.
            parts += [f"SET LOCAL lock_timeout = {ms}", f"SET LOCAL statement_timeout = {ms + min(max(ms, 250), 1000)}"]
        if label is not None and not insert:
            parts.append(f"SET LOCAL application_name = {_literal(application_name(label))}")
        select = f"SELECT {self._select(None if insert else self._hint)}"
        if insert:
            parts.append(f"INSERT INTO {self._t} (key, value, version, updated_at) VALUES ({self._k}, NULL, 0, now()) "
                         "ON CONFLICT (key) DO NOTHING")
            select += f", pg_try_advisory_xact_lock({self._tag[0]}, {self._tag[1]})"
        parts.append(f"{select} FROM {self._t} WHERE key = {self._k} FOR UPDATE{' NOWAIT' if nowait else ''}")
        if not nowait:
            parts.append("SET LOCAL statement_timeout TO DEFAULT")
        return "; ".join(parts)

    def _create_query(self) -> str:
        return ("BEGIN; "
                f"SELECT pg_advisory_xact_lock({_int4('lockstore:create')}, {_int4(self.table)}); "
                f"CREATE TABLE IF NOT EXISTS {self._t} (key text PRIMARY KEY, value bytea, version bigint NOT NULL, "
                "updated_at timestamptz NOT NULL DEFAULT now()); COMMIT")

    def _holder_query(self) -> str:
        return (
            "SELECT a.pid, a.application_name, coalesce(a.client_hostname, host(a.client_addr)), a.usename, "
            "extract(epoch FROM clock_timestamp() - CASE WHEN a.state LIKE 'idle in transaction%' THEN a.state_change "
            "ELSE a.xact_start END) FROM ("
            f"SELECT l.pid, 0 AS o FROM {self._t} r JOIN pg_locks l ON l.locktype = 'transactionid' "
            f"AND l.transactionid = r.xmax AND l.granted WHERE r.key = {self._k} "
            "UNION ALL SELECT l.pid, 1 FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            f"AND d.datname = current_database() WHERE l.locktype = 'advisory' AND l.classid = '{self._tag[0] % (1 << 32)}' "
            f"AND l.objid = '{self._tag[1] % (1 << 32)}' AND l.objsubid = 2 AND l.granted"
            ") h JOIN pg_stat_activity a ON a.pid = h.pid ORDER BY h.o LIMIT 1")

    _WAITERS_QUERY: Final = (
        "SELECT a.pid, a.application_name, coalesce(a.client_hostname, host(a.client_addr)), a.usename, "
        "extract(epoch FROM clock_timestamp() - a.query_start), pg_blocking_pids(a.pid) FROM pg_stat_activity a "
        "WHERE a.wait_event_type = 'Lock' AND a.datname = current_database()")

    def _save_query(self, held: PgHeld, data: bytes) -> list[_Query]:
        """The commit: inline with COMMIT in one round trip, or (large values) as a binary parameter, then COMMIT."""
        inline = len(data) <= INLINE_MAX
        value = _bytea(data) if inline else "%b"
        key = self._k if inline else "%s"
        if held.deleted is not None:  # set aside in this transaction: the row is gone
            write = (f"INSERT INTO {self._t} (key, value, version, updated_at) VALUES ({key}, {value}, "
                     f"{held.deleted + 1}, now())")
        else:
            write = f"UPDATE {self._t} SET value = {value}, version = version + 1, updated_at = now() WHERE key = {key}"
        write += " RETURNING version, xmin::text"
        if inline:
            return [f"{write}; COMMIT"]
        params = (self.key, data) if held.deleted is not None else (data, self.key)
        return [(write, params), "COMMIT"]

    # ------------------------------------------------------------------------------------------- steps
    def _load_steps(self) -> _Steps[Stored]:
        try:
            result = yield f"SELECT value, version, xmin::text FROM {self._t} WHERE key = {self._k}"
        except psycopg.errors.UndefinedTable:
            return Stored(None, None)
        except psycopg.Error as exc:
            raise self.error(exc, "reading") from None
        rows = result.sets[0]
        if not rows or rows[0][0] is None:
            return Stored(None, None)
        value, version, xmin = rows[0]
        token = (int(version), int(xmin))
        self._hint = token
        return Stored(bytes(value), token)

    def _lock_steps(self, held: PgHeld, start: float) -> _Steps[None]:
        created = False
        while True:
            try:
                result = yield self._lock_query(start, held.wait, held.label, insert=False)
                if not result.sets or not result.sets[0]:  # no row yet: insert a placeholder and lock that
                    result = yield self._lock_query(start, held.wait, None, insert=True)
            except psycopg.errors.UndefinedTable:
                if created:
                    raise
                yield "ROLLBACK"
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
                    yield "ROLLBACK"  # then this connection can read who holds the row
                    holder = yield from self._holder_steps(quiet=True)
                    raise LockTimeout(self.lock_name, waited, path=self.target, holder=holder) from None
                raise self.error(exc, "locking") from None
            held.row = result.sets[-1][0] if result.sets and result.sets[-1] else None
            return

    def _fetched(self, held: PgHeld, known: object) -> tuple[Stored | None, bool]:
        """What :meth:`fetch` returns, and whether the value must still be read (the lock's SELECT skipped it)."""
        row = held.row
        if row is None or (row[0] is None and not row[3]):
            return (None if known is None else Stored(None, None)), False
        token = (int(row[1]), int(row[2]))
        if token == known:
            return None, False
        if row[3]:
            return Stored(None, token), True
        self._hint = token
        return Stored(bytes(row[0]), token), False

    def _value_steps(self, token: _Token) -> _Steps[Stored]:
        try:
            result = yield f"SELECT value FROM {self._t} WHERE key = {self._k}"
        except psycopg.Error as exc:
            raise self.error(exc, "reading") from None
        rows = result.sets[0]
        if not rows or rows[0][0] is None:
            return Stored(None, None)
        self._hint = token
        return Stored(bytes(rows[0][0]), token)

    def _save_steps(self, held: PgHeld, data: bytes) -> _Steps[_Token]:
        if held.committed:
            yield from self._relock_steps(held)
        queries = self._save_query(held, data)
        try:
            result = yield queries[0]
            if len(queries) > 1:
                last = yield queries[1]
                result.status = last.status
        except psycopg.Error as exc:
            state = exc.sqlstate or ""
            if state == "25P03":
                raise LockLost(self.target, "the server ended the idle session (idle_in_transaction_session_"
                                            "timeout) before the commit") from None
            raise self.error(exc, "committing", unknown=True) from None
        rows = result.sets[0] if result.sets else []
        if not rows or result.status != "COMMIT":
            raise OSError(errno.EIO, f"writing: the row was not written ({result.status})", self.target)
        token = (int(rows[0][0]), int(rows[0][1]))
        held.committed, held.written, held.aside, held.deleted = True, token, False, None
        self._hint = token
        return token

    def _relock_steps(self, held: PgHeld) -> _Steps[None]:
        """A second save in one transaction (``commit()`` inside it): our first COMMIT let the row go, so lock it
        again and write only if nobody wrote since."""
        try:
            result = yield self._lock_query(time.monotonic(), held.wait, held.label, insert=False)
        except psycopg.Error as exc:
            raise self.error(exc, "locking again") from None
        rows = result.sets[0] if result.sets else []
        if not rows or (int(rows[0][1]), int(rows[0][2])) != held.written:
            yield "ROLLBACK"
            raise LockLost(self.target, "another process wrote between two commits of one transaction")
        held.committed = False

    def _set_aside_steps(self, held: PgHeld) -> _Steps[str]:
        aside = f"{self.key}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"
        try:
            result = yield (f"INSERT INTO {self._t} (key, value, version, updated_at) SELECT {_literal(aside)}, "
                            f"value, version, now() FROM {self._t} WHERE key = {self._k}; "
                            f"DELETE FROM {self._t} WHERE key = {self._k} RETURNING version")
        except psycopg.Error as exc:
            raise self.error(exc, "moving the undecodable value aside") from None
        rows = result.sets[0] if result.sets else []
        held.deleted = int(rows[0][0]) if rows else 0
        held.aside = True
        return f"{self._base_display}#{aside}"

    def _holder_steps(self, *, quiet: bool = False) -> _Steps[Holder | None]:
        try:
            result = yield self._holder_query()
        except psycopg.Error as exc:
            if quiet or isinstance(exc, psycopg.errors.UndefinedTable):
                return None
            raise self.error(exc, "reading who holds the lock") from None
        rows = result.sets[0] if result.sets else []
        return _holder_of(rows[0]) if rows else None

    def _waiters_steps(self) -> _Steps[list[Holder]]:
        try:
            result = yield f"{self._holder_query()}; {self._WAITERS_QUERY}"
        except psycopg.errors.UndefinedTable:
            return []
        except psycopg.Error as exc:
            raise self.error(exc, "reading who waits for the lock") from None
        holders, waiting = result.sets
        if not holders:
            return []
        # Waiters queue behind each other (the tuple lock) and the first waits for the holder's transaction: follow
        # pg_blocking_pids() from the holder.
        blocked_by = {row[0]: set(row[5] or ()) for row in waiting}
        chain = {holders[0][0]}
        grew = True
        while grew:
            grew = False
            for pid, blockers in blocked_by.items():
                if pid not in chain and blockers & chain:
                    chain.add(pid)
                    grew = True
        rows = [row for row in waiting if row[0] in chain]
        rows.sort(key=lambda row: -(row[4] or 0.0))
        return [_holder_of(row, waiting=True) for row in rows]

    # ------------------------------------------------------------------------------------------- reading
    def load(self) -> Stored:
        return self._reading(self._load_steps())

    def put(self, data: bytes) -> object:
        raise TypeError(f"{self.target}: a PostgreSQL store is always locked; write it in a transaction")

    # ------------------------------------------------------------------------------------------- the lock
    def held(self, owner: object, holder: object) -> PgHeld:
        return PgHeld(owner, holder)

    def acquire(self, held: object, *, timeout: float, blocking: bool, label: str | None) -> None:
        assert isinstance(held, PgHeld)
        start = time.monotonic()
        held.wait = timeout if blocking else 0.0
        held.label = label
        slot = held.slot = self._slot
        if _conflicts(slot.owner(), held.owner):
            raise LockReentryError(self.lock_name)
        if not slot.take(held.ticket, _left(start, held.wait)):
            raise self.timeout_error(time.monotonic() - start)
        self._check_fork()
        # Only a lock-free read of this Store on another thread can be using the connection, for one short query.
        self._use.take(held.use, -1.0)
        conn = held.conn = self._connection()
        _drive(conn, self._lock_steps(held, start))

    def fetch(self, held: object, known: object) -> Stored | None:
        assert isinstance(held, PgHeld)
        stored, read = self._fetched(held, known)
        if read and stored is not None:
            assert isinstance(stored.version, tuple)
            return _drive(held.conn, self._value_steps(stored.version))
        return stored

    def save(self, held: object, data: bytes) -> object:
        assert isinstance(held, PgHeld)
        return _drive(held.conn, self._save_steps(held, data))

    def set_aside(self, held: object) -> str | None:
        assert isinstance(held, PgHeld)
        return _drive(held.conn, self._set_aside_steps(held))

    def release(self, held: object) -> None:
        assert isinstance(held, PgHeld)
        if held.pid != os.getpid():
            return  # a forked child: the session and the lock are its parent's
        try:
            conn = held.conn
            if isinstance(conn, psycopg.AsyncConnection):
                self._release_async_here(held)
            elif conn is not None:
                self._end(conn, commit=held.aside and not held.committed)
                held.conn = None
        finally:
            try:
                self._use.give(held.use)
            finally:
                if held.slot is not None:
                    held.slot.give(held.ticket)

    def _end(self, conn: psycopg.Connection[Any], *, commit: bool) -> None:
        """End the SQL transaction on ``conn`` (ROLLBACK, or COMMIT of a value set aside), or drop the connection."""
        if conn.closed:
            return
        status = conn.info.transaction_status
        if status == pq.TransactionStatus.IDLE:
            return
        if status in (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR):
            try:
                _run(conn, "COMMIT" if commit and status == pq.TransactionStatus.INTRANS else "ROLLBACK")
                return
            except psycopg.Error:
                pass
            except BaseException:
                self._discard(conn)
                raise
        self._discard(conn)

    def _release_async_here(self, held: PgHeld) -> None:
        """An asyncio transaction dropped without ``__aexit__`` (an interrupt): no coroutine can run from here, so
        its connection is closed (the server rolls back) and its turns given back."""
        conn, held.conn = held.conn, None
        try:
            conn.pgconn.finish()
        except Exception:
            pass
        _give_turns(held)

    # ------------------------------------------------------------------------------------------- diagnostics
    def holder(self) -> Holder | None:
        return self._reading(self._holder_steps())

    def waiters(self) -> list[Holder]:
        return self._reading(self._waiters_steps())

    def timeout_error(self, waited: float) -> LockTimeout:
        try:
            holder = self.holder()
        except OSError:
            holder = None
        return LockTimeout(self.lock_name, waited, path=self.target, holder=holder)

    def close(self) -> None:
        if self._pid != os.getpid():
            self.forked()
            return
        conns = [self._conn, self._read]
        self._conn = self._read = None
        for conn in conns:
            if conn is not None:
                self._discard(conn)
        loops, self._loops = self._loops, {}
        for state in loops.values():
            state.finish()

    # ------------------------------------------------------------------------------------------- asyncio
    def _loop_state(self) -> _LoopState:
        self._check_fork()
        loop = asyncio.get_running_loop()
        for key, state in list(self._loops.items()):
            if state.gone():  # a loop closed without closing this Store: its sessions are closed now
                del self._loops[key]
                state.finish()
        state = self._loops.get(id(loop))
        if state is None or state.loop() is not loop:
            state = self._loops[id(loop)] = _LoopState(loop)
        return state

    async def _anew_connection(self) -> psycopg.AsyncConnection[Any]:
        failure: OSError | None = None
        try:
            conn = await psycopg.AsyncConnection.connect(self._url, **self._connect_kwargs())
        except psycopg.Error as exc:
            failure = self.error(exc, "connecting")
        if failure is not None:
            raise failure
        try:
            await _adrive(conn, self._setup_steps())
        except BaseException:
            conn.pgconn.finish()
            raise
        return conn

    async def _aconnection(self, state: _LoopState) -> psycopg.AsyncConnection[Any]:
        conn = state.conn
        if conn is None or conn.closed:
            conn = state.conn = await self._anew_connection()
        return conn

    async def _areading(self, steps: _Steps[_T]) -> _T:
        state = self._loop_state()
        if not state.tx_lock.locked():
            async with state.tx_lock:
                return await _adrive(await self._aconnection(state), steps)
        async with state.read_lock:
            conn = state.read
            if conn is None or conn.closed:
                conn = state.read = await self._anew_connection()
            return await _adrive(conn, steps)

    async def aload(self) -> Stored:
        return await self._areading(self._load_steps())

    async def _atimeout(self, start: float) -> LockTimeout:
        try:
            holder = await self._areading(self._holder_steps())
        except OSError:
            holder = None
        return LockTimeout(self.lock_name, time.monotonic() - start, path=self.target, holder=holder)

    async def aacquire(self, held: object, *, timeout: float, blocking: bool, label: str | None) -> None:
        from ._aio import in_thread

        assert isinstance(held, PgHeld)
        start = time.monotonic()
        held.wait = wait = timeout if blocking else 0.0
        held.label = label
        slot = held.slot = self._slot
        state = held.state = self._loop_state()
        turn = _turn(self._identity)
        if turn.owner is held.owner or _conflicts(slot.owner(), held.owner):
            raise LockReentryError(self.lock_name)
        if wait == 0 and turn.locked():
            raise await self._atimeout(start)
        try:
            async with asyncio.timeout(None if wait < 0 else _left(start, wait)):
                await turn.acquire()
        except TimeoutError:
            raise await self._atimeout(start) from None
        held.turn = turn
        turn.owner = held.owner
        # Then this process's other threads (tasks of this loop never hold the slot here: they hold the turn).
        while not slot.try_take(held.ticket):
            left = _left(start, wait)
            if left == 0:
                raise await self._atimeout(start)
            if await in_thread(slot.take, held.ticket, _SLICE if left < 0 else min(_SLICE, left)):
                break
        await state.tx_lock.acquire()
        state.tx_owner = held
        conn = held.conn = await self._aconnection(state)
        await _adrive(conn, self._lock_steps(held, start))

    async def afetch(self, held: object, known: object) -> Stored | None:
        assert isinstance(held, PgHeld)
        stored, read = self._fetched(held, known)
        if read and stored is not None:
            assert isinstance(stored.version, tuple)
            return await _adrive(held.conn, self._value_steps(stored.version))
        return stored

    async def asave(self, held: object, data: bytes) -> object:
        assert isinstance(held, PgHeld)
        return await _adrive(held.conn, self._save_steps(held, data))

    async def aset_aside(self, held: object) -> str | None:
        assert isinstance(held, PgHeld)
        return await _adrive(held.conn, self._set_aside_steps(held))

    async def arelease(self, held: object) -> None:
        assert isinstance(held, PgHeld)
        if held.pid != os.getpid():
            return
        try:
            conn = held.conn
            if conn is not None:
                await self._aend(conn, commit=held.aside and not held.committed)
                held.conn = None
        finally:
            try:
                _give_turns(held)
            finally:
                if held.slot is not None:
                    held.slot.give(held.ticket)

    async def _aend(self, conn: psycopg.AsyncConnection[Any], *, commit: bool) -> None:
        if conn.closed:
            return
        status = conn.info.transaction_status
        if status == pq.TransactionStatus.IDLE:
            return
        if status in (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR):
            try:
                await _arun(conn, "COMMIT" if commit and status == pq.TransactionStatus.INTRANS else "ROLLBACK")
                return
            except psycopg.Error:
                pass
            except BaseException:
                conn.pgconn.finish()
                raise
        conn.pgconn.finish()


def _give_turns(held: PgHeld) -> None:
    """Give back the asyncio locks ``held`` holds: its Store's connection on this loop, and the loop's turn."""
    state = held.state
    if state is not None and state.tx_owner is held:
        state.tx_owner = None
        try:
            state.tx_lock.release()
        except RuntimeError:
            pass
    turn, held.turn = held.turn, None
    if turn is not None:
        turn.owner = None
        try:
            turn.release()
        except RuntimeError:
            pass


def _secrets(url: str, params: dict[str, Any]) -> list[str]:
    """The password as the URL spells it and as it is meant, for scrubbing texts that might echo it."""
    found = []
    password = params.get("password")
    if password:
        found.append(str(password))
    netloc = urllib.parse.urlsplit(url).netloc
    userinfo = netloc.rpartition("@")[0]
    if ":" in userinfo:
        raw = userinfo.split(":", 1)[1]
        if raw:
            found.append(raw)
    return sorted(set(found), key=len, reverse=True)


def _holder_of(row: _Row, *, waiting: bool = False) -> Holder:
    """A Holder from a ``pg_stat_activity`` row: (backend pid, application_name, client, role, seconds since)."""
    backend, app, client, user, age = row[:5]
    since = None if age is None else time.time() - float(age)
    match = _RECORD.match(app or "")
    if match is None:  # a session that is not lockstore's (psql...): known by its backend
        return Holder(pid=int(backend), host=client or "(the server's Unix socket)", user=user or "",
                      cmdline=[app or "(no application_name)", f"(PostgreSQL backend pid {backend})"],
                      acquired_at=None, label=None, alive=None, recorded=False,
                      waiting_since=since if waiting else None)
    pid, host, label = int(match[1]), match[2], match[3]
    alive, cmdline, start = _local_process(pid, host, since)
    return Holder(pid=pid, host=host, user=user or "", cmdline=cmdline or [f"(PostgreSQL backend pid {backend})"],
                  acquired_at=None if waiting else since, label=label, alive=alive, start_time=start,
                  waiting_since=since if waiting else None)


def _local_process(pid: int, host: str, since: float | None) -> tuple[bool | None, list[str], float | None]:
    """Whether a holder recorded on this host still runs (True, or None when that cannot be told), its command line
    and start time. A process that started after the lock was taken is not the holder (a reused pid)."""
    if host != _holder._host_name():
        return None, [], None
    import psutil  # here only: importing psutil costs tens of milliseconds

    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            created = proc.create_time()
            if since is not None and created > since + 1.0:
                return None, [], None
            return True, proc.cmdline(), created
    except psutil.Error:
        return None, [], None  # gone, or another PID namespace with the same host name: the server still has it


__all__ = ["DEFAULT_TABLE", "PgHeld", "PgStorage", "application_name", "make"]
