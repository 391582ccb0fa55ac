"""The Redis storage: one value at one key of a Redis server, locked by a lease that the server itself fences.

``lockstore.open("redis://HOST:PORT/DB#KEY")`` (also ``rediss://`` and ``unix:///PATH?db=N#KEY``). How the lock
works is in ``_redis_lease.py``, the keys and scripts in ``_redis_scripts.py``, the renewal thread in
``_redis_renew.py``, the asyncio half in ``_redis_aio.py``; this module connects, runs the scripts, and turns the
driver's errors into the library's.

- The value is a plain string at KEY (``redis-cli GET KEY`` shows the JSON); its version is its SHA-1, compared
  by the server under the lock, so a value changed by any client is always re-read and never overwritten unseen.
- Commits are fenced: the SAVE script writes only while our token holds the lock, so a holder that lost its lease
  (paused, partitioned) gets LockLost and writes nothing. Only the value reaches the AOF and the replicas: the lock
  and the queue do not (one fsync per transaction, and no lock outlives a server restart).
- Durability: with ``durable=True``, opening refuses a server that does not run ``appendonly yes`` with
  ``appendfsync always`` (NotDurableError); where CONFIG is forbidden (managed servers) it logs one warning.
- Errors from the server or the network are OSErrors naming the target without its password: ConnectionError
  (unreachable, timed out), PermissionError (authentication, ACL), OSError (anything else). The driver retries
  nothing: :meth:`RedisStorage.call` retries what may run twice, never a commit (a commit cut off by a broken
  connection raises ConnectionError saying that whether it was written is unknown).
- Connections: one client (a pool) per storage, shared by its threads, and one more for the renewal thread; after
  a fork redis-py's pools open new connections in the child (they check the pid), and the child neither renews nor
  releases a lease its parent took.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeVar

try:
    import redis
    import redis.asyncio
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # tested in a subprocess
    raise ImportError('a Redis store (redis://, rediss://, unix:// targets) needs the redis package: '
                      'pip install "lockstore[redis]"', name="redis") from exc

from . import _options
from . import _redis_scripts as scripts
from ._backend import Stored
from ._error import LockTimeout, NotDurableError
from ._redis_aio import AsyncHalf, close_clients, give_turn, stop_renewal
from ._redis_lease import REDIS_HINT, TOKENS, Call, Lease, RedisHeld, as_bytes, sha, text
from ._redis_renew import Renewer

if TYPE_CHECKING:
    from ._holder import Holder
    from ._redis_scripts import Script
    from ._target import ServerTarget

log = logging.getLogger("lockstore")
T = TypeVar("T")

DEFAULT_LEASE: Final = 30.0
#: Connecting, and waiting for one reply (waits for the lock are far shorter slices): a dead server is reported in
#: seconds, after two retries.
CONNECT_TIMEOUT: Final = 5.0
SOCKET_TIMEOUT: Final = 5.0
#: Pauses before the second and third try of a call that may run twice (not a commit) after a broken connection.
RETRY_PAUSES: Final = (0.05, 0.25)
_WARNED: set[str] = set()


def make(path: str, *, lock: object, durable: bool, poll_interval: float, timeout: float = -1.0,
         lease: object = DEFAULT_LEASE, **options: Any) -> RedisStorage:
    """The storage of a ``redis://``, ``rediss://`` or ``unix://`` target (see the module docstring)."""
    from ._target import parse_server

    server = parse_server(path)
    if options:
        raise TypeError(f"unexpected option(s) for a Redis store: {', '.join(sorted(options))} (it takes lease=)")
    if lock is not True:
        raise ValueError(f"{server.display}: a Redis store is always locked, by its lease on {server.key}:lock; "
                         f"lock= must be True, not {lock!r}")
    return RedisStorage(server, durable=durable, lease=_options.positive(lease, "lease"))


