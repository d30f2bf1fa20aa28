# -*- test-case-name: tests.integration.test_drain, tests.unit.core.test_drain -*-
"""
The live connections of this process, in one owner: the open relays and
broadcast sessions, the connection limiter, the stats, the tracer whose
spans they end, and the broker and durable queue they are registered
with. Every listener's factory hands its connections here, the service
drains them from here, and the admin views read the stats kept here.

The durable queue is a one-way collaborator: this object registers each
durable relay with it (``track``/``untrack``); the queue knows nothing of
this one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from wsgateway.handshake.admission import ConnectionLimiter, PendingHandshakes
from wsgateway.interfaces import DurableQueue
from wsgateway.ops import accesslog
from wsgateway.ops.stats import Connection, GatewayStats
from wsgateway.ops.tracing import NoTracer, OtelTracer


class LiveConnections:
    """Every open connection of the process and what counts, traces and limits them."""

    log = Logger()

    def __init__(
        self,
        *,
        clock: IReactorTime,
        limiter: ConnectionLimiter,
        stats: GatewayStats | None = None,
        tracer: NoTracer | OtelTracer | None = None,
        broker: Any = None,
        queue: DurableQueue | None = None,
    ) -> None:
        self.clock = clock
        # shared by every listener, so the limits hold for the whole gateway
        self.limiter = limiter
        self.stats = stats if stats is not None else GatewayStats()
        self.tracer = tracer if tracer is not None else NoTracer()
        self.broker = broker  # broadcast routes refuse with 503 without one
        self.queue = queue  # the durable queue, when a route is at_least_once
        self.relays: set[Any] = set()
        self.sessions: set[Any] = set()  # open broadcast connections
        # connections of every listener not upgraded yet ([limits] max_pending_handshakes)
        self.pending = PendingHandshakes()
        # connections that found their address's share taken, waiting for their request to refuse it
        self.over_share = 0
        # the refused handshakes' lines, rate-limited per reason
        self.refusal_lines = accesslog.RefusalLines()

    def open_connections(self) -> list[Any]:
        """Every open connection: relays and broadcast sessions (both have drain, client, upstream)."""
        return [*self.relays, *self.sessions]

    # -- proxied connections ----------------------------------------------

    def relay_opened(self, relay: Any, info: Any, identity: Any, delivery: Any) -> None:
        """
        ``relay`` took over the connection described by ``info`` (relay/start.py
        ConnInfo); ``delivery`` is its durable hooks, if any.
        """
        self.relays.add(relay)
        if delivery is not None and self.queue is not None:
            self.queue.track(info.conn_id, delivery)
        route = info.route
        subject = identity.subject if identity is not None else None
        if info.pushes is not None:
            for channel in info.pushes.channels:
                self.broker.join(channel, info.conn_id, subject)
        self.stats.opened(Connection(
            conn_id=info.conn_id,
            route=route.name if route is not None else "",
            upstream=(route.upstream or "") if route is not None else "",
            node=info.node.url if info.node else "",
            peer=info.peer,
            trace_id=info.trace_id,
            subject=subject,
            started=relay.started,
            relay=relay,
            compressed=relay.deflate,
        ))

    def relay_done(self, info: Any, relay: Any) -> None:
        self.relays.discard(relay)
        if self.queue is not None:
            self.queue.untrack(info.conn_id, relay.hooks)
        pushes = info.pushes
        if pushes is not None:
            pushes.outbox.release()
            for channel in pushes.channels:
                self.broker.leave(channel, info.conn_id)
            pushes.cancel()
            info.pushes = None
        now = self.clock.seconds()  # the end: the duration histogram's and the access line's
        self.stats.closed(relay, relay.close_code, now)
        route = info.route
        if info.span is not None:
            self.end_span(info, relay, {
                "wsgateway.upstream.pool": route.upstream if route else None,
                "wsgateway.node": info.node.url if info.node else None,
                "websocket.close_code": relay.close_code,
                "websocket.closed_by": relay.closed_by,
            })
        if info.ip is not None:
            self.limiter.release(info.ip)
            info.ip = None
        if info.node is not None and info.upstream is not None:
            info.upstream.release(info.node, vanished=relay.upstream_vanished)
        accesslog.relay_closed(info, relay, now)

    # -- broadcast connections --------------------------------------------

    def session_opened(self, session: Any, conn: Connection) -> None:
        self.sessions.add(session)
        self.stats.opened(conn)

    def session_done(self, proto: Any, session: Any) -> None:
        self.sessions.discard(session)
        now = self.clock.seconds()
        self.stats.closed(session, proto.close_code, now)
        self.end_span(proto, session, {"wsgateway.channel": proto.channel, "websocket.close_code": proto.close_code})
        accesslog.channel_closed(proto, session, now)

    # -- connections not upgraded yet --------------------------------------

    def handshake_started(self, proto: Any, max_pending: int) -> list[Any]:
        """
        Hold ``proto`` until it is upgraded or lost; returns the oldest
        connections beyond ``max_pending``, no longer held, for the caller
        to drop.
        """
        return self.pending.add(proto, max_pending)

    def handshake_ended(self, proto: Any) -> None:
        """``proto`` was upgraded or lost (a no-op when it was not held)."""
        self.pending.discard(proto)

    def over_share_started(self, max_waiting: int) -> bool:
        """Count one more connection waiting over its address's share; False (nothing counted) at ``max_waiting``."""
        if self.over_share >= max_waiting:
            return False
        self.over_share += 1
        return True

    def over_share_ended(self) -> None:
        self.over_share -= 1

    # -- handshakes that end without a connection --------------------------

    def handshake_accepted(self, proto: Any) -> None:
        """``proto``'s 101 is out: its handshake's time (from its request head) is observed."""
        route = proto.route
        if route is not None and proto.head_at is not None:
            self.stats.handshake_time(route.name, self.clock.seconds() - proto.head_at)

    def handshake_refused(self, proto: Any, status: int, reason: str, why: str = "") -> None:
        """
        ``proto``'s handshake is refused with ``status``: ``reason`` is a
        ``codes.R_*`` token, ``why`` a fixed phrase or a log-safe text ("" for none).
        """
        route = proto.route
        now = self.clock.seconds()
        head_at = getattr(proto, "head_at", None)
        self.stats.handshake(route.name if route else None, status, reason,
                             now - head_at if head_at is not None else None)
        if proto.span is not None:
            self.end_span(proto, extra={"http.response.status_code": status}, error=f"refused with {status}")
        self.refusal_lines.refused(proto, status, reason, why, now)

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
