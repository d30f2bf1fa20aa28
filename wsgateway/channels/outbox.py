# -*- test-case-name: tests.unit.channels.test_broadcast -*-
"""
The client side of channels: what a broker delivers to one connection, with
a bounded outbound queue so a slow subscriber never holds back the others.

``Outbox`` is the policy (reactor-free): messages go straight to the socket
while it keeps up; once Twisted says the socket's buffer is full
(``pauseProducing``), they wait in a queue of at most ``limit`` bytes, and
when that overflows the route's ``slow_consumer`` policy applies: ``close``
(1008 "slow consumer") or ``drop_oldest``. Either way it is counted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from wsgateway import codes
from wsgateway.channels.deflate import PreparedMessage, frame_payload_size
from wsgateway.channels.history import Recovery, recover
from wsgateway.channels.recovery import RecoveryGate, kept_messages, recovered_frame
from wsgateway.handshake.admission import TokenBucket

SLOW_CONSUMER = "slow consumer"
OPEN = WebSocketProtocol.STATE_OPEN


@implementer(IPushProducer)
class Outbox:
    """
    Registered as the streaming producer of the client transport, which is
    how it learns that the socket is full; ``send`` writes one whole
    message, ``close`` ends the connection with a policy close.
    """

    __slots__ = ("_send", "_close", "limit", "policy", "queue", "queued", "paused", "dropped", "closed", "on_drop")

    def __init__(
        self,
        send: Callable[[bytes, bool], None],
        close: Callable[[int, str], None],
        *,
        limit: int,
        policy: str,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        self._send = send
        self._close = close
        self.limit = limit
        self.policy = policy
        self.queue: deque[tuple[bytes, bool]] = deque()
        self.queued = 0
        self.paused = False
        self.dropped = 0
        self.closed = False
        self.on_drop = on_drop

    def deliver(self, payload: bytes, binary: bool) -> None:
        if self.closed:
            return
        if not self.paused and not self.queue:
            self._send(payload, binary)
            return
        self.queue.append((payload, binary))
        self.queued += len(payload)
        if self.queued <= self.limit:
            return
        if self.policy == "drop_oldest":
            n = 0
            while self.queued > self.limit and len(self.queue) > 1:
                old, _ = self.queue.popleft()
                self.queued -= len(old)
                n += 1
            self.dropped += n
            if self.on_drop is not None:
                self.on_drop(n)
        else:
            self.closed = True
            self.dropped += len(self.queue)
            if self.on_drop is not None:
                self.on_drop(len(self.queue))
            self.queue.clear()
            self.queued = 0
            self._close(codes.POLICY_VIOLATION, SLOW_CONSUMER)

    # IPushProducer: the transport's signals about its own buffer

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while self.queue and not self.paused and not self.closed:
            payload, binary = self.queue.popleft()
            self.queued -= len(payload)
            self._send(payload, binary)  # may pause us again at once

    def stopProducing(self) -> None:
        self.closed = True
        self.queue.clear()
        self.queued = 0

    def release(self) -> None:
        """
        The connection is gone: nothing more is sent, and the methods of
        whoever it sent to (a session or a relay, which hold this outbox: a
        reference cycle) are let go, so the connection is freed at once.
        """
        self.stopProducing()
        self._send = _not_sent
        self._close = _not_closed


def _not_sent(payload: bytes, binary: bool) -> None:
    """A released outbox's sends: none (it is closed)."""


def _not_closed(code: int, reason: str) -> None:
    """A released outbox's closes: none (it is closed)."""


class Subscription:
    """One connection's membership of channels on a broker."""

    __slots__ = ("broker", "outbox", "channels")

    def __init__(self, broker: Any, outbox: Outbox, channels: tuple[str, ...]) -> None:
        self.broker = broker
        self.outbox = outbox
        self.channels = channels
        for channel in channels:
            broker.subscribe(channel, self)

    def deliver(self, payload: bytes, binary: bool) -> None:
        self.outbox.deliver(payload, binary)

    def cancel(self) -> None:
        for channel in self.channels:
            self.broker.unsubscribe(channel, self)
        self.channels = ()


class MessageTooBig(Exception):
    """A published message over the subscriber's max_message_size (as Autobahn's sendMessage refused it)."""


