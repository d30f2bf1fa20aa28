# -*- test-case-name: tests.test_broker -*-
"""
Broadcast channels (docs/protocol.md#broadcast-channels): the L{Broker} interface, the
L{InProcessBroker} of a single node and the L{RedisBroker} of a cluster.

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

Redis (C{[redis]}): channel C{NAME} is Redis channel C{{prefix}:ch:NAME}.
Each node holds one Redis subscription per channel, however many local
subscribers it has (SUBSCRIBE on the first, UNSUBSCRIBE after the last), so
a message is fanned out once per node. A local publish is delivered to the
local subscribers at once and sent to Redis; the copy Redis sends back to
its own broker (same origin instance) is dropped. C{publish} fails fast
with L{BrokerUnavailable} while Redis is down, and when more than
C{max_pending} publishes (or C{max_pending_bytes}) await Redis's answer:
nothing is ever buffered for later. Startup never waits for Redis: C{ready}
is False until both connections (commands, pub/sub) are up. Lost
connections come back with a jittered, capped backoff; every channel is
subscribed again and presence rewritten; "redis down" and "redis back" are
logged once per outage.

Messages travel through Redis in an envelope (origin, sequence number,
text/binary flag, raw payload); backends may also publish plain messages
to C{{prefix}:ch:NAME}: see L{wsgateway.channels.envelope} for the format and the rule.

Presence (who is on a channel, cluster-wide): see L{wsgateway.channels.presence}.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgateway.config.loader import RedisConfig
from wsgateway.channels.envelope import EnvelopeError, decode_message, encode_envelope
from wsgateway.channels.presence import MemoryPresence, PresenceEntry, RedisPresence
from wsgateway.redislink import Backoff, CommandProtocol, PubSubProtocol, RedisLink, parse_url

__all__ = [
    "Broker", "BrokerObserver", "BrokerUnavailable", "Fanout", "InProcessBroker", "NullObserver", "PresenceEntry",
    "RedisBroker", "Subscriber", "make_broker",
]


class Subscriber(Protocol):
    def deliver(self, payload: bytes, binary: bool) -> None: ...


class BrokerObserver(Protocol):
    """Hooks for metrics; every method is called in the reactor thread."""

    def broker_published(self, channel: str, deliveries: int) -> None:
        """A local publish was accepted (and delivered to C{deliveries} local subscribers)."""

    def broker_received(self, channel: str, deliveries: int, outside: bool) -> None:
        """A message from another node (or from outside the gateway) was fanned out here."""

    def broker_dropped(self, channel: str, reason: str) -> None:
        """A message lost: C{redis_down}, C{backlog} (refused), C{redis_error} (after sending), C{malformed}."""

    def broker_state(self, up: bool) -> None:
        """Redis went down (False) or came (back) up (True)."""


class NullObserver:
    def broker_published(self, channel: str, deliveries: int) -> None:
        pass

    def broker_received(self, channel: str, deliveries: int, outside: bool) -> None:
        pass

    def broker_dropped(self, channel: str, reason: str) -> None:
        pass

    def broker_state(self, up: bool) -> None:
        pass


class BrokerUnavailable(Exception):
    """
    A publish or presence read that did not happen. C{reason}: C{redis_down}
    (refused at once), C{backlog} (refused at once: too many publishes await
    Redis) or C{redis_error} (sent, then lost: timeout or connection lost).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Broker(Protocol):
    """What the gateway uses; both brokers are also twisted IServices."""

    node_id: str

    @property
    def ready(self) -> bool:
        """False while Redis is down (always True in process): broadcast routes answer 503, /readyz degraded."""

    def subscribe(self, channel: str, subscriber: Subscriber) -> None:
        """From now on C{subscriber.deliver} gets C{channel}'s messages. Idempotent; works while Redis is down."""

    def unsubscribe(self, channel: str, subscriber: Subscriber) -> None:
        """No more messages (not even one being fanned out right now). Unknown pairs are ignored."""

    def publish(self, channel: str, payload: bytes, binary: bool, origin: object | None = None) -> Deferred[None]:
        """
        To every subscriber of C{channel} on every node, except C{origin}.
        Local subscribers get it before this returns. Fails with
        L{BrokerUnavailable}: at once (nothing delivered anywhere) when
        Redis is down or the backlog is full, later (delivered here,
        perhaps not elsewhere) when Redis did not confirm it.
        """

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