class RedisStorage(AsyncHalf):
    """One key of one Redis server, with its lease lock (see the module docstring)."""

    def __init__(self, server: ServerTarget, *, durable: bool, lease: float) -> None:
        self.target = server.display
        self.key = server.key
        self.durable = durable
        self._url = server.url
        self._secrets = _secrets(server.url)
        self._sync: redis.Redis | None = None
        self._renewal_client: redis.Redis | None = None
        self._hint: str | None = None  # the version this storage last read or wrote
        self.aio: dict[Any, Any] = {}  # event loop -> its client (see _redis_aio)
        # One slot per server, db and key in this process (whichever URL reached them).
        kw = redis.connection.parse_url(server.url)  # type: ignore[no-untyped-call]
        self.lease = Lease(server.key, lease, (kw.get("path"), kw.get("host"), kw.get("port"), kw.get("db", 0),
                                               server.key))
        self.keys = self.lease.keys
        self._renewer = Renewer(self._renew, self._release_again, lease, server.key, idle=self.lease.heartbeat)
        if durable:
            self._check_durable()

    @property
    def lock_name(self) -> str:
        return self.keys.lock

    @property
    def locked(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"<RedisStorage {self.target!r}>"

    # ------------------------------------------------------------------------------------------- connections
    def options(self, *, renewal: bool = False) -> dict[str, Any]:
        """redis-py client options (a URL's own query options, such as ``?socket_timeout=``, win over these)."""
        if renewal:  # a renewal fails fast and is tried again while the lease lasts
            timeout = min(SOCKET_TIMEOUT, max(0.05, self.lease.seconds / 6))
            return {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": Retry(NoBackoff(), 0)}
        # No retries by the driver: it would run a commit again after a broken connection, and a commit that was
        # written the first time would then be refused by the fence (its lock gone with a restart) and reported as
        # LockLost, "nothing written". ``call`` retries the idempotent calls itself.
        return {"socket_timeout": max(SOCKET_TIMEOUT, self.lease.heartbeat + 2),
                "socket_connect_timeout": CONNECT_TIMEOUT, "retry": Retry(NoBackoff(), 0)}

    def client(self) -> redis.Redis:
        client = self._sync
        if client is None:
            client = self._sync = redis.Redis.from_url(self._url, **self.options())
        return client

    def async_client(self) -> redis.asyncio.Redis:
        """A new asyncio client (``_redis_aio`` keeps one per event loop)."""
        return redis.asyncio.Redis.from_url(self._url, **self.options())

    def scrub(self, message: str) -> str:
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return message

    def fail(self, exc: redis.RedisError, doing: str) -> NoReturn:
        """Raise ``exc`` as an OSError naming the target without its password; ``exc`` is its cause unless its
        text showed the password."""
        message = self.scrub(str(exc))
        err: OSError
        if isinstance(exc, redis.AuthenticationError) or message.upper().startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
            err = PermissionError(f"{self.target}: {doing}: the server refused us (check the password and ACL): "
                                  f"{message}")
        elif isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            err = ConnectionError(f"{self.target}: {doing}: cannot reach the Redis server: {message}")
        else:
            err = OSError(f"{self.target}: {doing}: {type(exc).__name__}: {message}")
        raise err from (exc if message == str(exc) else None)

    def call(self, func: Callable[[], T], doing: str, *, retry: bool = True) -> T:
        """``func()``, tried again (twice, after a short pause) when the connection broke and ``retry`` says that
        running it twice does no harm; the driver's errors become OSErrors (see :meth:`fail`)."""
        for pause in (*RETRY_PAUSES, None) if retry else (None,):
            try:
                return func()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if pause is None or isinstance(exc, redis.AuthenticationError):
                    self.fail(exc, doing)
                time.sleep(pause)
            except redis.RedisError as exc:
                self.fail(exc, doing)
        raise AssertionError("unreachable")  # pragma: no cover

    def eval(self, client: redis.Redis, script: Script, call: Call,
             doing: str, *, retry: bool = True) -> Any:
        keys, args = call

        def run() -> Any:
            try:
                return client.evalsha(script.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:  # a restarted server: EVAL caches it again
                return client.eval(script.text, len(keys), *keys, *args)

        return self.call(run, doing, retry=retry)

    def _check_durable(self) -> None:
        try:
            found = {text(k): text(v) for k, v in self.call(lambda: self.client().config_get("append*"),
                                                            "checking its durability settings", retry=True).items()}
        except PermissionError:
            raise
        except OSError as exc:
            if not isinstance(exc.__cause__, redis.ResponseError):
                raise  # CONFIG renamed or denied (managed servers): say so once, go on
            if self.target not in _WARNED:
                _WARNED.add(self.target)
                log.warning("lockstore: %s: cannot check that the server syncs each write (CONFIG GET: %s); make "
                            "sure it runs with appendonly yes and appendfsync always, or pass durable=False",
                            self.target, self.scrub(str(exc.__cause__)))
            return
        wrong = [f"{name} {found.get(name)}" for name, want in (("appendonly", "yes"), ("appendfsync", "always"))
                 if found.get(name) != want]
        if wrong:
            raise NotDurableError(self.target, f"{', '.join(wrong)}; set appendonly yes and appendfsync always")

    # ------------------------------------------------------------------------------------------- reading, writing
    def load(self) -> Stored:
        return self.stored(as_bytes(self.call(lambda: self.client().get(self.key), "reading")))

    def stored(self, data: bytes | None) -> Stored:
        self._hint = version = sha(data)
        return Stored(data, version)

    def fetch_call(self, held: RedisHeld, known: object) -> Call:
        return (self.keys.lock, self.key), (held.token, known or "")

    def fetch(self, held: object, known: object) -> Stored | None:
        assert isinstance(held, RedisHeld)
        reply = self.lease.prefetched(held, known) or self.eval(self.client(), scripts.FETCH,
                                                                self.fetch_call(held, known), "reading")
        return self.fetched(held, known, reply)

    def fetched(self, held: RedisHeld, known: object, reply: list[Any]) -> Stored | None:
        """A FETCH answer: {-1} lease lost, {0} nothing stored, {1} unchanged since ``known``, {2, data}."""
        self.lease.check(held, self.target, lost=reply[0] == -1)
        if reply[0] == 1 or (reply[0] == 0 and known is None):
            self._hint = known if isinstance(known, str) else None
            return None
        return self.stored(as_bytes(reply[1]) if reply[0] == 2 else None)

    def save(self, held: object, data: bytes, *, last: bool = False) -> object:
        if last:
            return self.save_last(held, data)
        assert isinstance(held, RedisHeld)
        self.lease.check(held, self.target)
        try:
            ok = self.eval(self.client(), scripts.SAVE, ((self.keys.lock, self.key), (held.token, data)), "committing",
                           retry=False)
        except ConnectionError as exc:
            raise ConnectionError(f"{exc}; whether the commit was written is unknown") from exc.__cause__
        return self.saved(held, data, ok)

    def saved(self, held: RedisHeld, data: bytes, ok: object) -> str:
        self.lease.check(held, self.target, lost=not ok)
        version = self._hint = hashlib.sha1(data).hexdigest()
        return version

    def save_last(self, held: object, data: bytes) -> object:
        """:meth:`save` and :meth:`release` in one round trip, for the last write of a transaction (``last=True``;
        ``commit()`` inside a block writes and keeps the lock). After it, ``release(held)`` only gives back what
        this process holds."""
        assert isinstance(held, RedisHeld)
        self.lease.check(held, self.target)
        self.stop_renewing(held)
        try:
            ok = self.eval(self.client(), scripts.SAVE_RELEASE, self.lease.save_release_call(held, data), "committing",
                           retry=False)
        except ConnectionError as exc:
            raise ConnectionError(f"{exc}; whether the commit was written is unknown") from exc.__cause__
        version = self.saved(held, data, ok)
        held.sent = False  # released by the same script
        return version

    def stop_renewing(self, held: RedisHeld) -> None:
        self._renewer.remove(held)

    def put(self, data: bytes) -> object:
        raise TypeError(f"{self.target}: a Redis store is always locked; it writes only in transactions")

    def aside_call(self, held: RedisHeld) -> Call:
        return (self.keys.lock, self.key), (held.token, f"{self.key}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")

    def set_aside(self, held: object) -> str | None:
        assert isinstance(held, RedisHeld)
        reply = self.eval(self.client(), scripts.ASIDE, self.aside_call(held), "moving the value aside", retry=False)
        return self.aside(held, reply)

    def aside(self, held: RedisHeld, reply: list[Any]) -> str | None:
        """An ASIDE answer: {-1} lease lost, {0} nothing stored any more, {1, the key it was renamed to}."""
        self.lease.check(held, self.target, lost=reply[0] == -1)
        self._hint = None
        return None if reply[0] == 0 else text(reply[1])

    # ------------------------------------------------------------------------------------------- locking
    def held(self, owner: object, holder: object) -> RedisHeld:
        return self.lease.held(owner, holder, self._hint)

    def acquire(self, held: object, *, timeout: float, blocking: bool, label: str | None) -> None:
        assert isinstance(held, RedisHeld)
        lease = self.lease
        start = time.monotonic()
        once = not blocking or timeout == 0
        lease.check_reentry(held)
        if not lease.slot.take(held.ticket, 0.0 if once else timeout):
            raise self.timeout_error(time.monotonic() - start)
        client = self.client()
        call = lease.acquire_call(held, label, once)
        while True:
            held.sent = True  # recorded first: release() undoes it whatever happens next
            reply = self.eval(client, scripts.ACQUIRE, call, "taking the lock")
            if lease.got(held, reply):
                break
            pause = lease.pause(reply, start, timeout, once)
            if pause is None:
                self.release_in_redis(held)
                raise self.timeout_error(time.monotonic() - start)
            if pause > 0:
                # A grant lost with a broken connection is not lost: the next ACQUIRE finds the lock ours.
                popped = self.call(functools.partial(client.blpop, [lease.wake_key(held)], timeout=pause),
                                   "waiting for the lock")
                grant = lease.granted(held, popped)
                if grant is not None and lease.got(held, grant):
                    reply = grant
                    break
        self._renewer.add(held, lease.first_renewal(reply))

    def release(self, held: object, *, abandoned: object = None) -> None:
        assert isinstance(held, RedisHeld)
        if held.inherited():
            return  # the parent's lock: never ours to renew or release
        self._renewer.remove(held)
        try:
            if held.task is not None:
                stop_renewal(held)
            TOKENS.pop(held.token, None)
            self.release_in_redis(held)
        finally:
            self.lease.slot.give(held.ticket)
            if held.turn is not None:
                give_turn(held)

    def release_in_redis(self, held: RedisHeld) -> None:
        if held.sent:
            try:
                self.eval(self.client(), scripts.RELEASE, self.lease.release_call(held), "releasing the lock")
            except OSError as exc:  # after the caller's commit: never an error; tried again in the background
                self.release_failed(held, exc)
            held.sent = False

    def release_failed(self, held: RedisHeld, exc: OSError) -> None:
        log.debug("lockstore: %s: %s; trying again in the background", self.target, exc)
        self._renewer.release_later(held)

    def _release_again(self, held: RedisHeld) -> None:
        self.eval(self.client(), scripts.RELEASE, self.lease.release_call(held), "releasing the lock")

    def _renew(self, held: RedisHeld) -> bool:
        client = self._renewal_client
        if client is None:
            client = self._renewal_client = redis.Redis.from_url(self._url, **self.options(renewal=True))
        call = (self.keys.lock,), (held.token, self.lease.ms)
        return bool(self.eval(client, scripts.RENEW, call, "renewing the lease"))

    # ------------------------------------------------------------------------------------------- diagnostics
    def holder(self) -> Holder | None:
        return self.lease.holder_of(as_bytes(self.call(lambda: self.client().get(self.keys.lock), "reading the lock")))

    def waiters(self) -> list[Holder]:
        k = self.keys
        call = (k.queue, k.expiry, k.waiters), (k.wake,)
        found, dead = self.lease.waiting(self.eval(self.client(), scripts.WAITERS, call, "listing the waiters"))
        for token in dead:  # killed local waiters: their entries go now instead of at their expiry
            self.eval(self.client(), scripts.RELEASE, self.lease.release_call(token), "removing a dead waiter")
        return found

    def timeout_error(self, waited: float) -> LockTimeout:
        try:
            holder = self.holder()
        except OSError:
            holder = None
        return LockTimeout(self.lock_name, waited, path=self.target, holder=holder, hint=REDIS_HINT)

    def close(self) -> None:
        """Close the connections and stop the renewal thread (both come back when the store is used again)."""
        self._renewer.close()
        clients, self._sync, self._renewal_client = (self._sync, self._renewal_client), None, None
        for client in clients:
            if client is not None:
                try:
                    client.close()
                except Exception:
                    pass
        if self.aio:
            close_clients(self)


def _secrets(url: str) -> list[str]:
    """The password of ``url`` as it may appear in messages: as written and percent-decoded (longest first)."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    found = [parts.password or ""]
    found += [v for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k.lower() == "password"]
    found += [pair.partition("=")[2] for pair in parts.query.split("&") if pair.lower().startswith("password=")]
    found += [urllib.parse.unquote(s) for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)


__all__ = ["DEFAULT_LEASE", "RedisStorage", "make"]