class PreparedSubscription(Subscription):
    """
    A broadcast connection's membership: its outbox takes whole frames,
    the ones of the L{PreparedMessage} for its C{window} (None: plain), so
    that subscribers with the same window write the same bytes and queue
    what actually goes on the wire. A C{json} subscriber (the
    C{wsgateway.json} subprotocol) takes each message's JSON envelope; while
    a C{gate} is set (a recovery in flight, recovery.py) messages wait there.
    """

    __slots__ = ("window", "max_size", "json", "gate", "seen")

    def __init__(self, broker: Any, outbox: Outbox, channels: tuple[str, ...], *, window: int | None,
                 max_size: int, json: bool = False, gate: Any = None) -> None:
        self.window = window
        self.max_size = max_size
        self.json = json
        self.gate = gate
        # after a recovery: the epoch and newest offset it sent. Redis may
        # hand a live message the read already returned (another connection,
        # another socket) after the read's answer: not sent twice.
        self.seen: tuple[str, int] | None = None
        super().__init__(broker, outbox, channels)

    def deliver_prepared(self, message: PreparedMessage) -> None:
        if self.gate is not None:
            self.gate.hold(message)
            return
        seen, position = self.seen, message.position
        if seen is not None and position is not None:
            if position.epoch == seen[0] and position.offset <= seen[1]:
                return
            self.seen = None  # past the seam (or a new epoch): nothing more to compare
        self.send(message)

    def send(self, message: PreparedMessage) -> None:
        if 0 < self.max_size < len(message.payload):
            # the fanout logs it and goes on with the others
            raise MessageTooBig(f"{len(message.payload)} bytes over max_message_size {self.max_size}")
        if self.json:
            message = message.enveloped()
        self.outbox.deliver(message.frame(self.window), message.binary)

    def deliver(self, payload: bytes, binary: bool) -> None:
        self.deliver_prepared(PreparedMessage(payload, binary))