# -- local fan-out -------------------------------------------------------------


class Fanout:
    """Channel -> this node's subscribers (by identity, in subscription order)."""

    log = Logger()

    def __init__(self) -> None:
        self._channels: dict[str, dict[int, Subscriber]] = {}

    def add(self, channel: str, subscriber: Subscriber) -> bool:
        """True when C{channel} had no subscriber before."""
        first = channel not in self._channels
        self._channels.setdefault(channel, {})[id(subscriber)] = subscriber
        return first

    def remove(self, channel: str, subscriber: Subscriber) -> bool:
        """True when that was C{channel}'s last subscriber."""
        subs = self._channels.get(channel)
        if subs is None or subs.get(id(subscriber)) is not subscriber:
            return False
        del subs[id(subscriber)]
        if subs:
            return False
        del self._channels[channel]
        return True

    def deliver(self, channel: str, payload: bytes, binary: bool, origin: object | None) -> int:
        """To every subscriber but C{origin}; how many took it."""
        subs = self._channels.get(channel)
        if not subs:
            return 0
        count = 0
        for key, sub in list(subs.items()):
            if sub is origin:
                continue
            current = self._channels.get(channel)
            if current is None or current.get(key) is not sub:
                continue  # unsubscribed by an earlier delivery of this message
            try:
                sub.deliver(payload, binary)
            except Exception:
                self.log.failure("a subscriber of {channel} failed to take a message", channel=channel)
            else:
                count += 1
        return count

    def counts(self) -> dict[str, int]:
        return {channel: len(subs) for channel, subs in self._channels.items()}

    def channels(self) -> list[str]:
        return list(self._channels)


# -- one node --------------------------------------------------------------------


class InProcessBroker(Service):
    """The broker without C{[redis]}: one process, always ready."""

    def __init__(self, node_id: str, *, clock: IReactorTime, observer: BrokerObserver | None = None) -> None:
        self.node_id = node_id
        self.observer: BrokerObserver = observer or NullObserver()
        self._fanout = Fanout()
        self._presence = MemoryPresence(node_id, clock)

    @property
    def ready(self) -> bool:
        return True

    def subscribe(self, channel: str, subscriber: Subscriber) -> None:
        self._fanout.add(channel, subscriber)

    def unsubscribe(self, channel: str, subscriber: Subscriber) -> None:
        self._fanout.remove(channel, subscriber)

    def publish(self, channel: str, payload: bytes, binary: bool, origin: object | None = None) -> Deferred[None]:
        self.observer.broker_published(channel, self._fanout.deliver(channel, payload, binary, origin))
        return succeed(None)

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


# -- a cluster through Redis -----------------------------------------------------


