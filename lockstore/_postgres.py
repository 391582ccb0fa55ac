"""The PostgreSQL storage: one value in one row of a table, locked by ``SELECT ... FOR UPDATE`` in one SQL transaction.

``lockstore.open("postgresql://USER@HOST:PORT/DB#KEY", table="lockstore")`` (also ``postgres://``; libpq's URL
parameters work, e.g. ``?sslmode=require&connect_timeout=5``). This module makes the storage, keeps its connections
and handles fork; a transaction's SQL is in ``_pg_row.py``, opening a session in ``_pg_session.py``, pipelines,
prepared statements and error mapping in ``_pg_io.py``, the holder record in ``_pg_holder.py``, the asyncio half
in ``_pg_aio.py``.

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
- Connecting: an unreachable server is reported (ConnectionError) after the URL's ``connect_timeout``; without
  one, after the Store's lock timeout rounded up to whole seconds (at least 1; psycopg waits at least 2), and never
  later than ``CONNECT_TIMEOUT`` (10 s), which is also the bound for a Store without a lock timeout. The bound is
  the Store's timeout when it is opened: a later ``store.timeout = ...`` or a transaction's own timeout does not
  change it.
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

import os
import re
import threading
import time
import weakref
from typing import Any, Final, TypeVar

try:
    import psycopg
    from psycopg import pq
except ImportError as exc:  # pragma: no cover - tested in a subprocess
    raise ImportError('a PostgreSQL store (postgresql://, postgres:// targets) needs the psycopg package: '
                      'pip install "lockstore[postgres]"', name="psycopg") from exc

from ._backend import Stored
from ._error import LockReentryError, LockTimeout
from ._holder import Holder
from ._os import O_CLOEXEC
from ._owners import OwnerLock, Ticket, at_fork, conflicts, current_owner
from ._pg_aio import AsyncHalf, LoopState, forget_turns, release_here
from ._pg_holder import PG_HINT, application_name
from ._pg_io import ENDS, Steps, discard, usable
from ._pg_row import PgHeld, time_left
from ._pg_session import connect_timeout
from ._target import ServerTarget, parse_server

_T = TypeVar("_T")

DEFAULT_TABLE: Final = "lockstore"
_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*\Z")


def make(path: str, *, lock: object, durable: bool, poll_interval: float, timeout: float = -1.0,
         table: object = DEFAULT_TABLE, **options: Any) -> PgStorage:
    """The storage of a ``postgresql://`` or ``postgres://`` target (see the module docstring); ``timeout`` is the
    Store's lock timeout (-1.0: none), which bounds a connection attempt when the URL gives no connect_timeout."""
    server = parse_server(path)
    if options:
        raise TypeError(f"unexpected option(s) for a PostgreSQL store: {', '.join(sorted(options))} (it takes "
                        "table=)")
    if lock is not True:
        raise ValueError(f"{server.display}: a PostgreSQL store is always locked (by its row, FOR UPDATE); lock= "
                         f"must be True, not {lock!r}")
    if "\0" in server.key:
        raise ValueError(f"{server.display}: a key cannot contain a NUL character")
    return PgStorage(server, table=_table(table), durable=durable, connect_timeout=connect_timeout(timeout))


def _table(table: object) -> tuple[str, ...]:
    """``table=`` as identifier parts: ``name`` or ``schema.name``, each a plain SQL identifier (quoted as given)."""
    if not isinstance(table, str):
        raise TypeError(f"table must be a string, not {type(table).__name__}")
    parts = tuple(table.split("."))
    if len(parts) > 2 or not all(_IDENT.match(p) and len(p.encode()) <= 63 for p in parts):
        raise ValueError(f"table must be a plain SQL identifier (letters, digits, _ and $, at most 63 bytes), "
                         f"optionally schema-qualified, not {table!r}")
    return parts


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


# ------------------------------------------------------------------------------------------------ fork
_LIVE: weakref.WeakSet[PgStorage] = weakref.WeakSet()


