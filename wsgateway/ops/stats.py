# -*- test-case-name: tests.unit.ops.test_stats -*-
"""
What the gateway has done, per route, for /metrics, the dashboard and the
admin API. Nothing here runs per message: a relay already counts its own
messages and bytes (the access line needs them), so live counts are read
from the open relays when asked, and a closed relay's counts are added to
the route's totals once. Reactor-free.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from wsgateway.codes import ABNORMAL

C2U = "client_to_upstream"
U2C = "upstream_to_client"
NO_ROUTE = ""  # handshakes refused before a route was found (404, 400...)


class Counted(Protocol):
    """What a relay exposes for counting (relay.Relay has these)."""

    messages_c2u: int
    messages_u2c: int
    bytes_c2u: int
    bytes_u2c: int


@dataclass
class RouteTotals:
    """One route's counts, closed connections only; live ones are added on read."""

    messages: Counter[str] = field(default_factory=Counter)  # by direction
    bytes: Counter[str] = field(default_factory=Counter)
    handshakes: Counter[int] = field(default_factory=Counter)  # by HTTP status (101 = accepted)
    closes: Counter[int] = field(default_factory=Counter)  # by close code


@dataclass
class Connection:
    """One open relayed connection, for /admin/connections."""

    conn_id: str
    route: str
    upstream: str
    node: str
    peer: str
    trace_id: str
    subject: str | None
    started: float
    relay: Any  # a Counted relay
    compressed: bool = False  # permessage-deflate negotiated with the client


class GatewayStats:
    def __init__(self) -> None:
        self.routes: dict[str, RouteTotals] = {}
        self.open: dict[int, Connection] = {}  # id(relay) -> connection

    def _route(self, name: str) -> RouteTotals:
        totals = self.routes.get(name)
        if totals is None:
            totals = self.routes[name] = RouteTotals()
        return totals

    def handshake(self, route: str | None, status: int) -> None:
        self._route(route or NO_ROUTE).handshakes[status] += 1

    def opened(self, conn: Connection) -> None:
        self._route(conn.route).handshakes[101] += 1
        self.open[id(conn.relay)] = conn

    def closed(self, relay: Counted, code: int | None) -> None:
        conn = self.open.pop(id(relay), None)
        if conn is None:
            return
        totals = self._route(conn.route)
        _add(totals, relay)
        # 1006: no close frame either way (RFC 6455 7.1.5)
        totals.closes[code if code is not None else ABNORMAL] += 1

    def connections(self, route: str | None = None) -> Iterator[Connection]:
        for conn in self.open.values():
            if route is None or conn.route == route:
                yield conn

    def active(self) -> Counter[str]:
        """Open connections per route."""
        return Counter(conn.route for conn in self.open.values())

    def compressed_active(self) -> Counter[str]:
        """Open connections per route with permessage-deflate negotiated."""
        return Counter(conn.route for conn in self.open.values() if conn.compressed)

    def traffic(self) -> dict[str, RouteTotals]:
        """Messages and bytes per route and direction, open connections included."""
        out: dict[str, RouteTotals] = {}
        for name, totals in self.routes.items():
            view = out[name] = RouteTotals(handshakes=totals.handshakes, closes=totals.closes)
            view.messages.update(totals.messages)
            view.bytes.update(totals.bytes)
        for conn in self.open.values():
            found = out.get(conn.route)
            if found is None:
                found = out[conn.route] = RouteTotals()
            _add(found, conn.relay)
        return out


def _add(totals: RouteTotals, relay: Counted) -> None:
    totals.messages[C2U] += relay.messages_c2u
    totals.messages[U2C] += relay.messages_u2c
    totals.bytes[C2U] += relay.bytes_c2u
    totals.bytes[U2C] += relay.bytes_u2c
