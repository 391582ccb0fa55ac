"""The Redis store's key layout and Lua scripts (see ``_redis_lease.py`` for how they are used).

Keys of the store ``KEY`` (all ``KEY`` + a suffix, so a hash tag in KEY, ``{app}:counter``, puts them in one slot):

==================  ========================================================================================
``KEY``             the encoded value, a plain string (``redis-cli GET KEY`` shows the JSON)
``KEY:lock``        ``<token>\\n<holder record>`` with a PX lease; only the holder of ``<token>`` may write KEY
``KEY:queue``       sorted set: waiting tokens by arrival (server microseconds); only the first may take the lock
``KEY:expiry``      sorted set: the same tokens by the server time (ms) at which an unrefreshed entry is stale
``KEY:waiters``     hash: token -> the waiter's record (``Store.waiters()``)
``KEY:wake:<tok>``  list: a releaser pushes one element to wake the queue's head blocked in BLPOP on it
==================  ========================================================================================

Every script names the keys it uses in KEYS except the wake lists and a set-aside copy, which it derives from KEY:
they share KEY's hash slot only when KEY has a hash tag. Time comes from the server (``TIME``), never a client.
"""

from __future__ import annotations

import hashlib
from typing import Final, NamedTuple


class Script(NamedTuple):
    text: str
    sha: str


def _script(text: str) -> Script:
    return Script(text, hashlib.sha1(text.encode()).hexdigest())


_OWNS = "local function owns(v, tok) return v and string.sub(v, 1, #tok) == tok end\n"
_FORGET = """
local function forget(tok, queue, expiry, waiters, wake)
  redis.call('ZREM', queue, tok); redis.call('ZREM', expiry, tok); redis.call('HDEL', waiters, tok)
  redis.call('DEL', wake .. tok)
end
local function wake_head(queue, wake, ttl)
  local head = redis.call('ZRANGE', queue, 0, 0)[1]
  if head and redis.call('LLEN', wake .. head) == 0 then
    redis.call('RPUSH', wake .. head, '1'); redis.call('PEXPIRE', wake .. head, ttl)
  end
end
local function prune(queue, expiry, waiters, wake, now)
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', expiry, '-inf', now)) do forget(w, queue, expiry, waiters, wake) end
end
"""

#: KEYS: data, lock, queue, expiry, waiters. ARGV: token, lock value, lease ms, enqueue (1/0), waiter record,
#: waiter ttl ms, the SHA-1 the caller knows ('' for none, '-' not to read the value), wake prefix.
#: Returns {1, 0} taken, nothing stored; {1, 1} taken, value unchanged; {1, 2, data} taken; {1, 3} taken, not read;
#: {0, pttl, holder's token} not taken (pttl -1: the lock is free but another waiter is first).
ACQUIRE: Final = _script(_OWNS + _FORGET + """
local tok = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
prune(KEYS[3], KEYS[4], KEYS[5], ARGV[8], now)
local cur = redis.call('GET', KEYS[2])
local mine = false
if cur then
  mine = owns(cur, tok)
  if mine then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
else
  local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  if head == nil or head == tok then
    redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
    mine = true
  else
    wake_head(KEYS[3], ARGV[8], ARGV[6])
  end
end
if mine then
  forget(tok, KEYS[3], KEYS[4], KEYS[5], ARGV[8])
  if ARGV[7] == '-' then return {1, 3} end
  local d = redis.call('GET', KEYS[1])
  if not d then return {1, 0} end
  if ARGV[7] ~= '' and redis.sha1hex(d) == ARGV[7] then return {1, 1} end
  return {1, 2, d}
end
if ARGV[4] == '1' then
  if not redis.call('ZSCORE', KEYS[3], tok) then
    redis.call('ZADD', KEYS[3], t[1] .. string.format('%06d', tonumber(t[2])), tok)
    redis.call('HSET', KEYS[5], tok, ARGV[5])
  end
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[6]), tok)
end
if cur then return {0, redis.call('PTTL', KEYS[2]), string.sub(cur, 1, #tok)} end
return {0, -1, ''}
""")

#: KEYS: lock, queue, expiry, waiters. ARGV: token, wake prefix, waiter ttl ms. Unlocks if the token holds the
#: lock, withdraws the token from the queue, wakes the new head when the lock is free. Returns 1 when it unlocked.
RELEASE: Final = _script(_OWNS + _FORGET + """
local tok = ARGV[1]
local cur = redis.call('GET', KEYS[1])
local freed = 0
if owns(cur, tok) then redis.call('DEL', KEYS[1]); freed = 1; cur = false end
forget(tok, KEYS[2], KEYS[3], KEYS[4], ARGV[2])
if not cur then wake_head(KEYS[2], ARGV[2], ARGV[3]) end
return freed
""")

#: KEYS: lock, data. ARGV: token, data. The fence: writes only while the token holds the lock; 1 written, 0 not.
SAVE: Final = _script(_OWNS + """
if not owns(redis.call('GET', KEYS[1]), ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1
""")

#: KEYS: lock, data. ARGV: token, known SHA-1 or ''. {-1} lock lost, {0} nothing stored, {1} unchanged, {2, data}.
FETCH: Final = _script(_OWNS + """
if not owns(redis.call('GET', KEYS[1]), ARGV[1]) then return {-1} end
local d = redis.call('GET', KEYS[2])
if not d then return {0} end
if ARGV[2] ~= '' and redis.sha1hex(d) == ARGV[2] then return {1} end
return {2, d}
""")

#: KEYS: lock. ARGV: token, lease ms. Extends the lease only while the token holds the lock: 1, else 0.
RENEW: Final = _script(_OWNS + """
if not owns(redis.call('GET', KEYS[1]), ARGV[1]) then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
""")

#: KEYS: lock, data. ARGV: token, base name. Renames the value to a free name (fenced): {-1} lost, {0} nothing
#: stored, {1, name}.
ASIDE: Final = _script(_OWNS + """
if not owns(redis.call('GET', KEYS[1]), ARGV[1]) then return {-1} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {0} end
local name, n = ARGV[2], 0
while redis.call('EXISTS', name) == 1 do n = n + 1; name = ARGV[2] .. '-' .. n end
redis.call('RENAME', KEYS[2], name)
return {1, name}
""")

#: KEYS: queue, expiry, waiters. ARGV: wake prefix. Prunes stale entries; returns {token, record, ...} oldest first.
WAITERS: Final = _script(_FORGET + """
local t = redis.call('TIME')
prune(KEYS[1], KEYS[2], KEYS[3], ARGV[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local out = {}
for _, w in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  out[#out + 1] = w; out[#out + 1] = redis.call('HGET', KEYS[3], w) or ''
end
return out
""")


class Keys(NamedTuple):
    """The names of one store's keys (see the module docstring)."""

    data: str
    lock: str
    queue: str
    expiry: str
    waiters: str
    wake: str  # prefix: + token

    @classmethod
    def of(cls, key: str) -> Keys:
        return cls(key, f"{key}:lock", f"{key}:queue", f"{key}:expiry", f"{key}:waiters", f"{key}:wake:")


__all__ = ["ACQUIRE", "ASIDE", "FETCH", "RELEASE", "RENEW", "SAVE", "WAITERS", "Keys", "Script"]
