# -*- test-case-name: tests.integration.test_redis_ha -*-
"""
Channels spread over several Redis shards (C{[redis] shards},
docs/configuration.md#redis): L{ShardedBroker} holds one
L{wsgateway.channels.redisbroker.RedisBroker} per shard and sends each
channel, with its pub/sub, history and presence, to the shard
L{shard_of} picks.

Placement is Lamping and Veach's jump consistent hash of a 64-bit BLAKE2b
digest of the channel's name: the same on every node and every run (not
Python's salted C{hash}), even across shards, and adding a shard moves
only about 1/N of the channels (docs: reordering C{shards} moves many,
appending one does not). A shard that is down refuses only its own
channels: their handshakes get 503, the others go on.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred

from wsgateway.channels.fanout import BrokerObserver, NullObserver, Subscriber
from wsgateway.channels.history import HistoryRules, Position, Window
from wsgateway.channels.presence import PresenceEntry
from wsgateway.channels.redisbroker import RedisBroker
from wsgateway.config.redis import RedisConfig

__all__ = ["ShardedBroker", "jump_hash", "shard_of"]


def jump_hash(key: int, buckets: int) -> int:
    """Lamping and Veach, "A Fast, Minimal Memory, Consistent Hash Algorithm" (2014)."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def shard_of(channel: str, shards: int) -> int:
    """The index of C{channel}'s shard among C{shards}."""
    digest = hashlib.blake2b(channel.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return jump_hash(int.from_bytes(digest, "big"), shards)


class ShardedBroker(MultiService):
    """The L{wsgateway.channels.broker.Broker} of C{[redis] shards}: each call goes to its channel's shard."""

    def __init__(self, config: RedisConfig, node_id: str, *, reactor: Any, observer: BrokerObserver | None = None,
                 **options: Any) -> None:
        super().__init__()
        self.node_id = node_id
        self.observer: BrokerObserver = observer or NullObserver()
        self.shards: list[RedisBroker] = [
            RedisBroker(config, node_id, reactor=reactor, observer=self.observer, shard=target, **options)
            for target in config.targets
        ]
        for shard in self.shards:
            shard.setServiceParent(self)
        self._rules = HistoryRules()

    @property
    def history_rules(self) -> HistoryRules:
        return self._rules

    @history_rules.setter
    def history_rules(self, rules: HistoryRules) -> None:
        self._rules = rules
        for shard in self.shards:
            shard.history_rules = rules

    def _for(self, channel: str) -> RedisBroker:
        return self.shards[shard_of(channel, len(self.shards))]

    @property
    def ready(self) -> bool:
        """Every shard up (/readyz says degraded otherwise); a channel's own check is L{ready_for}."""
        return all(s.ready for s in self.shards)

    def ready_for(self, channel: str) -> bool:
        return self._for(channel).ready

    def shard_states(self) -> dict[str, bool]:
        return {s.shard.name: s.ready for s in self.shards}

    def shard_name(self, channel: str) -> str:
        return self._for(channel).shard.name

    def subscribe(self, channel: str, subscriber: Subscriber) -> None:
        self._for(channel).subscribe(channel, subscriber)

    def unsubscribe(self, channel: str, subscriber: Subscriber) -> None:
        self._for(channel).unsubscribe(channel, subscriber)

    def subscribed(self, channel: str) -> Deferred[None]:
        return self._for(channel).subscribed(channel)

    def publish(self, channel: str, payload: bytes, binary: bool,
                origin: object | None = None) -> Deferred[Position | None]:
        return self._for(channel).publish(channel, payload, binary, origin)

    def history(self, channel: str, since: int) -> Deferred[Window | None]:
        return self._for(channel).history(channel, since)

    def join(self, channel: str, conn_id: str, user: str | None = None) -> Deferred[None]:
        return self._for(channel).join(channel, conn_id, user)

    def leave(self, channel: str, conn_id: str) -> Deferred[None]:
        return self._for(channel).leave(channel, conn_id)

    def presence(self, channel: str) -> Deferred[list[PresenceEntry]]:
        return self._for(channel).presence(channel)

    def channels(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for shard in self.shards:
            out.update(shard.channels())
        return out
