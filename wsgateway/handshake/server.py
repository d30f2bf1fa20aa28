# -*- test-case-name: tests.test_proxy -*-
"""
The two Autobahn legs of a proxied connection and what joins them.

Autobahn does both opening handshakes: ``GatewayServerProtocol`` faces the
client, ``UpstreamProtocol`` (upstreamleg.py) the backend. The upstream is
connected from inside the client's ``onConnect`` (a Deferred), so the client gets the
upstream's subprotocol and its refusal as an HTTP status. Once both legs are
open, ``dataReceived`` of each goes straight to the frame relay and Autobahn
no longer looks at the bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgateway._compat import autobahn as _autobahn
from wsgateway import codes
from wsgateway.ops import logs
from wsgateway.auth.credentials import check_roles, claim_headers
from wsgateway.auth.identity import AuthFailed, Identity
from wsgateway.auth.verifier import Authenticator
from wsgateway.upstream.balance import hash_key
from wsgateway.channels.outbox import ChannelSession, Outbox, Subscription
from wsgateway.config.auth import AuthConfig
from wsgateway.config.loader import GatewayConfig
from wsgateway.config.routes import RouteConfig
from wsgateway.ids import random_hex
from wsgateway.handshake.headers import (
    HeaderInjection,
    check_header,
    check_request_head,
    check_resource,
    check_subprotocol,
    upstream_headers,
)
from wsgateway.handshake.admission import ConnectionLimiter, client_ip
from wsgateway.handshake.origins import OriginPolicy
from wsgateway.durable.delivery import replay_connection
from wsgateway.durable.relay import DurableDelivery
from wsgateway.durable.replay import CONN_HEADER, SEQ_HEADER, QueueLink, stored_headers
from wsgateway.relay.relay import Relay
from wsgateway.relay.transport import Leg
from wsgateway._compat.sendnow import send_at_once
from wsgateway.routing.patterns import has_dot_segments
from wsgateway.routing.router import Router
from wsgateway.routing.templates import TemplateError, query_params, render_template, upstream_target
from wsgateway.ops.stats import Connection, GatewayStats
from wsgateway.ops.tracing import NoTracer, OtelTracer
from wsgateway.upstream.pool import Node, Upstream, UpstreamError, UpstreamRequest
from wsgateway.upstream.leg import UpstreamProtocol, adopt


OPEN = WebSocketProtocol.STATE_OPEN
CONNECTING = WebSocketProtocol.STATE_CONNECTING



@dataclass(slots=True)
class ConnInfo:
    """What the access line needs once the handshake objects are gone."""

    conn_id: str
    route: RouteConfig | None
    node: Node | None
    upstream: Upstream[Any] | None
    peer: str
    trace_id: str
    ip: str | None = None  # counted by the limiter until the relay is done
    span: Any = None
    pushes: Subscription | None = None


# Autobahn's refusal reasons quote request text (a duplicated bearer
# subprotocol, a resource with its query): never let it into a log line.
_QUOTED = re.compile(r'"[^"]*"|\'[^\']*\'')

# RFC 6750 section 3: the scheme a 401 asks for
_BEARER_CHALLENGE = 'Bearer realm="wsgateway"'


# upstream failures after which an at_least_once route accepts the client and queues
_UNREACHABLE = frozenset({codes.UPSTREAM_FAILED, codes.UNAVAILABLE, codes.UPSTREAM_TIMEOUT})


def _discard(data: bytes) -> None:
    """What a mirror sends back goes nowhere."""




# -- client leg -----------------------------------------------------------


class GatewayServerProtocol(WebSocketServerProtocol):
    """The gateway as the client's WebSocket server."""

    # not ``log``: that name is Autobahn's own txaio logger, whose debug
    # calls are no-ops; a twisted Logger there would build every event.
    _log = Logger()
    factory: GatewayServerFactory
    relay: Relay | None = None
    upstream_leg: UpstreamProtocol | None = None
    _head_done = False
    _early = b""
    _lost = False
    _deny: tuple[int, list[tuple[str, str]]] | None = None
    _handshake: Deferred[Any] | None = None
    conn_id = ""
    route: RouteConfig | None = None
    node: Node | None = None
    upstream: Upstream[UpstreamProtocol] | None = None
    upstream_request: UpstreamRequest | None = None
    trace_id = ""
    span: Any = None  # the connection's OpenTelemetry span, when tracing exports
    identity: Identity | None = None
    channel: str | None = None  # broadcast routes: the channel, once the handshake chose it
    channel_config: Any = None
    push_channels: tuple[str, ...] = ()
    session: ChannelSession | None = None
    close_code: int | None = None
    opened_at = 0.0
    # the client IP counted by the factory's limiter until the relay takes over
    admitted_ip: str | None = None
    # an at_least_once route with no node reachable: accepted, its messages queued
    degraded = False

    _head_timer: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        # Our own timer: Autobahn's batched timer rounds deadlines down to a
        # whole second, which would drop clients early (at once below 1 s).
        timeout = self.factory.config.limits.handshake_timeout
        self._head_timer = self.factory.clock.callLater(timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._head_done:
            self._log.debug("dropping {peer}: no complete upgrade request in time", peer=self.peer)
            self.transport.abortConnection()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            if self._head_timer.active():
                self._head_timer.cancel()
            self._head_timer = None

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
                self.transport.pauseProducing()
            return
        if self.state == CONNECTING and len(self.data) + len(data) > codes.MAX_REQUEST_HEAD:
            head = self.data + data
            if head.find(b"\r\n\r\n", 0, codes.MAX_REQUEST_HEAD + 4) < 0:
                # Autobahn would buffer an endless header until the handshake timeout.
                self._deny = (codes.HEADERS_TOO_LARGE, [])
                self.failHandshake("request head too large", codes.HEADERS_TOO_LARGE)
                return
        self._dataReceived(data)

    def onConnect(self, request: ConnectionRequest) -> Deferred[Any]:
        self._head_done = True
        # The client has sent its whole request in time; from here the wait
        # is for the upstream, bounded by connect_timeout and retries.
        self._cancel_head_timer()
        self._handshake = Deferred.fromCoroutine(self._open_upstream(request))
        return self._handshake

    async def _open_upstream(self, request: ConnectionRequest) -> str | None:
        try:
            return await self.factory.open_upstream(self, request)
        except AuthFailed as e:
            self._log.info(
                "refused {peer} with {status} on route {route}: {why}",
                peer=self.peer,
                status=e.status,
                route=self.route.name if self.route else "-",
                why=e.why,
                conn_id=self.conn_id,
                trace_id=self.trace_id,
            )
            headers = [("WWW-Authenticate", _BEARER_CHALLENGE)] if e.status == codes.UNAUTHORIZED else []
            self._deny = (e.status, headers)
            raise ConnectionDeny(e.status, codes.reason_phrase(e.status)) from None
        except HeaderInjection:
            self._log.info(
                "refused {peer} with 400: control characters in the request",
                peer=self.peer,
                conn_id=self.conn_id,
                trace_id=self.trace_id,
            )
            self._deny = (codes.BAD_REQUEST, [])
            raise ConnectionDeny(codes.BAD_REQUEST, "Bad Request") from None
        except ConnectionDeny as e:
            self._deny = (e.code, [])
            raise
        except UpstreamError as e:
            self._deny = (e.status, [])
            raise ConnectionDeny(e.status, codes.reason_phrase(e.status)) from None
        except CancelledError:
            self._deny = (codes.UNAVAILABLE, [])
            raise ConnectionDeny(codes.UNAVAILABLE, "Service Unavailable") from None
        except Exception:
            # Fail closed, with a fixed text: never an accept, never the exception's words.
            self._log.failure("handshake of {conn_id} failed", conn_id=self.conn_id, trace_id=self.trace_id)
            self._deny = (codes.INTERNAL_SERVER_ERROR, [])
            raise ConnectionDeny(codes.INTERNAL_SERVER_ERROR, "Internal Server Error") from None

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        headers: list[tuple[str, str]] = []
        if self._deny is not None:
            code, headers = self._deny
        elif reason.startswith("WebSocket version") or "Sec-WebSocket-Version" in reason:
            code, headers = codes.UPGRADE_REQUIRED, [("Sec-WebSocket-Version", "13")]
        elif code == codes.UPGRADE_REQUIRED:
            # a plain HTTP request to the WebSocket port
            headers = [("Upgrade", "websocket"), ("Connection", "Upgrade")]
        else:
            # every other malformed upgrade (method, key, HTTP version, headers)
            code = codes.BAD_REQUEST
        self._log.debug("refused {peer}: {code} ({reason})", peer=self.peer, code=code, reason=_QUOTED.sub("…", reason))
        self.factory.handshake_refused(self, code)
        # A refusal is an answer, not a failure: Autobahn would log each one
        # at warn level, quoting its reason, which can carry request text.
        self.wasClean = True
        self.sendHttpErrorResponse(code, codes.reason_phrase(code), headers + [("Content-Length", "0")])
        self.dropConnection(abort=False)

    def onOpen(self) -> None:
        if self.channel is not None:
            if not self._lost:
                self.session = self.factory.start_channel(self)
                # frames that came with the request: Autobahn reads them right after onOpen
                self.data, self._early = self.data + self._early, b""
                self.transport.resumeProducing()
            return
        up = self.upstream_leg
        if self._lost or (up is None and not self.degraded):
            return
        early, self.data, self._early = self.data + self._early, b"", b""
        relay = self.factory.start_relay(self, up)
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
            self.transport.resumeProducing()
            relay.client_data(early)
        if self.route is not None and self.route.mirror and self.upstream_request is not None:
            self.factory.start_mirror(relay, self.route.mirror, self.upstream_request)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._lost = True
        self._cancel_head_timer()
        if self.admitted_ip is not None:
            # counted at the handshake, but no relay took the connection over
            self.factory.limiter.release(self.admitted_ip)
            self.admitted_ip = None
        if self.relay is not None:
            self.relay.client_connection_lost()
        elif self._handshake is not None and not self._handshake.called:
            self._handshake.cancel()
        elif self.upstream_leg is not None:
            # the upstream leg opened but ours never did
            if self.upstream is not None and self.node is not None:
                self.upstream.release(self.node)
            if not self.upstream_leg.lost:
                self.upstream_leg.transport.loseConnection()
        if self.session is None:
            # no relay took the connection over: its span (if any) ends here
            self.factory.end_span(self, error="client left during the handshake")
        super().connectionLost(reason)
        if self.session is not None:
            # after Autobahn's onClose, which tells the close code
            self.session.ended()
            self.factory.channel_done(self)
            self.session = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        # only broadcast connections get here: relayed ones never reach Autobahn
        if self.session is not None:
            self.session.message(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        # broadcast connections only: the code of whoever closed first
        self.close_code = self.localCloseCode if self.closedByMe else code


class GatewayServerFactory(WebSocketServerFactory):
    """
    Accepts clients; holds what the handshake needs (the factory is the
    dependency container, the protocol stays thin).
    """

    protocol = GatewayServerProtocol
    # not ``log``: that name is Autobahn's own txaio logger, whose debug
    # calls are no-ops; a twisted Logger there would build every event.
    _log = Logger()
    noisy = False

    def __init__(
        self,
        config: GatewayConfig,
        router: Router,
        upstreams: dict[str, Upstream[UpstreamProtocol]],
        *,
        reactor: Any,
        clock: IReactorTime,
        secure: bool = False,
        auth: Authenticator | None = None,
        limiter: ConnectionLimiter | None = None,
        stats: GatewayStats | None = None,
        tracer: NoTracer | OtelTracer | None = None,
        broker: Any = None,
    ) -> None:
        super().__init__(reactor=reactor, server=None)
        self.clock = clock
        self.secure = secure
        # shared by every listener, so the limits hold for the whole gateway
        # (not ``limiter or ...``: a limiter with no connection is falsy, its __len__ is 0)
        self.limiter = limiter if limiter is not None else ConnectionLimiter(
            config.limits.max_connections, config.limits.max_connections_per_ip
        )
        self.stats = stats or GatewayStats()
        self.tracer = tracer or NoTracer()
        self.broker = broker  # broadcast routes refuse with 503 without one
        self.sessions: set[ChannelSession] = set()  # open broadcast connections
        self.relays: set[Relay] = set()
        self.queue: Any = None  # delivery.DeliveryService, when a route is at_least_once
        self.reconfigure(config, router, upstreams, auth)

    def reconfigure(
        self,
        config: GatewayConfig,
        router: Router,
        upstreams: dict[str, Upstream[UpstreamProtocol]],
        auth: Authenticator | None,
    ) -> None:
        """
        What new connections use from here on (a SIGHUP reload). Open
        connections keep what they were given; a handshake in progress
        finishes with what it started with. The limiter is shared by every
        listener: its limits are the service's to change.
        """
        self.config = config
        self.router = router
        self.upstreams = upstreams
        self.auth = auth
        self.origins = OriginPolicy(config.gateway.allowed_origins)
        self._route_origins = {
            r.name: OriginPolicy(r.allowed_origins) for r in config.routes if r.allowed_origins is not None
        }
        # names the client may not set: the gateway's own claim headers and the API key header
        self._owned_headers = frozenset(
            [h.lower() for _, h in config.auth.forward_claims] if config.auth else []
        ) | (auth.credential_headers if auth is not None else frozenset())
        # The token parameter is never forwarded (docs/configuration.md), with or
        # without an [auth] section: a client may send one regardless.
        self.token_param = (config.auth or AuthConfig()).query_param or None
        limits = config.limits
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

    def buildProtocol(self, addr: Any) -> GatewayServerProtocol:
        p: GatewayServerProtocol = super().buildProtocol(addr)
        p.conn_id = random_hex(6)
        return p

    async def open_upstream(self, proto: GatewayServerProtocol, request: ConnectionRequest) -> str | None:
        """
        The handshake's chain, cheapest refusal first: route (404), Origin
        (403), connection limits (503/429), credentials (401/403), then the
        upstream itself.
        """
        # Lines Autobahn split differently from a proxy in front of us (a NEL
        # byte inside a value) could smuggle in a forged X-Forwarded-For.
        check_request_head(proto.http_request_data)
        # A reload may swap the factory's config at any await below: this
        # handshake keeps the one it started with.
        config, upstreams = self.config, self.upstreams
        token_param, owned_headers = self.token_param, self._owned_headers
        # The trace is known from the first check on, so every line about
        # this connection (refusals included) carries its trace_id.
        proto.span, trace = self.tracer.start(request.headers.get("traceparent"))
        proto.trace_id = trace[1]
        target = proto.http_request_uri
        if has_dot_segments(target):
            raise ConnectionDeny(codes.BAD_REQUEST, "Bad Request")
        match = self.router.match(target, request.headers.get("host"), request.headers)
        if match is None:
            raise ConnectionDeny(codes.NOT_FOUND, "Not Found")
        route = match.route
        proto.route = route
        # Autobahn gives "" when the request has no Origin header
        if not self._route_origins.get(route.name, self.origins).allows(request.origin or None):
            raise AuthFailed(codes.FORBIDDEN, "origin not allowed")
        trusted = config.gateway.trusted_proxies
        peer_ip = _peer_ip(proto.transport)
        ip = client_ip(peer_ip, request.headers.get("x-forwarded-for"), trusted) if trusted else peer_ip
        refused = self.limiter.admit(ip)
        if refused is not None:
            raise ConnectionDeny(refused, codes.reason_phrase(refused))
        proto.admitted_ip = ip

        protocols: tuple[str, ...] = tuple(request.protocols)
        identity = None
        if self.auth is not None:
            creds = self.auth.credentials(request.headers, target.partition("?")[2], protocols)
            protocols = creds.protocols
            identity = await self.auth.identify(creds, route.auth)
            check_roles(identity, route.roles)
            proto.identity = identity
        claims = identity.claims if identity is not None else None
        if route.mode != "proxy" or route.upstream is None:
            return self._open_channel(proto, route, match, request, claims, protocols, config, token_param)
        if route.subscribe:
            # pushes to this proxied client, e.g. user:{claims.sub}
            try:
                query = query_params(target, drop=token_param)
                proto.push_channels = tuple(
                    render_template(t, captures=match.captures, claims=claims, query=query, headers=request.headers)
                    for t in route.subscribe
                )
            except TemplateError:
                raise ConnectionDeny(codes.BAD_REQUEST, "Bad Request") from None
        try:
            resource = upstream_target(
                match,
                request_path=target,
                strip_prefix=route.strip_prefix,
                upstream_path=route.upstream_path,
                drop_query_param=token_param,
                claims=claims,
                headers=request.headers,
            )
        except TemplateError:
            raise ConnectionDeny(codes.BAD_REQUEST, "Bad Request") from None
        check_resource(resource)
        headers, _rid, proto.trace_id = upstream_headers(
            request.headers,
            peer_ip=peer_ip,
            secure=self.secure,
            trusted_proxies=trusted,
            forward_auth=route.forward_auth,
            extra_identity=owned_headers,
            added=claim_headers(identity, config.auth.forward_claims) if config.auth else None,
            trace=trace,
        )
        durable = route.delivery == "at_least_once" and self.queue is not None
        if durable:
            # (conn id, seq) names each client message for an upstream that dedupes (durable.py)
            headers[CONN_HEADER] = proto.conn_id
            headers[SEQ_HEADER] = "1"
        upstream = upstreams[route.upstream]
        ucfg = upstream.config
        key = (
            hash_key(ucfg.balance, peer_ip=ip, claims=claims, headers=request.headers)
            if ucfg.balance.startswith("hash:")
            else None
        )
        version = request.headers.get(ucfg.version_header.lower()) if ucfg.version_header else None
        ureq = UpstreamRequest(
            resource=resource,
            headers=headers,
            protocols=protocols,
            origin=request.origin,
            useragent=request.headers.get("user-agent"),
            trace_id=proto.trace_id,
        )
        # Autobahn writes these itself, unchecked
        for name, value in (("Origin", ureq.origin), ("User-Agent", ureq.useragent)):
            if value is not None:
                check_header(name, value)
        for p in protocols:
            check_subprotocol(p)
        proto.upstream_request = ureq
        try:
            node, leg = await upstream.connect(ureq, key=key, version=version)
        except UpstreamError as e:
            if not durable or e.status not in _UNREACHABLE or not self.queue.available or proto._lost:
                raise
            self._log.warn(
                "no node of upstream {upstream} reachable ({why}): accepting {conn_id} and queueing its messages",
                upstream=route.upstream, why=e.detail, conn_id=proto.conn_id, trace_id=proto.trace_id,
            )
            proto.degraded = True
            proto.upstream = upstream
            # what the upstream would have picked is unknown: the client's first offer
            return protocols[0] if protocols else None
        if proto._lost:
            upstream.release(node)
            leg.transport.loseConnection()
            raise CancelledError()
        proto.node = node
        proto.upstream = upstream
        proto.upstream_leg = leg
        return leg.websocket_protocol_in_use

    def _open_channel(
        self,
        proto: GatewayServerProtocol,
        route: RouteConfig,
        match: Any,
        request: ConnectionRequest,
        claims: Mapping[str, Any] | None,
        protocols: tuple[str, ...],
        config: GatewayConfig,
        token_param: str | None,
    ) -> str | None:
        """A broadcast route: no upstream; Autobahn keeps the connection, the broker feeds it."""
        broker = self.broker
        if broker is None or not broker.ready or route.channel is None:
            raise ConnectionDeny(codes.UNAVAILABLE, "Service Unavailable")
        try:
            proto.channel = render_template(
                route.channel,
                captures=match.captures,
                claims=claims,
                query=query_params(proto.http_request_uri, drop=token_param),
                headers=request.headers,
            )
        except TemplateError:
            raise ConnectionDeny(codes.BAD_REQUEST, "Bad Request") from None
        limits = config.limits
        # set before the 101 goes out: Autobahn starts its pings then
        proto.autoPingInterval = limits.ping_interval
        proto.autoPingTimeout = limits.ping_timeout
        proto.closeHandshakeTimeout = 5
        proto.channel_config = (route, limits)
        # the gateway is the endpoint here: it takes the first subprotocol offered
        # (browsers fail a handshake whose offered subprotocols get no answer)
        return protocols[0] if protocols else None

    def start_channel(self, proto: GatewayServerProtocol) -> ChannelSession:
        route, limits = proto.channel_config
        identity = proto.identity
        session = ChannelSession(
            proto,
            self.broker,
            proto.channel or "",
            conn_id=proto.conn_id,
            user=identity.subject if identity is not None else None,
            client_publish=route.client_publish,
            slow_consumer=route.slow_consumer,
            queue_limit=limits.write_buffer,
            messages_per_second=limits.messages_per_second,
            clock=self.clock,
        )
        proto.opened_at = self.clock.seconds()
        # one write per delivery: sent at once, like the relay's (sendnow.py)
        send_at_once(proto.transport)
        self.sessions.add(session)
        self.stats.opened(Connection(
            conn_id=proto.conn_id, route=route.name, upstream="", node="", peer=proto.peer,
            trace_id=proto.trace_id, subject=identity.subject if identity is not None else None,
            started=proto.opened_at, relay=session,
        ))
        self._log.debug("{conn_id} joined channel {channel} on route {route}", conn_id=proto.conn_id,
                        channel=proto.channel, route=route.name, trace_id=proto.trace_id)
        return session

    def channel_done(self, proto: GatewayServerProtocol) -> None:
        session = proto.session
        if session is None:
            return
        self.sessions.discard(session)
        self.stats.closed(session, proto.close_code)
        self.end_span(proto, session, {"wsgateway.channel": proto.channel, "websocket.close_code": proto.close_code})
        self._log.info(
            "closed {conn_id} route={route} channel={channel} peer={peer} trace_id={trace_id} code={code} "
            "duration={duration:.3f} messages_in={msgs_in} messages_out={msgs_out} bytes_in={bytes_in} "
            "bytes_out={bytes_out} dropped={dropped}",
            conn_id=proto.conn_id,
            route=proto.route.name if proto.route else "",
            channel=proto.channel,
            peer=proto.peer,
            trace_id=proto.trace_id,
            code=proto.close_code,
            duration=self.clock.seconds() - proto.opened_at,
            msgs_in=session.messages_c2u,
            msgs_out=session.messages_u2c,
            bytes_in=session.bytes_c2u,
            bytes_out=session.bytes_u2c,
            dropped=session.outbox.dropped,
        )

    def start_relay(self, proto: GatewayServerProtocol, leg: UpstreamProtocol | None) -> Relay:
        limits = self.config.limits
        info = ConnInfo(proto.conn_id, proto.route, proto.node, proto.upstream, proto.peer, proto.trace_id,
                        proto.admitted_ip, proto.span)
        proto.admitted_ip = None
        proto.span = None
        identity = proto.identity
        close_at = None
        if identity is not None and identity.expires is not None and self.config.auth is not None:
            # the token stays acceptable for the same leeway the handshake allowed
            close_at = identity.expires + self.config.auth.leeway
        route = proto.route
        reconnect = None
        upstream = proto.upstream  # the one this connection came from, even if a reload has replaced it since
        request = proto.upstream_request
        delivery: DurableDelivery | None = None
        agreed = leg.websocket_protocol_in_use if leg is not None else proto.websocket_protocol_in_use
        if route is not None and upstream is not None and request is not None:
            durable = route.delivery == "at_least_once" and self.queue is not None
            if durable or route.on_upstream_close == "reconnect":
                reconnect = self._reconnector(info, upstream, request, agreed)
            if durable and reconnect is not None:
                delivery = DurableDelivery(self._queue_link(proto, route, upstream, request, agreed), reconnect,
                                           clock=self.clock, write_buffer=limits.write_buffer)
        relay = Relay(
            proto.transport,
            leg.transport if leg is not None else None,
            clock=self.clock,
            max_message_size=limits.max_message_size,
            write_buffer=limits.write_buffer,
            idle_timeout=limits.idle_timeout,
            ping_interval=limits.ping_interval,
            ping_timeout=limits.ping_timeout,
            on_done=lambda r: self._relay_done(info, r),
            reconnect=reconnect,
            messages_per_second=limits.messages_per_second,
            close_at=close_at,
            log_fields={"conn_id": proto.conn_id, "trace_id": proto.trace_id,
                        "route": route.name if route is not None else "", "peer": proto.peer},
            reconnect_buffer=upstream.config.reconnect_buffer if upstream is not None else 0,
            hooks=delivery,
        )
        self.relays.add(relay)
        if delivery is not None:
            self.queue.live[proto.conn_id] = delivery
        if proto.push_channels and self.broker is not None and route is not None:
            outbox = Outbox(relay.push, relay.slow_consumer, limit=limits.write_buffer, policy=route.slow_consumer)
            relay.attach_outbox(outbox)
            info.pushes = Subscription(self.broker, outbox, proto.push_channels)
            user = identity.subject if identity is not None else None
            for channel in proto.push_channels:
                self.broker.join(channel, proto.conn_id, user)
        self.stats.opened(Connection(
            conn_id=proto.conn_id,
            route=route.name if route is not None else "",
            upstream=(route.upstream or "") if route is not None else "",
            node=proto.node.url if proto.node else "",
            peer=proto.peer,
            trace_id=proto.trace_id,
            subject=identity.subject if identity is not None else None,
            started=relay.started,
            relay=relay,
        ))
        if logs.SHOWS_DEBUG:
            self._log.debug(
                "open {conn_id} route={route} node={node} peer={peer} trace_id={trace_id}",
                conn_id=proto.conn_id,
                route=proto.route.name if proto.route else "",
                node=proto.node.url if proto.node else "",
                peer=proto.peer,
                trace_id=proto.trace_id,
            )
        return relay

    def _queue_link(self, proto: GatewayServerProtocol, route: RouteConfig, upstream: Upstream[Any],
                    request: UpstreamRequest, agreed: str | None) -> QueueLink:
        queue = self.queue
        identity = proto.identity
        return QueueLink(
            store=queue.store,
            route=route.name,
            conn_key=proto.conn_id,
            headers=stored_headers(request.resource, request.headers, agreed, request.origin),
            claims=dict(identity.claims) if identity is not None and identity.claims else {},
            trace_id=proto.trace_id or None,
            on_delivered=queue.delivered,
            on_failure=queue.failed,
            retry_initial=upstream.config.backoff_initial,
        )

    def _reconnector(
        self, info: ConnInfo, upstream: Upstream[UpstreamProtocol], request: UpstreamRequest, agreed: str | None
    ) -> Callable[[Relay], Deferred[None]]:
        # the new leg must speak what the client agreed to (nothing, if it agreed to nothing)
        request = replace(request, protocols=(agreed,) if agreed is not None else ())

        def reconnect(relay: Relay) -> Deferred[None]:
            return Deferred.fromCoroutine(self._reconnect(relay, info, upstream, request, agreed))

        return reconnect

    async def _reconnect(
        self, relay: Relay, info: ConnInfo, upstream: Upstream[UpstreamProtocol], request: UpstreamRequest, agreed: str | None
    ) -> None:
        """on_upstream_close = reconnect: a new leg (any eligible node, with the upstream's retries and backoff)."""
        if info.node is not None:
            upstream.release(info.node, vanished=relay.upstream_vanished)
            info.node = None
        leg_headers = relay.hooks.leg_headers()
        if leg_headers is not None:
            request = replace(request, headers={**request.headers, **leg_headers}, quiet=True)
        node, leg = await upstream.connect(request)
        if leg.websocket_protocol_in_use != agreed or relay.done or not relay.reconnecting:
            upstream.release(node)
            leg.transport.loseConnection()
            if relay.done or not relay.reconnecting:
                return
            raise UpstreamError(codes.UPSTREAM_FAILED, "the new upstream leg chose another subprotocol")
        info.node = node
        self._log.info(
            "{conn_id} reconnected to {node}", conn_id=info.conn_id, node=node.url, trace_id=info.trace_id
        )
        new_leg = relay.upstream_reconnected(leg.transport)
        if not adopt(leg, new_leg):
            leg.sink = new_leg
        pending = leg.take_pending()
        if pending:
            new_leg.dataReceived(pending)

    def replay(self, route_name: str, entries: list[Any]) -> Deferred[bool]:
        """A replay connection for queued ``entries`` of ``route_name`` (delivery.replay_connection)."""
        route = next((r for r in self.config.routes if r.name == route_name), None)
        upstream = self.upstreams.get(route.upstream) if route is not None and route.upstream else None
        if upstream is None:
            raise UpstreamError(codes.UNAVAILABLE, f"route {route_name} has no upstream now")
        return Deferred.fromCoroutine(
            replay_connection(upstream, entries, clock=self.clock, request_type=UpstreamRequest)
        )

    def start_mirror(self, relay: Relay, name: str, request: UpstreamRequest) -> None:
        """
        Open the route's mirror leg beside the relay. Nothing about it may
        touch the primary: connect failures are logged at debug level, what
        it sends is discarded, and a slow mirror is cut off by the relay.
        """
        mirror = self.upstreams.get(name)
        if mirror is None:
            return  # removed by a reload during this connection's handshake

        def opened(result: tuple[Node, UpstreamProtocol]) -> None:
            node, leg = result
            released = []

            def release() -> None:
                if not released:
                    released.append(True)
                    mirror.release(node)

            if not relay.attach_mirror(leg.transport, self.config.limits.write_buffer, release):
                release()
                leg.transport.loseConnection()
                return
            sink = Leg(_discard, relay.mirror_lost)
            if not adopt(leg, sink):
                leg.sink = sink
            leg.take_pending()

        def failed(f: Failure) -> None:
            self._log.debug("mirror {mirror} not reached: {error}", mirror=name, error=f.getErrorMessage())

        Deferred.fromCoroutine(mirror.connect(request)).addCallbacks(opened, failed)

    def _relay_done(self, proto: ConnInfo, relay: Relay) -> None:
        self.relays.discard(relay)
        if self.queue is not None and self.queue.live.get(proto.conn_id) is relay.hooks:
            # what it still had queued is the Deliverer's to replay now
            if self.queue.live.pop(proto.conn_id).left_queued and self.queue.deliverer:
                self.queue.deliverer.kick()  # rather than wait out a backed-off pass
        if proto.pushes is not None:
            proto.pushes.outbox.stopProducing()
            for channel in proto.pushes.channels:
                self.broker.leave(channel, proto.conn_id)
            proto.pushes.cancel()
            proto.pushes = None
        self.stats.closed(relay, relay.close_code)
        self.end_span(proto, relay, {
            "wsgateway.upstream.pool": proto.route.upstream if proto.route else None,
            "wsgateway.node": proto.node.url if proto.node else None,
            "websocket.close_code": relay.close_code,
            "websocket.closed_by": relay.closed_by,
        })
        if proto.ip is not None:
            self.limiter.release(proto.ip)
            proto.ip = None
        if proto.node is not None and proto.upstream is not None:
            proto.upstream.release(proto.node, vanished=relay.upstream_vanished)
        if logs.SHOWS_INFO:  # the access line
            self._log.info(
                "closed {conn_id} route={route} upstream={upstream} node={node} peer={peer} trace_id={trace_id} "
                "code={code} closed_by={closed_by} duration={duration:.3f} messages_in={msgs_in} "
                "messages_out={msgs_out} bytes_in={bytes_in} bytes_out={bytes_out} mirror_dropped={mirror_dropped}",
                conn_id=proto.conn_id,
                route=proto.route.name if proto.route else "",
                upstream=proto.route.upstream if proto.route else "",
                node=proto.node.url if proto.node else "",
                peer=proto.peer,
                trace_id=proto.trace_id,
                code=relay.close_code,
                closed_by=relay.closed_by,
                duration=self.clock.seconds() - relay.started,
                msgs_in=relay.messages_c2u,
                msgs_out=relay.messages_u2c,
                bytes_in=relay.bytes_c2u,
                bytes_out=relay.bytes_u2c,
                mirror_dropped=relay.mirror_dropped,
            )

    def end_span(
        self, holder: Any, counted: Any = None, extra: Mapping[str, Any] | None = None, error: str | None = None
    ) -> None:
        """
        End the connection's span, if tracing exports one: ``holder`` is the
        protocol or its ConnInfo, ``counted`` the relay or broadcast session.
        """
        span, holder.span = holder.span, None
        if span is None:
            return
        attributes = {"wsgateway.route": holder.route.name if holder.route else None,
                      "wsgateway.conn_id": holder.conn_id, **(extra or {})}
        if counted is not None:
            attributes["wsgateway.messages_in"] = counted.messages_c2u
            attributes["wsgateway.messages_out"] = counted.messages_u2c
        self.tracer.end(span, attributes, error)

    def handshake_refused(self, proto: GatewayServerProtocol, status: int) -> None:
        self.stats.handshake(proto.route.name if proto.route else None, status)
        self.end_span(proto, extra={"http.response.status_code": status}, error=f"refused with {status}")
        if status >= 500:
            self._log.warn(
                "refused {peer} with {status} on route {route}",
                peer=proto.peer,
                status=status,
                route=proto.route.name if proto.route else "-",
                conn_id=proto.conn_id,
                trace_id=proto.trace_id or None,
            )


def _peer_ip(transport: Any) -> str:
    peer = transport.getPeer()
    return getattr(peer, "host", None) or "unix"
