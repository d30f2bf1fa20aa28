# -*- test-case-name: tests.test_relay -*-
"""
The frame relay: once both WebSocket legs are open, frames go from one
transport to the other as they arrive, headers checked, payloads untouched
(docs/protocol.md#forwarding-and-close-codes).

Each direction has a FrameScanner. The relay adds what needs time and both
legs at once: the close handshake passed through and bounded in time,
the gateway's own pings per hop and the idle timeout (keepalive.py), the
client's message rate (ratelimit.py) and token expiry, the gateway's own
closes (1001, 1002, 1008, 1009, 1014) and backpressure, by making each
transport the streaming producer of the other (transport.py). What happens
when the upstream leg is lost is its hooks' decision (interfaces.RelayHooks):
1014 by default, a new leg (reconnect.py) or the durable queue
(wsgateway.durable.relay).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from wsgateway import codes
from wsgateway.interfaces import RelayHooks, RelayTransport
from wsgateway.ops.logs import ConnLogger
from wsgateway.relay.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PONG,
    OP_TEXT,
    FrameScanner,
    encode_close,
    encode_frame,
    parse_close,
)
from wsgateway.relay.hooks import NO_HOOKS
from wsgateway.relay.keepalive import Keepalive
from wsgateway.relay.ratelimit import rate_limiter
from wsgateway.relay.reconnect import RECONNECT_CODES, Reconnect
from wsgateway.relay.transport import (
    Both,
    Leg,
    Overflow,
    Reader,
    lose,
    set_write_buffer,
    take,
)

__all__ = ["CLIENT", "GATEWAY", "RECONNECT_CODES", "UPSTREAM", "Leg", "Relay", "lose", "set_write_buffer"]

CLIENT = "client"
UPSTREAM = "upstream"
GATEWAY = "gateway"


class Relay:
    """
    One proxied connection after both handshakes.

    ``client`` and ``upstream`` are transports. Frames the gateway originates
    go through the scanner whose output feeds that peer (``inject``), so they
    land between frames, never inside one.
    """

    log = Logger()

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
    ) -> None:
        """
        ``messages_per_second`` (0 = off) limits client messages with a token
        bucket of twice that burst (docs/configuration.md ``[limits]``); ``close_at`` is a time
        on ``clock`` (a token's ``exp``) at which the connection is closed
        with 1008 "token expired". ``log_fields`` (conn_id, trace_id...) go
        into every line this relay logs. ``hooks`` decide what an upstream
        loss does; without them, ``reconnect`` (and ``reconnect_buffer``)
        makes them L{Reconnect}'s.
        """
        if log_fields is not None:
            self.log = ConnLogger(Relay.log, log_fields)  # type: ignore[assignment]
        if hooks is None:
            hooks = NO_HOOKS if reconnect is None else Reconnect(reconnect, reconnect_buffer)
        self.hooks = hooks
        hooks.attach(self)
        self.client = client
        # a RelayTransport; None while no upstream leg is open (reconnecting, or hooks that start without one)
        self.upstream: Any = upstream if upstream is None else hooks.upstream_transport(upstream)
        self._clock = clock
        self._on_done = on_done
        # client -> upstream frames must be masked; the limit protects the
        # upstream and the gateway from clients, not the other way round.
        self.c2u = FrameScanner(
            masked=True,
            max_message_size=max_message_size,
            on_control=self._from_client,
            on_message=rate_limiter(messages_per_second, clock),
        )
        self.u2c = FrameScanner(masked=False, max_message_size=0, on_control=self._from_upstream)
        self.bytes_c2u = 0
        self.bytes_u2c = 0
        # close handshake state, one flag per half
        self.closed_to_client = False
        self.closed_to_upstream = False
        # Once a close is committed towards a peer, only this many more bytes
        # go to it (the rest of a frame in flight and the close itself); None
        # while the stream is open.
        self._budget_client: int | None = None
        self._budget_upstream: int | None = None
        self._lose_client_after = False
        self._lose_upstream_after = False
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
        self._close_timeout = close_timeout
        self._close_call: IDelayedCall | None = None
        self.keepalive = Keepalive(self, clock, ping_interval=ping_interval, ping_timeout=ping_timeout,
                                   idle_timeout=idle_timeout)
        self.started = self.last_activity = clock.seconds()
        self._expiry_call: IDelayedCall | None = None
        if close_at is not None:
            # already past: closed on the next turn, once the caller has
            # finished wiring this relay up
            self._expiry_call = clock.callLater(max(close_at - self.started, 0.0), self._expired)

        # A mirror gets a copy of the client's frames from a message boundary
        # on; it is never a consumer of the client (it must not slow it down).
        self.mirror: Any = None
        self._mirror_ready = False
        self._mirror_done: Callable[[], None] | None = None
        self.mirror_dropped_at: int | None = None  # client message count when a slow mirror was cut off
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
        budget = self._budget_upstream
        out = c2u.feed(data)
        if active or c2u.data_frames != frames:
            self.last_activity = self._clock.seconds()
        if self.holding:
            if out:
                self.hooks.hold(out)
        elif out and not self.upstream_lost:
            if budget is None:
                self.upstream.write(out)
            elif budget:
                self._owed_to_upstream(out, budget)
        if budget is None and self.closed_to_upstream and self._budget_upstream is None:
            # a close from the client went through in this read: nothing after it
            self._budget_upstream = 0
        if self.mirror is not None and (self.hooks.mirrors_held or not self.holding):
            self._copy(out)
        if c2u.error is not None:
            self.client_violation(*c2u.error)

    def upstream_data(self, data: bytes) -> None:
        self.bytes_u2c += len(data)
        u2c = self.u2c
        active = u2c.in_frame
        frames = u2c.data_frames
        budget = self._budget_client
        out = u2c.feed(data)
        if active or u2c.data_frames != frames:
            self.last_activity = self._clock.seconds()
        if out and not self.client_lost:
            if budget is None:
                self.client.write(out)
            elif budget:
                self._owed_to_client(out, budget)
        if budget is None and self.closed_to_client and self._budget_client is None:
            self._budget_client = 0
        if u2c.error is not None:
            self._upstream_violation(*u2c.error)
        elif self._pushes:
            self._flush_pushes()

    def _owed_to_client(self, out: bytes, budget: int) -> None:
        chunk = out if len(out) <= budget else out[:budget]
        self.client.write(chunk)
        self._budget_client = budget - len(chunk)
        if self._budget_client == 0 and self._lose_client_after:
            lose(self.client)

    def _owed_to_upstream(self, out: bytes, budget: int) -> None:
        chunk = out if len(out) <= budget else out[:budget]
        self.upstream.write(chunk)
        self._budget_upstream = budget - len(chunk)
        if self._budget_upstream == 0 and self._lose_upstream_after:
            lose(self.upstream)

    @property
    def messages_c2u(self) -> int:
        return self.c2u.messages

    @property
    def messages_u2c(self) -> int:
        return self.u2c.messages + self.messages_pushed

    # -- control frames --------------------------------------------------

    def _from_client(self, opcode: int, payload: bytes) -> bool:
        if opcode == OP_PONG:
            if payload == self.keepalive.payload:
                self.keepalive.pong_from_client = True
                return False
            return True
        if opcode == OP_CLOSE:
            self.close_from_client = True
            self._note_close(CLIENT, payload)
            if self.holding:
                # nobody upstream to pass it to: answer it ourselves (and end a leg that delivers held frames)
                self.hooks.stop_reconnecting()
                self._close_upstream(codes.GOING_AWAY, "client gone")
                code, reason = parse_close(payload)
                self._close_client(code or codes.NORMAL, reason)
            if self.closed_to_client:
                # the client's answer to a close sent to it: the client half is done
                self._clock.callLater(0, self.finish_client)
            if self.closed_to_upstream or self.upstream_lost:
                return False
            self.closed_to_upstream = True
            self._start_close_timer()
            return True
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
            self.close_from_upstream = True
            self._note_close(UPSTREAM, payload)
            if self.closed_to_client or self.client_lost:
                return False
            self.closed_to_client = True
            self._start_close_timer()
            if self.close_from_client:
                # our forwarding of this close completes the client's handshake
                self._clock.callLater(0, self.finish_client)
            return True
        return True

    def _note_close(self, who: str, payload: bytes) -> None:
        if self.closed_by is None:
            self.closed_by = who
            code, reason = parse_close(payload)
            self.close_code = code if code is not None else 1005
            self.close_reason = reason

    # -- the gateway's own closes ----------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Close both legs with the same code, e.g. 1001 on shutdown or idle."""
        if self.closed_by is None:
            self.closed_by = GATEWAY
            self.close_code = code
            self.close_reason = reason
        self._close_client(code, reason)
        self._close_upstream(code, reason)

    def drain(self, code: int = codes.GOING_AWAY, reason: str = "server shutting down") -> None:
        """
        The shutdown close (docs/operations.md#signals-and-lifecycle): 1001 to the client only. Its
        frames keep flowing upstream until its close answer, which is passed
        on upstream behind them: nothing the client sent before it saw our
        close is lost (``close`` would shut the upstream at once, dropping
        what is still on the wire from the client). The client's answer ends
        both legs as for a close it began; one that never answers is cut off
        by the close timer, and the upstream then gets 1001 all the same.
        """
        if self.done or self.closed_by is not None:
            return  # already closing, for its own reasons
        self.closed_by = GATEWAY
        self.close_code = code
        self.close_reason = reason
        if self.reconnecting:
            # no upstream to pass anything to: what is held cannot be delivered
            self.hooks.stop_reconnecting()
        self._close_client(code, reason)

    def _close_client(self, code: int, reason: str) -> None:
        if self.closed_to_client or self.client_lost:
            return
        self.closed_to_client = True
        if self.u2c.in_frame and self.upstream_lost:
            # the frame being streamed to the client can never be completed
            self.client.abortConnection()
            return
        out = self.u2c.inject(encode_close(code, reason, mask=False))
        if out:
            self.client.write(out)
            self._budget_client = 0
        else:
            # the close waits behind a frame still streaming to the client
            self._budget_client = self.u2c.owed
        self._start_close_timer()

    def _close_upstream(self, code: int, reason: str) -> None:
        if self.hooks.closing_upstream() or self.closed_to_upstream or self.upstream_lost:
            return
        self.closed_to_upstream = True
        if self.c2u.in_frame and self.client_lost:
            self.upstream.abortConnection()
            return
        out = self.c2u.inject(encode_close(code, reason, mask=True))
        if out:
            self.upstream.write(out)
            self._budget_upstream = 0
        else:
            self._budget_upstream = self.c2u.owed
        self._start_close_timer()

    # -- pushes (a proxy route's ``subscribe`` channels) ---------------------

    _pushes: deque[bytes] | None = None  # frames waiting for the end of an upstream message
    messages_pushed = 0

    def push(self, payload: bytes, binary: bool) -> None:
        """
        A message from a channel this client is subscribed to. It goes out
        between the upstream's messages, never inside one: a data frame may
        not interleave with another message's fragments (RFC 6455 5.4).
        """
        if self.done or self.closed_to_client or self.client_lost:
            return
        self.messages_pushed += 1
        frame = encode_frame(OP_BINARY if binary else OP_TEXT, payload, mask=False)
        u2c = self.u2c
        if self._pushes or u2c.in_frame or u2c.in_message:
            if self._pushes is None:
                self._pushes = deque()
            self._pushes.append(frame)
            return
        out = u2c.inject(frame)
        if out:
            self.client.write(out)

    def _flush_pushes(self) -> None:
        pushes = self._pushes
        u2c = self.u2c
        while pushes and not (u2c.in_frame or u2c.in_message) and not self.closed_to_client:
            out = u2c.inject(pushes.popleft())
            if out:
                self.client.write(out)

    _outbox: Any = None

    def attach_outbox(self, outbox: Any) -> None:
        """Let ``outbox`` (broadcast.Outbox) hear when the client's socket is full."""
        self._outbox = outbox
        self.client.unregisterProducer()
        self.client.registerProducer(self._client_producer(self.upstream), True)

    def _client_producer(self, upstream: Any) -> Any:
        reader = Reader(upstream)
        return reader if self._outbox is None else Both(reader, self._outbox)

    def slow_consumer(self, code: int, reason: str) -> None:
        """The push queue overflowed (slow_consumer = close): as for a client that broke a rule."""
        if not self.done and self.closed_by is None:
            self.client_violation(code, reason)

    def client_violation(self, code: int, reason: str) -> None:
        self.log.info("closing client: {code} {reason}", code=code, reason=reason)
        if self.closed_by is None:
            self.closed_by = GATEWAY
            self.close_code = code
            self.close_reason = reason
        self._close_client(code, reason)
        # The client's stream is unusable now: fail it (RFC 6455 7.1.7) once
        # the close frame is out, rather than wait for an answer.
        self._lose_client()
        self._close_upstream(codes.GOING_AWAY, "client closed")

    def _expired(self) -> None:
        """
        The client's token has expired (docs/protocol.md#forwarding-and-close-codes): 1008 to the client,
        1001 upstream as when the gateway closes a client for a violation.
        Unlike a violation the client's stream is sound, so its close
        handshake is completed (bounded by close_timeout).
        """
        self._expiry_call = None
        if self.done or self.closed_by is not None:
            return
        self.log.info("token expired: closing the connection")
        self.closed_by = GATEWAY
        self.close_code = codes.POLICY_VIOLATION
        self.close_reason = codes.REASON_TOKEN_EXPIRED
        if self.reconnecting:
            # no new upstream for a client that is not allowed in any more
            self.hooks.stop_reconnecting()
        self._close_client(codes.POLICY_VIOLATION, codes.REASON_TOKEN_EXPIRED)
        self._close_upstream(codes.GOING_AWAY, "client closed")

    def _upstream_violation(self, code: int, reason: str) -> None:
        self.log.warn("upstream broke the protocol: {code} {reason}", code=code, reason=reason)
        if self.closed_by is None:
            self.closed_by = GATEWAY
            self.close_code = codes.BAD_GATEWAY
            self.close_reason = "bad gateway"
        self._close_upstream(code, reason)
        self._lose_upstream()
        self._close_client(codes.BAD_GATEWAY, "bad gateway")

    # -- transport loss --------------------------------------------------

    def client_connection_lost(self) -> None:
        if self.client_lost:
            return
        waits = self.hooks.awaits_upstream_close()
        self.client_lost = True
        if self.closed_by is None:
            self.closed_by = CLIENT
            self.close_code = 1006
        if not self.closed_to_upstream and not self.upstream_lost:
            self._close_upstream(codes.GOING_AWAY, "client gone")
        if not self.upstream_lost and not waits:
            # FIN right after the close frame: nobody is left to wait for
            self._lose_upstream()
        self._maybe_done()

    def upstream_connection_lost(self) -> None:
        if self.upstream_lost:
            return
        vanished = not self.close_from_upstream and not self.closed_to_upstream
        if self.hooks.upstream_connection_lost(vanished):
            return
        self.upstream_lost = True
        self.upstream_vanished = vanished
        if not self.close_from_upstream:
            # no close frame from the upstream: it vanished (1006)
            if self.closed_by is None:
                self.closed_by = UPSTREAM
                self.close_code = codes.BAD_GATEWAY
                self.close_reason = "upstream lost"
            self._close_client(codes.BAD_GATEWAY, "upstream lost")
        if self.closed_to_client and self.close_from_client:
            self.finish_client()
        self._maybe_done()

    def finish_client(self) -> None:
        # both halves of the client's close handshake are done; the server
        # side (us) closes the TCP connection first (RFC 6455 7.1.1)
        self._lose_client()

    def _lose_client(self) -> None:
        """loseConnection once what is owed to the client (its close) is written."""
        if self.client_lost:
            return
        if self._budget_client:
            self._lose_client_after = True
        else:
            lose(self.client)

    def _lose_upstream(self) -> None:
        if self.upstream_lost:
            return
        if self._budget_upstream:
            self._lose_upstream_after = True
        else:
            lose(self.upstream)

    def _start_close_timer(self) -> None:
        if self._close_call is None and self._close_timeout > 0:
            self._close_call = self._clock.callLater(self._close_timeout, self._close_expired)

    def _close_expired(self) -> None:
        self._close_call = None
        if not self.client_lost:
            self.client.abortConnection()
        if self.upstream_lost:
            return
        if not (self.closed_to_upstream or self.close_from_upstream or self.c2u.in_frame):
            # a client that never answered drain()'s close: the upstream,
            # which has had no close yet, gets one rather than a dropped TCP
            self._close_upstream(codes.GOING_AWAY, "client gone")
            lose(self.upstream)
        else:
            self.upstream.abortConnection()

    # -- upstream legs ----------------------------------------------------

    def leg_for(self, transport: Any) -> Leg:
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
        self._budget_upstream = None
        self.keepalive.pong_from_upstream = True
        self.u2c = FrameScanner(masked=False, max_message_size=0, on_control=self._from_upstream)
        take(transport, self.write_buffer)
        self.client.unregisterProducer()
        self.client.registerProducer(self._client_producer(transport), True)
        transport.registerProducer(self.hooks.client_reader(self.client), True)
        leg = self.upstream_leg = self.leg_for(transport)
        self.hooks.upstream_reconnected()
        return leg

    def give_up(self) -> None:
        if self.closed_by is None:
            self.closed_by = UPSTREAM
            self.close_code = codes.BAD_GATEWAY
            self.close_reason = "upstream lost"
        self._close_client(codes.BAD_GATEWAY, "upstream lost")
        self._maybe_done()

    # -- mirror ------------------------------------------------------------

    def attach_mirror(self, transport: Any, write_buffer: int, on_done: Callable[[], None]) -> bool:
        """
        Start copying client frames to ``transport`` (an open upstream leg of
        the route's mirror). Returns False (and the caller closes it) when
        this connection is already closing.
        """
        if self.done or self.closed_by is not None:
            return False
        self.mirror = transport
        self._mirror_done = on_done
        self._mirror_ready = not (self.c2u.in_frame or self.c2u.in_message)
        take(transport, write_buffer)
        # Its buffer over the mark means the mirror is too slow: cut it off
        # rather than hold copies or slow the client (never a backpressure source).
        transport.registerProducer(Overflow(self._mirror_overflow), True)
        return True

    def _copy(self, out: bytes) -> None:
        if self._mirror_ready:
            if out:
                self.mirror.write(out)
        elif not (self.c2u.in_frame or self.c2u.in_message):
            # the next read starts a new message: copies can begin there
            self._mirror_ready = True

    def _mirror_overflow(self) -> None:
        if self.mirror is None:
            return
        self.mirror_dropped_at = self.c2u.messages
        self.log.info("mirror too slow: no more copies for this connection")
        mirror, self.mirror = self.mirror, None
        mirror.abortConnection()

    def mirror_lost(self) -> None:
        self.mirror = None
        done, self._mirror_done = self._mirror_done, None
        if done is not None:
            done()

    @property
    def mirror_dropped(self) -> int:
        """Client messages the mirror did not get a copy of, once it was cut off."""
        return 0 if self.mirror_dropped_at is None else self.c2u.messages - self.mirror_dropped_at

    def _maybe_done(self) -> None:
        self.hooks.maybe_done()
        if self.done or not (self.client_lost and self.upstream_lost):
            return
        self.done = True
        if self.reconnecting:
            self.hooks.stop_reconnecting()
        if self.mirror is not None:
            # it had the client's close too, if there was one; no waiting for it
            lose(self.mirror)
        self.keepalive.stop()
        for name in ("_close_call", "_expiry_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        if self._on_done is not None:
            self._on_done(self)
