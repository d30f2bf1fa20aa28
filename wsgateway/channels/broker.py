# -*- test-case-name: tests.integration.test_broker -*-
"""
Broadcast channels (docs/protocol.md#broadcast-channels): the L{Broker} interface, the
L{InProcessBroker} of a single node and, through L{make_broker}, the
L{wsgateway.channels.redisbroker.RedisBroker} of a cluster.

A subscriber is any object with C{deliver(payload: bytes, binary: bool)};
the broker calls it synchronously, in the reactor thread, and never
buffers for it (a connection keeps its own bounded queue and applies its
route's C{slow_consumer} policy). A subscriber that raises is logged and
skipped; the others still get the message.

Delivery rules, both brokers:
  - each message reaches each subscriber of its channel once, except its
    C{origin} (the local subscriber that sent it: no echo);
  - a node's subscribers get a channel's messages in the order the node had
    them: local publishes at once, in publish order; the others in the order
    Redis delivered them to this node.

Redis (C{[redis]}): channels, outages and the envelope are described in
L{wsgateway.channels.redisbroker}.

Presence (who is on a channel, cluster-wide): see L{wsgateway.channels.presence}.

History (C{history_size} on a broadcast route): each message of such a
channel gets a L{Position} when published, handed to the subscribers with
it and kept for recovery (L{wsgateway.channels.history}). With Redis a
node's subscribers get those messages when Redis hands them back, not at
once: the order of the offsets is the order of delivery everywhere.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from wsgateway.channels.fanout import BrokerObserver, BrokerUnavailable, Fanout, NullObserver, Subscriber
from wsgateway.channels.history import HistoryRules, MemoryHistory, Position, Window
from wsgateway.channels.presence import MemoryPresence, PresenceEntry
from wsgateway.channels.redisbroker import RedisBroker
from wsgateway.channels.shards import ShardedBroker
from wsgateway.config.redis import RedisConfig

__all__ = [
    "Broker", "BrokerObserver", "BrokerUnavailable", "Fanout", "InProcessBroker", "NullObserver", "PresenceEntry",
    "RedisBroker", "Subscriber", "make_broker",
]


class Broker(Protocol):
    """What the gateway uses; both brokers are also twisted IServices."""

    node_id: str
    observer: BrokerObserver
    # which channels keep a history: set from the routes at start and on every reload
    history_rules: HistoryRules

    @property
    def ready(self) -> bool:
        """False while Redis (any shard) is down; always True in process. /readyz says degraded."""

    def ready_for(self, channel: str) -> bool:
        """Whether C{channel} works now (its shard is up): its broadcast handshakes get 503 otherwise."""

    def shard_states(self) -> dict[str, bool]:
        """Each Redis shard's name and whether it is up (empty in process), for /readyz."""

    def subscribe(self, channel: str, subscriber: Subscriber) -> None:
        """From now on C{subscriber.deliver} gets C{channel}'s messages. Idempotent; works while Redis is down."""

    def unsubscribe(self, channel: str, subscriber: Subscriber) -> None:
        """No more messages (not even one being fanned out right now). Unknown pairs are ignored."""

    def publish(self, channel: str, payload: bytes, binary: bool,
                origin: object | None = None) -> Deferred[Position | None]:
        """
        To every subscriber of C{channel} on every node, except C{origin};
        fires with the message's position when the channel keeps a history.
        Local subscribers get it before this returns (on a channel with
        history and Redis: when Redis hands it back). Fails with
        L{BrokerUnavailable}: at once (nothing delivered anywhere) when
        Redis is down or the backlog is full, later (delivered here,
        perhaps not elsewhere) when Redis did not confirm it.
        """

    def subscribed(self, channel: str) -> Deferred[None]:
        """
        Fires once every message published from now on reaches this node's
        subscribers of C{channel} (with Redis: its SUBSCRIBE is confirmed).
        Call after C{subscribe}; L{BrokerUnavailable} if Redis goes first.
        """

    def history(self, channel: str, since: int) -> Deferred[Window | None]:
        """What C{channel}'s history keeps after offset C{since}; None when it keeps none."""

    def join(self, channel: str, conn_id: str, user: str | None = None) -> Deferred[None]:
        """C{conn_id} (with its token's C{sub}, if any) is on C{channel}; fires once written, never fails."""

    def leave(self, channel: str, conn_id: str) -> Deferred[None]:
        """The opposite of C{join}; call it for each joined channel when the connection closes."""

    def presence(self, channel: str) -> Deferred[list[PresenceEntry]]:
        """Every node's entries, sorted by node then conn_id; L{BrokerUnavailable} while Redis is down."""

    def channels(self) -> dict[str, int]:
        """This node's channels and their local subscriber counts."""

    def setServiceParent(self, parent: Any) -> Any: ...

    def startService(self) -> None: ...

    def stopService(self) -> Deferred[None] | None: ...


# -- one node --------------------------------------------------------------------


class InProcessBroker(Service):
    """The broker without C{[redis]}: one process, always ready."""

    def __init__(self, node_id: str, *, clock: IReactorTime, observer: BrokerObserver | None = None) -> None:
        self.node_id = node_id
        self.observer: BrokerObserver = observer or NullObserver()
        self.history_rules = HistoryRules()
        self.clock = clock
        self._fanout = Fanout()
        self._presence = MemoryPresence(node_id, clock)
        self._history = MemoryHistory()

    @property
    def ready(self) -> bool:
        return True

    def ready_for(self, channel: str) -> bool:
        return True

    def shard_states(self) -> dict[str, bool]:
        return {}

    def subscribe(self, channel: str, subscriber: Subscriber) -> None:
        self._fanout.add(channel, subscriber)

    def unsubscribe(self, channel: str, subscriber: Subscriber) -> None:
        self._fanout.remove(channel, subscriber)

    def publish(self, channel: str, payload: bytes, binary: bool,
                origin: object | None = None) -> Deferred[Position | None]:
        rule = self.history_rules.rule(channel)
        position = None
        if rule is not None:
            position = self._history.append(channel, rule, payload, binary, self.clock.seconds())
        self.observer.broker_published(channel, self._fanout.deliver(channel, payload, binary, origin, position))
        return succeed(position)

    def subscribed(self, channel: str) -> Deferred[None]:
        return succeed(None)

    def history(self, channel: str, since: int) -> Deferred[Window | None]:
        rule = self.history_rules.rule(channel)
        if rule is None:
            return succeed(None)
        return succeed(self._history.read(channel, rule, since, self.clock.seconds()))

    def join(self, channel: str, conn_id: str, user: str | None = None) -> Deferred[None]:
        self._presence.join(channel, conn_id, user)
        return succeed(None)

    def leave(self, channel: str, conn_id: str) -> Deferred[None]:
        self._presence.leave(channel, conn_id)
        return succeed(None)

    def presence(self, channel: str) -> Deferred[list[PresenceEntry]]:
        return succeed(self._presence.entries(channel))

    def channels(self) -> dict[str, int]:
        return self._fanout.counts()


def make_broker(
    redis: RedisConfig | None, node_id: str, *, reactor: Any, observer: BrokerObserver | None = None, **options: Any
) -> InProcessBroker | RedisBroker | ShardedBroker:
    """The broker the config asks for: in process without C{[redis]}, one per shard with C{shards}."""
    if redis is None:
        return InProcessBroker(node_id, clock=reactor, observer=observer)
    if redis.sharded:
        return ShardedBroker(redis, node_id, reactor=reactor, observer=observer, **options)
    return RedisBroker(redis, node_id, reactor=reactor, observer=observer, **options)
