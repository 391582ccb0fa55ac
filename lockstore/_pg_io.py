"""How the PostgreSQL storage talks to its server: prepared statements in pipelines, steps, and errors as OSErrors.

- Straight to libpq through psycopg's own I/O generators (waited for by ``conn.wait``, which on Ctrl-C or a task's
  cancellation cancels the query on the server first). A transaction's statements are prepared once per connection
  and sent as one pipeline per round trip: parsing and planning them every time would cost more than running them.
  Where libpq has no pipeline mode (before 14) the same statements go one round trip each.
- Steps: the storage's logic is written once, as generators that yield a query (SQL text, or prepared statements
  with their parameters) and receive its :class:`Result` or its psycopg error; :meth:`Prepared.drive` runs them on
  a Connection and :meth:`Prepared.adrive` on an AsyncConnection.
- Errors: :func:`as_oserror` turns psycopg's errors into OSErrors naming the target without its password
  (ConnectionError: unreachable, refused, timed out, lost; PermissionError: authentication, privileges;
  FileNotFoundError: no such database; OSError: anything else).
"""

from __future__ import annotations

import errno
import urllib.parse
import weakref
from collections.abc import Callable, Generator, Iterable
from functools import partial
from typing import Any, Final, TypeAlias, TypeVar

import psycopg
from psycopg import generators, pq

_T = TypeVar("_T")

Cmd: TypeAlias = "tuple[bytes, tuple[bytes | None, ...], tuple[int, ...] | None]"
Query: TypeAlias = "str | list[Cmd]"
Steps: TypeAlias = Generator[Query, "Result", _T]
Row: TypeAlias = tuple[Any, ...]
Token: TypeAlias = tuple[int, int]

#: SQLSTATEs of a session the server ended (admin shutdown, crash, terminated backend, idle-in-transaction timeout).
_SESSION_ENDED: Final = ("57P01", "57P02", "57P03", "25P03", "57P05")
#: How the server words a refused connection (before any session exists there is no SQLSTATE to go by).
_REFUSED: Final = ("authentication failed", "no password supplied", "pg_hba.conf", "permission denied",
                   "role", "not permitted", "password")


class Result:
    """What one round trip returned: for each statement, its rows (text values as bytes, or None), and the last
    statement's command status."""

    __slots__ = ("sets", "status")

    def __init__(self, sets: list[list[Row]], status: str | None) -> None:
        self.sets = sets
        self.status = status

    def rows(self, index: int = 0) -> list[Row]:
        return self.sets[index] if len(self.sets) > index else []


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


def _batch(pgconn: Any, commands: list[Cmd]) -> Generator[Any, Any, list[Any]]:
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


def _collect(results: list[Any], encoding: str) -> Result:
    """The rows of each result; raises the first error (after every result was read: the connection is clean)."""
    sets: list[list[Row]] = []
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
    return Result(sets, None if status is None else status.decode())


class Prepared:
    """A storage's prepared statements (name -> text), which of them each connection has prepared, and the steps
    run with them. A transaction's first round trip prepares all of them; a lock-free read only those it needs."""

    __slots__ = ("_done", "texts")

    def __init__(self, texts: dict[bytes, bytes]) -> None:
        self.texts = texts
        self._done: weakref.WeakKeyDictionary[Any, set[bytes]] = weakref.WeakKeyDictionary()

    def _unprepared(self, conn: Any, query: list[Cmd]) -> list[tuple[bytes, bytes]]:
        """All statements ``conn`` has not prepared yet, when ``query`` needs one of them (one round trip for all)."""
        done = self._done.get(conn)
        if done is None:
            done = self._done[conn] = set()
        elif all(name in done for name, _, _ in query):
            return []
        if query[0][0] != b"lockstore_begin":  # a lock-free read: a connection for it alone (lockstore.read())
            return [(name, self.texts[name]) for name, _, _ in query if name not in done]
        return [(name, text) for name, text in self.texts.items() if name not in done]

    def _prepared_now(self, conn: Any, statements: list[tuple[bytes, bytes]], results: list[Any]) -> None:
        done = self._done.setdefault(conn, set())
        for (name, _), res in zip(statements, results, strict=False):
            if res.status == pq.ExecStatus.COMMAND_OK:
                done.add(name)
        _collect(results, "utf-8")  # raises the first failure (a missing table: the caller creates it)

    def run(self, conn: psycopg.Connection[Any], query: Query) -> Result:
        with conn.lock:
            pgconn = conn.pgconn
            if isinstance(query, str):
                return _collect(conn.wait(_text_query(pgconn, query)), "utf-8")
            if statements := self._unprepared(conn, query):
                self._prepared_now(conn, statements, conn.wait(_prepare(pgconn, statements)))
            return _collect(conn.wait(_batch(pgconn, query)), "utf-8")

    async def arun(self, conn: psycopg.AsyncConnection[Any], query: Query) -> Result:
        async with conn.lock:
            pgconn = conn.pgconn
            if isinstance(query, str):
                return _collect(await conn.wait(_text_query(pgconn, query)), "utf-8")
            if statements := self._unprepared(conn, query):
                self._prepared_now(conn, statements, await conn.wait(_prepare(pgconn, statements)))
            return _collect(await conn.wait(_batch(pgconn, query)), "utf-8")

    def drive(self, conn: psycopg.Connection[Any], steps: Steps[_T]) -> _T:
        """Run ``steps`` (a generator of queries that receives their results, or their psycopg errors) on ``conn``."""
        try:
            query = next(steps)
            while True:
                try:
                    result = self.run(conn, query)
                except psycopg.Error as exc:
                    query = steps.throw(exc)
                else:
                    query = steps.send(result)
        except StopIteration as stop:
            value: _T = stop.value
            return value

    async def adrive(self, conn: psycopg.AsyncConnection[Any], steps: Steps[_T]) -> _T:
        """:meth:`drive` on an AsyncConnection: the same steps, awaited."""
        try:
            query = next(steps)
            while True:
                try:
                    result = await self.arun(conn, query)
                except psycopg.Error as exc:
                    query = steps.throw(exc)
                else:
                    query = steps.send(result)
        except StopIteration as stop:
            value: _T = stop.value
            return value


