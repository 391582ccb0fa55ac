"""Real, throwaway PostgreSQL and Redis servers for tests, started and stopped reliably.

Nothing here needs a client library: PostgreSQL is driven through its own ``psql`` binary, Redis through a tiny
RESP client on a raw socket. No fixed ports (a free port is picked and the start retried on a port race), no system
services, and every server is a child process of the test process:

* ``postgres`` is run directly (not through ``pg_ctl``, which would orphan the postmaster) and, when the tests run
  as root, as user ``nobody`` through ``setpriv`` (PostgreSQL refuses root). Its files go in a fresh directory that
  ``nobody`` owns: under the directory you pass when ``nobody`` can reach it, else under the system temp directory
  (pytest's own temp root is mode 0700, so that is the usual case), removed again by ``close()``.
* ``redis-server`` runs as the current user with ``--daemonize no``, AOF on and ``appendfsync always``, in a fresh
  directory under the one you pass (or under the system temp directory, removed again by ``close()``).
* Both get ``setpriv --pdeathsig KILL``: if the test process dies without running its ``finally`` blocks (SIGKILL),
  the kernel kills the servers too. Caveat: the signal fires when the *thread* that started the server exits, so
  start servers from the main thread (pytest fixtures do) or pass ``die_with_parent=False``.
* ``start_new_session=True``: a Ctrl-C in the terminal reaches pytest only, which then stops the servers itself.

Authentication of the PostgreSQL server (pg_hba.conf, written after initdb): the superuser ``postgres`` is trusted
on the socket and on TCP; every other role needs its password (scram-sha-256) on both. So
``create_role("app", "secret")`` gives a role for wrong-password tests while the fixtures keep needing no password.

Durability settings (``fsync``, ``synchronous_commit``, ``full_page_writes``) are written to postgresql.conf, not
given as ``-c`` options: command-line options would override ``ALTER SYSTEM``, and ``set_config("fsync", "off")``
(a negative control) would silently do nothing.

A server can run inside a network namespace "host" (see ``_hosts.py``): pass ``prefix=host.prefix`` and
``bind=[host.addr]``. It is still reached from the test process through its Unix socket (the file system is shared),
and from the other hosts at ``url_for(host.addr)``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, TypeAlias

import pytest

__all__ = [
    "PgServer",
    "RedisServer",
    "RespError",
    "free_port",
    "have_postgres",
    "have_redis",
    "pg_bindir",
    "postgres_server",
    "redis_server",
    "start_postgres",
    "start_redis",
    "why_no_postgres",
    "why_no_redis",
]

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
PORT_RETRIES = 5
# sun_path holds 108 bytes; PostgreSQL appends "/.s.PGSQL.NNNNN" (and ".lock") to its socket directory.
_MAX_SOCKET_PATH = 100
_NAME = re.compile(r"[a-z_][a-z0-9_]*\Z")
_SETTING = re.compile(r"[a-z_][a-z0-9_.]*\Z")

Base: TypeAlias = "Path | str | pytest.TempPathFactory | None"
RespReply: TypeAlias = "str | int | bytes | list[RespReply] | None"

_LIVE: weakref.WeakSet[PgServer | RedisServer] = weakref.WeakSet()


@atexit.register
def _close_leftovers() -> None:
    """Backstop for servers that a caller forgot to close (the context managers always close theirs)."""
    for srv in list(_LIVE):
        with contextlib.suppress(Exception):
            srv.close()


# ---------------------------------------------------------------------------------------------------- discovery


def pg_bindir() -> Path | None:
    """Where initdb/postgres/psql are: $LOCKSTORE_PG_BINDIR, ``pg_config --bindir``, the newest
    /usr/lib/postgresql/*/bin, or PATH."""
    candidates: list[Path] = []
    if env := os.environ.get("LOCKSTORE_PG_BINDIR"):
        candidates.append(Path(env))
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))

    def version(p: Path) -> int:
        return int(p.parent.name) if p.parent.name.isdigit() else 0

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).parent)
    for c in candidates:
        if all(os.access(c / b, os.X_OK) for b in ("initdb", "postgres", "psql")):
            return c
    return None


def why_no_postgres() -> str | None:
    """None when a PostgreSQL server can be started here, else the reason (for ``pytest.skip``)."""
    if pg_bindir() is None:
        return "PostgreSQL server binaries (initdb, postgres, psql) not found: apt-get install postgresql"
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            return "running as root and setpriv (util-linux) is missing: PostgreSQL refuses to run as root"
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            return "running as root and there is no user 'nobody' to run PostgreSQL as"
    return None


def have_postgres() -> bool:
    return why_no_postgres() is None


def why_no_redis() -> str | None:
    """None when a Redis server can be started here, else the reason (for ``pytest.skip``)."""
    if shutil.which("redis-server") is None:
        return "redis-server not found: apt-get install redis-server"
    return None


def have_redis() -> bool:
    return why_no_redis() is None


# ---------------------------------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller retries its start on a port race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _base_dir(base: Base, name: str) -> Path | None:
    """None: the system temp directory, and the server removes its directory when closed."""
    if base is None:
        return None
    if isinstance(base, pytest.TempPathFactory):
        return base.mktemp(name)
    return Path(base)


def _reachable_by(path: Path, uid: int) -> bool:
    """Whether user ``uid`` may traverse every directory down to ``path`` (by the "other" or owner bits)."""
    for p in [path.resolve(), *path.resolve().parents]:
        st = p.stat()
        if not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)):
            return False
    return True


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path("/proc", entry.name, "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry.name))
    return kids


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill_tree(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGKILL ``proc`` and all its descendants.

    ``proc`` is frozen first, so that it can neither fork nor reap meanwhile: the descendants' pids stay theirs
    (as zombies at worst) until ``proc`` dies, and ``proc.pid`` is signalled only while ``poll()`` says it runs."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGSTOP)
    kids = _descendants(proc.pid)
    for k in reversed(kids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(k, signal.SIGKILL)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout)
    deadline = time.monotonic() + timeout
    while any(_alive(k) for k in kids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {[k for k in kids if _alive(k)]} survived SIGKILL")
        time.sleep(0.01)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _pdeathsig(enabled: bool) -> list[str]:
    return ["setpriv", "--pdeathsig", "KILL"] if enabled and shutil.which("setpriv") else []


def _socket_dir(preferred: Path, uid: int | None, suffix: str) -> tuple[Path, Path | None]:
    """``preferred`` when a socket path in it fits sun_path, else a new short directory (also returned for removal)."""
    if len(str(preferred / suffix)) <= _MAX_SOCKET_PATH:
        return preferred, None
    short = Path(tempfile.mkdtemp(prefix="ls-sock-"))
    if uid is not None:
        os.chown(short, uid, -1)
    short.chmod(0o755)
    return short, short


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"use a plain lower-case SQL name, not {name!r}")
    return name


# ---------------------------------------------------------------------------------------------------- PostgreSQL


class PgServer:
    """One throwaway PostgreSQL cluster: ``initdb`` on first ``start()``, then start/stop/kill9 at will."""

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        bind: Sequence[str] = (),
        prefix: Sequence[str] = (),
        die_with_parent: bool = True,
        settings: dict[str, str] | None = None,
    ) -> None:
        reason = why_no_postgres()
        bindir = pg_bindir()
        if reason is not None or bindir is None:
            raise RuntimeError(reason)
        self.bindir = bindir
        self.bind = list(bind)
        self.prefix = list(prefix)
        self.die_with_parent = die_with_parent
        self.settings = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on", **(settings or {})}
        self._uid: int | None = None
        self._gid: int | None = None
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            self._uid, self._gid = nobody.pw_uid, nobody.pw_gid
        if base_dir is not None:
            base_dir.mkdir(parents=True, exist_ok=True)
            if self._uid is not None and not _reachable_by(base_dir, self._uid):
                base_dir = None
        self.workdir = Path(tempfile.mkdtemp(prefix="lockstore-pg-", dir=base_dir))
        self._remove_workdir = base_dir is None
        if self._uid is not None:
            os.chown(self.workdir, self._uid, self._gid if self._gid is not None else -1)
        self.workdir.chmod(0o755)
        self.datadir = self.workdir / "data"
        self.log_path = self.workdir / "postgres.log"
        self.socket_dir, self._extra_dir = _socket_dir(self.workdir, self._uid, ".s.PGSQL.65535.lock")
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        _LIVE.add(self)

    # -- addresses

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres`` (superuser, trusted, no password)."""
        return self.url_for()

    @property
    def socket_url(self) -> str:
        """libpq's Unix-socket form; the port is part of it because it names the socket file."""
        return self.socket_url_for()

    def url_for(
        self, db: str = "postgres", *, user: str = "postgres", password: str | None = None, host: str = "127.0.0.1"
    ) -> str:
        cred = urllib.parse.quote(user, safe="")
        if password is not None:
            cred += ":" + urllib.parse.quote(password, safe="")
        return f"postgresql://{cred}@{host}:{self.port}/{urllib.parse.quote(db, safe='')}"

    def socket_url_for(self, db: str = "postgres", *, user: str = "postgres") -> str:
        q = urllib.parse.urlencode({"host": str(self.socket_dir), "port": self.port, "user": user})
        return f"postgresql:///{urllib.parse.quote(db, safe='')}?{q}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- life cycle

    def _as_server_user(self) -> list[str]:
        argv = list(self.prefix)
        if self._uid is not None:
            argv += ["setpriv", f"--reuid={self._uid}", f"--regid={self._gid}", "--clear-groups"]
            if self.die_with_parent:
                argv += ["--pdeathsig", "KILL"]
        else:
            argv += _pdeathsig(self.die_with_parent)
        return argv

    def _initdb(self) -> None:
        argv = [*self._as_server_user()[len(self.prefix) :], str(self.bindir / "initdb")]
        argv += ["-D", str(self.datadir), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"]
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=self.workdir)
        if res.returncode:
            raise RuntimeError(f"initdb failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        (self.datadir / "pg_hba.conf").write_text(
            "# lockstore test server: the superuser is trusted; every other role needs its password\n"
            "local all postgres             trust\n"
            "host  all postgres all         trust\n"
            "local all all                  scram-sha-256\n"
            "host  all all      all         scram-sha-256\n"
        )
        with (self.datadir / "postgresql.conf").open("a") as f:
            f.write("\n# lockstore test server (ALTER SYSTEM overrides these; -c options would not let it)\n")
            for k, v in self.settings.items():
                f.write(f"{k} = {_sql_literal(v)}\n")

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start (initdb first if needed). The first start picks a free port, later ones reuse it."""
        if self._closed:
            raise RuntimeError("the server was closed")
        if self.running:
            return
        if not (self.datadir / "PG_VERSION").exists():
            self._initdb()
        for attempt in range(PORT_RETRIES if self._port is None else 1):
            port = self._port if self._port is not None else free_port()
            if self._start_on(port, timeout):
                self._port = port
                return
            if attempt + 1 == PORT_RETRIES:
                break
        raise RuntimeError(f"postgres did not start; its log:\n{_tail(self.log_path)}")

    def _start_on(self, port: int, timeout: float) -> bool:
        """True when up; False on a port race (the caller picks another port); raises on any other failure."""
        listen = ",".join(["127.0.0.1", *self.bind])
        argv = [*self._as_server_user(), str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(port)]
        argv += ["-k", str(self.socket_dir), "-c", f"listen_addresses={listen}"]
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._proc = proc
        deadline = time.monotonic() + timeout
        pidfile = self.datadir / "postmaster.pid"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                with self.log_path.open("rb") as f:
                    f.seek(log_start)
                    if b"Address already in use" in f.read():
                        return False
                raise RuntimeError(f"postgres exited with {proc.returncode}; its log:\n{_tail(self.log_path)}")
            with contextlib.suppress(OSError):
                lines = pidfile.read_text().splitlines()
                # Line 1: the postmaster's pid (a stale file after kill9 names the old one); line 8: its status.
                if len(lines) >= 8 and lines[0].strip() == str(proc.pid) and lines[7].strip() == "ready":
                    return True
            time.sleep(0.02)
        _kill_tree(proc)
        raise RuntimeError(f"postgres not ready within {timeout} s; its log:\n{_tail(self.log_path)}")

    def stop(self, mode: str = "fast", timeout: float = STOP_TIMEOUT) -> None:
        """Shut down: "smart" (wait for clients), "fast" (abort transactions, checkpoint), "immediate" (no
        checkpoint: crash recovery at the next start). Falls back to kill9 after ``timeout``."""
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            raise RuntimeError(f"postgres did not stop ({mode}) within {timeout} s; killed it") from None

    def kill9(self) -> None:
        """SIGKILL the postmaster and all its children (a crash; the next ``start()`` runs crash recovery)."""
        if self._proc is not None:
            _kill_tree(self._proc)

    def close(self) -> None:
        """Stop for good and remove what lives outside the caller's directory. Safe to call twice."""
        if self._closed:
            return
        try:
            try:
                self.stop("fast")
            finally:
                if self._proc is not None and self._proc.poll() is None:
                    _kill_tree(self._proc)
        finally:
            self._closed = True
            _LIVE.discard(self)
            if self._extra_dir is not None:
                shutil.rmtree(self._extra_dir, ignore_errors=True)
            if self._remove_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- administration (through psql on the Unix socket, as the trusted superuser)

    def psql(self, sql: str, db: str = "postgres", timeout: float = 60.0) -> str:
        """Run one SQL command (autocommit, so ALTER SYSTEM / CREATE DATABASE work); its unaligned output."""
        argv = [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        argv += ["-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres", "-d", db, "-c", sql]
        env = {**os.environ, "PGCONNECT_TIMEOUT": "10", "PGOPTIONS": ""}
        for var in ("PGPASSWORD", "PGSERVICE", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE"):
            env.pop(var, None)
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        if res.returncode:
            raise RuntimeError(f"psql {sql!r} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout.strip()

    def set_config(self, name: str, value: str | int | bool, *, restart: bool = False) -> None:
        """ALTER SYSTEM SET name = value, then reload (waiting until new sessions see it) or, with
        ``restart=True``, a fast restart (for settings that need one; raises if one is needed and not asked for)."""
        if not _SETTING.match(name):
            raise ValueError(f"not a setting name: {name!r}")
        text = ("on" if value else "off") if isinstance(value, bool) else str(value)
        self.psql(f"ALTER SYSTEM SET {name} = {_sql_literal(text)}")
        if restart:
            self.stop("fast")
            self.start()
            return
        before = self.psql("SELECT pg_conf_load_time()")
        self.psql("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while self.psql("SELECT pg_conf_load_time()") == before:  # SIGHUP is handled asynchronously
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not reload its configuration within 10 s")
            time.sleep(0.02)
        pending = self.psql(f"SELECT pending_restart FROM pg_settings WHERE name = {_sql_literal(name)}")
        if pending == "t":
            raise RuntimeError(f"{name} needs a restart: call set_config(..., restart=True)")

    def show(self, name: str) -> str:
        """``SHOW name`` in a new session."""
        if not _SETTING.match(name):
            raise ValueError(f"not a setting name: {name!r}")
        return self.psql(f"SHOW {name}")

    def create_role(self, name: str, password: str, *, superuser: bool = False, createdb: bool = True) -> str:
        """A login role that must give ``password`` (scram-sha-256, socket and TCP); returns its TCP URL to
        database ``postgres``. Use ``url_for(db, user=name, password="wrong")`` for wrong-password tests."""
        attrs = ["LOGIN", "SUPERUSER" if superuser else "NOSUPERUSER", "CREATEDB" if createdb else "NOCREATEDB"]
        self.psql(f"CREATE ROLE {_check_name(name)} {' '.join(attrs)} PASSWORD {_sql_literal(password)}")
        return self.url_for(user=name, password=password)

    def create_database(self, name: str, *, owner: str | None = None) -> str:
        """CREATE DATABASE ``name``; returns its TCP URL (as the superuser)."""
        sql = f"CREATE DATABASE {_check_name(name)}"
        if owner is not None:
            sql += f" OWNER {_check_name(owner)}"
        self.psql(sql)
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS ... WITH (FORCE): sessions still connected to it are terminated."""
        self.psql(f"DROP DATABASE IF EXISTS {_check_name(name)} WITH (FORCE)")


def start_postgres(
    base: Base = None,
    *,
    bind: Sequence[str] = (),
    prefix: Sequence[str] = (),
    die_with_parent: bool = True,
    settings: dict[str, str] | None = None,
) -> PgServer:
    """A started PostgreSQL server; the caller must ``close()`` it (or use ``postgres_server``)."""
    srv = PgServer(_base_dir(base, "pg"), bind=bind, prefix=prefix, die_with_parent=die_with_parent, settings=settings)
    try:
        srv.start()
    except BaseException:
        srv.close()
        raise
    return srv


@contextlib.contextmanager
def postgres_server(
    base: Base = None,
    *,
    bind: Sequence[str] = (),
    prefix: Sequence[str] = (),
    die_with_parent: bool = True,
    settings: dict[str, str] | None = None,
) -> Iterator[PgServer]:
    """``with postgres_server(tmp_path) as pg:`` a started server, closed (and its processes gone) afterwards."""
    srv = start_postgres(base, bind=bind, prefix=prefix, die_with_parent=die_with_parent, settings=settings)
    try:
        yield srv
    finally:
        srv.close()


# ---------------------------------------------------------------------------------------------------- Redis


class RespError(Exception):
    """An error reply (``-ERR ...``) from Redis."""


def _resp_encode(args: Sequence[str | bytes | int]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _resp_read(f: BinaryIO) -> RespReply:
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RespError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_resp_read(f) for _ in range(n)]
    raise ConnectionError(f"unexpected reply from redis: {line!r}")


class RedisServer:
    """One throwaway ``redis-server`` (AOF on, ``appendfsync always`` unless told otherwise, no RDB snapshots)."""

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        bind: Sequence[str] = (),
        password: str | None = None,
        unixsocket: bool = True,
        prefix: Sequence[str] = (),
        appendfsync: str = "always",
        extra_args: Sequence[str] = (),
        die_with_parent: bool = True,
    ) -> None:
        if reason := why_no_redis():
            raise RuntimeError(reason)
        self.bind = list(bind)
        self.password = password
        self.prefix = list(prefix)
        # Inside a network namespace the test process cannot reach the server's TCP port: it talks over the socket.
        self.unixsocket = unixsocket or bool(self.prefix)
        self.appendfsync = appendfsync
        self.extra_args = list(extra_args)
        self.die_with_parent = die_with_parent
        if base_dir is not None:
            base_dir.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="lockstore-redis-", dir=base_dir))
        self._remove_dir = base_dir is None
        self.log_path = self.dir / "redis.log"
        sock_dir, self._extra_dir = _socket_dir(self.dir, None, "redis.sock")
        self.socket_path = sock_dir / "redis.sock"
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        _LIVE.add(self)

    # -- addresses

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (with ``:PASSWORD@`` when the server has one)."""
        return self.url_for()

    def url_for(self, host: str = "127.0.0.1", db: int = 0) -> str:
        auth = f":{urllib.parse.quote(self.password, safe='')}@" if self.password is not None else ""
        return f"redis://{auth}{host}:{self.port}/{db}"

    @property
    def unix_url(self) -> str:
        """``unix://DIR/redis.sock?db=0`` (with ``&password=`` when the server has one)."""
        if not self.unixsocket:
            raise RuntimeError("started with unixsocket=False")
        q = {"db": "0"} | ({"password": self.password} if self.password is not None else {})
        return f"unix://{self.socket_path}?{urllib.parse.urlencode(q)}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- the raw client

    def execute(self, *args: str | bytes | int, timeout: float = 10.0) -> RespReply:
        """One command on a new connection (AUTH first when the server has a password); raises RespError."""
        if self.unixsocket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            addr: str | tuple[str, int] = str(self.socket_path)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            addr = ("127.0.0.1", self.port)
        with sock:
            sock.settimeout(timeout)
            sock.connect(addr)
            with sock.makefile("rb") as f:
                if self.password is not None:
                    sock.sendall(_resp_encode(["AUTH", self.password]))
                    _resp_read(f)
                sock.sendall(_resp_encode(args))
                return _resp_read(f)

    def ping(self, timeout: float = 2.0) -> bool:
        try:
            return self.execute("PING", timeout=timeout) == "PONG"
        except (OSError, RespError):
            return False

    def server_pid(self) -> int | None:
        """The pid that the answering server reports (INFO server), None when none answers."""
        try:
            info = self.execute("INFO", "server", timeout=2.0)
        except (OSError, RespError):
            return None
        m = re.search(rb"^process_id:(\d+)", info if isinstance(info, bytes) else b"", re.M)
        return int(m.group(1)) if m else None

    def config_set(self, name: str, value: str | int) -> None:
        """CONFIG SET (e.g. ``config_set("appendfsync", "everysec")`` for a negative control)."""
        if self.execute("CONFIG", "SET", name, value) != "OK":
            raise RespError(f"CONFIG SET {name} {value} failed")

    def config_get(self, name: str) -> str:
        reply = self.execute("CONFIG", "GET", name)
        if not isinstance(reply, list) or len(reply) != 2 or not isinstance(reply[1], bytes):
            raise RespError(f"unexpected CONFIG GET reply: {reply!r}")
        return reply[1].decode()

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key that starts with ``prefix`` (SCAN + UNLINK); how many were deleted."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
        cursor = b"0"
        deleted = 0
        while True:
            reply = self.execute("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            if not (isinstance(reply, list) and len(reply) == 2 and isinstance(reply[0], bytes)):
                raise RespError(f"unexpected SCAN reply: {reply!r}")
            cursor, keys = reply[0], reply[1]
            if isinstance(keys, list) and keys:
                n = self.execute("UNLINK", *[k for k in keys if isinstance(k, bytes)])
                deleted += n if isinstance(n, int) else 0
            if cursor == b"0":
                return deleted

    # -- life cycle

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start and wait until it answers PING. The first start picks a free port, later ones reuse it."""
        if self._closed:
            raise RuntimeError("the server was closed")
        if self.running:
            return
        for attempt in range(PORT_RETRIES if self._port is None else 1):
            port = self._port if self._port is not None else free_port()
            if self._start_on(port, timeout):
                return
            if attempt + 1 == PORT_RETRIES:
                break
        raise RuntimeError(f"redis-server did not start; its log:\n{_tail(self.log_path)}")

    def _start_on(self, port: int, timeout: float) -> bool:
        argv = [*self.prefix, *_pdeathsig(self.die_with_parent), "redis-server"]
        argv += ["--port", str(port), "--bind", "127.0.0.1", *self.bind, "--dir", str(self.dir)]
        argv += ["--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "", "--daemonize", "no"]
        argv += ["--logfile", "", "--loglevel", "notice"]
        if self.bind:  # protected mode would refuse clients from other hosts when there is no password
            argv += ["--protected-mode", "no"]
        if self.unixsocket:
            argv += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        argv += self.extra_args
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._proc = proc
        self._port = port  # ping() over TCP needs it
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                with self.log_path.open("rb") as f:
                    f.seek(log_start)
                    if b"Address already in use" in f.read():
                        self._port = None
                        return False
                raise RuntimeError(f"redis-server exited with {proc.returncode}; its log:\n{_tail(self.log_path)}")
            # PONG from *this* process: on a port race another server may answer on the port (TCP-only mode).
            if self.ping(timeout=0.5) and self.server_pid() == proc.pid:
                return True
            time.sleep(0.01)
        _kill_tree(proc)
        raise RuntimeError(f"redis-server not ready within {timeout} s; its log:\n{_tail(self.log_path)}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (a clean shutdown: the AOF is flushed), then wait; falls back to kill9 after ``timeout``."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            raise RuntimeError(f"redis-server did not stop within {timeout} s; killed it") from None

    def kill9(self) -> None:
        """SIGKILL the server (and any AOF-rewrite child): a crash."""
        if self._proc is not None:
            _kill_tree(self._proc)

    def close(self) -> None:
        if self._closed:
            return
        try:
            try:
                self.stop()
            finally:
                if self._proc is not None and self._proc.poll() is None:
                    _kill_tree(self._proc)
        finally:
            self._closed = True
            _LIVE.discard(self)
            if self._extra_dir is not None:
                shutil.rmtree(self._extra_dir, ignore_errors=True)
            if self._remove_dir:
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_redis(
    base: Base = None,
    *,
    bind: Sequence[str] = (),
    password: str | None = None,
    unixsocket: bool = True,
    prefix: Sequence[str] = (),
    appendfsync: str = "always",
    extra_args: Sequence[str] = (),
    die_with_parent: bool = True,
) -> RedisServer:
    """A started Redis server; the caller must ``close()`` it (or use ``redis_server``)."""
    srv = RedisServer(
        _base_dir(base, "redis"),
        bind=bind,
        password=password,
        unixsocket=unixsocket,
        prefix=prefix,
        appendfsync=appendfsync,
        extra_args=extra_args,
        die_with_parent=die_with_parent,
    )
    try:
        srv.start()
    except BaseException:
        srv.close()
        raise
    return srv


@contextlib.contextmanager
def redis_server(
    base: Base = None,
    *,
    bind: Sequence[str] = (),
    password: str | None = None,
    unixsocket: bool = True,
    prefix: Sequence[str] = (),
    appendfsync: str = "always",
    extra_args: Sequence[str] = (),
    die_with_parent: bool = True,
) -> Iterator[RedisServer]:
    """``with redis_server(tmp_path) as r:`` a started server, closed (and its process gone) afterwards."""
    srv = start_redis(
        base,
        bind=bind,
        password=password,
        unixsocket=unixsocket,
        prefix=prefix,
        appendfsync=appendfsync,
        extra_args=extra_args,
        die_with_parent=die_with_parent,
    )
    try:
        yield srv
    finally:
        srv.close()
