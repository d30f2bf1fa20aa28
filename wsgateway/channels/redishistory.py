# -*- test-case-name: tests.integration.test_history -*-
"""
Channel history in Redis (docs/protocol.md#channel-history-and-recovery),
for L{wsgateway.channels.redisbroker.RedisBroker}.

Keys, for channel C{NAME} and the C{[redis] prefix} C{P}:

  - C{P:hm:NAME}, a hash: C{epoch} and C{top} (the newest offset). It
    expires L{wsgateway.channels.history.META_TTL} after the last publish.
  - C{P:h:NAME}, a stream capped at the route's C{history_size} (exact
    C{MAXLEN}), entry id C{OFFSET-1}, fields C{d} (the payload), C{b} (1:
    binary) and C{t} (the publishing node's clock, ms). It expires
    C{history_ttl} after the last publish; older entries of a busy channel
    are skipped when read.

L{PUBLISH} assigns the offset, appends to the stream and PUBLISHes the
envelope with its position in one script, so that the offset a live
subscriber sees is the one history keeps, and messages reach every node's
subscription in offset order. A missing hash means the history was lost
(Redis restarted empty, flushed, or a month of silence): the script starts
a new epoch, with the caller's random candidate, and drops any stream left.
L{READ} does the same on a channel it has never seen, so the epoch a client
is told is the one the next message will carry.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore

from wsgateway.channels.history import META_TTL, HistoryRule, Kept, Position, Window, new_epoch
from wsgateway.redis.link import RedisLink
from wsgateway.redis.scripts import LuaScript, eval_script

__all__ = ["PUBLISH", "READ", "RedisHistory"]

_EPOCH = r"""
local meta, stream = KEYS[1], KEYS[2]
local function epoch_of(candidate, metattl)
  local epoch = redis.call('HGET', meta, 'epoch')
  if epoch then return epoch end
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', candidate, 'top', 0)
  redis.call('EXPIRE', meta, metattl)
  return candidate
end
"""

# KEYS: meta, stream, the pub/sub channel.
# ARGV: envelope head, payload, binary (0/1), size, ttl (ms), meta ttl (s), candidate epoch, now (ms).
PUBLISH = LuaScript((_EPOCH + r"""
local head, payload = ARGV[1], ARGV[2]
local epoch = epoch_of(ARGV[7], ARGV[6])
local offset = redis.call('HINCRBY', meta, 'top', 1)
redis.call('XADD', stream, 'MAXLEN', ARGV[4], offset .. '-1', 'd', payload, 'b', ARGV[3], 't', ARGV[8])
redis.call('PEXPIRE', stream, ARGV[5])
redis.call('EXPIRE', meta, ARGV[6])
local o = tostring(offset)
redis.call('PUBLISH', KEYS[3], head .. string.char(#o) .. o .. string.char(#epoch) .. epoch .. payload)
return {offset, epoch}
""").encode())

# KEYS: meta, stream. ARGV: since, now (ms), ttl (ms), candidate epoch, meta ttl (s).
# -> {epoch, top, first unexpired offset after since (top + 1: none), packed entries}
# Entries are packed into one string ("LEN:BYTES" for offset, binary flag,
# payload): txredisapi parses a reply of many short strings in quadratic time.
READ = LuaScript((_EPOCH + r"""
local epoch = epoch_of(ARGV[4], ARGV[5])
local top = tonumber(redis.call('HGET', meta, 'top'))
local cutoff = tonumber(ARGV[2]) - tonumber(ARGV[3])
local out, first = {}, top + 1
for _, e in ipairs(redis.call('XRANGE', stream, tostring(tonumber(ARGV[1]) + 1), '+')) do
  local f = {}
  for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
  if tonumber(f['t']) >= cutoff then
    local o = string.match(e[1], '^(%d+)')
    if first > top then first = tonumber(o) end
    out[#out + 1] = #o .. ':' .. o .. #f['b'] .. ':' .. f['b'] .. #f['d'] .. ':' .. f['d']
  end
end
return {epoch, top, first, table.concat(out)}
""").encode())


# History reads in flight on one link. A thousand clients recovering at once
# would otherwise send a thousand reads of up to history_size messages each,
# whose replies queue on the one connection past its reply timeout, which then
# aborts it and fails them all (bench/history.py's recovery storm on Redis:
# a quarter of the clients closed with 1013 before this bound). Reads past it
# wait here, in order, while the link is up; once it is down they fail at once.
MAX_READS = 16


class RedisHistory:
    """The two operations, on the broker's command link; they fail at once while it is down."""

    def __init__(self, link: RedisLink, prefix: str, clock: Any) -> None:
        self.link = link
        self.prefix = prefix
        self.clock = clock
        self._reads = DeferredSemaphore(MAX_READS)

    def _keys(self, channel: str) -> list[bytes]:
        return [f"{self.prefix}:hm:{channel}".encode(), f"{self.prefix}:h:{channel}".encode()]

    def publish(self, channel: str, rule: HistoryRule, pubsub_key: bytes, head: bytes, payload: bytes,
                binary: bool) -> Deferred[Position]:
        args = [head, payload, b"1" if binary else b"0", rule.size, int(rule.ttl * 1000), int(META_TTL),
                new_epoch(), self._now_ms()]
        d = eval_script(self.link, PUBLISH, [*self._keys(channel), pubsub_key], args)
        return d.addCallback(lambda r: Position(int(r[0]), _text(r[1])))

    def read(self, channel: str, rule: HistoryRule, since: int) -> Deferred[Window]:
        return self._reads.run(self._read, channel, rule, since)

    def _read(self, channel: str, rule: HistoryRule, since: int) -> Deferred[Window]:
        # the time is taken when the read is sent, not when it was asked for
        args = [since, self._now_ms(), int(rule.ttl * 1000), new_epoch(), int(META_TTL)]
        return eval_script(self.link, READ, self._keys(channel), args).addCallback(_window)

    def _now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)


def _text(value: Any) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def _window(reply: list[Any]) -> Window:
    epoch, top, first, packed = reply
    return Window(_text(epoch), int(top), int(first), _unpack(packed or b""))


def _unpack(packed: bytes) -> list[Kept]:
    fields: list[bytes] = []
    at = 0
    while at < len(packed):
        colon = packed.index(b":", at)
        n = int(packed[at:colon])
        fields.append(packed[colon + 1 : colon + 1 + n])
        at = colon + 1 + n
    return [Kept(int(fields[i]), fields[i + 2], fields[i + 1] == b"1") for i in range(0, len(fields), 3)]
