"""The PostgreSQL storage: one value in one row of a table, locked by ``SELECT ... FOR UPDATE`` in one SQL transaction.

``lockstore.open("postgresql://USER@HOST:PORT/DB#KEY", table="lockstore")`` (also ``postgres://``; libpq's URL
parameters work, e.g. ``?sslmode=require&connect_timeout=5``).

- Schema: ``key text PRIMARY KEY, value bytea, version bigint, updated_at timestamptz``, created by the first
  transaction that finds it missing (under an advisory lock: concurrent ``CREATE TABLE IF NOT EXISTS`` collide in
  the catalog). ``value`` holds the encoded bytes of any format; a JSON store reads in psql as
  ``convert_from(value, 'UTF8')``.
- A transaction is one SQL transaction on the Store's connection, in two round trips of prepared statements sent as
  one pipeline each: BEGIN, the time limits, ``SELECT ... FOR UPDATE`` (which returns the value unless it is the
  version this Store last saw); then ``UPDATE ...; COMMIT`` when the value changed, else ROLLBACK. A missing row is
  inserted as a placeholder in the same SQL transaction, so a transaction that changes nothing leaves no row.
- Versions are (version, xmin): every write of the row, lockstore's or another client's, changes its xmin, so a
  value written behind lockstore's back (psql) is always re-read, never overwritten unseen.
- Timeouts: ``lock_timeout`` (0 tries once: ``NOWAIT``; negative: no limit), plus a ``statement_timeout`` a little
  longer for the locking statement alone, because a waiter queued behind another waiter waits for two locks in one
  statement. SQLSTATE 55P03 (or that statement timeout) becomes a LockTimeout naming the holder.
- Holder: each session's ``application_name`` is ``lockstore PID@HOST``, plus `` LABEL`` during a labelled
  transaction (cut to PostgreSQL's 63 bytes). ``holder()`` reads the row's ``xmax`` (the locking transaction), the
  backend holding that transaction's lock in ``pg_locks`` and its ``pg_stat_activity`` row: no waiting, no lock. A
  holder still inserting the row (it did not exist) is found through an advisory lock it takes for that purpose.
  ``waiters()`` follows ``pg_blocking_pids()`` back to the holder, oldest request first.
- In one process, threads and tasks first queue on an OwnerLock per row (first come, first served;
  LockReentryError for a second Store of the same owner), so one connection per Store serves its transactions;
  lock-free reads use it when it is idle and a second connection while a transaction holds it. asyncio uses one
  ``AsyncConnection`` per Store and event loop (and a second for lock-free reads during a transaction).
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
from collections.abc import Callable, Generator
from functools import partial
from typing import Any, Final, TypeAlias, TypeVar

try:
    import psycopg
    from psycopg import generators, pq, sql
except ImportError as exc:  # pragma: no cover - tested in a subprocess
    raise ImportError('a PostgreSQL store (postgresql://, postgres:// targets) needs the psycopg package: '
                      'pip install "lockstore[postgres]"', name="psycopg") from exc

from . import _holder
from ._backend import Stored
from ._error import LockLost, LockReentryError, LockTimeout, NotDurableError
from ._holder import Holder
from ._os import O_CLOEXEC
from ._owners import OwnerLock, Ticket, at_fork, conflicts, current_owner
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
#: Values larger than this are read by a statement of their own after the lock's (see ``PgStorage._statements``).
_SPLIT: Final = 256 * 1024
#: PostgreSQL keeps this many bytes of application_name (NAMEDATALEN - 1).
_APP_NAME_MAX: Final = 63
#: Longest blocking wait of an asyncio task in a helper thread (for this process's other threads): how long a
#: cancelled task may take to notice.
_SLICE: Final = 0.25
_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*\Z")
_RECORD: Final = re.compile(r"lockstore (\d+)@(\S*)(?: (.*))?\Z", re.S)
#: SQLSTATEs of a session the server ended (admin shutdown, crash, terminated backend, idle-in-transaction timeout).
_SESSION_ENDED: Final = ("57P01", "57P02", "57P03", "25P03", "57P05")
#: How the server words a refused connection (before any session exists there is no SQLSTATE to go by).
_REFUSED: Final = ("authentication failed", "no password supplied", "pg_hba.conf", "permission denied",
                   "role", "not permitted", "password")
_WARNED: set[str] = set()

_Cmd: TypeAlias = "tuple[bytes, tuple[bytes | None, ...], tuple[int, ...] | None]"
_Query: TypeAlias = "str | list[_Cmd]"
_Steps: TypeAlias = Generator[_Query, "_Result", _T]
_Row: TypeAlias = tuple[Any, ...]
_Token: TypeAlias = tuple[int, int]


#: What a LockTimeout tells operators about a PostgreSQL store's lock.
PG_HINT: Final = ("the lock is the row's FOR UPDATE lock: it is freed when its holder's SQL transaction ends, or "
                  "when the server sees the holder's connection end (a killed client)")


def make(path: str, *, lock: object, durable: bool, poll_interval: float, timeout: float = -1.0,
         table: object = DEFAULT_TABLE, **options: Any) -> PgStorage:
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


class _Result:
    """What one round trip returned: for each statement, its rows (text values as bytes, or None), and the last
    statement's command status."""

    __slots__ = ("sets", "status")

    def __init__(self, sets: list[list[_Row]], status: str | None) -> None:
        self.sets = sets
        self.status = status

    def rows(self, index: int = 0) -> list[_Row]:
        return self.sets[index] if len(self.sets) > index else []


