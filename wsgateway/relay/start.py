# -*- test-case-name: tests.integration.test_proxy -*-
"""
Starting the relay of a proxied connection once both handshakes are done:
the Relay with the connection's limits, its reconnect or durable hooks,
channel pushes and mirror, handed to the live connections. One
``RelayStarter`` per config (built with the handshake chain); a connection
keeps the one its handshake began with.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgateway import codes
from wsgateway.channels.outbox import Outbox, Subscription
from wsgateway.config.limits import LimitsConfig
from wsgateway.config.routes import RouteConfig
from wsgateway.durable.relay import DurableDelivery
from wsgateway.durable.replay import QueueLink, stored_headers
from wsgateway.interfaces import DurableQueue
from wsgateway.ops import logs
from wsgateway.relay.mirror import Mirror
from wsgateway.relay.relay import Relay
from wsgateway.relay.transport import Leg, transport_of
from wsgateway.upstream.leg import UpstreamProtocol, adopt
from wsgateway.upstream.pool import Node, Upstream, UpstreamError, UpstreamRequest


@dataclass(slots=True)
class ConnInfo:
    """
    What the end of a relay needs once the handshake objects are gone; called
    by the relay when it is done (its ``on_done``), so no closure is made per connection.
    """

    live: Any  # LiveConnections
    conn_id: str
    route: RouteConfig | None
    node: Node | None
    upstream: Upstream[Any] | None
    peer: str
    trace_id: str
    ip: str | None = None  # counted by the limiter until the relay is done
    span: Any = None
    pushes: Subscription | None = None

    def __call__(self, relay: Relay) -> None:
        self.live.relay_done(self, relay)


def _discard(data: bytes) -> None:
    """What a mirror sends back goes nowhere."""


class RelayStarter:
    """Builds each proxied connection's Relay from the limits of one config."""

    log = Logger()

    def __init__(self, live: Any, *, limits: LimitsConfig, token_leeway: float | None,
                 upstreams: dict[str, Upstream[UpstreamProtocol]], queue: DurableQueue | None) -> None:
        self.live = live
        self.clock = live.clock
        self.limits = limits
        # a token stays acceptable for the same leeway the handshake allowed (None: no [auth])
        self.token_leeway = token_leeway
        self.upstreams = upstreams  # for mirrors, looked up when the connection opens
        self.queue = queue

    def start(self, proto: Any, leg: UpstreamProtocol | None) -> Relay:
        """``proto`` is the client's GatewayServerProtocol; ``leg`` None when degraded (durable, no node reachable)."""
        limits = self.limits
        route: RouteConfig | None = proto.route
        info = ConnInfo(self.live, proto.conn_id, route, proto.node, proto.upstream, proto.peer, proto.trace_id,
                        proto.admitted_ip, proto.span)
        proto.admitted_ip = None
        proto.span = None
        identity = proto.identity
        close_at = None
        if identity is not None and identity.expires is not None and self.token_leeway is not None:
            close_at = identity.expires + self.token_leeway
        reconnect = None
        upstream = proto.upstream  # the one this connection came from, even if a reload has replaced it since
        request = proto.upstream_request
        delivery: DurableDelivery | None = None
        if route is not None and upstream is not None and request is not None:
            durable = route.delivery == "at_least_once" and self.queue is not None
            if durable or route.on_upstream_close == "reconnect":
                agreed = leg.websocket_protocol_in_use if leg is not None else proto.websocket_protocol_in_use
                reconnect = Reconnector(info, upstream, request, agreed)
                if durable:
                    delivery = DurableDelivery(self._queue_link(proto, route, upstream, request, agreed), reconnect,
                                               clock=self.clock, write_buffer=limits.write_buffer)
        route_name = route.name if route is not None else ""
        relay = Relay(
            transport_of(proto),
            transport_of(leg) if leg is not None else None,
            clock=self.clock,
            max_message_size=limits.max_message_size,
            write_buffer=limits.write_buffer,
            idle_timeout=limits.idle_timeout,
            ping_interval=limits.ping_interval,
            ping_timeout=limits.ping_timeout,
            close_timeout=limits.close_timeout,
            on_done=info,
            reconnect=reconnect,
            messages_per_second=limits.messages_per_second,
            close_at=close_at,
            log_fields={"conn_id": proto.conn_id, "trace_id": proto.trace_id, "route": route_name,
                        "peer": proto.peer},
            reconnect_buffer=upstream.config.reconnect_buffer if upstream is not None else 0,
            hooks=delivery,
            deflate=leg is not None and leg.deflate is not None,
        )
        broker = self.live.broker
        if proto.push_channels and broker is not None and route is not None:
            outbox = Outbox(relay.push, relay.slow_consumer, limit=limits.write_buffer, policy=route.slow_consumer)
            relay.attach_outbox(outbox)
            info.pushes = Subscription(broker, outbox, proto.push_channels)
        self.live.relay_opened(relay, info, identity, delivery)
        if logs.SHOWS_DEBUG:
            self.log.debug(
                "open {conn_id} route={route} node={node} peer={peer} trace_id={trace_id}",
                conn_id=proto.conn_id, route=route_name, node=proto.node.url if proto.node else "",
                peer=proto.peer, trace_id=proto.trace_id,
            )
        return relay

    def _queue_link(self, proto: Any, route: RouteConfig, upstream: Upstream[Any], request: UpstreamRequest,
                    agreed: str | None) -> QueueLink:
        queue = self.queue
        assert queue is not None
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

    def open_mirror(self, name: str, request: UpstreamRequest) -> MirrorLeg | None:
        """
        Begin the connect of the route's mirror leg, alongside the primary's;
        the relay takes it once it starts (L{MirrorLeg.attach}). None when
        a reload has removed that upstream meanwhile.
        """
        mirror = self.upstreams.get(name)
        if mirror is None:
            return None
        return MirrorLeg(mirror, name, request, self.limits.write_buffer)