class RedisBroker(Service):
    """Channels shared by every node through Redis pub/sub (see the module docstring)."""

    log = Logger()

    def __init__(
        self,
        config: RedisConfig,
        node_id: str,
        *,
        reactor: Any,
        clock: IReactorTime | None = None,
        heartbeat: float = 5.0,
        reply_timeout: float = 5.0,
        connect_timeout: float = 3.0,
        backoff: Backoff = Backoff(),
        max_pending: int = 10000,
        max_pending_bytes: int = 64 * 1024 * 1024,
        observer: BrokerObserver | None = None,
        rng: random.Random | None = None,
    ) -> None:
        clock = clock or reactor
        self.node_id = node_id
        self.observer: BrokerObserver = observer or NullObserver()
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.heartbeat = heartbeat
        # Unique per process, whatever the rng: it tells our own messages apart.
        self.instance = os.urandom(8)
        self._node = node_id.encode("utf-8")[:255].decode("utf-8", "ignore").encode("utf-8")
        self._seq = 0
        self._pending = 0
        self._pending_bytes = 0
        self._malformed = 0
        self._channel_prefix = f"{config.prefix}:ch:"
        self._fanout = Fanout()
        self._keys: dict[bytes, str] = {}  # Redis channel -> channel, for each channel subscribed here
        self._state: bool | None = None  # None until the first connection or failure
        self._refusal = ""
        self.target = parse_url(config.url)
        common: dict[str, Any] = dict(
            reactor=reactor, clock=clock, reply_timeout=reply_timeout, connect_timeout=connect_timeout,
            backoff=backoff, rng=rng or random.Random(), on_down=self._link_down, on_failure=self._link_failed,
        )
        self._commands = RedisLink(self.target, protocol=CommandProtocol, on_up=self._commands_up, **common)
        self._pubsub = RedisLink(
            self.target, protocol=PubSubProtocol, on_up=self._pubsub_up, on_message=self._received, **common
        )
        self._presence = RedisPresence(
            self._commands, prefix=config.prefix, node_id=node_id, instance=self.instance.hex(), clock=clock,
            heartbeat=heartbeat,
        )
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = clock

    @property
    def ready(self) -> bool:
        return self._commands.up and self._pubsub.up

    # -- the service --------------------------------------------------------

    def startService(self) -> None:
        """Starts connecting and returns at once: never waits for Redis."""
        super().startService()  # type: ignore[no-untyped-call]
        self._commands.start()
        self._pubsub.start()
        self._beat.start(self.heartbeat, now=False)

    def stopService(self) -> Deferred[None]:
        """This node's presence removed from Redis (when up), then both connections closed."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._beat.running:
            self._beat.stop()
        cleared = self._presence.clear() if self._commands.up else succeed(None)

        def close(_: object) -> Deferred[None]:
            return gatherResults([self._commands.stop(), self._pubsub.stop()]).addCallback(lambda _: None)

        return cleared.addCallback(close)

    # -- channels ---------------------------------------------------------------

    def _key(self, channel: str) -> bytes:
        return (self._channel_prefix + channel).encode("utf-8")

    def subscribe(self, channel: str, subscriber: Subscriber) -> None:
        if self._fanout.add(channel, subscriber):
            key = self._key(channel)
            self._keys[key] = channel
            proto = self._pubsub.protocol
            if proto is not None:
                _quiet(proto.subscribe, [key])

    def unsubscribe(self, channel: str, subscriber: Subscriber) -> None:
        if self._fanout.remove(channel, subscriber):
            key = self._key(channel)
            del self._keys[key]
            proto = self._pubsub.protocol
            if proto is not None:
                _quiet(proto.unsubscribe, [key])

    def channels(self) -> dict[str, int]:
        return self._fanout.counts()

    def publish(self, channel: str, payload: bytes, binary: bool, origin: object | None = None) -> Deferred[None]:
        proto = self._commands.protocol
        if proto is None or not self._pubsub.up:
            return self._refuse(channel, "redis_down")
        size = len(payload)
        if self._pending >= self.max_pending or (self._pending and self._pending_bytes + size > self.max_pending_bytes):
            return self._refuse(channel, "backlog")
        self._seq += 1
        try:
            sent: Deferred[Any] = proto.execute_command(
                "PUBLISH", self._key(channel), encode_envelope(self.instance, self._seq, self._node, payload, binary)
            )
        except Exception:
            return self._refuse(channel, "redis_down")
        self._pending += 1
        self._pending_bytes += size
        self.observer.broker_published(channel, self._fanout.deliver(channel, payload, binary, origin))

        def answered(result: object) -> None:
            self._pending -= 1
            self._pending_bytes -= size
            if isinstance(result, Failure):
                self.observer.broker_dropped(channel, "redis_error")
                raise BrokerUnavailable("redis_error", result.getErrorMessage())

        return sent.addBoth(answered)

    def _refuse(self, channel: str, reason: str) -> Deferred[None]:
        self.observer.broker_dropped(channel, reason)
        return fail(BrokerUnavailable(reason))

    def _received(self, redis_channel: bytes, data: bytes) -> None:
        channel = self._keys.get(redis_channel)
        if channel is None:
            return  # the last local subscriber left; the UNSUBSCRIBE is on its way
        try:
            msg = decode_message(data)
        except EnvelopeError as e:
            self._malformed += 1
            if self._malformed & (self._malformed - 1) == 0:  # the 1st, 2nd, 4th, 8th...
                self.log.warn("dropped a malformed message on channel {channel} ({problem}); {count} so far",
                              channel=channel, problem=str(e), count=self._malformed)
            self.observer.broker_dropped(channel, "malformed")
            return
        if msg.instance == self.instance:
            return  # our own publish, delivered locally when it was made
        self.observer.broker_received(channel, self._fanout.deliver(channel, msg.payload, msg.binary, None),
                                      msg.outside)

    # -- presence -------------------------------------------------------------

    def join(self, channel: str, conn_id: str, user: str | None = None) -> Deferred[None]:
        return self._presence.join(channel, conn_id, user)

    def leave(self, channel: str, conn_id: str) -> Deferred[None]:
        return self._presence.leave(channel, conn_id)

    def presence(self, channel: str) -> Deferred[list[PresenceEntry]]:
        if not self._commands.up:
            return fail(BrokerUnavailable("redis_down"))

        def lost(failure: Failure) -> Failure:
            raise BrokerUnavailable("redis_error", failure.getErrorMessage())

        return maybeDeferred(self._presence.read, channel).addErrback(lost)

    # -- Redis coming and going --------------------------------------------------

    def _heartbeat(self) -> None:
        self._presence.beat()
        # PING both connections: a server that hangs (no RST) is caught by replyTimeout.
        for link in (self._commands, self._pubsub):
            proto = link.protocol
            if proto is not None:
                _quiet(proto.ping)

    def _commands_up(self, proto: Any) -> None:
        self._presence.rewrite_all()  # never fails
        self._went_up()

    def _pubsub_up(self, proto: Any) -> None:
        # One channel per SUBSCRIBE: one reply per command keeps txredisapi's
        # reply queue aligned (a multi-channel SUBSCRIBE answers once per
        # channel, and the extra replies would be handed to later commands).
        for key in list(self._keys):
            _quiet(proto.subscribe, [key])
        self._went_up()

    def _went_up(self) -> None:
        if not self.ready or self._state is True or not self.running:
            return
        back = self._state is False
        self._state = True
        self._refusal = ""
        self.log.info("redis {what}: {target}, {count} channels subscribed", what="back" if back else "up",
                      target=self.target.describe(), count=len(self._keys))
        self.observer.broker_state(True)

    def _link_down(self, why: Failure) -> None:
        self._went_down(why.getErrorMessage())

    def _link_failed(self, why: Failure | str) -> None:
        if isinstance(why, str):  # AUTH or SELECT refused: a configuration problem
            if why != self._refusal:
                self._refusal = why
                self.log.error("redis {target}: {problem}", target=self.target.describe(), problem=why)
            why_text = why
        else:
            why_text = why.getErrorMessage()
        self._went_down(why_text)

    def _went_down(self, why: str) -> None:
        if self._state is False or not self.running:
            return
        self._state = False
        self.log.warn("redis down: {target} ({why}); broadcast and presence unavailable, reconnecting with backoff",
                      target=self.target.describe(), why=why)
        self.observer.broker_state(False)


def _quiet(command: Callable[..., Deferred[Any]], *args: Any) -> None:
    """A command whose answer does not matter: a lost connection is handled by the link."""
    try:
        command(*args).addErrback(lambda _: None)
    except Exception:  # txredisapi raises at once on a closed connection
        pass


def make_broker(
    redis: RedisConfig | None, node_id: str, *, reactor: Any, observer: BrokerObserver | None = None, **options: Any
) -> InProcessBroker | RedisBroker:
    """The broker the config asks for: in process without C{[redis]}."""
    if redis is None:
        return InProcessBroker(node_id, clock=reactor, observer=observer)
    return RedisBroker(redis, node_id, reactor=reactor, observer=observer, **options)