# Straight to libpq through psycopg's own I/O generators (waited for by ``conn.wait``, which on Ctrl-C or a task's
# cancellation cancels the query on the server first). A transaction's statements are prepared once per connection
# and sent as one pipeline per round trip: parsing and planning them every time would cost more than running them.
_TUPLES_OK: Final = pq.ExecStatus.TUPLES_OK
_FATAL: Final = (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.BAD_RESPONSE, pq.ExecStatus.NONFATAL_ERROR)
_SYNC: Final = pq.ExecStatus.PIPELINE_SYNC


def _pipelines() -> bool:
    try:
        return bool(psycopg.Pipeline.is_supported())
    except Exception:  # pragma: no cover - an old psycopg
        return False


_PIPELINE: Final = _pipelines()


def _round_trip(pgconn: Any, sends: list[Callable[[], None]]) -> Generator[Any, Any, list[Any]]:
    """Send the messages ``sends`` queue (prepared statements, or statements to prepare) and collect one result
    each: as one pipeline, or one after the other where libpq has no pipeline mode (stopping at the first error)."""
    results: list[Any] = []
    if not _PIPELINE:
        for send in sends:
            send()
            got = yield from generators.execute(pgconn)
            results += got
            if any(r.status in _FATAL for r in got):
                break
        return results
    pgconn.enter_pipeline_mode()
    for send in sends:
        send()
    pgconn.pipeline_sync()
    yield from generators.send(pgconn)
    for _ in range(2 * len(sends) + 2):
        got = yield from generators.fetch_many(pgconn)
        if got and got[-1].status == _SYNC:
            pgconn.exit_pipeline_mode()
            return results
        results += got
    raise psycopg.OperationalError("lockstore: the pipeline's results did not end")  # pragma: no cover


def _batch(pgconn: Any, commands: list[_Cmd]) -> Generator[Any, Any, list[Any]]:
    """Run prepared ``commands`` (name, parameters, formats) in one round trip; one result each."""
    send = pgconn.send_query_prepared
    return _round_trip(pgconn, [partial(send, name, params, param_formats=formats) for name, params, formats in
                                commands])


def _prepare(pgconn: Any, statements: list[tuple[bytes, bytes]]) -> Generator[Any, Any, list[Any]]:
    """Prepare ``statements`` (name, text) in one round trip; one result each (some may have failed)."""
    return _round_trip(pgconn, [partial(pgconn.send_prepare, name, text) for name, text in statements])


def _text_query(pgconn: Any, text: str) -> Generator[Any, Any, list[Any]]:
    """A simple query (several statements, no parameters): for what runs rarely (diagnostics, DDL)."""
    pgconn.send_query(text.encode())
    results: list[Any] = yield from generators.execute(pgconn)
    return results


def _collect(results: list[Any], encoding: str) -> _Result:
    """The rows of each result; raises the first error (after every result was read: the connection is clean)."""
    sets: list[list[_Row]] = []
    status: bytes | None = None
    error = None
    for res in results:
        if res.status == _TUPLES_OK:
            fields = range(res.nfields)
            sets.append([tuple(res.get_value(r, c) for c in fields) for r in range(res.ntuples)])
        else:
            sets.append([])
            if error is None and res.status in _FATAL:
                error = res
        status = res.command_status
    if error is not None:
        raise psycopg.errors.error_from_result(error, encoding=encoding)
    return _Result(sets, None if status is None else status.decode())


