# -*- test-case-name: tests.integration.test_queue_redis -*-
"""
The Lua scripts of L{wsgateway.durable.redis.RedisQueueStore}, one for each
store operation: L{SCRIPTS}, by name. The prelude and the reading and
ownership scripts are here; the ones that change entries are in
L{wsgateway.durable.redis_writes}.

Each script gets the key prefix C{P} as C{ARGV[1]} and computes its keys
from it (C{_PRELUDE}: C{ROUTES}, C{NODES}, C{COUNTER}, C{skey}, C{dkey}...).
The key layout, the fields of a stream entry and the ownership rules the
scripts keep are described once, in L{wsgateway.durable.redis_layout} and
L{wsgateway.durable.redis_node} (ownership).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from wsgateway.durable.redis_writes import ACK, APPEND, ATTEMPT_FAILED, EXPIRE, PURGE, REPLAY_DEAD, WRITES

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
        _Script.make("append", _W, WRITES, APPEND),
        _Script.make("pending", _R, _PENDING),
        _Script.make("pending_for", _R, _PENDING_FOR),
        _Script.make("conn_keys", _R, _CONN_KEYS),
        _Script.make("ack", " flags=allow-oom", WRITES, ACK),
        _Script.make("attempt_failed", _W, WRITES, ATTEMPT_FAILED),
        _Script.make("expire", _W, WRITES, EXPIRE),
        _Script.make("replay_dead", _W, WRITES, REPLAY_DEAD),
        _Script.make("purge", _W, WRITES, PURGE),
        _Script.make("depth", _R, _DEPTH),
        _Script.make("dead_letters", _R, _DEAD_LETTERS),
        _Script.make("heartbeat", _W, _HEARTBEAT),
        _Script.make("release", " flags=allow-oom", _RELEASE),
    ]
}