def _after_fork() -> None:
    global _SLOTS_LOCK
    _SLOTS_LOCK = threading.Lock()
    forget_turns()
    for storage in list(_LIVE):
        storage.forked()


at_fork(_after_fork)


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


class PgStorage(AsyncHalf):
    """One row of a PostgreSQL table, locked FOR UPDATE (see the module docstring)."""

    cheap_versions = True

    def __init__(self, server: ServerTarget, *, table: tuple[str, ...], durable: bool, connect_timeout: int) -> None:
        super().__init__(server, table=table, durable=durable, connect_timeout=connect_timeout)
        self._slot = _slot(self._identity)
        self._pid = os.getpid()
        self._conn: psycopg.Connection[Any] | None = None
        self._read: psycopg.Connection[Any] | None = None
        self._use = OwnerLock()  # who uses ``_conn``: a transaction, or a short lock-free read
        self._read_lock = threading.Lock()
        self._loops: dict[int, LoopState] = {}
        _LIVE.add(self)

    def __repr__(self) -> str:
        return f"<PgStorage {self.target!r} table={self.table}>"

    @property
    def locked(self) -> bool:
        return True

    # ------------------------------------------------------------------------------------------- connections, fork
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
        if conn is None or not usable(conn):
            if conn is not None:
                discard(conn)
            conn = self._conn = self._new_connection()
        return conn

    def _reading(self, steps: Steps[_T]) -> _T:
        """Run lock-free ``steps`` on the Store's connection when no transaction uses it, else on a second one."""
        self._check_fork()
        ticket = Ticket(current_owner())
        try:
            if self._use.try_take(ticket):
                return self._io.drive(self._connection(), steps)
        finally:
            self._use.give(ticket)
        with self._read_lock:
            conn = self._read
            if conn is None or not usable(conn):
                if conn is not None:
                    discard(conn)
                conn = self._read = self._new_connection()
            return self._io.drive(conn, steps)

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
        if not slot.take(held.ticket, time_left(start, held.wait)):
            raise self.timeout_error(time.monotonic() - start)
        self._check_fork()
        # Only a lock-free read of this Store on another thread can be using the connection, for one short query.
        self._use.take(held.use, -1.0)
        conn = held.conn = self._connection()
        self._io.drive(conn, self._lock_steps(held, start))

    def fetch(self, held: object, known: object) -> Stored | None:
        assert isinstance(held, PgHeld)
        stored, read = self._fetched(held, known)
        if read and stored is not None:
            assert isinstance(stored.version, tuple)
            return self._io.drive(held.conn, self._value_steps(stored.version))
        return stored

    def save(self, held: object, data: bytes, *, last: bool = False) -> object:
        assert isinstance(held, PgHeld)  # the save commits the SQL transaction, which releases the row: always last
        return self._io.drive(held.conn, self._save_steps(held, data))

    def set_aside(self, held: object) -> str | None:
        assert isinstance(held, PgHeld)
        return self._io.drive(held.conn, self._set_aside_steps(held))

    def release(self, held: object, *, abandoned: object = None) -> None:
        assert isinstance(held, PgHeld)
        if held.pid != os.getpid():
            return  # a forked child: the session and the lock are its parent's
        try:
            conn = held.conn
            if isinstance(conn, psycopg.AsyncConnection):
                release_here(held)
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
        if status == pq.TransactionStatus.IDLE and usable(conn):
            return
        if status in (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR) and usable(conn):
            try:
                self._io.run(conn, [(ENDS[commit and status == pq.TransactionStatus.INTRANS], (), None)])
                return
            except psycopg.Error:
                pass
            except BaseException:
                discard(conn)
                raise
        discard(conn)

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
                discard(conn)
        loops, self._loops = self._loops, {}
        for state in loops.values():
            state.finish()


__all__ = ["DEFAULT_TABLE", "PgHeld", "PgStorage", "application_name", "make"]
