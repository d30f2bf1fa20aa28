# -*- test-case-name: tests.unit.ops.test_stats -*-
"""
What the gateway has done, per route, for /metrics, the dashboard and the
admin API. Nothing here runs per message: a relay already counts its own
messages and bytes (the access line needs them), so live counts are read
from the open relays when asked, and a closed relay's counts are added to
the route's totals once. Reactor-free.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from wsgateway.codes import ABNORMAL, refusal_reason

C2U = "client_to_upstream"
U2C = "upstream_to_client"
NO_ROUTE = ""  # handshakes refused before a route was found (404, 400...)

# Upper bounds (seconds) of wsgateway_handshake_duration_seconds: a
# refusal takes well under a millisecond, an upstream connect a few on a
# LAN, a token key fetch or retries with backoff seconds (connect_timeout
# defaults to 3 s).
HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# ... of wsgateway_connection_duration_seconds: WebSocket connections live
# from a failed first exchange (under a second) to a working day and more.
DURATION_BUCKETS = (0.1, 1.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0)


class Buckets:
    """
    One histogram series: counts per bucket (not cumulative; the last one is
    +Inf), their sum and count. Observed once per handshake or connection,
    never per message; exported by metrics.GatewayCollector at scrape time.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # le: a value equal to a bound is in that bound's bucket
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, count at or below it) pairs as Prometheus wants them, ending with infinity's: the count."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            total += n
            out.append((bound, total))
        return out


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
    refusals: Counter[tuple[int, str]] = field(default_factory=Counter)  # by (status, reason): the refused ones
    closes: Counter[int] = field(default_factory=Counter)  # by close code
    # seconds from the request head to the 101 or the refusal; from the 101 to the close
    handshake_seconds: Buckets = field(default_factory=lambda: Buckets(HANDSHAKE_BUCKETS))
    duration_seconds: Buckets = field(default_factory=lambda: Buckets(DURATION_BUCKETS))


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

    def handshake(self, route: str | None, status: int, reason: str | None = None,
                  seconds: float | None = None) -> None:
        """
        A refused handshake: ``reason`` a ``codes.R_*`` token (by default
        the status's), ``seconds`` its time from the request head, when it
        had one.
        """
        totals = self._route(route or NO_ROUTE)
        totals.handshakes[status] += 1
        totals.refusals[(status, reason or refusal_reason(status))] += 1
        if seconds is not None:
            totals.handshake_seconds.observe(seconds)

    def handshake_time(self, route: str, seconds: float) -> None:
        """An accepted handshake took ``seconds`` from its request head to its 101 (counted by ``opened``)."""
        self._route(route).handshake_seconds.observe(seconds)

    def opened(self, conn: Connection) -> None:
        self._route(conn.route).handshakes[101] += 1
        self.open[id(conn.relay)] = conn

    def closed(self, relay: Counted, code: int | None, now: float | None = None) -> None:
        """``relay``'s connection ended, at ``now`` (the clock's seconds; None: its duration is not observed)."""
        conn = self.open.pop(id(relay), None)
        if conn is None:
            return
        totals = self._route(conn.route)
        _add(totals, relay)
        # 1006: no close frame either way (RFC 6455 7.1.5)
        totals.closes[code if code is not None else ABNORMAL] += 1
        if now is not None:
            totals.duration_seconds.observe(max(0.0, now - conn.started))

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
            view = out[name] = RouteTotals(handshakes=totals.handshakes, refusals=totals.refusals, closes=totals.closes,
                                           handshake_seconds=totals.handshake_seconds,
                                           duration_seconds=totals.duration_seconds)
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
