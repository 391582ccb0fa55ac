"""Who holds and who waits for a PostgreSQL store's row lock, read from the server without waiting or locking.

- The record: each session's ``application_name`` is ``lockstore PID@HOST``, plus `` LABEL`` during a labelled
  transaction (cut to PostgreSQL's 63 bytes).
- The holder: the row's ``xmax`` (the locking transaction), the backend holding that transaction's lock in
  ``pg_locks`` and its ``pg_stat_activity`` row. A holder still inserting the row (it did not exist) is found
  through an advisory lock it takes for that purpose (see ``_pg_row``'s ``lock_tag`` statement).
- The waiters: sessions waiting for a lock, followed through ``pg_blocking_pids()`` back to the holder, oldest
  request first.
- A session that is not lockstore's (psql...) is named by its backend pid; one of this host is checked for a reused
  pid through psutil.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from typing import Final

import psycopg

from . import _holder
from ._holder import Holder
from ._pg_io import Row, Steps, as_text

#: What a LockTimeout tells operators about a PostgreSQL store's lock.
PG_HINT: Final = ("the lock is the row's FOR UPDATE lock: it is freed when its holder's SQL transaction ends, or "
                  "when the server sees the holder's connection end (a killed client)")
#: PostgreSQL keeps this many bytes of application_name (NAMEDATALEN - 1).
_APP_NAME_MAX: Final = 63
_RECORD: Final = re.compile(r"lockstore (\d+)@(\S*)(?: (.*))?\Z", re.S)

_WAITERS_QUERY: Final = (
    "SELECT a.pid, a.application_name, coalesce(a.client_hostname, host(a.client_addr)), a.usename, "
    "extract(epoch FROM clock_timestamp() - a.query_start), pg_blocking_pids(a.pid) FROM pg_stat_activity a "
    "WHERE a.wait_event_type = 'Lock' AND a.datname = current_database()")


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


def holder_query(table: str, key: str, tag: tuple[int, int]) -> str:
    """Who holds the row ``key`` (a SQL literal) of ``table`` (quoted), advisory lock ``tag`` included."""
    return (
        "SELECT a.pid, a.application_name, coalesce(a.client_hostname, host(a.client_addr)), a.usename, "
        "extract(epoch FROM clock_timestamp() - CASE WHEN a.state LIKE 'idle in transaction%' THEN a.state_change "
        "ELSE a.xact_start END) FROM ("
        f"SELECT l.pid, 0 AS o FROM {table} r JOIN pg_locks l ON l.locktype = 'transactionid' "
        f"AND l.transactionid = r.xmax AND l.granted WHERE r.key = {key} "
        "UNION ALL SELECT l.pid, 1 FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
        "AND d.datname = current_database() WHERE l.locktype = 'advisory' "
        f"AND l.classid = '{tag[0] % (1 << 32)}' AND l.objid = '{tag[1] % (1 << 32)}' "
        "AND l.objsubid = 2 AND l.granted"
        ") h JOIN pg_stat_activity a ON a.pid = h.pid ORDER BY h.o LIMIT 1")


def holder_steps(query: str, error: Callable[[psycopg.Error, str], OSError], *,
                 quiet: bool = False) -> Steps[Holder | None]:
    """The holder found by ``query`` (:func:`holder_query`); ``quiet``: None instead of an error."""
    try:
        result = yield query
    except psycopg.Error as exc:
        if quiet or isinstance(exc, psycopg.errors.UndefinedTable):
            return None
        raise error(exc, "reading who holds the lock") from None
    rows = result.rows()
    return holder_of(rows[0]) if rows else None


def waiters_steps(query: str, error: Callable[[psycopg.Error, str], OSError]) -> Steps[list[Holder]]:
    """Who waits for the row whose holder ``query`` (:func:`holder_query`) finds, oldest request first."""
    try:
        result = yield f"{query}; {_WAITERS_QUERY}"
    except psycopg.errors.UndefinedTable:
        return []
    except psycopg.Error as exc:
        raise error(exc, "reading who waits for the lock") from None
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
    return [holder_of(row, waiting=True) for row in rows]


def holder_of(row: Row, *, waiting: bool = False) -> Holder:
    """A Holder from a ``pg_stat_activity`` row: (backend pid, application_name, client, role, seconds since)."""
    backend, app, client, user = int(row[0]), as_text(row[1]), as_text(row[2]), as_text(row[3])
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


__all__ = ["PG_HINT", "application_name", "holder_of", "holder_query", "holder_steps", "waiters_steps"]
