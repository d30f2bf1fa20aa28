# -*- test-case-name: tests.integration.test_proxy -*-
"""
The handshake's ordered checks, cheapest refusal first: request head,
route (404), Origin (403), connection limits (503/429), credentials
(401/403), then the upstream. Built once per config (at start and on each
SIGHUP), with a table per route of everything that does not depend on the
request, so a handshake only looks things up.

``begin`` answers Autobahn's ``onConnect``: a plain value when nothing
async is needed (a broadcast route without token checks), else a Deferred
(token checks that may fetch keys, the upstream connect).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgateway import codes
from wsgateway.auth.credentials import check_roles, claim_headers
from wsgateway.auth.identity import Identity
from wsgateway.auth.verifier import Authenticator
from wsgateway.channels.sessions import open_channel
from wsgateway.config.auth import AuthConfig
from wsgateway.config.loader import GatewayConfig
from wsgateway.config.routes import RouteConfig
from wsgateway.durable.delivery import replay_connection
from wsgateway.durable.entries import Entry
from wsgateway.durable.replay import CONN_HEADER, SEQ_HEADER
from wsgateway.handshake.admission import client_ip
from wsgateway.handshake.headers import check_header, check_request_head, check_resource, check_subprotocol, \
    peer_is_trusted, upstream_headers
from wsgateway.handshake.origins import OriginPolicy
from wsgateway.handshake.refusals import Refused
from wsgateway.interfaces import DurableQueue
from wsgateway.relay.start import RelayStarter
from wsgateway.relay.transport import transport_of
from wsgateway.routing.patterns import has_dot_segments
from wsgateway.routing.router import Router, split_host
from wsgateway.routing.templates import TemplateError, query_params, render_template, upstream_target
from wsgateway.upstream.balance import hash_key
from wsgateway.upstream.compression import for_client, offers_header, offers_in
from wsgateway.upstream.leg import UpstreamProtocol
from wsgateway.upstream.pool import Node, Upstream, UpstreamError, UpstreamRequest

# upstream failures after which an at_least_once route accepts the client and queues
_UNREACHABLE = frozenset({codes.UPSTREAM_FAILED, codes.UNAVAILABLE, codes.UPSTREAM_TIMEOUT})


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """What the handshake of one route needs that no request changes."""

    route: RouteConfig
    origins: OriginPolicy
    upstream: Upstream[UpstreamProtocol] | None
    durable: bool  # at_least_once with a queue: (conn id, seq) headers, accepted while unreachable
    identify: bool  # [auth] is set and the route's auth is not "none"
    hash_balance: str | None  # the upstream's balance, when it hashes something of the request
    version_header: str | None  # lower case, as Autobahn's header names are
    channel: bool  # mode = broadcast: no upstream, the broker feeds the connection


def _peer_ip(transport: Any) -> str:
    peer = transport.getPeer()
    return getattr(peer, "host", None) or "unix"


class HandshakeChain:
    """The checks of one config, and the starter of its relays."""

    log = Logger()

    def __init__(
        self,
        config: GatewayConfig,
        router: Router,
        upstreams: dict[str, Upstream[UpstreamProtocol]],
        auth: Authenticator | None,
        *,
        live: Any,
        queue: DurableQueue | None = None,
    ) -> None:
        self.config = config
        self.router = router
        self.upstreams = upstreams
        self.auth = auth
        self.live = live
        self.queue = queue
        self.limits = config.limits
        self.trusted = config.gateway.trusted_proxies
        # names the client may not set: the gateway's own claim headers and the API key header
        self.owned_headers = frozenset(
            [h.lower() for _, h in config.auth.forward_claims] if config.auth else []
        ) | (auth.credential_headers if auth is not None else frozenset())
        # The token parameter is never forwarded (docs/configuration.md), with or
        # without an [auth] section: a client may send one regardless.
        self.token_param = (config.auth or AuthConfig()).query_param or None
        self.forward_claims = config.auth.forward_claims if config.auth else None
        default_origins = OriginPolicy(config.gateway.allowed_origins)
        self.plans = {r.name: self._plan(r, default_origins) for r in config.routes}
        self.relays = RelayStarter(live, limits=config.limits,
                                   token_leeway=config.auth.leeway if config.auth is not None else None,
                                   upstreams=upstreams, queue=queue)

    def _plan(self, route: RouteConfig, default_origins: OriginPolicy) -> RoutePlan:
        upstream = self.upstreams.get(route.upstream) if route.upstream is not None else None
        ucfg = upstream.config if upstream is not None else None
        return RoutePlan(
            route=route,
            origins=OriginPolicy(route.allowed_origins) if route.allowed_origins is not None else default_origins,
            upstream=upstream,
            durable=route.delivery == "at_least_once" and self.queue is not None,
            identify=self.auth is not None and route.auth != "none",
            hash_balance=ucfg.balance if ucfg is not None and ucfg.balance.startswith("hash:") else None,
            version_header=ucfg.version_header.lower() if ucfg is not None and ucfg.version_header else None,
            channel=route.mode != "proxy" or route.upstream is None,
        )

    def pending_address(self, transport: Any) -> str | None:
        """
        The address a connection whose request head has not arrived counts
        against ``max_connections_per_ip`` (as ``begin`` will count it), or
        None for a trusted proxy: the clients behind it are not known yet,
        and its connections are bounded by ``max_pending_handshakes`` alone.
        """
        peer_ip = _peer_ip(transport)
        trusted = self.trusted
        if not trusted:
            return peer_ip
        # normalised as begin() will have it (an IPv4-mapped peer as IPv4)
        ip = client_ip(peer_ip, None, trusted)
        return None if peer_is_trusted(ip, trusted) else ip

    def origins_of(self, route_name: str) -> OriginPolicy | None:
        plan = self.plans.get(route_name)
        return plan.origins if plan is not None else None

    # -- the chain ------------------------------------------------------------

    def begin(self, proto: Any, request: ConnectionRequest, secure: bool) -> Any:
        """
        Autobahn's ``onConnect`` for ``proto``: the subprotocol to answer, or
        a Deferred of it. Raises (or fails with) ConnectionDeny, AuthFailed,
        HeaderInjection or UpstreamError; the protocol turns each into a status.
        """
        # Lines Autobahn split differently from a proxy in front of us (a NEL
        # byte inside a value) could smuggle in a forged X-Forwarded-For.
        check_request_head(proto.http_request_data)
        headers = request.headers
        # The trace is known from the first check on, so every line about
        # this connection (refusals included) carries its trace_id.
        proto.span, trace = self.live.tracer.start(headers.get("traceparent"))
        proto.trace_id = trace[1]
        target = proto.http_request_uri
        if has_dot_segments(target):
            raise Refused(codes.BAD_REQUEST, codes.R_BAD_PATH)
        host = headers.get("host")
        # Autobahn requires one Host but takes any text in it; a value that
        # is not host[:port] would reach host rules and X-Forwarded-Host.
        if host is None or split_host(host) is None:
            raise Refused(codes.BAD_REQUEST, codes.R_BAD_HOST)
        match = self.router.match(target, host, headers)
        if match is None:
            raise Refused(codes.NOT_FOUND, codes.R_NO_ROUTE)
        plan = self.plans[match.route.name]
        proto.route = plan.route
        # Autobahn gives "" when the request has no Origin header
        if not plan.origins.allows(request.origin or None):
            raise Refused(codes.FORBIDDEN, codes.R_ORIGIN, "origin not allowed")
        trusted = self.trusted
        peer_ip = _peer_ip(proto.transport)
        ip = client_ip(peer_ip, headers.get("x-forwarded-for"), trusted) if trusted else peer_ip
        refused = self.live.limiter.admit(ip)
        if refused is not None:
            full = refused == codes.UNAVAILABLE  # else 429: this address's share
            raise Refused(refused, codes.R_TOO_MANY_CONNECTIONS if full else codes.R_PER_IP_LIMIT)
        proto.admitted_ip = ip
        protocols: tuple[str, ...] = tuple(request.protocols)
        auth = self.auth
        if auth is None:
            return self._route(proto, request, plan, match, None, protocols, peer_ip, trace, secure)
        creds = auth.credentials(headers, target.partition("?")[2], protocols)
        protocols = creds.protocols
        if not plan.identify:
            check_roles(None, plan.route.roles)
            return self._route(proto, request, plan, match, None, protocols, peer_ip, trace, secure)
        d: Deferred[Any] = Deferred.fromCoroutine(auth.identify(creds, plan.route.auth))
        d.addCallback(self._identified, proto, request, plan, match, protocols, peer_ip, trace, secure)
        return d

    def _identified(self, identity: Identity | None, proto: Any, request: ConnectionRequest, plan: RoutePlan,
                    match: Any, protocols: tuple[str, ...], peer_ip: str, trace: tuple[str, str],
                    secure: bool) -> Any:
        check_roles(identity, plan.route.roles)
        proto.identity = identity
        return self._route(proto, request, plan, match, identity, protocols, peer_ip, trace, secure)

    def _route(self, proto: Any, request: ConnectionRequest, plan: RoutePlan, match: Any, identity: Identity | None,
               protocols: tuple[str, ...], peer_ip: str, trace: tuple[str, str], secure: bool) -> Any:
        route = plan.route
        headers = request.headers
        claims = identity.claims if identity is not None else None
        if plan.channel:
            try:
                return open_channel(proto, route, match, headers, claims, protocols, self.limits, self.token_param,
                                    self.live.broker)
            except ConnectionDeny as e:
                if e.code == codes.UNAVAILABLE:  # no broker, or not ready: Redis down
                    raise Refused(e.code, codes.R_BROKER_UNAVAILABLE) from None
                raise
        upstream = plan.upstream
        if upstream is None:
            # config validation names an upstream for every proxy route: never a client's doing
            raise RuntimeError(f"route {route.name}: upstream {route.upstream} is not configured")
        token_param = self.token_param
        target = proto.http_request_uri
        try:
            if route.subscribe:
                # pushes to this proxied client, e.g. user:{claims.sub}
                query = query_params(target, drop=token_param)
                proto.push_channels = tuple(
                    render_template(t, captures=match.captures, claims=claims, query=query, headers=headers)
                    for t in route.subscribe
                )
            resource = upstream_target(
                match,
                request_path=target,
                strip_prefix=route.strip_prefix,
                upstream_path=route.upstream_path,
                drop_query_param=token_param,
                claims=claims,
                headers=headers,
            )
        except TemplateError:
            raise ConnectionDeny(codes.BAD_REQUEST, "Bad Request") from None
        check_resource(resource)
        forward_claims = self.forward_claims
        out, _rid, proto.trace_id = upstream_headers(
            headers,
            peer_ip=peer_ip,
            secure=secure,
            trusted_proxies=self.trusted,
            forward_auth=route.forward_auth,
            extra_identity=self.owned_headers,
            added=claim_headers(identity, forward_claims) if forward_claims is not None else None,
            trace=trace,
        )
        if plan.durable:
            # (conn id, seq) names each client message for an upstream that dedupes (durable/relay.py)
            out[CONN_HEADER] = proto.conn_id
            out[SEQ_HEADER] = "1"
        balance = plan.hash_balance
        key = hash_key(balance, peer_ip=proto.admitted_ip, claims=claims, headers=headers) if balance else None
        version = headers.get(plan.version_header) if plan.version_header else None
        origin = request.origin
        useragent = headers.get("user-agent")
        # Autobahn writes these itself, unchecked
        if origin is not None:
            check_header("Origin", origin)
        if useragent is not None:
            check_header("User-Agent", useragent)
        for p in protocols:
            check_subprotocol(p)
        # the client's permessage-deflate offers, and only those, go upstream (docs/protocol.md#compression)
        offers = offers_in(headers.get("sec-websocket-extensions")) if route.compressed else ()
        if offers:
            out["Sec-WebSocket-Extensions"] = offers_header(offers)
        ureq = proto.upstream_request = UpstreamRequest(
            resource=resource, headers=out, protocols=protocols, origin=origin, useragent=useragent,
            trace_id=proto.trace_id, deflate_offers=offers,
        )
        d: Deferred[Any] = Deferred.fromCoroutine(upstream.connect(ureq, key=key, version=version))
        d.addCallbacks(self._connected, self._unreached, callbackArgs=(proto, upstream),
                       errbackArgs=(proto, plan, protocols))
        return d

    def _connected(self, result: tuple[Node, UpstreamProtocol], proto: Any,
                   upstream: Upstream[UpstreamProtocol]) -> str | None | tuple[str | None, dict[str, str]]:
        node, leg = result
        if proto.gone:
            upstream.release(node)
            transport_of(leg).loseConnection()
            raise CancelledError()
        proto.node = node
        proto.upstream = upstream
        proto.upstream_leg = leg
        if leg.deflate is not None:
            # Autobahn answers (subprotocol, headers) as it answers a subprotocol alone
            return leg.websocket_protocol_in_use, {"Sec-WebSocket-Extensions": for_client(leg.deflate)}
        return leg.websocket_protocol_in_use

    def _unreached(self, f: Failure, proto: Any, plan: RoutePlan, protocols: tuple[str, ...]) -> Any:
        e = f.value
        queue = self.queue
        if (not plan.durable or not isinstance(e, UpstreamError) or e.status not in _UNREACHABLE or queue is None
                or not queue.available or proto.gone):
            return f
        self.log.warn(
            "no node of upstream {upstream} reachable ({why}): accepting {conn_id} and queueing its messages",
            upstream=plan.route.upstream, why=e.detail, conn_id=proto.conn_id, trace_id=proto.trace_id,
        )
        proto.degraded = True
        proto.upstream = plan.upstream
        # what the upstream would have picked is unknown: the client's first offer
        return protocols[0] if protocols else None

    # -- durable delivery -------------------------------------------------------

    def replay(self, route_name: str, entries: list[Entry]) -> Deferred[bool]:
        """A replay connection for queued ``entries`` of ``route_name`` (delivery.replay_connection)."""
        plan = self.plans.get(route_name)
        upstream = plan.upstream if plan is not None else None
        if upstream is None:
            raise UpstreamError(codes.UNAVAILABLE, f"route {route_name} has no upstream now")
        return Deferred.fromCoroutine(
            replay_connection(upstream, entries, clock=self.live.clock, request_type=UpstreamRequest)
        )