_ESCAPING: Final = pq.Escaping()
#: How a transaction ends: ROLLBACK, or COMMIT (of a value set aside, when nothing else was written).
_ENDS: Final = {False: b"lockstore_rollback", True: b"lockstore_commit"}


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def _value(value: bytes | None) -> bytes | None:
    """A bytea column in text form (hex, or the old escape format) as bytes."""
    return None if value is None else _ESCAPING.unescape_bytea(value)


def _usable(conn: Any) -> bool:
    """Whether ``conn`` is open and between two round trips (not left in a pipeline by an interrupt)."""
    return not conn.closed and conn.pgconn.pipeline_status == pq.PipelineStatus.OFF


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
        nul = os.open(os.devnull, os.O_RDWR | O_CLOEXEC)
        try:
            os.dup2(nul, fd)  # our copy of the socket is closed; libpq's goodbye now goes to /dev/null
        finally:
            os.close(nul)
    pgconn.finish()


# ------------------------------------------------------------------------------------------------ per process
class _Slot(OwnerLock):
    """One row in this process: who holds it here (shared by every Store on it, kept while one is open)."""

    __slots__ = ("__weakref__",)


_SLOTS: weakref.WeakValueDictionary[tuple[object, ...], _Slot] = weakref.WeakValueDictionary()
_SLOTS_LOCK = threading.Lock()


