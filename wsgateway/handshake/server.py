# -*- test-case-name: tests.integration.test_proxy -*-
"""
The client's leg: the Autobahn server protocol and factory, and nothing
more. The protocol hands the upgrade to the handshake chain (chain.py),
turns what it raises into an HTTP status, and once the 101 is out hands the
connection to its relay (relay/start.py) or, on a broadcast route, its
channel session (channels/sessions.py). The upstream leg is
``wsgateway.upstream.leg.UpstreamProtocol``; the live connections are
``wsgateway.connections.LiveConnections``'s.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgateway import codes
from wsgateway._compat import autobahn as _autobahn
from wsgateway.auth.identity import Identity
from wsgateway.channels.outbox import ChannelSession
from wsgateway.channels.sessions import start_channel
from wsgateway.config.routes import RouteConfig
from wsgateway.connections import LiveConnections
from wsgateway.handshake.chain import HandshakeChain
from wsgateway.handshake.pending import PendingHandshake
from wsgateway.handshake.refusals import autobahn_answer, refusal_for
from wsgateway.ids import random_hex
from wsgateway.relay.relay import Relay
from wsgateway.relay.start import MirrorLeg
from wsgateway.relay.transport import transport_of
from wsgateway.upstream.leg import UpstreamProtocol, adopt
from wsgateway.upstream.pool import Node, Upstream, UpstreamRequest

CONNECTING = WebSocketProtocol.STATE_CONNECTING


class GatewayServerProtocol(WebSocketServerProtocol):
    """The gateway as the client's WebSocket server."""

    # not ``log``: that name is Autobahn's own txaio logger, whose debug
    # calls are no-ops; a twisted Logger there would build every event.
    _log = Logger()
    # Autobahn's: a peer's protocol error (a broadcast client's bad frame) at debug, not warn
    log = _autobahn.PeerFaultLog(WebSocketServerProtocol.log)
    factory: GatewayServerFactory
    # the chain this connection's handshake began with: a reload during it changes nothing for it
    chain: HandshakeChain
    relay: Relay | None = None
    upstream_leg: UpstreamProtocol | None = None
    _head_done = False
    _early = b""
    gone = False  # the client's connection is lost
    # what failHandshake answers and logs: status, headers, reason token (codes.R_*), a fixed phrase or ""
    _deny: tuple[int, list[tuple[str, str]], str, str] | None = None
    # when the request head was read (the clock's seconds): the start of wsgateway_handshake_duration_seconds
    head_at: float | None = None
    _handshake: Deferred[Any] | None = None
    conn_id = ""
    route: RouteConfig | None = None
    node: Node | None = None
    upstream: Upstream[UpstreamProtocol] | None = None
    upstream_request: UpstreamRequest | None = None
    # the route's mirror leg, connecting alongside the primary's until the relay takes it
    mirror_leg: MirrorLeg | None = None
    trace_id = ""
    span: Any = None  # the connection's OpenTelemetry span, when tracing exports
    identity: Identity | None = None
    channel: str | None = None  # broadcast routes: the channel, once the handshake chose it
    channel_config: Any = None
    json_envelope = False  # the client chose the wsgateway.json subprotocol
    recover_from: tuple[int, str | None] | None = None  # ?since=&epoch=
    push_channels: tuple[str, ...] = ()
    session: ChannelSession | None = None
    close_code: int | None = None
    opened_at = 0.0
    # the client IP counted by the limiter until the relay takes over
    admitted_ip: str | None = None
    # until the request head is read: its timer, its place among the pending handshakes
    _pending: PendingHandshake | None = None
    # an at_least_once route with no node reachable: accepted, its messages queued
    degraded = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._pending = PendingHandshake(self, self.factory, self._log)
        self._pending.begin()

    def drop_pending(self) -> None:
        """Dropped as the oldest connection not upgraded yet (``max_pending_handshakes``)."""
        assert self._pending is not None  # held from connectionMade on
        self._pending.drop()

    def dataReceived(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:
            relay.client_data(data)
            return
        if self.session is not None:
            # a broadcast connection: Autobahn reads its frames
            self._dataReceived(data)
            return
        if self._head_done:
            # Frames sent before our 101 (pipelining) wait for the relay;
            # Autobahn must not parse them as another request.
            self._early += data
            if len(self._early) > self.factory.write_buffer:
                transport_of(self).pauseProducing()
            return
        if self.state == CONNECTING and len(self.data) + len(data) > codes.MAX_REQUEST_HEAD:
            head = self.data + data
            if head.find(b"\r\n\r\n", 0, codes.MAX_REQUEST_HEAD + 4) < 0:
                # Autobahn would buffer an endless header until the handshake timeout.
                self._deny = (codes.HEADERS_TOO_LARGE, [], codes.R_HEADERS_TOO_LARGE, "")
                self.failHandshake("request head too large", codes.HEADERS_TOO_LARGE)
                return
        self._dataReceived(data)

    def onConnect(self, request: ConnectionRequest) -> Any:
        self._head_done = True
        self.head_at = self.factory.clock.seconds()
        # The client has sent its whole request in time; from here the wait
        # is for the upstream, bounded by connect_timeout and retries.
        assert self._pending is not None  # held from connectionMade on
        self._pending.head_read()
        factory = self.factory
        chain = self.chain = factory.chain
        # A plain value when nothing async is needed: Autobahn takes either.
        try:
            answer = chain.begin(self, request, factory.secure)
        except Exception as e:
            raise self._refusal(e, None) from None
        if isinstance(answer, Deferred):
            self._handshake = answer
            answer.addErrback(self._refused)
            # the primary's connect has begun: the mirror's begins with it
            self._open_mirror()
        return answer

    def _open_mirror(self) -> None:
        route, request = self.route, self.upstream_request
        if self.mirror_leg is None and route is not None and route.mirror and request is not None:
            self.mirror_leg = self.chain.relays.open_mirror(route.mirror, request)

    def _refused(self, f: Failure) -> None:
        assert f.value is not None  # a Failure always carries its exception here
        raise self._refusal(f.value, f) from None

    def _refusal(self, e: BaseException, f: Failure | None) -> ConnectionDeny:
        """The ConnectionDeny for what the handshake raised; ``_deny`` keeps the status and headers for failHandshake."""
        r = refusal_for(e)
        if r.unexpected:
            self._log.failure("handshake of {conn_id} failed", f, conn_id=self.conn_id, trace_id=self.trace_id)
        # the refusal's line is written once, by failHandshake (LiveConnections.handshake_refused)
        self._deny = (r.status, r.headers, r.reason, r.why)
        return r.deny

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        if self._deny is not None:
            code, headers, token, why = self._deny
        else:
            code, headers, token, said = autobahn_answer(reason, code)
            # Autobahn's text can still carry request text it does not quote
            # (an exception's, a version): at debug, out of the info line
            self._log.debug("refused {peer}: {code} ({reason})", peer=self.peer, code=code, reason=said)
            why = ""
        self.factory.live.handshake_refused(self, code, token, why)
        # A refusal is an answer, not a failure: Autobahn would log each one
        # at warn level, quoting its reason, which can carry request text.
        self.wasClean = True
        self.sendHttpErrorResponse(code, codes.reason_phrase(code), headers + [("Content-Length", "0")])
        self.dropConnection(abort=False)

    def onOpen(self) -> None:
        self.factory.live.handshake_ended(self)
        self.factory.live.handshake_accepted(self)
        if self.channel is not None:
            if not self.gone:
                self.session = start_channel(self, self.factory.live)
                # frames that came with the request: Autobahn reads them right after onOpen
                self.data, self._early = self.data + self._early, b""
                transport_of(self).resumeProducing()
            return
        up = self.upstream_leg
        if self.gone or (up is None and not self.degraded):
            return
        early, self.data, self._early = self.data + self._early, b"", b""
        relays = self.chain.relays
        relay = relays.start(self, up)
        if up is not None:
            # (opened here when the handshake waited, on token keys, before the primary's connect began)
            self._open_mirror()
        mirror, self.mirror_leg = self.mirror_leg, None
        if mirror is not None:
            # before any client frame is relayed: the mirror gets copies from the first
            if up is None:
                mirror.cancel()
            else:
                mirror.attach(relay)
        if up is None:
            # degraded: the relay queues until it has an upstream leg of its own
            if not adopt(self, relay.client_leg):
                self.relay = relay
            if early:
                relay.client_data(early)
            return
        # From here the relay owns both connections; these handshake objects
        # are dropped (or, on an unknown transport, keep forwarding to it).
        if not adopt(self, relay.client_leg):
            self.relay = relay
            self._log.debug("client transport {t!r} kept its protocol", t=self.transport)
        else:
            # dropped: not kept alive until a full collection by the cycle
            # with its pending record (connectionLost, below, says more)
            self._pending = None
        if not up.lost and not adopt(up, relay.upstream_leg):
            up.sink = relay.upstream_leg
            self._log.debug("upstream transport {t!r} kept its protocol", t=up.transport)
        if up.lost:
            relay.upstream_connection_lost()
        else:
            pending = up.take_pending()
            if pending:
                relay.upstream_data(pending)
        if early:
            transport_of(self).resumeProducing()
            relay.client_data(early)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.gone = True
        if self.mirror_leg is not None:
            # no relay took the connection over
            self.mirror_leg.cancel()
            self.mirror_leg = None
        if self._pending is not None:
            self._pending.lost()
        live = self.factory.live
        live.handshake_ended(self)
        if self.admitted_ip is not None:
            # counted at the handshake, but no relay took the connection over
            live.limiter.release(self.admitted_ip)
            self.admitted_ip = None
        if self.relay is not None:
            self.relay.client_connection_lost()
        elif self.upstream_leg is not None:
            # the upstream leg opened but ours never did
            if self.upstream is not None and self.node is not None:
                self.upstream.release(self.node)
            if not self.upstream_leg.lost:
                transport_of(self.upstream_leg).loseConnection()
        elif self._handshake is not None:
            # still waiting (on the token keys or the upstream): stop; a no-op once it has answered
            self._handshake.cancel()
        if self.session is None and self.span is not None:
            # no relay took the connection over: its span ends here
            live.end_span(self, error="client left during the handshake")
        super().connectionLost(reason)
        if self.session is not None:
            # after Autobahn's onClose, which tells the close code
            self.session.ended()
            live.session_done(self, self.session)
            self.session = None
        # The reference cycles an ended connection would leave: its pending
        # record (and the logger it keeps, whose source is this protocol), and
        # Autobahn's is_open / is_closed Deferreds, fired with this protocol as
        # their result. Broken here, its memory goes at once instead of at a
        # rare full collection (make soak's hostile scenario: every half-open
        # connection left some twenty objects in such cycles).
        self._pending = None
        self.is_open = self.is_closed = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        # only broadcast connections get here: relayed ones never reach Autobahn
        if self.session is not None:
            self.session.message(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        # broadcast connections only: the code of whoever closed first
        self.close_code = self.localCloseCode if self.closedByMe else code


class GatewayServerFactory(WebSocketServerFactory):
    """
    Accepts clients on one listener. Holds the handshake chain new
    connections use (swapped by ``reconfigure`` on SIGHUP) and the live
    connections they join, shared by every listener.
    """

    # Twisted types ``protocol`` by a protocol whose ``factory`` is any Factory; ours
    # narrows it to GatewayServerFactory, which that bound cannot express
    protocol = GatewayServerProtocol  # type: ignore[assignment]
    # not ``log``: that name is Autobahn's own txaio logger, whose debug
    # calls are no-ops; a twisted Logger there would build every event.
    _log = Logger()
    noisy = False

    def __init__(
        self,
        chain: HandshakeChain,
        live: LiveConnections,
        *,
        reactor: Any,
        clock: IReactorTime,
        secure: bool = False,
    ) -> None:
        super().__init__(reactor=reactor, server=None)
        self.clock = clock
        self.secure = secure
        self.live = live
        self.reconfigure(chain)

    def reconfigure(self, chain: HandshakeChain) -> None:
        """
        What new connections use from here on (a SIGHUP reload). Open
        connections keep what they were given; a handshake in progress
        finishes with the chain it started with.
        """
        self.chain = chain
        limits = chain.limits
        self.handshake_timeout = limits.handshake_timeout
        self.max_pending = limits.max_pending_handshakes
        self.write_buffer = limits.write_buffer
        self.setProtocolOptions(
            versions=[13],
            webStatus=False,
            # compression declined on both legs: frames are relayed as they are
            perMessageCompressionAccept=lambda offers: None,
            # handshake_timeout is our own timer (see connectionMade); the
            # close handshake after the upgrade is the relay's
            openHandshakeTimeout=0,
            closeHandshakeTimeout=0,
            autoPingInterval=0,
            maxFramePayloadSize=limits.max_message_size,
            maxMessagePayloadSize=limits.max_message_size,
            maxConnections=0,
            trustXForwardedFor=0,
            # Origin is ours to judge (OriginPolicy): Autobahn would refuse
            # "null" itself, with a 400
            allowNullOrigin=True,
            requireMaskedClientFrames=True,
            tcpNoDelay=True,
        )
        _autobahn.preset_options(self)

    def buildProtocol(self, addr: Any) -> Any:
        # Any: Twisted types the result by a protocol whose ``factory`` is any
        # Factory, while ours narrows it to this class
        p: Any = super().buildProtocol(addr)
        p.conn_id = random_hex(6)
        return p
