# -*- test-case-name: tests.integration.test_broker -*-
"""
Presence: which connections are on a channel, across the cluster.

An entry is C{{"node": NODE_ID, "conn_id": ID, "user": SUB-or-None,
"since": UNIX_SECONDS}}. Each node's own entries live in memory
(L{MemoryPresence}); that is the whole story for the in-process broker,
and the source of truth that L{RedisPresence} mirrors into Redis:

  - C{{prefix}:presence-node:{instance}:{channel}}: a hash, one per broker
    instance and channel, field C{conn_id} -> the entry as JSON. Its TTL
    is C{3 x heartbeat}; every heartbeat refreshes it (C{PEXPIRE}), so the
    entries of a node that crashed, froze or lost Redis vanish within three
    heartbeats, with nothing to clean up after it.
  - C{{prefix}:presence:{channel}}: a set of those hash keys (the nodes
    that have someone on the channel), same TTL, refreshed by every live
    node's heartbeat, so it disappears with the last node.

C{instance} is unique per process (two workers share a C{node_id}, and
each must expire on its own); the node id is in the JSON, never parsed out
of a key, and the two key shapes cannot collide whatever the channel name.
Reading a channel is C{SMEMBERS} of the set, then C{HGETALL} of each hash;
a member whose hash has expired is dropped from the set on the way
(C{SREM}). A node that was only slow re-adds itself at its next heartbeat.

Joins and leaves are written at once when Redis is up; while it is down
they are only kept in memory, and every hash is rewritten (C{DEL} + C{HSET})
when the link comes back, and whenever a heartbeat finds one gone (Redis
restarted empty). Writes never fail the caller: Redis errors are logged at
debug level (the broker logs the outage itself) and the next heartbeat or
reconnect repairs the state.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypedDict

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgateway.redis.link import RedisLink

__all__ = ["MemoryPresence", "PresenceEntry", "RedisPresence"]


class PresenceEntry(TypedDict):
    node: str
    conn_id: str
    user: str | None
    since: float


def _sorted(entries: list[PresenceEntry]) -> list[PresenceEntry]:
    return sorted(entries, key=lambda e: (e["node"], e["conn_id"]))


class MemoryPresence:
    """This node's entries: channel -> conn_id -> entry."""

    def __init__(self, node_id: str, clock: IReactorTime) -> None:
        self.node_id = node_id
        self._clock = clock
        self._channels: dict[str, dict[str, PresenceEntry]] = {}

    def join(self, channel: str, conn_id: str, user: str | None) -> PresenceEntry:
        entry = PresenceEntry(node=self.node_id, conn_id=conn_id, user=user, since=self._clock.seconds())
        self._channels.setdefault(channel, {})[conn_id] = entry
        return entry

    def leave(self, channel: str, conn_id: str) -> bool:
        """False when C{conn_id} was not on C{channel}."""
        entries = self._channels.get(channel)
        if entries is None or entries.pop(conn_id, None) is None:
            return False
        if not entries:
            del self._channels[channel]
        return True

    def entries(self, channel: str) -> list[PresenceEntry]:
        return _sorted([PresenceEntry(**e) for e in self._channels.get(channel, {}).values()])

    def count(self, channel: str) -> int:
        return len(self._channels.get(channel, ()))

    def channels(self) -> list[str]:
        return list(self._channels)


