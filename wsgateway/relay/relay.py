# -*- test-case-name: tests.unit.relay.test_relay -*-
"""
The frame relay: once both WebSocket legs are open, frames go from one
transport to the other as they arrive, headers checked, payloads untouched
(docs/protocol.md#forwarding-and-close-codes).

Each direction has a FrameScanner. The relay adds what needs time and both
legs at once: the close handshake passed through and bounded in time,
the gateway's own pings per hop and the idle timeout (keepalive.py), the
client's message rate (ratelimit.py), the close handshakes, the gateway's
own closes (1001, 1002, 1008, 1009, 1014) and token expiry (closes.py),
backpressure, by making each transport the streaming producer of the other
(transport.py), channel pushes (pushes.py) and the mirror (mirror.py). What happens
when the upstream leg is lost is its hooks' decision (interfaces.RelayHooks):
1014 by default, a new leg (reconnect.py) or the durable queue
(wsgateway.durable.relay).
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger

from wsgateway import codes
from wsgateway.interfaces import RelayHooks, RelayTransport
from wsgateway.ops.logs import ConnLogger
from wsgateway.relay.closes import Closes
from wsgateway.relay.codec import OP_CLOSE, OP_PONG, close_error
from wsgateway.relay.frames import FrameScanner
from wsgateway.relay.hooks import NO_HOOKS
from wsgateway.relay.keepalive import Keepalive
from wsgateway.relay.mirror import Mirror
from wsgateway.relay.pushes import Pushes
from wsgateway.relay.ratelimit import rate_limiter
from wsgateway.relay.reconnect import Reconnect
from wsgateway.relay.transport import Leg, Reader, take


class Relay:
    """
    One proxied connection after both handshakes.

    ``client`` and ``upstream`` are transports. Frames the gateway originates
    go through the scanner whose output feeds that peer (``inject``), so they
    land between frames, never inside one.
    """

    log: Logger | ConnLogger = Logger()  # a ConnLogger when the connection has log fields

    def __init__(
        self,
        client: RelayTransport,
        upstream: RelayTransport | None,  # None only with hooks that start with no upstream leg
        *,
        clock: IReactorTime,
        max_message_size: int,
        write_buffer: int,
        idle_timeout: float,
        ping_interval: float,
        ping_timeout: float,
        close_timeout: float = 5.0,
        on_done: Callable[[Relay], None] | None = None,
        reconnect: Callable[[Relay], Deferred[None]] | None = None,
        reconnect_buffer: int = 0,
        messages_per_second: float = 0,
        close_at: float | None = None,
        log_fields: dict[str, Any] | None = None,
        hooks: RelayHooks | None = None,
        deflate: bool = False,
    ) -> None:
        """
        ``messages_per_second`` (0 = off) limits client messages with a token
        bucket of twice that burst (docs/configuration.md ``[limits]``); ``close_at`` is a time
        on ``clock`` (a token's ``exp``) at which the connection is closed
        with 1008 "token expired". ``log_fields`` (conn_id, trace_id...) go
        into every line this relay logs. ``hooks`` decide what an upstream
        loss does; without them, ``reconnect`` (and ``reconnect_buffer``)
        makes them L{Reconnect}'s. ``deflate``: both legs agreed on
        permessage-deflate (RSV1 frames are legal, and a client message's
        limit counts its inflated size).
        """
        if log_fields is not None:
            # on the class it is always the Logger: only an instance gets a ConnLogger
            self.log = ConnLogger(cast(Logger, Relay.log), log_fields)
        if hooks is None:
            hooks = NO_HOOKS if reconnect is None else Reconnect(reconnect, reconnect_buffer)
        self.hooks = hooks
        hooks.attach(self)
        self.client = client
        # None while no upstream leg is open (reconnecting, or hooks that start without one)
        self.upstream: RelayTransport | None = upstream if upstream is None else hooks.upstream_transport(upstream)
        self._clock = clock
        self._on_done = on_done
        self.deflate = deflate
        # client -> upstream frames must be masked; the limit protects the
        # upstream and the gateway from clients, not the other way round.
        self.c2u = FrameScanner(
            masked=True,
            max_message_size=max_message_size,
            on_control=self._from_client,
            on_message=rate_limiter(messages_per_second, clock),
            deflate=deflate,
        )
        self.u2c = FrameScanner(masked=False, max_message_size=0, on_control=self._from_upstream, deflate=deflate)
        self.bytes_c2u = 0
        self.bytes_u2c = 0
        # close handshake state, one flag per half
        self.closed_to_client = False
        self.closed_to_upstream = False
        # Once a close is committed towards a peer, only this many more bytes
        # go to it (the rest of a frame in flight and the close itself); None
        # while the stream is open.
        self.budget_client: int | None = None
        self.budget_upstream: int | None = None
        self.close_from_client = False
        self.close_from_upstream = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed_by: str | None = None
        self.client_lost = False
        self.upstream_lost = False
        # the upstream dropped its connection without a close frame, unasked:
        # a passive health failure (normal and application closes are not)
        self.upstream_vanished = False
        self.done = False
        # Client frames go to hooks.hold instead of upstream (a reconnect or
        # the durable queue); reconnecting: the hooks are opening a new leg.
        self.holding = False
        self.reconnecting = False
        self.reconnects = 0
        self.keepalive = Keepalive(self, clock, ping_interval=ping_interval, ping_timeout=ping_timeout,
                                   idle_timeout=idle_timeout)
        self.started = self.last_activity = clock.seconds()
        self.closes = Closes(self, clock, close_timeout, close_at)
        self.write_buffer = write_buffer

        self.client_leg = Leg(self.client_data, self.client_connection_lost)
        self.upstream_leg = self.leg_for(self.upstream)
        take(client, write_buffer)
        if self.upstream is not None:
            take(self.upstream, write_buffer)
            # Backpressure: a transport whose write buffer is over the mark
            # pauses the other one, which stops reading from its socket.
            client.registerProducer(Reader(self.upstream), True)
            self.upstream.registerProducer(hooks.client_reader(client), True)
        self.keepalive.start()
        hooks.started()

    # -- data path -------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        self.bytes_c2u += len(data)
        c2u = self.c2u
        active = c2u.in_frame
        frames = c2u.data_frames
        budget = self.budget_upstream
        out = c2u.feed(data)
        if active or c2u.data_frames != frames:
            self.last_activity = self._clock.seconds()
        if self.holding:
            if out:
                self.hooks.hold(out)
        elif out and not self.upstream_lost:
            if budget is None:
                upstream = self.upstream
                assert upstream is not None  # neither lost nor holding: a leg is open
                upstream.write(out)
            elif budget:
                self.closes.owed_to_upstream(out, budget)
        if budget is None and self.closed_to_upstream and self.budget_upstream is None:
            # a close from the client went through in this read: nothing after it
            self.budget_upstream = 0
        if (mirror := self.mirror) is not None and (self.hooks.mirrors_held or not self.holding):
            mirror.copy(out)
        if c2u.error is not None:
            self.client_violation(*c2u.error)

    def upstream_data(self, data: bytes) -> None:
        self.bytes_u2c += len(data)
        u2c = self.u2c
        active = u2c.in_frame
        frames = u2c.data_frames
        budget = self.budget_client
        out = u2c.feed(data)
        if active or u2c.data_frames != frames:
            self.last_activity = self._clock.seconds()
        if out and not self.client_lost:
            if budget is None:
                self.client.write(out)
            elif budget:
                self.closes.owed_to_client(out, budget)
        if budget is None and self.closed_to_client and self.budget_client is None:
            self.budget_client = 0
        if u2c.error is not None:
            self.closes.upstream_violation(*u2c.error)
        elif self.pushes_waiting and self.pushes is not None:
            self.pushes.flush()

    @property
    def messages_c2u(self) -> int:
        return self.c2u.messages

    @property
    def messages_u2c(self) -> int:
        return self.u2c.messages + (self.pushes.count if self.pushes is not None else 0)

    # -- control frames --------------------------------------------------

    def _from_client(self, opcode: int, payload: bytes) -> bool | tuple[int, str]:
        if opcode == OP_PONG:
            if payload == self.keepalive.payload:
                self.keepalive.pong_from_client = True
                return False
            return True
        if opcode == OP_CLOSE:
            # An invalid close is a violation like any other (1002 or 1007,
            # the upstream 1001): a conformant upstream would fail the
            # connection on it, and the client would get 1014 for its own error.
            invalid = close_error(payload)
            if invalid is not None:
                return invalid
            return self.closes.from_client(payload)
        # pings pass through: the upstream answers them itself
        return True

    def _from_upstream(self, opcode: int, payload: bytes) -> bool:
        if opcode == OP_PONG and payload == self.keepalive.payload:
            self.keepalive.pong_from_upstream = True
            return False
        handled = self.hooks.upstream_control(opcode, payload)
        if handled is not None:
            return handled
        if opcode == OP_CLOSE:
            return self.closes.from_upstream(payload)
        return True

    # -- how it ends (closes.py) -------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Close both legs with the same code, e.g. 1001 on shutdown or idle."""
        self.closes.close(code, reason)

    def drain(self, code: int = codes.GOING_AWAY, reason: str = "server shutting down") -> None:
        """The shutdown close: 1001 to the client only, the upstream's after the client's answer (Closes.drain)."""
        self.closes.drain(code, reason)

    def client_violation(self, code: int, reason: str) -> None:
        self.closes.client_violation(code, reason)

    def give_up(self) -> None:
        self.closes.give_up()

    def finish_client(self) -> None:
        # both halves of the client's close handshake are done; the server
        # side (us) closes the TCP connection first (RFC 6455 7.1.1)
        self.closes.lose_client()

    def client_connection_lost(self) -> None:
        self.closes.client_lost()

    def upstream_connection_lost(self) -> None:
        self.closes.upstream_lost()

    # -- upstream legs ----------------------------------------------------

    def leg_for(self, transport: RelayTransport | None) -> Leg:
        """
        The protocol for one upstream transport. Events from a transport the
        relay has already replaced (after a reconnect) are ignored.
        """

        def data(chunk: bytes) -> None:
            if self.upstream is transport:
                self.upstream_data(chunk)

        def lost() -> None:
            if self.upstream is transport:
                self.upstream_connection_lost()

        return Leg(data, lost)

    def upstream_gone(self, vanished: bool) -> None:
        """The upstream leg is lost to the hooks, which look for another: nothing goes to it any more."""
        self.upstream_lost = True
        self.upstream_vanished = vanished
        self.upstream = None

    def upstream_reconnected(self, transport: RelayTransport) -> Leg:
        """A new upstream leg is open: relay as before (the hooks send what was held first)."""
        self.reconnecting = False
        self.reconnects += 1
        self.upstream = transport = self.hooks.upstream_transport(transport)
        self.upstream_lost = self.upstream_vanished = False
        self.close_from_upstream = False
        self.budget_upstream = None
        self.keepalive.pong_from_upstream = True
        self.u2c = FrameScanner(masked=False, max_message_size=0, on_control=self._from_upstream,
                                deflate=self.deflate)
        take(transport, self.write_buffer)
        self.client.unregisterProducer()
        self.client.registerProducer(Reader(transport) if self.pushes is None else self.pushes.producer(transport),
                                     True)
        transport.registerProducer(self.hooks.client_reader(self.client), True)
        leg = self.upstream_leg = self.leg_for(transport)
        self.hooks.upstream_reconnected()
        return leg

    # -- pushes (pushes.py) ------------------------------------------------

    pushes: Pushes | None = None  # once the client has a channel to be pushed from
    pushes_waiting: deque[bytes] | None = None  # frames waiting for the end of an upstream message

    def _pushes(self) -> Pushes:
        if self.pushes is None:
            self.pushes = Pushes(self)
        return self.pushes

    @property
    def push(self) -> Callable[[bytes, bool], None]:
        """
        ``relay.push(payload, binary)``: a message from a channel this client
        is subscribed to, sent between the upstream's messages. The outbox
        keeps the method itself: no call in front of it per pushed message.
        """
        return self._pushes().push

    def attach_outbox(self, outbox: IPushProducer) -> None:
        """Let ``outbox`` (channels.outbox.Outbox) hear when the client's socket is full."""
        self._pushes().attach(outbox)

    def slow_consumer(self, code: int, reason: str) -> None:
        """The push queue overflowed (slow_consumer = close): as for a client that broke a rule."""
        self._pushes().slow_consumer(code, reason)

    # -- mirror (mirror.py) ------------------------------------------------

    mirror: Mirror | None = None  # copies of the client's frames go there; None once it is cut off or lost
    _mirrored: Mirror | None = None  # the one attached, also once cut off or lost

    def expect_mirror(self, write_buffer: int) -> Mirror | None:
        """
        Copy the client's frames for the route's mirror, whose leg is being
        opened (relay/start.py's MirrorLeg): held, up to ``write_buffer``
        bytes, until it opens (L{Mirror.opened}) or fails. None (and the
        caller drops the leg) when this connection is already over.
        """
        if self.done or self.closed_by is not None:
            return None
        self.mirror = self._mirrored = Mirror(self, write_buffer)
        return self.mirror

    def mirror_lost(self) -> None:
        self.mirror = None
        if self._mirrored is not None:
            self._mirrored.lost()

    @property
    def mirror_dropped(self) -> int:
        """Client messages the mirror did not get a copy of, once it was cut off."""
        return 0 if self._mirrored is None else self._mirrored.dropped

    def maybe_done(self) -> None:
        """Once both legs are gone the relay is done: its timers stop, its mirror goes, ``on_done`` is told."""
        self.hooks.maybe_done()
        if self.done or not (self.client_lost and self.upstream_lost):
            return
        self.done = True
        if self.reconnecting:
            self.hooks.stop_reconnecting()
        if self.mirror is not None:
            self.mirror.finish()
        self.keepalive.stop()
        self.closes.stop()
        if self._on_done is not None:
            self._on_done(self)
        self.let_go()

    def let_go(self) -> None:
        """
        Break the done relay's reference cycles (legs and scanners hold its
        methods; keepalive, closes and pushes the relay), so that reference
        counting frees the connection at once: left to the cycle collector, a
        churn of short connections piled up garbage between full collections
        (make soak's hostile scenario). Whoever still calls a done relay holds
        it, so the weak proxies are alive whenever they are used.
        """
        for part in (self.client_leg, self.upstream_leg, self.c2u, self.u2c):
            part.release()
        ended = cast(Any, weakref.proxy(self))
        for helper in (self.keepalive, self.closes, self.pushes):
            if helper is not None:
                helper.let_go(ended)