# ------------------------------------------------------------------------------------------------ values
_ESCAPING: Final = pq.Escaping()
#: How a transaction ends: ROLLBACK, or COMMIT (of a value set aside, when nothing else was written).
ENDS: Final = {False: b"lockstore_rollback", True: b"lockstore_commit"}


def as_text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def bytea(value: bytes | None) -> bytes | None:
    """A bytea column in text form (hex, or the old escape format) as bytes."""
    return None if value is None else _ESCAPING.unescape_bytea(value)


def literal(text: str) -> str:
    """A SQL string literal, right whatever standard_conforming_strings says (E'' when it holds a backslash)."""
    quoted = text.replace("'", "''")
    return f"E'{quoted.replace(chr(92), chr(92) * 2)}'" if "\\" in quoted else f"'{quoted}'"


def usable(conn: Any) -> bool:
    """Whether ``conn`` is open and between two round trips (not left in a pipeline by an interrupt)."""
    return not conn.closed and conn.pgconn.pipeline_status == pq.PipelineStatus.OFF


# ------------------------------------------------------------------------------------------------ errors
def lost(exc: psycopg.Error) -> bool:
    """Whether ``exc`` means the session is gone (unreachable, refused, cut, or ended by the server)."""
    state = exc.sqlstate or ""
    return isinstance(exc, psycopg.OperationalError) and (not state or state.startswith("08")
                                                          or state in _SESSION_ENDED)


def secrets_in(url: str, params: dict[str, Any]) -> list[str]:
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


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` on one line, with every one of ``secrets`` replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return " ".join(text.split())


def as_oserror(exc: psycopg.Error, doing: str, *, target: str, secrets: Iterable[str],
               unknown: bool = False) -> OSError:
    """``exc`` as the OSError to raise, naming ``target`` (shown without its password) and without ``secrets``
    (psycopg's error is its cause only when its text showed no secret). ``unknown``: a commit was sent and its
    reply lost."""
    text = scrub(str(exc), secrets)
    state = exc.sqlstate or ""
    err: OSError
    lower = text.lower()
    # A failed connection has no SQLSTATE (libpq reports it as text): told apart by the server's words.
    if state.startswith("28") or state == "42501" or (not state and any(w in lower for w in _REFUSED)):
        err, code = PermissionError(f"{target}: {doing}: the server refused us: {text}"), errno.EACCES
    elif state == "3D000" or (not state and "database" in lower and "does not exist" in lower):
        err, code = FileNotFoundError(f"{target}: {doing}: {text}"), errno.ENOENT
    elif lost(exc):
        code = errno.ETIMEDOUT if "timeout" in lower else errno.ECONNREFUSED if "refused" in lower else (
            errno.ECONNABORTED)
        if unknown:
            text = ("the connection was lost before the server confirmed the commit, so the new value may or may "
                    f"not be stored: {text}")
        else:
            text = f"cannot reach the PostgreSQL server: {text}"
        err = ConnectionError(f"{target}: {doing}: {text}")
    else:
        err, code = OSError(f"{target}: {doing}: PostgreSQL error {state or type(exc).__name__}: {text}"), (
            errno.EIO)
    err.errno = code
    # The cause without its traceback: psycopg's connect() frames hold the conninfo, password included.
    err.__cause__ = exc.with_traceback(None) if text.endswith(" ".join(str(exc).split())) else None
    err.__suppress_context__ = True
    return err


def discard(conn: psycopg.Connection[Any]) -> None:
    """Close a connection in an unknown state: the server rolls back its transaction."""
    try:
        conn.close()
    except Exception:
        pass


__all__ = ["ENDS", "Cmd", "Prepared", "Query", "Result", "Row", "Steps", "Token", "as_oserror", "as_text", "bytea",
           "discard", "literal", "lost", "scrub", "secrets_in", "usable"]
