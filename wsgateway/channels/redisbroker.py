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

Timers (the heartbeat, the links' reconnects and reply timeouts) run on the
injected C{clock}.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgateway.channels.envelope import EnvelopeError, decode_message, encode_envelope
from wsgateway.channels.fanout import BrokerObserver, BrokerUnavailable, Fanout, NullObserver, Subscriber
from wsgateway.channels.presence import PresenceEntry, RedisPresence
from wsgateway.config.redis import RedisConfig
from wsgateway.redislink import Backoff, CommandProtocol, PubSubProtocol, RedisLink, parse_url

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