class ChannelSession:
    """
    A client of a ``mode = broadcast`` route: what it sends is published to
    its channel (``client_publish``), what the channel carries is delivered
    to it through its Outbox. Autobahn keeps the connection (pings, close,
    UTF-8 checks); this object only connects it to the broker.
    """

    log = Logger()

    def __init__(
        self,
        proto: Any,
        broker: Any,
        channel: str,
        *,
        conn_id: str,
        user: str | None,
        client_publish: bool,
        slow_consumer: str,
        queue_limit: int,
        messages_per_second: float,
        clock: IReactorTime,
        on_drop: Callable[[int], None] | None = None,
        window: int | None = None,
        max_size: int = 0,
        json: bool = False,
        recover_from: tuple[int, str | None] | None = None,
        route: str = "",
    ) -> None:
        self.proto = proto
        self.route = route
        self.broker = broker
        self.channel = channel
        self.conn_id = conn_id
        self.client_publish = client_publish
        self.clock = clock
        # named like a relay's counters, for stats and the access line
        self.messages_c2u = self.messages_u2c = self.bytes_c2u = self.bytes_u2c = 0
        self.bucket = (
            TokenBucket(messages_per_second, max(2.0 * messages_per_second, 1.0), clock.seconds())
            if messages_per_second > 0
            else None
        )
        # the outbox holds whole frames (compressed ones for a compressed
        # connection): what it counts against queue_limit is what the socket has to take
        self.outbox = Outbox(self._write, self._close, limit=queue_limit, policy=slow_consumer, on_drop=on_drop)
        proto.transport.registerProducer(self.outbox, True)
        gate = None
        if recover_from is not None:
            # set before subscribing: live messages wait until history is read
            gate = RecoveryGate(limit=queue_limit, policy=slow_consumer, on_drop=self._dropped,
                                on_overflow=lambda: self._close(codes.POLICY_VIOLATION, SLOW_CONSUMER))
        self.subscription = PreparedSubscription(broker, self.outbox, (channel,), window=window, max_size=max_size,
                                                 json=json, gate=gate)
        broker.join(channel, conn_id, user)
        if recover_from is not None:
            self._recover(*recover_from)

    def _dropped(self, n: int) -> None:
        self.outbox.dropped += n
        if self.outbox.on_drop is not None:
            self.outbox.on_drop(n)

    def _recover(self, since: int, epoch: str | None) -> None:
        """docs/protocol.md#channel-history-and-recovery: subscribed first (live), then history read."""
        d = self.broker.subscribed(self.channel)
        d.addCallback(lambda _: self.broker.history(self.channel, since))
        d.addCallbacks(lambda window: self._recovered(recover(self.channel, since, epoch, window)),
                       self._recovery_failed)

    def _recovered(self, recovery: Recovery) -> None:
        gate, self.subscription.gate = self.subscription.gate, None
        if gate is None or gate.overflowed or self.outbox.closed:
            return
        self.broker.observer.history_recovered(self.route, "recovered" if recovery.recovered else "gap")
        self.outbox.deliver(recovered_frame(recovery).frame(self.subscription.window), False)
        self.subscription.seen = (recovery.epoch, recovery.offset)
        for message in [*kept_messages(recovery), *gate.release(recovery.offset)]:
            try:
                self.subscription.send(message)
            except MessageTooBig:
                pass  # published when the limit was higher (a reload): as live delivery, skipped

    def _recovery_failed(self, f: Failure) -> None:
        self.subscription.gate = None
        self.log.info("{conn_id} could not recover {channel}: {error}", conn_id=self.conn_id,
                      channel=self.channel, error=f.getErrorMessage())
        if not self.outbox.closed:
            self.outbox.closed = True
            self._close(codes.TRY_AGAIN_LATER, "broadcast unavailable")

    def _write(self, frame: bytes, binary: bool) -> None:
        """One whole frame of a L{PreparedMessage}, shared with the channel's other subscribers."""
        if self.proto.state != OPEN:
            # the close handshake has begun: no data frame may follow ours
            # (RFC 6455 5.5.1), where Autobahn's sendMessage would raise
            return
        self.messages_u2c += 1
        # the payload as it goes on the wire (compressed, if it is), as the relay counts
        self.bytes_u2c += frame_payload_size(frame)
        self.proto.sendData(frame)

    def _close(self, code: int, reason: str) -> None:
        self.log.info("{conn_id} closing client: {code} {reason}", conn_id=self.conn_id, code=code, reason=reason)
        if self.proto.state == OPEN:
            # not sendClose: Autobahn lets applications send only 1000 and
            # 3000-4999, and these are the gateway's own protocol-level codes
            self.proto.sendCloseFrame(code, reason.encode(), isReply=False)

    def message(self, payload: bytes, binary: bool) -> None:
        """A whole message from the client."""
        if self.outbox.closed or self.proto.state != OPEN:
            # Autobahn reads on after it closed the client for a malformed
            # frame (failByDrop off, sessions.py): nothing more is published
            return
        if self.bucket is not None and not self.bucket.take(self.clock.seconds()):
            self.outbox.closed = True
            self._close(codes.POLICY_VIOLATION, codes.REASON_RATE_LIMIT)
            return
        if not self.client_publish:
            return  # a listen-only channel: what clients send goes nowhere (README)
        self.messages_c2u += 1
        self.bytes_c2u += len(payload)
        self.broker.publish(self.channel, payload, binary, origin=self.subscription).addErrback(self._not_published)

    def _not_published(self, f: Failure) -> None:
        # Redis is down or lagging: say so rather than lose the message
        # quietly; the client reconnects and gets 503 until the broker is back.
        self.log.info("{conn_id} could not publish to {channel}: {error}", conn_id=self.conn_id,
                      channel=self.channel, error=f.getErrorMessage())
        if not self.outbox.closed:
            self.outbox.closed = True
            self._close(codes.TRY_AGAIN_LATER, "broadcast unavailable")

    upstream = None  # for the shutdown drain, which handles relays and sessions alike

    @property
    def client(self) -> Any:
        return self.proto.transport

    def drain(self, code: int = codes.GOING_AWAY, reason: str = "server shutting down") -> None:
        """The shutdown close (docs/operations.md#signals-and-lifecycle): 1001, after what is already queued for the client."""
        if not self.outbox.closed:
            self.outbox.closed = True
            self._close(code, reason)

    def ended(self) -> None:
        """The connection is gone: leave the channel."""
        self.outbox.release()
        self.subscription.gate = None  # its overflow callback is one of this session's
        self.subscription.cancel()
        self.broker.leave(self.channel, self.conn_id)
