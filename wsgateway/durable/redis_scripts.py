# -*- test-case-name: tests.test_queue_redis -*-
"""
The Lua scripts of L{wsgateway.durable.redis.RedisQueueStore}, one for each
store operation: L{SCRIPTS}, by name.

Each script gets the key prefix C{P} as C{ARGV[1]} and computes its keys
from it (C{_PRELUDE}: C{ROUTES}, C{NODES}, C{COUNTER}, C{skey}, C{dkey}...).
The key layout, the fields of a stream entry and the ownership rules the
scripts keep are described once, in the docstring of L{wsgateway.durable.redis}.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["SCRIPTS"]

_PRELUDE = r"""
local P = ARGV[1]
local G = 'gw'
local ROUTES, NODES, COUNTER = P .. ':routes', P .. ':nodes', P .. ':n'
local function skey(r) return P .. ':s:' .. r end
local function dkey(r) return P .. ':d:' .. r end
local function akey(r) return P .. ':a:' .. r end
local function xkey(r) return P .. ':x:' .. r end
local function ckey(c) return P .. ':c:' .. c end
local function okey(n) return P .. ':o:' .. n end
local function lkey(n) return P .. ':lease:' .. n end
local function vkey(n) return P .. ':alive:' .. n end

local function fields(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end

-- one stream entry: its flat field list and a table, or nil
local function get(key, id)
  local got = redis.call('XRANGE', key, id, id)
  if #got == 0 then return nil, nil end
  return got[1][2], fields(got[1][2])
end

-- "ROUTE/ID" -> ROUTE, ID (a route may contain "/", a stream id never does)
local function split(member)
  local at = string.find(member, '/[^/]*$')
  return string.sub(member, 1, at - 1), string.sub(member, at + 1)
end

-- one entry as one bulk string ("LEN:BYTES" each): a reply of a few long strings, not
-- thousands of short ones, which txredisapi's line parser handles in quadratic time
local function pack(head, flat)
  local out = {}
  for _, v in ipairs(head) do out[#out + 1] = #v .. ':' .. v end
  for _, v in ipairs(flat) do out[#out + 1] = #v .. ':' .. v end
  return table.concat(out)
end

-- the owners whose lease this token holds: checked in the script that reads (fencing)
local function held(token)
  local out = {}
  for _, n in ipairs(redis.call('SMEMBERS', NODES)) do
    if redis.call('GET', lkey(n)) == token then out[#out + 1] = n end
  end
  return out
end

-- an owner's pending ids in route r, oldest first ({} when the stream or group is gone)
local function pel(r, count, owner)
  local got = redis.pcall('XPENDING', skey(r), G, '-', '+', count, owner)
  if type(got) ~= 'table' or got.err then return {} end
  return got
end
"""

# Writes also keep the indexes: forget() removes an entry everywhere and
# reindex() gives each touched connection the n of its first entry left
# (by seq: the next one to deliver), or takes it out of its owner's index.
_WRITES = r"""
local touched = {}

local function forget(r, id, f)
  redis.call('XACK', skey(r), G, id)
  redis.call('XDEL', skey(r), id)
  redis.call('HDEL', akey(r), id)
  redis.call('ZREM', ckey(f.conn), r .. '/' .. id)
  touched[f.node] = touched[f.node] or {}
  touched[f.node][f.ck] = f.conn
end

local function reindex()
  for owner, conns in pairs(touched) do
    for ck, conn in pairs(conns) do
      -- the connection's first entry by seq (normally the first member: no scan), or none left
      local score, start = nil, 0
      while not score do
        local page = redis.call('ZRANGE', ckey(conn), start, start + 49)
        if #page == 0 then break end
        for _, m in ipairs(page) do
          local r, id = split(m)
          local _, f = get(skey(r), id)
          if f and f.node == owner and f.ck == ck then score = f.n; break end
        end
        start = start + 50
      end
      if score then redis.call('ZADD', okey(owner), score, ck) else redis.call('ZREM', okey(owner), ck) end
    end
  end
  touched = {}
end

local function bury(r, id, flat, f, attempts, reason, now)
  local d = {}
  for i = 1, #flat do d[i] = flat[i] end
  for _, v in ipairs({'id', id, 'attempts', tostring(attempts), 'reason', reason, 'dead', now}) do d[#d + 1] = v end
  redis.call('HSET', xkey(r), id, redis.call('XADD', dkey(r), '*', unpack(d)))
  redis.call('SADD', ROUTES, r)
  forget(r, id, f)
end

local function ensure_group(r)
  redis.pcall('XGROUP', 'CREATE', skey(r), G, '0', 'MKSTREAM')  -- BUSYGROUP when it exists
  redis.call('SADD', ROUTES, r)
end
"""

_APPEND = r"""
local me, token, enq, lease_ms, alive_ms = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local ids, routes = {}, {}
for i = 7, #ARGV, 11 do
  local r, conn, seq, ck = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if not routes[r] then routes[r] = true; ensure_group(r) end
  local n = redis.call('INCR', COUNTER)
  local id = redis.call('XADD', skey(r), '*', 'node', me, 'conn', conn, 'seq', seq, 'ck', ck, 'n', n,
    'enq', enq, 'eid', ARGV[i + 4], 'bin', ARGV[i + 5], 'first', ARGV[i + 6], 'trace', ARGV[i + 7],
    'claims', ARGV[i + 8], 'headers', ARGV[i + 9], 'msg', ARGV[i + 10])
  redis.call('ZADD', ckey(conn), seq, r .. '/' .. id)
  redis.call('ZADD', okey(me), 'NX', n, ck)
  ids[#ids + 1] = id
end
-- Into this node's PEL, in the same script: no other node can ever read them as new.
for r in pairs(routes) do redis.call('XREADGROUP', 'GROUP', G, me, 'STREAMS', skey(r), '>') end
redis.call('SADD', NODES, me)
redis.call('SET', vkey(me), token, 'PX', alive_ms)
redis.call('SET', lkey(me), token, 'PX', lease_ms, 'NX')
return table.concat(ids, ' ')
"""

_PENDING = r"""
local token, limit, route = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local routes = route and {route} or redis.call('SMEMBERS', ROUTES)
local owners = held(token)
local found = {}
for _, r in ipairs(routes) do
  for _, o in ipairs(owners) do
    for _, p in ipairs(pel(r, limit, o)) do
      local flat, f = get(skey(r), p[1])
      if flat then found[#found + 1] = {tonumber(f.n), r, p[1], flat} end
    end
  end
end
table.sort(found, function(a, b) return a[1] < b[1] end)
local out = {}
for k = 1, math.min(limit, #found) do
  local e = found[k]
  out[k] = pack({e[2], e[3], redis.call('HGET', akey(e[2]), e[3]) or '0'}, e[4])
end
return out
"""

_PENDING_FOR = r"""
local token, conn, limit = ARGV[2], ARGV[3], tonumber(ARGV[4])
local mine = {}
for _, o in ipairs(held(token)) do mine[o] = true end
local out, start = {}, 0
while #out < limit do
  local page = redis.call('ZRANGE', ckey(conn), start, start + limit - 1)
  if #page == 0 then break end
  for _, m in ipairs(page) do
    if #out >= limit then break end
    local r, id = split(m)
    local flat, f = get(skey(r), id)
    if flat and mine[f.node] then out[#out + 1] = pack({r, id, redis.call('HGET', akey(r), id) or '0'}, flat) end
  end
  start = start + limit
end
return out
"""

_CONN_KEYS = r"""
local token, limit = ARGV[2], tonumber(ARGV[3])
local found = {}
for _, o in ipairs(held(token)) do
  local z = redis.call('ZRANGE', okey(o), 0, limit - 1, 'WITHSCORES')
  for k = 1, #z, 2 do found[#found + 1] = {tonumber(z[k + 1]), z[k]} end
end
table.sort(found, function(a, b) return a[1] < b[1] end)
local out = {}
for k = 1, math.min(limit, #found) do out[k] = found[k][2] end
return out
"""

_ACK = r"""
local count = 0
for i = 2, #ARGV, 2 do
  local r, id = ARGV[i], ARGV[i + 1]
  local _, f = get(skey(r), id)
  if f then forget(r, id, f); count = count + 1 end
end
reindex()
return count
"""

_ATTEMPT_FAILED = r"""
local now, max, cutoff = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local moved = {}
for i = 5, #ARGV, 2 do
  local r, id = ARGV[i], ARGV[i + 1]
  local flat, f = get(skey(r), id)
  if f then
    local a = redis.call('HINCRBY', akey(r), id, 1)
    local reason = nil
    if a >= max then reason = 'max_attempts' elseif tonumber(f.enq) < cutoff then reason = 'retention' end
    if reason then bury(r, id, flat, f, a, reason, now); moved[#moved + 1] = r .. '/' .. id end
  end
end
reindex()
return moved
"""

# Each owner appends with its own clock, so per route and owner the PEL is
# in enqueued_at order: the walk stops at the first entry still in time.
_EXPIRE = r"""
local token, now, cutoff, budget = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local moved = {}
local owners = held(token)
for _, r in ipairs(redis.call('SMEMBERS', ROUTES)) do
  for _, o in ipairs(owners) do
    local done = false
    while not done do
      local page = pel(r, 100, o)
      if #page == 0 then break end
      for _, p in ipairs(page) do
        if #moved >= budget then reindex(); return {moved, 1} end
        local flat, f = get(skey(r), p[1])
        if not f then
          redis.call('XACK', skey(r), G, p[1])
        elseif tonumber(f.enq) < cutoff then
          bury(r, p[1], flat, f, redis.call('HGET', akey(r), p[1]) or '0', 'retention', now)
          moved[#moved + 1] = r .. '/' .. p[1]
        else
          done = true
          break
        end
      end
    end
  end
end
reindex()
return {moved, 0}
"""

# A dead letter goes back to its owner's PEL (whoever holds that owner's
# lease delivers it), as a new stream entry, in the original append order.
_REPLAY_DEAD = r"""
local now, budget, mode = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local picked, seen = {}, {}
local function pick(r, did, flat)
  if flat and not seen[r .. '/' .. did] then
    seen[r .. '/' .. did] = true
    picked[#picked + 1] = {tonumber(fields(flat).n), r, did, flat}
  end
end
if mode == 'ids' then
  for i = 5, #ARGV, 2 do
    local r = ARGV[i]
    local did = redis.call('HGET', xkey(r), ARGV[i + 1])
    if did then pick(r, did, (get(dkey(r), did))) end
  end
else
  for _, r in ipairs(redis.call('SMEMBERS', ROUTES)) do
    if #picked >= budget then break end
    for _, e in ipairs(redis.call('XRANGE', dkey(r), '-', '+', 'COUNT', budget - #picked)) do pick(r, e[1], e[2]) end
  end
end
table.sort(picked, function(a, b) return a[1] < b[1] end)
local skip = {id = true, attempts = true, reason = true, dead = true, n = true, enq = true}
for _, p in ipairs(picked) do
  local r, did, flat = p[2], p[3], p[4]
  local f = fields(flat)
  ensure_group(r)
  local n = redis.call('INCR', COUNTER)
  local out = {}
  for i = 1, #flat, 2 do
    if not skip[flat[i]] then out[#out + 1] = flat[i]; out[#out + 1] = flat[i + 1] end
  end
  for _, v in ipairs({'n', n, 'enq', now}) do out[#out + 1] = v end
  local id = redis.call('XADD', skey(r), '*', unpack(out))
  redis.call('XREADGROUP', 'GROUP', G, f.node, 'STREAMS', skey(r), '>')
  redis.call('ZADD', ckey(f.conn), f.seq, r .. '/' .. id)
  redis.call('ZADD', okey(f.node), 'NX', n, f.ck)
  redis.call('SADD', NODES, f.node)
  redis.call('XDEL', dkey(r), did)
  redis.call('HDEL', xkey(r), f.id)
end
local more = 0
if mode ~= 'ids' and #picked >= budget then more = 1 end
return {#picked, more}
"""

_PURGE = r"""
local route, dead = ARGV[2], ARGV[3] == '1'
local routes = {route}
if route == '' then routes = redis.call('SMEMBERS', ROUTES) end
local count = 0
for _, r in ipairs(routes) do
  if dead then
    count = count + redis.call('XLEN', dkey(r))
    redis.call('UNLINK', dkey(r), xkey(r))
    if redis.call('XLEN', skey(r)) == 0 then  -- nothing left of the route: no empty stream either
      redis.call('UNLINK', skey(r), akey(r))
      redis.call('SREM', ROUTES, r)
    end
  else
    local start = '-'
    while true do
      local page = redis.call('XRANGE', skey(r), start, '+', 'COUNT', 500)
      if #page == 0 then break end
      for _, e in ipairs(page) do
        local f = fields(e[2])
        redis.call('ZREM', ckey(f.conn), r .. '/' .. e[1])
        redis.call('ZREM', okey(f.node), f.ck)  -- every entry of that connection in r goes
      end
      count = count + #page
      start = '(' .. page[#page][1]
    end
    redis.call('UNLINK', skey(r), akey(r))
    if redis.call('XLEN', dkey(r)) == 0 then redis.call('SREM', ROUTES, r) end
  end
end
return count
"""

_DEPTH = r"""
local out = {}
for _, r in ipairs(redis.call('SMEMBERS', ROUTES)) do
  local n, d = redis.call('XLEN', skey(r)), redis.call('XLEN', dkey(r))
  if n > 0 or d > 0 then
    local first = ''
    if n > 0 then first = fields(redis.call('XRANGE', skey(r), '-', '+', 'COUNT', 1)[1][2]).first end
    out[#out + 1] = {r, n, d, first}
  end
end
return out
"""

_DEAD_LETTERS = r"""
local limit, route = tonumber(ARGV[2]), ARGV[3]
local routes = route and {route} or redis.call('SMEMBERS', ROUTES)
local found = {}
for _, r in ipairs(routes) do
  for _, e in ipairs(redis.call('XRANGE', dkey(r), '-', '+', 'COUNT', limit)) do
    local ms, sq = string.match(e[1], '^(%d+)-(%d+)$')
    found[#found + 1] = {tonumber(ms), tonumber(sq), r, e[2]}
  end
end
table.sort(found, function(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end)
local out = {}
for k = 1, math.min(limit, #found) do out[k] = pack({found[k][3]}, found[k][4]) end
return out
"""

# Liveness, own lease, adoption of dead owners, hand-back to owners that
# came back, and forgetting dead owners with nothing left: one atomic pass.
_HEARTBEAT = r"""
local me, token, alive_ms, lease_ms = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local function owns_any(n)
  for _, r in ipairs(redis.call('SMEMBERS', ROUTES)) do
    if #pel(r, 1, n) > 0 then return true end
  end
  return false
end
local function drop(n)
  redis.call('SREM', NODES, n)
  redis.call('DEL', okey(n))
  for _, r in ipairs(redis.call('SMEMBERS', ROUTES)) do redis.pcall('XGROUP', 'DELCONSUMER', skey(r), G, n) end
end
redis.call('SET', vkey(me), token, 'PX', alive_ms)
redis.call('SADD', NODES, me)
local out = {}
for _, n in ipairs(redis.call('SMEMBERS', NODES)) do
  local lease = redis.call('GET', lkey(n))
  if n == me then
    if lease == token then redis.call('PEXPIRE', lkey(n), lease_ms); out[#out + 1] = n
    elseif not lease then redis.call('SET', lkey(n), token, 'PX', lease_ms); out[#out + 1] = n end
  elseif lease == token then
    if redis.call('EXISTS', vkey(n)) == 1 then
      redis.call('DEL', lkey(n))  -- it is back: its entries are its own again
    elseif not owns_any(n) then
      redis.call('DEL', lkey(n))
      drop(n)
    else
      redis.call('PEXPIRE', lkey(n), lease_ms)
      out[#out + 1] = n
    end
  elseif not lease and redis.call('EXISTS', vkey(n)) == 0 then
    if owns_any(n) then
      redis.call('SET', lkey(n), token, 'PX', lease_ms)
      out[#out + 1] = n
    else
      drop(n)
    end
  end
end
return out
"""

_RELEASE = r"""
local me, token = ARGV[2], ARGV[3]
if redis.call('GET', vkey(me)) == token then redis.call('DEL', vkey(me)) end
for _, n in ipairs(held(token)) do redis.call('DEL', lkey(n)) end
return 1
"""


@dataclass(frozen=True)
class _Script:
    name: str
    text: bytes
    sha: str

    @classmethod
    def make(cls, name: str, flags: str, *parts: str) -> _Script:
        text = "\n".join([f"#!lua{flags}", _PRELUDE, *parts]).encode()
        return cls(name, text, hashlib.sha1(text).hexdigest())


_W, _R = "", " flags=no-writes"
SCRIPTS = {
    s.name: s
    for s in [
        _Script.make("append", _W, _WRITES, _APPEND),
        _Script.make("pending", _R, _PENDING),
        _Script.make("pending_for", _R, _PENDING_FOR),
        _Script.make("conn_keys", _R, _CONN_KEYS),
        _Script.make("ack", " flags=allow-oom", _WRITES, _ACK),
        _Script.make("attempt_failed", _W, _WRITES, _ATTEMPT_FAILED),
        _Script.make("expire", _W, _WRITES, _EXPIRE),
        _Script.make("replay_dead", _W, _WRITES, _REPLAY_DEAD),
        _Script.make("purge", _W, _WRITES, _PURGE),
        _Script.make("depth", _R, _DEPTH),
        _Script.make("dead_letters", _R, _DEAD_LETTERS),
        _Script.make("heartbeat", _W, _HEARTBEAT),
        _Script.make("release", " flags=allow-oom", _RELEASE),
    ]
}