class MirrorLeg:
    """
    The route's mirror leg of one connection, from its connect to the relay
    whose client it copies. Nothing about it may touch the primary: connect
    failures are logged at debug level, what it sends is discarded, and a
    slow mirror is cut off by the relay (relay/mirror.py).
    """

    log = Logger()

    def __init__(self, mirror: Upstream[UpstreamProtocol], name: str, request: UpstreamRequest,
                 write_buffer: int) -> None:
        self._upstream = mirror
        self._name = name
        self._write_buffer = write_buffer
        self._relay: Relay | None = None
        self._copies: Mirror | None = None
        self._open: tuple[Node, UpstreamProtocol] | None = None  # opened before the relay started
        self._over = False  # failed, or cancelled: no relay takes it
        self._connect: Deferred[tuple[Node, UpstreamProtocol]] = Deferred.fromCoroutine(mirror.connect(request))
        self._connect.addCallbacks(self._opened, self._failed)

    def attach(self, relay: Relay) -> None:
        """The relay has started: its client's frames are copied from the first, held until the leg opens."""
        if self._over:
            return
        copies = relay.expect_mirror(self._write_buffer)
        if copies is None:
            self.cancel()
            return
        self._relay, self._copies = relay, copies
        opened, self._open = self._open, None
        if opened is not None:
            self._hand_over(*opened)

    def cancel(self) -> None:
        """No relay will take it: the handshake failed, or the client left before the relay started."""
        if self._over:
            return
        self._over = True
        opened, self._open = self._open, None
        if opened is not None:
            node, leg = opened
            self._upstream.release(node)
            transport_of(leg).loseConnection()
        else:
            self._connect.cancel()

    def _opened(self, result: tuple[Node, UpstreamProtocol]) -> None:
        node, leg = result
        if self._over:
            self._upstream.release(node)
            transport_of(leg).loseConnection()
        elif self._relay is None:
            self._open = result
        else:
            self._hand_over(node, leg)

    def _hand_over(self, node: Node, leg: UpstreamProtocol) -> None:
        relay, copies = self._relay, self._copies
        assert relay is not None and copies is not None  # attached
        mirror = self._upstream
        released: list[bool] = []

        def release() -> None:
            if not released:
                released.append(True)
                mirror.release(node)

        if not copies.opened(transport_of(leg), release):
            release()
            transport_of(leg).loseConnection()
            return
        sink = Leg(_discard, relay.mirror_lost)
        if not adopt(leg, sink):
            leg.sink = sink
        leg.take_pending()

    def _failed(self, f: Failure) -> None:
        if self._over:
            return  # cancelled: nobody wanted it any more
        self._over = True
        self.log.debug("mirror {mirror} not reached: {error}", mirror=self._name, error=f.getErrorMessage())
        if self._copies is not None:
            self._copies.failed()


class Reconnector:
    """
    ``on_upstream_close = reconnect`` (and durable routes): a new upstream
    leg for a relay whose leg was lost, on any eligible node, with the
    upstream's retries and backoff. The relay calls it.
    """

    log = Logger()

    def __init__(self, info: ConnInfo, upstream: Upstream[UpstreamProtocol], request: UpstreamRequest,
                 agreed: str | None) -> None:
        self.info = info
        self.upstream = upstream
        # the new leg must speak what the client agreed to (nothing, if it agreed to nothing)
        self.request = replace(request, protocols=(agreed,) if agreed is not None else ())
        self.agreed = agreed

    def __call__(self, relay: Relay) -> Deferred[None]:
        return Deferred.fromCoroutine(self._reconnect(relay))

    async def _reconnect(self, relay: Relay) -> None:
        info, upstream, request = self.info, self.upstream, self.request
        if info.node is not None:
            upstream.release(info.node, vanished=relay.upstream_vanished)
            info.node = None
        leg_headers = relay.hooks.leg_headers()
        if leg_headers is not None:
            request = replace(request, headers={**request.headers, **leg_headers}, quiet=True)
        node, leg = await upstream.connect(request)
        if leg.websocket_protocol_in_use != self.agreed or relay.done or not relay.reconnecting:
            upstream.release(node)
            transport_of(leg).loseConnection()
            if relay.done or not relay.reconnecting:
                return
            raise UpstreamError(codes.UPSTREAM_FAILED, "the new upstream leg chose another subprotocol")
        info.node = node
        self.log.info(
            "{conn_id} reconnected to {node}", conn_id=info.conn_id, node=node.url, trace_id=info.trace_id
        )
        new_leg = relay.upstream_reconnected(transport_of(leg))
        if not adopt(leg, new_leg):
            leg.sink = new_leg
        pending = leg.take_pending()
        if pending:
            new_leg.dataReceived(pending)
