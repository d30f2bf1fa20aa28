# -*- test-case-name: tests.integration.test_broker -*-
"""
L{RedisBroker}: broadcast channels shared by every node through Redis
pub/sub, with presence (L{wsgateway.channels.presence}); the rules it keeps
are in L{wsgateway.channels.broker}.

Channel C{NAME} is Redis channel C{{prefix}:ch:NAME}.
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

A channel with history (L{wsgateway.channels.redishistory}) is published
by a script that assigns the offset and PUBLISHes in one step; this node's
subscribers get the message when Redis hands it back, like every other
node's, so each node delivers a channel's messages in offset order. The
publishing subscriber is left out by the envelope's sequence number
(C{_origins}).

Timers (the heartbeat, the links' reconnects and reply timeouts) run on the
injected C{clock}.
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgateway.channels.confirmations import Confirmations
from wsgateway.channels.envelope import EnvelopeError, decode_message, encode_envelope, envelope_head
from wsgateway.channels.fanout import BrokerObserver, BrokerUnavailable, Fanout, NullObserver, Subscriber
from wsgateway.channels.history import HistoryRules, Position, Window
from wsgateway.channels.presence import PresenceEntry, RedisPresence
from wsgateway.channels.redishistory import RedisHistory
from wsgateway.config.redis import RedisConfig
from wsgateway.redis.link import Backoff, CommandProtocol, PubSubProtocol, RedisLink
from wsgateway.config.redis import RedisShard
from wsgateway.redis.sentinel import locator_for

__all__ = ["RedisBroker"]


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
        shard: RedisShard | None = None,
    ) -> None:
        clock = clock or reactor
        self.node_id = node_id
        # the Redis of this broker: the only one, or one of [redis] shards (channels/shards.py)
        self.shard = shard or config.targets[0]
        self.observer: BrokerObserver = observer or NullObserver()
        self.observer.redis_state(self.shard.name, False)  # a series per shard from the start
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
        self._confirmed = Confirmations()  # the channels whose SUBSCRIBE Redis answered on this connection
        # sequence number -> origin of this node's publishes on channels with
        # history, until Redis hands them back (bounded: the oldest go first)
        self._origins: OrderedDict[int, object | None] = OrderedDict()
        self.history_rules = HistoryRules()
        self._state: bool | None = None  # None until the first connection or failure
        self._refusal = ""
        self.target = locator_for(config, self.shard, reactor=reactor, clock=clock, timeout=connect_timeout)
        common: dict[str, Any] = dict(
            reactor=reactor, clock=clock, reply_timeout=reply_timeout, connect_timeout=connect_timeout,
            backoff=backoff, rng=rng or random.Random(), on_down=self._link_down, on_failure=self._link_failed,
        )
        self._commands = RedisLink(self.target, protocol=CommandProtocol, on_up=self._commands_up,
                                   on_failover=self._failed_over, **common)
        self._pubsub = RedisLink(
            self.target, protocol=PubSubProtocol, on_up=self._pubsub_up, on_message=self._received,
            **{**common, "on_down": self._pubsub_down},
        )
        self._presence = RedisPresence(
            self._commands, prefix=config.prefix, node_id=node_id, instance=self.instance.hex(), clock=clock,
            heartbeat=heartbeat,
        )
        self._history = RedisHistory(self._commands, config.prefix, clock)
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = clock

    @property
    def ready(self) -> bool:
        return self._commands.up and self._pubsub.up

    def ready_for(self, channel: str) -> bool:
        return self.ready

    def shard_states(self) -> dict[str, bool]:
        return {self.shard.name: self.ready}

    # -- the service --------------------------------------------------------

    def startService(self) -> None:
        """Starts connecting and returns at once: never waits for Redis."""
        super().startService()
        self._commands.start()
        self._pubsub.start()
        self._beat.start(self.heartbeat, now=False)

    def stopService(self) -> Deferred[None]:
        """This node's presence removed from Redis (when up), then both connections closed."""
        super().stopService()
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
                self._send_subscribe(proto, key)

    def unsubscribe(self, channel: str, subscriber: Subscriber) -> None:
        if self._fanout.remove(channel, subscriber):
            key = self._key(channel)
            del self._keys[key]
            self._confirmed.forget(key)
            proto = self._pubsub.protocol
            if proto is not None:
                _quiet(proto.unsubscribe, [key])

    def _send_subscribe(self, proto: Any, key: bytes) -> None:
        def confirmed(_: object) -> None:
            if self._pubsub.protocol is proto and key in self._keys:
                self._confirmed.confirmed(key)

        try:
            proto.subscribe([key]).addCallbacks(confirmed, lambda _: None)
        except Exception:  # a closed connection: the link's on_down follows
            pass

    def subscribed(self, channel: str) -> Deferred[None]:
        key = self._key(channel)
        if key not in self._confirmed and (key not in self._keys or not self._pubsub.up):
            return fail(BrokerUnavailable("redis_down"))
        return self._confirmed.wait(key)

    def history(self, channel: str, since: int) -> Deferred[Window | None]:
        rule = self.history_rules.rule(channel)
        if rule is None:
            return succeed(None)
        if not self._commands.up:
            return fail(BrokerUnavailable("redis_down"))

        def lost(failure: Failure) -> Failure:
            raise BrokerUnavailable("redis_error", failure.getErrorMessage())

        read: Deferred[Any] = self._history.read(channel, rule, since)
        return read.addErrback(lost)

    def channels(self) -> dict[str, int]:
        return self._fanout.counts()

    def publish(self, channel: str, payload: bytes, binary: bool,
                origin: object | None = None) -> Deferred[Position | None]:
        proto = self._commands.protocol
        if proto is None or not self._pubsub.up:
            return self._refuse(channel, "redis_down")
        size = len(payload)
        if self._pending >= self.max_pending or (self._pending and self._pending_bytes + size > self.max_pending_bytes):
            return self._refuse(channel, "backlog")
        self._seq += 1
        rule = self.history_rules.rule(channel)
        if rule is not None:
            return self._publish_kept(channel, rule, payload, binary, origin)
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

    def _publish_kept(self, channel: str, rule: Any, payload: bytes, binary: bool,
                      origin: object | None) -> Deferred[Position | None]:
        """A channel with history: the script assigns the offset; local delivery waits for Redis's copy."""
        seq, key, size = self._seq, self._key(channel), len(payload)
        if key in self._keys:
            self._origins[seq] = origin
            while len(self._origins) > self.max_pending:
                self._origins.popitem(last=False)
        head = envelope_head(self.instance, seq, self._node, binary, positioned=True)
        sent = self._history.publish(channel, rule, key, head, payload, binary)
        self._pending += 1
        self._pending_bytes += size

        def answered(result: Any) -> Any:
            self._pending -= 1
            self._pending_bytes -= size
            if isinstance(result, Failure):
                self._origins.pop(seq, None)
                self.observer.broker_dropped(channel, "redis_error")
                raise BrokerUnavailable("redis_error", result.getErrorMessage())
            if key not in self._keys:  # no subscriber here: no copy comes back to deliver
                self.observer.broker_published(channel, 0)
            return result

        return sent.addBoth(answered)

    def _refuse(self, channel: str, reason: str) -> Deferred[Any]:
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
        position = None if msg.offset is None else Position(msg.offset, msg.epoch or "")
        if msg.instance == self.instance:
            if position is None:
                return  # our own publish, delivered locally when it was made
            origin = self._origins.pop(msg.seq or 0, None)
            self.observer.broker_published(
                channel, self._fanout.deliver(channel, msg.payload, msg.binary, origin, position))
            return
        self.observer.broker_received(
            channel, self._fanout.deliver(channel, msg.payload, msg.binary, None, position), msg.outside)

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
            link.verify()  # behind Sentinel: has the master moved?

    def _commands_up(self, proto: Any) -> None:
        self._presence.rewrite_all()  # never fails
        self._went_up()

    def _pubsub_up(self, proto: Any) -> None:
        # One channel per SUBSCRIBE: one reply per command keeps txredisapi's
        # reply queue aligned (a multi-channel SUBSCRIBE answers once per
        # channel, and the extra replies would be handed to later commands).
        for key in list(self._keys):
            self._send_subscribe(proto, key)
        self._went_up()

    def _pubsub_down(self, why: Failure) -> None:
        # what was subscribed is gone with the connection, and so are the
        # copies of our own publishes it would have handed back
        self._confirmed.reset(why.getErrorMessage())
        self._origins.clear()
        self._link_down(why)

    def _went_up(self) -> None:
        if not self.ready or self._state is True or not self.running:
            return
        back = self._state is False
        self._state = True
        self._refusal = ""
        self.log.info("redis {what}: {target}, {count} channels subscribed", what="back" if back else "up",
                      target=self.describe(), count=len(self._keys))
        self.observer.broker_state(True)
        self.observer.redis_state(self.shard.name, True)

    def _link_down(self, why: Failure) -> None:
        self._went_down(why.getErrorMessage())

    def _link_failed(self, why: Failure | str) -> None:
        if isinstance(why, str):  # AUTH or SELECT refused: a configuration problem
            if why != self._refusal:
                self._refusal = why
                self.log.error("redis {target}: {problem}", target=self.describe(), problem=why)
            why_text = why
        else:
            why_text = why.getErrorMessage()
        self._went_down(why_text)

    def _went_down(self, why: str) -> None:
        if self._state is False or not self.running:
            return
        self._state = False
        self.log.warn("redis down: {target} ({why}); broadcast and presence unavailable, reconnecting with backoff",
                      target=self.describe(), why=why)
        self.observer.broker_state(False)
        self.observer.redis_state(self.shard.name, False)

    def _failed_over(self, old: str, new: str) -> None:
        self.log.warn("redis failover followed ({what}): the master is now {new} (was {old})",
                      what=self.describe(), new=new, old=old)
        self.observer.redis_failover(self.shard.name)

    def describe(self) -> str:
        """The Redis this broker uses, for logs (never a password): its url or master, and where it is now."""
        where = self._commands.target
        named = self.target.describe()
        return named if where is None or where.describe() == named else f"{named} at {where.describe()}"


def _quiet(command: Callable[..., Deferred[Any]], *args: Any) -> None:
    """A command whose answer does not matter: a lost connection is handled by the link."""
    try:
        command(*args).addErrback(lambda _: None)
    except Exception:  # txredisapi raises at once on a closed connection
        pass