def _slot(identity: tuple[object, ...]) -> _Slot:
    with _SLOTS_LOCK:
        found = _SLOTS.get(identity)
        if found is None:
            found = _SLOTS[identity] = _Slot()
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
        self.row: tuple[bytes | None, int, int, bool] | None = None  # FOR UPDATE: value, version, xmin, skipped
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
        self._kb = server.key.encode()
        self._sql = self._statements()
        self._prepared: weakref.WeakKeyDictionary[Any, set[bytes]] = weakref.WeakKeyDictionary()
        self._statement_timeout = b"0"
        self._size = 0  # of the value this Store last read or wrote
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
        lower = text.lower()
        # A failed connection has no SQLSTATE (libpq reports it as text): told apart by the server's words.
        if state.startswith("28") or state == "42501" or (not state and any(w in lower for w in _REFUSED)):
            err, code = PermissionError(f"{self.target}: {doing}: the server refused us: {text}"), errno.EACCES
        elif state == "3D000" or (not state and "database" in lower and "does not exist" in lower):
            err, code = FileNotFoundError(f"{self.target}: {doing}: {text}"), errno.ENOENT
        elif lost(exc):
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
        # The cause without its traceback: psycopg's connect() frames hold the conninfo, password included.
        err.__cause__ = exc.with_traceback(None) if text.endswith(" ".join(str(exc).split())) else None
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
        parts.append("SELECT current_setting('fsync', true), current_setting('synchronous_commit', true), "
                     "current_setting('statement_timeout')")
        return "; ".join(parts)

    def _setup_steps(self) -> _Steps[None]:
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
            self._check_durable(_text(row[0]), _text(row[1]))

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
            self._drive(conn, self._setup_steps())
        except BaseException:
            conn.close()
            raise
        return conn

    def _statements(self) -> dict[bytes, bytes]:
        """The prepared statements of a transaction (prepared on each connection at its first use)."""
        t = self._t
        # The lock restores the session's statement_timeout as it runs (for the statements after it), and returns
        # the value unless it is the version this Store last saw ($3, $4). For a large value (_SPLIT) the value is
        # read by a statement of its own, so that sending it never counts against the wait's statement_timeout.
        same = "version = $3::bigint AND xmin = $4::xid"
        same2 = "version = $2::bigint AND xmin = $3::xid"
        bare = f"SELECT version, xmin::text, set_config('statement_timeout', $2, true) FROM {t} WHERE key = $1"
        lock = bare.replace(" FROM ", f", CASE WHEN {same} THEN NULL ELSE value END, {same} FROM ")
        tag = lock.replace(" FROM ", ", pg_try_advisory_xact_lock($5::int4, $6::int4) FROM ")  # see _holder_query
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

    def _unprepared(self, conn: Any, query: list[_Cmd]) -> list[tuple[bytes, bytes]]:
        """All statements ``conn`` has not prepared yet, when ``query`` needs one of them (one round trip for all)."""
        done = self._prepared.get(conn)
        if done is None:
            done = self._prepared[conn] = set()
        elif all(name in done for name, _, _ in query):
            return []
        if query[0][0] != b"lockstore_begin":  # a lock-free read: a connection for it alone (lockstore.read())
            return [(name, self._sql[name]) for name, _, _ in query if name not in done]
        return [(name, text) for name, text in self._sql.items() if name not in done]

    def _prepared_now(self, conn: Any, statements: list[tuple[bytes, bytes]], results: list[Any]) -> None:
        done = self._prepared.setdefault(conn, set())
        for (name, _), res in zip(statements, results, strict=False):
            if res.status == pq.ExecStatus.COMMAND_OK:
                done.add(name)
        _collect(results, "utf-8")  # raises the first failure (a missing table: the caller creates it)

    def _run(self, conn: psycopg.Connection[Any], query: _Query) -> _Result:
        with conn.lock:
            pgconn = conn.pgconn
            if isinstance(query, str):
                return _collect(conn.wait(_text_query(pgconn, query)), "utf-8")
            if statements := self._unprepared(conn, query):
                self._prepared_now(conn, statements, conn.wait(_prepare(pgconn, statements)))
            return _collect(conn.wait(_batch(pgconn, query)), "utf-8")

    async def _arun(self, conn: psycopg.AsyncConnection[Any], query: _Query) -> _Result:
        async with conn.lock:
            pgconn = conn.pgconn
            if isinstance(query, str):
                return _collect(await conn.wait(_text_query(pgconn, query)), "utf-8")
            if statements := self._unprepared(conn, query):
                self._prepared_now(conn, statements, await conn.wait(_prepare(pgconn, statements)))
            return _collect(await conn.wait(_batch(pgconn, query)), "utf-8")

    def _drive(self, conn: psycopg.Connection[Any], steps: _Steps[_T]) -> _T:
        """Run ``steps`` (a generator of queries that receives their results, or their psycopg errors) on ``conn``."""
        try:
            query = next(steps)
            while True:
                try:
                    result = self._run(conn, query)
                except psycopg.Error as exc:
                    query = steps.throw(exc)
                else:
                    query = steps.send(result)
        except StopIteration as stop:
            value: _T = stop.value
            return value

    async def _adrive(self, conn: psycopg.AsyncConnection[Any], steps: _Steps[_T]) -> _T:
        """:meth:`_drive` on an AsyncConnection: the same steps, awaited."""
        try:
            query = next(steps)
            while True:
                try:
                    result = await self._arun(conn, query)
                except psycopg.Error as exc:
                    query = steps.throw(exc)
                else:
                    query = steps.send(result)
        except StopIteration as stop:
            value: _T = stop.value
            return value

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
        if conn is None or not _usable(conn):
            if conn is not None:
                self._discard(conn)
            conn = self._conn = self._new_connection()
        return conn

    def _reading(self, steps: _Steps[_T]) -> _T:
        """Run lock-free ``steps`` on the Store's connection when no transaction uses it, else on a second one."""
        self._check_fork()
        ticket = Ticket(current_owner())
        try:
            if self._use.try_take(ticket):
                return self._drive(self._connection(), steps)
        finally:
            self._use.give(ticket)
        with self._read_lock:
            conn = self._read
            if conn is None or not _usable(conn):
                if conn is not None:
                    self._discard(conn)
                conn = self._read = self._new_connection()
            return self._drive(conn, steps)

    @staticmethod
    def _discard(conn: psycopg.Connection[Any]) -> None:
        """Close a connection in an unknown state: the server rolls back its transaction."""
        try:
            conn.close()
        except Exception:
            pass

    # ------------------------------------------------------------------------------------------- SQL
    def _lock_query(self, start: float, wait: float, label: str | None, *, insert: bool) -> list[_Cmd]:
        """BEGIN, the time limits (and the label), then lock the row (inserting a placeholder first with ``insert``)
        and read its value unless it is the version this Store last saw (see :meth:`_statements`)."""
        left = _left(start, wait)
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
        query: list[_Cmd] = [] if insert else [(b"lockstore_begin", (), None)]
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

    def _holder_query(self) -> str:
        return (
            "SELECT a.pid, a.application_name, coalesce(a.client_hostname, host(a.client_addr)), a.usename, "
            "extract(epoch FROM clock_timestamp() - CASE WHEN a.state LIKE 'idle in transaction%' THEN a.state_change "
            "ELSE a.xact_start END) FROM ("
            f"SELECT l.pid, 0 AS o FROM {self._t} r JOIN pg_locks l ON l.locktype = 'transactionid' "
            f"AND l.transactionid = r.xmax AND l.granted WHERE r.key = {self._k} "
            "UNION ALL SELECT l.pid, 1 FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "AND d.datname = current_database() WHERE l.locktype = 'advisory' "
            f"AND l.classid = '{self._tag[0] % (1 << 32)}' AND l.objid = '{self._tag[1] % (1 << 32)}' "
            "AND l.objsubid = 2 AND l.granted"
            ") h JOIN pg_stat_activity a ON a.pid = h.pid ORDER BY h.o LIMIT 1")

    _WAITERS_QUERY: Final = (
        "SELECT a.pid, a.application_name, coalesce(a.client_hostname, host(a.client_addr)), a.usename, "
        "extract(epoch FROM clock_timestamp() - a.query_start), pg_blocking_pids(a.pid) FROM pg_stat_activity a "
        "WHERE a.wait_event_type = 'Lock' AND a.datname = current_database()")

    def _save_query(self, held: PgHeld, data: bytes) -> list[_Cmd]:
        """The commit, in one round trip: the new value (a binary parameter) and COMMIT."""
        write: _Cmd = (b"lockstore_update", (data, self._kb), (1, 0))
        if held.deleted is not None:  # set aside in this transaction: the row is gone
            write = (b"lockstore_recreate", (data, self._kb, str(held.deleted + 1).encode()), (1, 0, 0))
        return [write, (b"lockstore_commit", (), None)]

    # ------------------------------------------------------------------------------------------- steps
    def _load_steps(self) -> _Steps[Stored]:
        try:
            result = yield [(b"lockstore_load", (self._kb,), None)]
        except psycopg.errors.UndefinedTable:
            return Stored(None, None)
        except psycopg.Error as exc:
            raise self.error(exc, "reading") from None
        rows = result.rows()
        if not rows or rows[0][0] is None:
            return Stored(None, None)
        data = _value(rows[0][0])
        token = (int(rows[0][1]), int(rows[0][2]))
        self._hint, self._size = token, len(data or b"")
        return Stored(data, token)

    def _lock_steps(self, held: PgHeld, start: float) -> _Steps[None]:
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
                data = _value(read[0][0])
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

    def _value_steps(self, token: _Token) -> _Steps[Stored]:
        try:
            result = yield [(b"lockstore_value", (self._kb,), None)]
        except psycopg.Error as exc:
            raise self.error(exc, "reading") from None
        rows = result.rows()
        if not rows or rows[0][0] is None:
            return Stored(None, None)
        data = _value(rows[0][0])
        self._hint, self._size = token, len(data or b"")
        return Stored(data, token)

    def _save_steps(self, held: PgHeld, data: bytes) -> _Steps[_Token]:
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

    def _relock_steps(self, held: PgHeld) -> _Steps[None]:
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

    def _set_aside_steps(self, held: PgHeld) -> _Steps[str]:
        aside = f"{self.key}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"
        try:
            result = yield (f"INSERT INTO {self._t} (key, value, version, updated_at) SELECT {_literal(aside)}, "
                            f"value, version, now() FROM {self._t} WHERE key = {self._k}; "
                            f"DELETE FROM {self._t} WHERE key = {self._k} RETURNING version")
        except psycopg.Error as exc:
            raise self.error(exc, "moving the undecodable value aside") from None
        rows = result.rows()
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
        rows = result.rows()
        return _holder_of(rows[0]) if rows else None

    def _waiters_steps(self) -> _Steps[list[Holder]]:
        try:
            result = yield f"{self._holder_query()}; {self._WAITERS_QUERY}"
        except psycopg.errors.UndefinedTable:
            return []
        except psycopg.Error as exc:
            raise self.error(exc, "reading who waits for the lock") from None
        holders, waiting = result.rows(0), result.rows(1)
        if not holders:
            return []
        # Waiters queue behind each other (the tuple lock) and the first waits for the holder's transaction: follow
        # pg_blocking_pids() from the holder.
        blocked_by = {row[0]: set((row[5] or b"{}").strip(b"{}").split(b",")) for row in waiting}
        chain = {holders[0][0]}
        grew = True
        while grew:
            grew = False
            for pid, blockers in blocked_by.items():
                if pid not in chain and blockers & chain:
                    chain.add(pid)
                    grew = True
        rows = [row for row in waiting if row[0] in chain]
        rows.sort(key=lambda row: -float(row[4] or 0))
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
        if conflicts(slot.owner(), held.owner):
            raise LockReentryError(self.lock_name)
        if not slot.take(held.ticket, _left(start, held.wait)):
            raise self.timeout_error(time.monotonic() - start)
        self._check_fork()
        # Only a lock-free read of this Store on another thread can be using the connection, for one short query.
        self._use.take(held.use, -1.0)
        conn = held.conn = self._connection()
        self._drive(conn, self._lock_steps(held, start))

    def fetch(self, held: object, known: object) -> Stored | None:
        assert isinstance(held, PgHeld)
        stored, read = self._fetched(held, known)
        if read and stored is not None:
            assert isinstance(stored.version, tuple)
            return self._drive(held.conn, self._value_steps(stored.version))
        return stored

    def save(self, held: object, data: bytes, *, last: bool = False) -> object:
        assert isinstance(held, PgHeld)  # the save commits the SQL transaction, which releases the row: always last
        return self._drive(held.conn, self._save_steps(held, data))

    def set_aside(self, held: object) -> str | None:
        assert isinstance(held, PgHeld)
        return self._drive(held.conn, self._set_aside_steps(held))

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
        if status == pq.TransactionStatus.IDLE and _usable(conn):
            return
        if status in (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR) and _usable(conn):
            try:
                self._run(conn, [(_ENDS[commit and status == pq.TransactionStatus.INTRANS], (), None)])
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
        return LockTimeout(self.lock_name, waited, path=self.target, holder=holder, hint=PG_HINT)

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
        found = self._loops.get(id(loop))
        if found is None or found.loop() is not loop:
            found = self._loops[id(loop)] = _LoopState(loop)
        return found

    async def _anew_connection(self) -> psycopg.AsyncConnection[Any]:
        failure: OSError | None = None
        try:
            conn = await psycopg.AsyncConnection.connect(self._url, **self._connect_kwargs())
        except psycopg.Error as exc:
            failure = self.error(exc, "connecting")
        if failure is not None:
            raise failure
        try:
            await self._adrive(conn, self._setup_steps())
        except BaseException:
            conn.pgconn.finish()
            raise
        return conn

    async def _aconnection(self, state: _LoopState) -> psycopg.AsyncConnection[Any]:
        conn = state.conn
        if conn is None or not _usable(conn):
            if conn is not None:
                conn.pgconn.finish()
            conn = state.conn = await self._anew_connection()
        return conn

    async def _areading(self, steps: _Steps[_T]) -> _T:
        state = self._loop_state()
        if not state.tx_lock.locked():
            async with state.tx_lock:
                return await self._adrive(await self._aconnection(state), steps)
        async with state.read_lock:
            conn = state.read
            if conn is None or not _usable(conn):
                if conn is not None:
                    conn.pgconn.finish()
                conn = state.read = await self._anew_connection()
            return await self._adrive(conn, steps)

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
        holder = slot.owner()  # tasks of this loop queue on the turn; the same task, or this very thread, cannot
        if turn.owner is held.owner or (holder is not None and holder in (held.owner, threading.get_ident())):
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
        await self._adrive(conn, self._lock_steps(held, start))

    async def afetch(self, held: object, known: object) -> Stored | None:
        assert isinstance(held, PgHeld)
        stored, read = self._fetched(held, known)
        if read and stored is not None:
            assert isinstance(stored.version, tuple)
            return await self._adrive(held.conn, self._value_steps(stored.version))
        return stored

    async def asave(self, held: object, data: bytes, *, last: bool = False) -> object:
        assert isinstance(held, PgHeld)
        return await self._adrive(held.conn, self._save_steps(held, data))

    async def aset_aside(self, held: object) -> str | None:
        assert isinstance(held, PgHeld)
        return await self._adrive(held.conn, self._set_aside_steps(held))

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
        if status == pq.TransactionStatus.IDLE and _usable(conn):
            return
        if status in (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR) and _usable(conn):
            try:
                await self._arun(conn, [(_ENDS[commit and status == pq.TransactionStatus.INTRANS], (), None)])
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
    backend, app, client, user = int(row[0]), _text(row[1]), _text(row[2]), _text(row[3])
    since = None if row[4] is None else time.time() - float(row[4])
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
