"""The Redis store's key layout and Lua scripts (see ``_redis_lease.py`` for how they are used).

Keys of the store ``KEY`` (all ``KEY`` + a suffix, so a hash tag in KEY, ``{app}:counter``, puts them in one slot):

==================  ========================================================================================
``KEY``             the encoded value, a plain string (``redis-cli GET KEY`` shows the JSON)
``KEY:lock``        ``<token>\\n<holder record>`` with a PX lease; only the holder of ``<token>`` may write KEY
``KEY:queue``       sorted set: waiting tokens by arrival (server microseconds); only the first may take the lock
``KEY:expiry``      sorted set: the same tokens by the server time (ms) at which an unrefreshed entry is stale
``KEY:waiters``     hash: token -> the waiter's record (``Store.waiters()``)
``KEY:wake:<tok>``  list: the grant that a releaser pushes when it hands the lock to the queue's head
==================  ========================================================================================

Every script names the keys it uses in KEYS except the wake lists and a set-aside copy, which it derives from KEY:
they share KEY's hash slot only when KEY has a hash tag. Time comes from the server (``TIME``), never a client. Only
the value and its renaming are written to the AOF and sent to replicas (see ``_QUEUE``).
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
# The lock, the queue and the wake-ups are kept out of the AOF and the replication stream
# (``redis.set_repl(redis.REPL_NONE)``): they need no fsync, so a transaction costs one fsync, its commit's; and a
# restarted or promoted server starts with no lock (a holder that survived is fenced: its token is gone). Only the
# value and its renaming are propagated.
_QUEUE = """
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), t
end
local function forget(tok, queue, expiry, waiters, wake)
  redis.call('ZREM', queue, tok); redis.call('ZREM', expiry, tok); redis.call('HDEL', waiters, tok)
  redis.call('DEL', wake .. tok)
end
local function prune(queue, expiry, waiters, wake, now)
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', expiry, '-inf', now)) do forget(w, queue, expiry, waiters, wake) end
end
-- The free lock goes straight to the queue's head, for a short lease (a killed waiter keeps it briefly), and the
-- head's wake list gets the grant: 'g0' nothing stored, 'g2' .. the value (up to cap bytes), 'g-' read it yourself.
local function hand_over(head, data, lock, queue, expiry, waiters, wake, ttl, cap, t)
  local at = t[1] .. '.' .. string.sub(string.format('%06d', tonumber(t[2])), 1, 3)
  local rec = string.gsub(redis.call('HGET', waiters, head) or '', '"at": [%d%.]+', '"at": ' .. at, 1)
  redis.call('SET', lock, head .. '\\n' .. rec, 'PX', ttl)
  forget(head, queue, expiry, waiters, wake)
  local d, msg = redis.call('GET', data), 'g-'
  if not d then msg = 'g0' elseif #d <= tonumber(cap) then msg = 'g2' .. d end
  redis.call('RPUSH', wake .. head, msg); redis.call('PEXPIRE', wake .. head, ttl)
end
"""

#: KEYS: data, lock, queue, expiry, waiters. ARGV: token, holder record, lease ms, enqueue (1/0), waiter ttl ms, the
#: SHA-1 the caller knows ('' for none, '-' not to read the value), wake prefix, cap.
#: Returns {1, state, pttl, data} taken (state 0 nothing stored, 1 unchanged, 2 data, 3 not read), or
#: {0, pttl, holder's token} not taken (queued when asked to).
ACQUIRE: Final = _script(_OWNS + _QUEUE + """
redis.set_repl(redis.REPL_NONE)
local tok = ARGV[1]
local now, t = clock()
prune(KEYS[3], KEYS[4], KEYS[5], ARGV[7], now)
local cur = redis.call('GET', KEYS[2])
local mine = owns(cur, tok)
if not cur then
  local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  if head == nil or head == tok then
    redis.call('SET', KEYS[2], tok .. '\\n' .. ARGV[2], 'PX', ARGV[3])
    mine = true
  else
    hand_over(head, KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[7], ARGV[5], ARGV[8], t)
    cur = redis.call('GET', KEYS[2])
  end
end
if mine then
  forget(tok, KEYS[3], KEYS[4], KEYS[5], ARGV[7])
  local pttl = redis.call('PTTL', KEYS[2])
  if ARGV[6] == '-' then return {1, 3, pttl, ''} end
  local d = redis.call('GET', KEYS[1])
  if not d then return {1, 0, pttl, ''} end
  if ARGV[6] ~= '' and redis.sha1hex(d) == ARGV[6] then return {1, 1, pttl, ''} end
  return {1, 2, pttl, d}
end
if ARGV[4] == '1' then
  if not redis.call('ZSCORE', KEYS[3], tok) then
    redis.call('ZADD', KEYS[3], t[1] .. string.format('%06d', tonumber(t[2])), tok)
    redis.call('HSET', KEYS[5], tok, ARGV[2])
  end
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[5]), tok)
end
return {0, redis.call('PTTL', KEYS[2]), string.sub(cur, 1, #tok)}
""")

#: KEYS: data, lock, queue, expiry, waiters. ARGV: token, wake prefix, waiter ttl ms, cap. Unlocks if the token
#: holds the lock, withdraws the token from the queue, and hands a free lock to the queue's head. Returns 1 when it
#: unlocked.
RELEASE: Final = _script(_OWNS + _QUEUE + """
redis.set_repl(redis.REPL_NONE)
local tok = ARGV[1]
local now, t = clock()
local cur = redis.call('GET', KEYS[2])
local freed = 0
if owns(cur, tok) then redis.call('DEL', KEYS[2]); freed = 1; cur = false end
forget(tok, KEYS[3], KEYS[4], KEYS[5], ARGV[2])
if not cur then
  prune(KEYS[3], KEYS[4], KEYS[5], ARGV[2], now)
  local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  if head then hand_over(head, KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[2], ARGV[3], ARGV[4], t) end
end
return freed
""")

#: KEYS: lock, data. ARGV: token, data. The fence: writes only while the token holds the lock; 1 written, 0 not.
SAVE: Final = _script(_OWNS + """
if not owns(redis.call('GET', KEYS[1]), ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1
""")

#: KEYS: data, lock, queue, expiry, waiters. ARGV: token, data, wake prefix, waiter ttl ms, cap. SAVE and RELEASE in one
#: (fenced: 0 when the token no longer holds the lock, nothing written), handing the lock over as RELEASE does.
SAVE_RELEASE: Final = _script(_OWNS + _QUEUE + """
local tok = ARGV[1]
if not owns(redis.call('GET', KEYS[2]), tok) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.set_repl(redis.REPL_NONE)
redis.call('DEL', KEYS[2])
forget(tok, KEYS[3], KEYS[4], KEYS[5], ARGV[3])
local now, t = clock()
prune(KEYS[3], KEYS[4], KEYS[5], ARGV[3], now)
local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
if head then hand_over(head, KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[3], ARGV[4], ARGV[5], t) end
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
redis.set_repl(redis.REPL_NONE)
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
WAITERS: Final = _script(_QUEUE + """
redis.set_repl(redis.REPL_NONE)
prune(KEYS[1], KEYS[2], KEYS[3], ARGV[1], clock())
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


__all__ = ["ACQUIRE", "ASIDE", "FETCH", "RELEASE", "RENEW", "SAVE", "SAVE_RELEASE", "WAITERS", "Keys", "Script"]
