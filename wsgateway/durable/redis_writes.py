# -*- test-case-name: tests.integration.test_queue_redis -*-
"""
The Lua of the scripts of L{wsgateway.durable.redis_scripts} that change
entries (append, ack, attempt_failed, expire, replay_dead, purge), and the
helpers they share (C{WRITES}). Each runs after the prelude of
L{wsgateway.durable.redis_scripts}, which defines the keys; the layout they
keep is described in L{wsgateway.durable.redis_layout}.
"""

from __future__ import annotations

__all__ = ["ACK", "APPEND", "ATTEMPT_FAILED", "EXPIRE", "PURGE", "REPLAY_DEAD", "WRITES"]

# Writes also keep the indexes: forget() removes an entry everywhere and
# reindex() gives each touched connection the n of its first entry left
# (by seq: the next one to deliver), or takes it out of its owner's index.
# They also keep the byte totals the [queue] caps are checked against
# (sized as wsgateway.durable.sqlite_file.entry_size sizes them): BYTES, all
# entries and dead letters; CBYTES, a hash connection -> its entries' bytes.
# Entries written before the totals existed are not in them: a total never
# goes below 0 for their sake.
WRITES = r"""
local touched = {}
local BYTES, CBYTES = P .. ':bytes', P .. ':cbytes'

local function size(f) return #f.msg + #f.claims + #f.headers + #f.conn + 64 end

local function count_bytes(conn, n, total)
  if conn then
    if redis.call('HINCRBY', CBYTES, conn, n) <= 0 then redis.call('HDEL', CBYTES, conn) end
  end
  -- an empty queue leaves no key behind (and none below 0, for entries from before the totals)
  if total and redis.call('INCRBY', BYTES, n) <= 0 then redis.call('DEL', BYTES) end
end

local function forget(r, id, f)
  count_bytes(f.conn, -size(f), true)
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
  count_bytes(nil, size(f), true)  -- a dead letter is no longer its connection's, but still held
end

local function ensure_group(r)
  redis.pcall('XGROUP', 'CREATE', skey(r), G, '0', 'MKSTREAM')  -- BUSYGROUP when it exists
  redis.call('SADD', ROUTES, r)
end
"""

# The caps (ARGV[7], ARGV[8]; 0 = none): a connection whose entries of this
# batch would pass its share or the whole queue's is refused whole; its ids
# are "-" (its share) or "=" (the queue). The reply ends with the total held.
APPEND = r"""
local me, token, enq, lease_ms, alive_ms = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local max_total, max_conn = tonumber(ARGV[7]), tonumber(ARGV[8])
local FIRST = 9
local ids, routes = {}, {}
local sizes, order, refused = {}, {}, {}
for i = FIRST, #ARGV, 11 do
  local conn = ARGV[i + 1]
  local n = #ARGV[i + 10] + #ARGV[i + 8] + #ARGV[i + 9] + #conn + 64
  if not sizes[conn] then sizes[conn] = 0; order[#order + 1] = conn end
  sizes[conn] = sizes[conn] + n
end
local total = tonumber(redis.call('GET', BYTES) or '0')
for _, conn in ipairs(order) do
  local have = tonumber(redis.call('HGET', CBYTES, conn) or '0')
  if max_conn > 0 and have + sizes[conn] > max_conn then refused[conn] = '-'
  elseif max_total > 0 and total + sizes[conn] > max_total then refused[conn] = '='
  else total = total + sizes[conn] end
end
for i = FIRST, #ARGV, 11 do
  local r, conn, seq, ck = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if refused[conn] then
    ids[#ids + 1] = refused[conn]
  else
    if not routes[r] then routes[r] = true; ensure_group(r) end
    local n = redis.call('INCR', COUNTER)
    local id = redis.call('XADD', skey(r), '*', 'node', me, 'conn', conn, 'seq', seq, 'ck', ck, 'n', n,
      'enq', enq, 'eid', ARGV[i + 4], 'bin', ARGV[i + 5], 'first', ARGV[i + 6], 'trace', ARGV[i + 7],
      'claims', ARGV[i + 8], 'headers', ARGV[i + 9], 'msg', ARGV[i + 10])
    redis.call('ZADD', ckey(conn), seq, r .. '/' .. id)
    redis.call('ZADD', okey(me), 'NX', n, ck)
    count_bytes(conn, #ARGV[i + 10] + #ARGV[i + 8] + #ARGV[i + 9] + #conn + 64, true)
    ids[#ids + 1] = id
  end
end
-- Into this node's PEL, in the same script: no other node can ever read them as new.
for r in pairs(routes) do redis.call('XREADGROUP', 'GROUP', G, me, 'STREAMS', skey(r), '>') end
redis.call('SADD', NODES, me)
redis.call('SET', vkey(me), token, 'PX', alive_ms)
redis.call('SET', lkey(me), token, 'PX', lease_ms, 'NX')
ids[#ids + 1] = redis.call('GET', BYTES) or '0'
return table.concat(ids, ' ')
"""

ACK = r"""
local count = 0
for i = 2, #ARGV, 2 do
  local r, id = ARGV[i], ARGV[i + 1]
  local _, f = get(skey(r), id)
  if f then forget(r, id, f); count = count + 1 end
end
reindex()
return count
"""

ATTEMPT_FAILED = r"""
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
EXPIRE = r"""
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
REPLAY_DEAD = r"""
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
  count_bytes(f.conn, size(f), false)  -- its connection's again; the total held does not change
  redis.call('SADD', NODES, f.node)
  redis.call('XDEL', dkey(r), did)
  redis.call('HDEL', xkey(r), f.id)
end
local more = 0
if mode ~= 'ids' and #picked >= budget then more = 1 end
return {#picked, more}
"""

PURGE = r"""
local route, dead = ARGV[2], ARGV[3] == '1'
local routes = {route}
if route == '' then routes = redis.call('SMEMBERS', ROUTES) end
local count = 0
for _, r in ipairs(routes) do
  if dead then
    count = count + redis.call('XLEN', dkey(r))
    local start = '-'
    while true do
      local page = redis.call('XRANGE', dkey(r), start, '+', 'COUNT', 500)
      if #page == 0 then break end
      local freed = 0
      for _, e in ipairs(page) do freed = freed + size(fields(e[2])) end
      count_bytes(nil, -freed, true)
      start = '(' .. page[#page][1]
    end
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
        count_bytes(f.conn, -size(f), true)
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