class RedisPresence:
    """This node's entries mirrored into Redis through C{link}; C{read} gives every node's."""

    log = Logger()

    def __init__(
        self, link: RedisLink, *, prefix: str, node_id: str, instance: str, clock: IReactorTime, heartbeat: float
    ) -> None:
        self.local = MemoryPresence(node_id, clock)
        self._link = link
        self._prefix = prefix
        self._instance = instance
        self.ttl_ms = max(1, round(3 * heartbeat * 1000))

    def index_key(self, channel: str) -> str:
        return f"{self._prefix}:presence:{channel}"

    def node_key(self, channel: str) -> str:
        return f"{self._prefix}:presence-node:{self._instance}:{channel}"

    # -- this node's changes ---------------------------------------------

    def join(self, channel: str, conn_id: str, user: str | None) -> Deferred[None]:
        entry = self.local.join(channel, conn_id, user)
        node = self.node_key(channel)
        return self._send([("HSET", node, conn_id, json.dumps(entry)), *self._touch(channel)])

    def leave(self, channel: str, conn_id: str) -> Deferred[None]:
        if not self.local.leave(channel, conn_id):
            return succeed(None)
        node = self.node_key(channel)
        if self.local.count(channel):
            return self._send([("HDEL", node, conn_id)])
        return self._send([("DEL", node), ("SREM", self.index_key(channel), node)])

    def beat(self) -> None:
        """Refresh the TTLs; rewrite a hash that is gone (Redis restarted empty)."""
        proto = self._link.protocol
        if proto is None:
            return
        for channel in self.local.channels():
            d = self._send_raw(proto, ("PEXPIRE", self.node_key(channel), self.ttl_ms))
            d.addCallback(self._refreshed, channel)
            d.addErrback(self._failed)
            self._send([("SADD", self.index_key(channel), self.node_key(channel)),
                        ("PEXPIRE", self.index_key(channel), self.ttl_ms)])

    def _refreshed(self, result: object, channel: str) -> None:
        if result == 0:  # the key does not exist (any more)
            self.rewrite(channel)

    def rewrite(self, channel: str) -> Deferred[None]:
        node = self.node_key(channel)
        entries = self.local.entries(channel)
        if not entries:
            return self._send([("DEL", node), ("SREM", self.index_key(channel), node)])
        fields: list[object] = []
        for e in entries:
            fields += [e["conn_id"], json.dumps(e)]
        return self._send([("DEL", node), ("HSET", node, *fields), *self._touch(channel)])

    def rewrite_all(self) -> Deferred[None]:
        """Every hash of this node written afresh: when the link (re)connects."""
        return gatherResults([self.rewrite(c) for c in self.local.channels()]).addCallback(lambda _: None)

    def clear(self) -> Deferred[None]:
        """Remove this node's entries from Redis (a graceful stop); memory keeps them."""
        commands: list[tuple[object, ...]] = []
        for channel in self.local.channels():
            node = self.node_key(channel)
            commands += [("DEL", node), ("SREM", self.index_key(channel), node)]
        return self._send(commands)

    def _touch(self, channel: str) -> list[tuple[object, ...]]:
        node, index = self.node_key(channel), self.index_key(channel)
        return [("PEXPIRE", node, self.ttl_ms), ("SADD", index, node), ("PEXPIRE", index, self.ttl_ms)]

    # -- every node's entries ----------------------------------------------

    def read(self, channel: str) -> Deferred[list[PresenceEntry]]:
        """Every live entry of C{channel}, sorted by node then conn_id. Fails while Redis is down."""
        proto = self._link.protocol
        if proto is None:
            raise ConnectionError("redis down")
        index = self.index_key(channel)

        def members(keys: Sequence[bytes]) -> Deferred[list[PresenceEntry]]:
            keys = list(keys or ())
            hashes = gatherResults([self._send_raw(proto, ("HGETALL", k)) for k in keys], consumeErrors=True)
            return hashes.addCallback(entries, keys)

        def entries(hashes: list[list[bytes]], keys: list[bytes]) -> list[PresenceEntry]:
            found: list[PresenceEntry] = []
            stale = [k for k, flat in zip(keys, hashes) if not flat]
            if stale:  # expired: that node stopped refreshing them
                self._send_raw(proto, ("SREM", index, *stale)).addErrback(self._failed)
            for flat in hashes:
                for raw in (flat or [])[1::2]:
                    entry = _parse(raw)
                    if entry is not None:
                        found.append(entry)
            return _sorted(found)

        return self._send_raw(proto, ("SMEMBERS", index)).addCallback(members)

    # -- sending ---------------------------------------------------------------

    def _send(self, commands: list[tuple[object, ...]]) -> Deferred[None]:
        """Pipelined, in order; fires with None when all are answered, never fails."""
        proto = self._link.protocol
        if proto is None or not commands:
            return succeed(None)
        done = gatherResults([self._send_raw(proto, c) for c in commands], consumeErrors=True)
        return done.addCallbacks(lambda _: None, self._failed)

    @staticmethod
    def _send_raw(proto: Any, command: tuple[object, ...]) -> Deferred[Any]:
        try:
            d: Deferred[Any] = proto.execute_command(*command)
        except Exception as e:  # txredisapi raises ConnectionError at once when not connected
            return fail(e)
        return d

    def _failed(self, failure: Failure) -> None:
        self.log.debug("presence: redis command failed: {error}", error=failure.getErrorMessage())


def _parse(raw: bytes) -> PresenceEntry | None:
    try:
        e = json.loads(raw)
        return PresenceEntry(node=str(e["node"]), conn_id=str(e["conn_id"]), user=e.get("user"),
                             since=float(e["since"]))
    except (ValueError, TypeError, KeyError):
        return None
