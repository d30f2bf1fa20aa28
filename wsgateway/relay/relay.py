# -*- test-case-name: tests.test_relay -*-
"""
The frame relay: once both WebSocket legs are open, frames go from one
transport to the other as they arrive, headers checked, payloads untouched
(docs/protocol.md#forwarding-and-close-codes).

Each direction has a FrameScanner. The relay adds what needs time and both
legs at once: the close handshake passed through and bounded in time,
the gateway's own pings per hop, the idle timeout, the client's message
rate and token expiry, the gateway's own closes (1001, 1002, 1008, 1009,
1014) and backpressure, by making each transport the streaming producer of
the other.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from wsgateway import codes
from wsgateway.relay.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameScanner,
    encode_close,
    encode_frame,
    parse_close,
)
from wsgateway.ids import random_bytes
from wsgateway.handshake.admission import TokenBucket
from wsgateway.ops.logs import ConnLogger
from wsgateway._compat.sendnow import send_at_once

# Upstream closes after which on_upstream_close = reconnect finds another
# leg: going away, service restart, try again later (and 1006, a vanished one).
RECONNECT_CODES = frozenset({1001, 1012, 1013})

CLIENT = "client"
UPSTREAM = "upstream"
GATEWAY = "gateway"

# What the client scanner stops on when the message rate is exceeded: the
# same path as a too-big message (close to the client, 1001 upstream).
_RATE_LIMITED = (codes.POLICY_VIOLATION, codes.REASON_RATE_LIMIT)


def set_write_buffer(transport: Any, size: int) -> None:
    """
    Make ``size`` the high-water mark at which ``transport`` pauses its
    producer. TLS transports wrap the TCP one; the socket buffer that fills
    up is the innermost one's.
    """
    t = transport
    for _ in range(4):
        if t is None:
            return
        if hasattr(t, "bufferSize"):
            t.bufferSize = size
        t = getattr(t, "transport", None)


def _take(transport: Any, write_buffer: int) -> None:
    """Set up a transport the relay writes to: paused over ``write_buffer``, and sending at once (sendnow.py)."""
    set_write_buffer(transport, write_buffer)
    send_at_once(transport)


@implementer(IPushProducer)
class _Reader:
    """
    One transport as the streaming producer of the other: pause and resume
    reach it, but not stopProducing. Twisted calls that on a consumer's
    loss and it would drop the other leg at once; how each leg ends (a close
    frame first, 1001 or 1014) is the relay's decision.
    """

    __slots__ = ("_transport",)

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


@implementer(IPushProducer)
class _Both:
    """The client transport's producer when pushes share it: the upstream's reader and the push outbox."""

    __slots__ = ("_reader", "_outbox")

    def __init__(self, reader: _Reader, outbox: Any) -> None:
        self._reader = reader
        self._outbox = outbox

    def pauseProducing(self) -> None:
        self._reader.pauseProducing()
        self._outbox.pauseProducing()

    def resumeProducing(self) -> None:
        self._reader.resumeProducing()
        self._outbox.resumeProducing()

    def stopProducing(self) -> None:
        pass


class Leg(Protocol):
    """
    What a transport talks to once the relay owns it: the Autobahn protocol
    that did the handshake is let go (its per-connection state is most of a
    proxied connection's memory), and each read goes to the relay with no
    layer in between.
    """

    def __init__(self, data: Callable[[bytes], None], lost: Callable[[], None]) -> None:
        self.dataReceived = data  # type: ignore[method-assign]
        self._lost = lost

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost()


@implementer(IPushProducer)
class _Overflow:
    """Registered with a transport only to hear when its write buffer overflows."""

    __slots__ = ("_on_pause",)

    def __init__(self, on_pause: Callable[[], None]) -> None:
        self._on_pause = on_pause

    def pauseProducing(self) -> None:
        self._on_pause()

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass



def lose(transport: Any) -> None:
    """
    loseConnection, after unregistering the other leg as its producer: a TLS
    transport (Twisted's TLSMemoryBIOProtocol) does not send its close_notify
    while a producer is registered, so a wss:// client would wait for our
    close until the close timer aborted the connection.
    """
    transport.unregisterProducer()
    transport.loseConnection()

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
        client: ITransport,
        upstream: Any,  # None only for a DurableRelay with no leg yet
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
    ) -> None:
        """
        ``messages_per_second`` (0 = off) limits client messages with a token
        bucket of twice that burst (docs/configuration.md ``[limits]``); ``close_at`` is a time
        on ``clock`` (a token's ``exp``) at which the connection is closed
        with 1008 "token expired". ``log_fields`` (conn_id, trace_id...) go
        into every line this relay logs.
        """
        if log_fields is not None:
            self.log = ConnLogger(Relay.log, log_fields)  # type: ignore[assignment]
        self.client = client
        self.upstream = upstream
        self._clock = clock
        self._on_done = on_done
        # client -> upstream frames must be masked; the limit protects the
        # upstream and the gateway from clients, not the other way round.
        self.c2u = FrameScanner(
            masked=True,
            max_message_size=max_message_size,
            on_control=self._from_client,
            on_message=_rate_limiter(messages_per_second, clock),
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
        self._close_timeout = close_timeout
        self._close_call: IDelayedCall | None = None
        self._ping_payload = b"wsgw" + random_bytes(4)
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._ping_call: IDelayedCall | None = None
        self._pong_call: IDelayedCall | None = None
        self._pong_from_client = True
        self._pong_from_upstream = True
        self._idle_timeout = idle_timeout
        self._idle_call: IDelayedCall | None = None
        self.started = self._last_activity = clock.seconds()
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

        # on_upstream_close = reconnect: while a new upstream leg is being
        # opened, client frames are held (up to reconnect_buffer bytes).
        self._reconnect = reconnect
        self._reconnect_buffer = reconnect_buffer
        self._reconnect_d: Deferred[None] | None = None
        self.reconnecting = False
        self.reconnects = 0
        self._held: list[bytes] = []
        self._held_size = 0
        self._write_buffer = write_buffer

        self.client_leg = Leg(self.client_data, self.client_connection_lost)
        self.upstream_leg = self.leg_for(upstream)
        _take(client, write_buffer)
        if upstream is not None:  # None: a durable relay that starts with no upstream leg
            _take(upstream, write_buffer)
            # Backpressure: a transport whose write buffer is over the mark
            # pauses the other one, which stops reading from its socket.
            client.registerProducer(_Reader(upstream), True)
            upstream.registerProducer(self._client_reader(), True)
        if ping_interval > 0:
            self._ping_call = clock.callLater(ping_interval, self._ping)
        if idle_timeout > 0:
            self._idle_call = clock.callLater(idle_timeout, self._check_idle)

    # -- data path -------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        self.bytes_c2u += len(data)
        c2u = self.c2u
        active = c2u.in_frame
        frames = c2u.data_frames
        budget = self._budget_upstream
        out = c2u.feed(data)
        if active or c2u.data_frames != frames:
            self._last_activity = self._clock.seconds()
        if self.reconnecting:
            if out:
                self._hold(out)
        elif out and not self.upstream_lost:
            if budget is None:
                self.upstream.write(out)
            elif budget:
                self._owed_to_upstream(out, budget)
        if budget is None and self.closed_to_upstream and self._budget_upstream is None:
            # a close from the client went through in this read: nothing after it
            self._budget_upstream = 0
        if self.mirror is not None:
            self._copy(out)
        if c2u.error is not None:
            self._client_violation(*c2u.error)

    def upstream_data(self, data: bytes) -> None:
        self.bytes_u2c += len(data)
        u2c = self.u2c
        active = u2c.in_frame
        frames = u2c.data_frames
        budget = self._budget_client
        out = u2c.feed(data)
        if active or u2c.data_frames != frames:
            self._last_activity = self._clock.seconds()
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
            if payload == self._ping_payload:
                self._pong_from_client = True
                return False
            return True
        if opcode == OP_CLOSE:
            self.close_from_client = True
            self._note_close(CLIENT, payload)
            if self.reconnecting:
                # nobody upstream to pass it to: answer it ourselves
                self._stop_reconnecting()
                code, reason = parse_close(payload)
                self._close_client(code or codes.NORMAL, reason)
            if self.closed_to_client:
                # the client's answer to a close sent to it: the client half is done
                self._clock.callLater(0, self._finish_client)
            if self.closed_to_upstream or self.upstream_lost:
                return False
            self.closed_to_upstream = True
            self._start_close_timer()
            return True
        # pings pass through: the upstream answers them itself
        return True

    def _from_upstream(self, opcode: int, payload: bytes) -> bool:
        if opcode == OP_PONG:
            if payload == self._ping_payload:
                self._pong_from_upstream = True
                return False
            return True
        if opcode == OP_CLOSE:
            code, _ = parse_close(payload)
            if code in RECONNECT_CODES and self._can_reconnect():
                # the upstream is going away (restart, overload): complete its
                # close handshake and find another leg; the client sees nothing
                self.upstream.write(encode_close(code, "", mask=True))
                lose(self.upstream)
                self._start_reconnect(vanished=False)
                return False
            self.close_from_upstream = True
            self._note_close(UPSTREAM, payload)
            if self.closed_to_client or self.client_lost:
                return False
            self.closed_to_client = True
            self._start_close_timer()
            if self.close_from_client:
                # our forwarding of this close completes the client's handshake
                self._clock.callLater(0, self._finish_client)
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
            self._stop_reconnecting()
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
        if self.closed_to_upstream or self.upstream_lost:
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

    def _client_reader(self) -> Any:
        """The client transport as the upstream's producer."""
        return _Reader(self.client)

    def _client_producer(self, upstream: Any) -> Any:
        reader = _Reader(upstream)
        return reader if self._outbox is None else _Both(reader, self._outbox)

    def slow_consumer(self, code: int, reason: str) -> None:
        """The push queue overflowed (slow_consumer = close): as for a client that broke a rule."""
        if not self.done and self.closed_by is None:
            self._client_violation(code, reason)

    def _client_violation(self, code: int, reason: str) -> None:
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
            self._stop_reconnecting()
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
        self.client_lost = True
        if self.closed_by is None:
            self.closed_by = CLIENT
            self.close_code = 1006
        if not self.closed_to_upstream and not self.upstream_lost:
            self._close_upstream(codes.GOING_AWAY, "client gone")
        if not self.upstream_lost:
            # FIN right after the close frame: nobody is left to wait for
            self._lose_upstream()
        self._maybe_done()

    def upstream_connection_lost(self) -> None:
        if self.upstream_lost:
            return
        vanished = not self.close_from_upstream and not self.closed_to_upstream
        if vanished and self._can_reconnect():
            self._start_reconnect(vanished=True)
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
            self._finish_client()
        self._maybe_done()

    def _finish_client(self) -> None:
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

    # -- reconnect ---------------------------------------------------------

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

    def _can_reconnect(self) -> bool:
        # Only between messages both ways: a message half-relayed from the
        # old upstream cannot be finished by a new one, nor one half-sent to it.
        return (
            self._reconnect is not None
            and not self.reconnecting
            and self.closed_by is None
            and not (self.client_lost or self.closed_to_client or self.closed_to_upstream)
            and not (self.u2c.in_frame or self.u2c.in_message or self.c2u.in_frame or self.c2u.in_message)
        )

    def _start_reconnect(self, *, vanished: bool) -> None:
        assert self._reconnect is not None
        self.log.info("upstream gone ({how}): reconnecting", how="vanished" if vanished else "going away")
        self.reconnecting = True
        self.upstream_lost = True  # nothing goes to the old leg any more
        self.upstream_vanished = vanished
        self.upstream = None
        # the old leg may have paused the client; the hold buffer has its own bound
        self.client.resumeProducing()
        self._reconnect_d = d = self._reconnect(self)
        d.addErrback(self._reconnect_failed)

    def upstream_reconnected(self, transport: Any) -> Leg:
        """A new upstream leg is open: send what was held, relay as before."""
        self._reconnect_d = None
        self.reconnecting = False
        self.reconnects += 1
        self.upstream = transport
        self.upstream_lost = self.upstream_vanished = False
        self.close_from_upstream = False
        self._budget_upstream = None
        self._pong_from_upstream = True
        self.u2c = FrameScanner(masked=False, max_message_size=0, on_control=self._from_upstream)
        _take(transport, self._write_buffer)
        self.client.unregisterProducer()
        self.client.registerProducer(self._client_producer(transport), True)
        transport.registerProducer(self._client_reader(), True)
        held, self._held, self._held_size = b"".join(self._held), [], 0
        if held:
            transport.write(held)
        leg = self.upstream_leg = self.leg_for(transport)
        return leg

    def _hold(self, out: bytes) -> None:
        self._held.append(out)
        self._held_size += len(out)
        if self._held_size > self._reconnect_buffer:
            self.log.info("reconnect buffer full: giving up on the upstream")
            self._stop_reconnecting()
            self._give_up()

    def _reconnect_failed(self, f: Failure) -> None:
        if not self.reconnecting:
            return None  # cancelled: the client went away or closed first
        self.log.info("reconnect failed: {error}", error=f.getErrorMessage())
        self._reconnect_d = None
        self.reconnecting = False
        self._held, self._held_size = [], 0
        self._give_up()
        return None

    def _give_up(self) -> None:
        if self.closed_by is None:
            self.closed_by = UPSTREAM
            self.close_code = codes.BAD_GATEWAY
            self.close_reason = "upstream lost"
        self._close_client(codes.BAD_GATEWAY, "upstream lost")
        self._maybe_done()

    def _stop_reconnecting(self) -> None:
        self.reconnecting = False
        self._held, self._held_size = [], 0
        d, self._reconnect_d = self._reconnect_d, None
        if d is not None:
            d.cancel()

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
        _take(transport, write_buffer)
        # Its buffer over the mark means the mirror is too slow: cut it off
        # rather than hold copies or slow the client (never a backpressure source).
        transport.registerProducer(_Overflow(self._mirror_overflow), True)
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
        if self.done or not (self.client_lost and self.upstream_lost):
            return
        self.done = True
        if self.reconnecting:
            self._stop_reconnecting()
        if self.mirror is not None:
            # it had the client's close too, if there was one; no waiting for it
            lose(self.mirror)
        for name in ("_close_call", "_ping_call", "_pong_call", "_idle_call", "_expiry_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        if self._on_done is not None:
            self._on_done(self)

    # -- keepalive and idle ----------------------------------------------

    def _ping(self) -> None:
        self._ping_call = None
        if self.done or self.closed_by is not None:
            return
        self._pong_from_client = self._pong_from_upstream = False
        out = self.u2c.inject(encode_frame(OP_PING, self._ping_payload, mask=False))
        if out:
            self.client.write(out)
        if not self.upstream_lost:
            out = self.c2u.inject(encode_frame(OP_PING, self._ping_payload, mask=True))
            if out:
                self.upstream.write(out)
        else:
            self._pong_from_upstream = True
        self._pong_call = self._clock.callLater(self._ping_timeout, self._check_pongs)

    def _check_pongs(self) -> None:
        self._pong_call = None
        if self.done:
            return
        # A peer is only judged once our ping has really gone out (it waits
        # behind a data frame in flight) and it could answer (a peer in the
        # middle of sending a frame cannot put a pong in it): a slow but
        # working peer moving a large message is not a dead one.
        waiting = False
        if not self._pong_from_client and not self.client_lost:
            if self.u2c.in_frame or self.c2u.in_frame:
                waiting = True
            else:
                self.log.info("client did not answer a ping in time: dropping it")
                self.client.abortConnection()
        if not self._pong_from_upstream and not self.upstream_lost:
            if self.c2u.in_frame or self.u2c.in_frame:
                waiting = True
            else:
                self.log.warn("upstream did not answer a ping in time: dropping it")
                self.upstream.abortConnection()
        if waiting:
            self._pong_call = self._clock.callLater(self._ping_timeout, self._check_pongs)
            return
        if self.closed_by is None:
            self._ping_call = self._clock.callLater(
                max(self._ping_interval - self._ping_timeout, 0.001), self._ping
            )

    def _check_idle(self) -> None:
        self._idle_call = None
        if self.done or self.closed_by is not None:
            return
        left = self._last_activity + self._idle_timeout - self._clock.seconds()
        if left <= 0:
            self.close(codes.GOING_AWAY, "idle timeout")
            return
        self._idle_call = self._clock.callLater(left, self._check_idle)


def _rate_limiter(
    messages_per_second: float, clock: IReactorTime
) -> Callable[[], tuple[int, str] | None] | None:
    """
    The client scanner's per-message check: None (no check at all) when the
    limit is off, else a closure over a fresh bucket, so the hot path does
    no attribute lookups and allocates nothing.
    """
    if messages_per_second <= 0:
        return None
    seconds = clock.seconds
    # burst = 2x rate (docs/configuration.md); at least one message, or a rate under 0.5/s
    # would refuse every message
    take = TokenBucket(messages_per_second, max(2.0 * messages_per_second, 1.0), seconds()).take

    def admit() -> tuple[int, str] | None:
        return None if take(seconds()) else _RATE_LIMITED

    return admit
