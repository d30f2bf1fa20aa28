# -*- test-case-name: tests.integration.test_metrics, tests.unit.ops.test_metrics -*-
"""
Prometheus metrics (docs/metrics.md: the names and labels are binding),
served as ``GET /metrics`` on the admin port.

Nothing here runs per message. What the relays and the handshake already
count for the access line and the admin API (``stats.GatewayStats``, with
its two duration histograms observed once per handshake and per closed
connection), and the nodes' health and open connections, are read when
Prometheus scrapes, by L{GatewayCollector}.
Only events that happen once per connection attempt or per operator action
are real prometheus_client objects, updated as they happen: the upstream
connect time and retries (reported by ``Upstream.connect`` through its
``observer``), and config reloads.

Label values, all bounded so a hostile peer cannot grow the series count:

- ``route``: a configured route name; ``(none)`` for handshakes refused
  before any route matched (404, 400, 431...): a route name can never
  contain parentheses, so it cannot clash with a route.
- ``status``: the HTTP status of the handshake; 101 = accepted.
- ``reason``: why a handshake was refused, one of ``codes.REFUSAL_REASONS``;
  ``""`` for the accepted ones (101).
- ``direction``: ``client_to_upstream`` or ``upstream_to_client``.
- ``code``: the connection's close code (1006 when neither side sent a
  close frame), kept as a number in 1000-1015 and 3000-4999 and folded
  into ``other`` elsewhere (codes a peer made up).
- ``upstream``, ``node``: configured names and node URLs.
- ``result``: ``ok`` or ``error``.

The registry is the gateway's own (not prometheus_client's global one), so
two gateways in one process (tests) never share counts. Counters of closed
connections and of routes removed by a reload stay until the process ends,
as counters should.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from twisted.logger import Logger

from wsgateway.upstream.health import eligible_nodes
from wsgateway.ops.stats import C2U, DURATION_BUCKETS, HANDSHAKE_BUCKETS, NO_ROUTE, U2C, Buckets, GatewayStats
from wsgateway.version import build_info

NO_ROUTE_LABEL = "(none)"
OTHER_CODE = "other"
DIRECTIONS = (C2U, U2C)
RELOAD_RESULTS = ("ok", "error")

# Upstream handshakes: loopback and LAN take a millisecond or two, a TLS
# upstream across regions a few hundred; connect_timeout defaults to 3 s.
CONNECT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def close_code_label(code: int) -> str:
    """The ``code`` label: the number for RFC 6455 and application codes, else ``other``."""
    if 1000 <= code <= 1015 or 3000 <= code <= 4999:
        return str(code)
    return OTHER_CODE


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class MetricsView(Protocol):
    """What the collector reads of the running gateway (GatewayService provides it)."""

    @property
    def routes(self) -> Sequence[_Named]: ...

    @property
    def upstreams(self) -> Mapping[str, Any]: ...  # name -> upstream.Upstream

    stats: GatewayStats

    def now(self) -> float: ...


class GatewayCollector(Collector):
    """
    The scrape-time metrics: connections, handshakes, messages, bytes and
    closes per route from GatewayStats, and node health from the upstreams
    the gateway has now (a reload replaces them, so they are read through
    the view on each scrape, never kept).

    Every configured route has its active gauge and both directions of
    messages and bytes, at 0 until traffic comes, so a dashboard sees 0
    rather than no data.
    """

    def __init__(self, view: MetricsView) -> None:
        self.view = view

    def describe(self) -> Iterable[Metric]:
        # Names only, so the registry refuses a duplicate without scraping us.
        return _Families().all()

    def collect(self) -> Iterable[Metric]:
        view = self.view
        stats = view.stats
        f = _Families()
        configured = [r.name for r in view.routes]

        live = stats.active()
        for route in _ordered(configured, live):
            f.active.add_metric([route], live.get(route, 0))
        compressed = stats.compressed_active()
        for route in _ordered(configured, compressed):
            f.compressed.add_metric([route], compressed.get(route, 0))

        traffic = stats.traffic()
        for route in _ordered(configured, traffic):
            totals = traffic.get(route)
            if route == NO_ROUTE:  # refused before a route matched: handshakes only
                if totals is not None:
                    _handshakes(f, NO_ROUTE_LABEL, totals.handshakes[101], totals.refusals, totals.handshake_seconds)
                continue
            for direction in DIRECTIONS:
                f.messages.add_metric([route, direction], totals.messages[direction] if totals else 0)
                f.bytes.add_metric([route, direction], totals.bytes[direction] if totals else 0)
            if totals is None:
                _histogram(f.handshake_seconds, route, Buckets(HANDSHAKE_BUCKETS))
                _histogram(f.duration_seconds, route, Buckets(DURATION_BUCKETS))
                continue
            _handshakes(f, route, totals.handshakes[101], totals.refusals, totals.handshake_seconds)
            _histogram(f.duration_seconds, route, totals.duration_seconds)
            folded: dict[str, int] = {}
            for code, n in totals.closes.items():
                label = close_code_label(code)
                folded[label] = folded.get(label, 0) + n
            for label, n in sorted(folded.items()):
                f.closes.add_metric([route, label], n)

        now = view.now()
        for name, upstream in view.upstreams.items():
            usable = {id(n) for n in eligible_nodes(upstream.nodes, now)}
            for node in upstream.nodes:
                f.node_healthy.add_metric([name, node.url], 1 if id(node) in usable else 0)
                # Node.active: the legs upstream.connect opened and not yet released, attempts in progress included
                f.upstream_active.add_metric([name, node.url], node.active)
        return f.all()


class _Families:
    """One scrape's metric families, empty."""

    def __init__(self) -> None:
        self.active = GaugeMetricFamily(
            "wsgateway_connections_active", "Open relayed connections.", labels=["route"]
        )
        self.compressed = GaugeMetricFamily(
            "wsgateway_compressed_connections_active",
            "Open connections with permessage-deflate negotiated with the client.", labels=["route"]
        )
        self.handshakes = CounterMetricFamily(
            "wsgateway_handshakes",
            "Client handshakes by HTTP status: 101 = accepted, else the refusal, and reason (\"\" for 101); "
            "route (none) = no route matched.",
            labels=["route", "status", "reason"],
        )
        self.handshake_seconds = HistogramMetricFamily(
            "wsgateway_handshake_duration_seconds",
            "Client handshakes: seconds from the request head read to the 101 or the refusal sent.",
            labels=["route"],
        )
        self.duration_seconds = HistogramMetricFamily(
            "wsgateway_connection_duration_seconds",
            "Closed client connections: seconds from the 101 to the end, proxied and broadcast alike.",
            labels=["route"],
        )
        self.messages = CounterMetricFamily(
            "wsgateway_messages", "WebSocket messages relayed.", labels=["route", "direction"]
        )
        self.bytes = CounterMetricFamily(
            "wsgateway_bytes",
            "Bytes relayed as read from the sending peer: whole frames (headers, masks, control frames included).",
            labels=["route", "direction"],
        )
        self.closes = CounterMetricFamily(
            "wsgateway_closes",
            "Closed relayed connections by close code (1006: no close frame; outside 1000-1015 and 3000-4999: other).",
            labels=["route", "code"],
        )
        self.node_healthy = GaugeMetricFamily(
            "wsgateway_upstream_node_healthy",
            "1 when the node may take new connections (healthy, not ejected or in panic mode, not draining), else 0.",
            labels=["upstream", "node"],
        )
        self.upstream_active = GaugeMetricFamily(
            "wsgateway_upstream_connections_active",
            "Open upstream connections per node, handshakes in progress included.",
            labels=["upstream", "node"],
        )

    def all(self) -> list[Metric]:
        return [self.active, self.compressed, self.handshakes, self.handshake_seconds, self.duration_seconds,
                self.messages, self.bytes, self.closes, self.node_healthy, self.upstream_active]


def _handshakes(f: _Families, route: str, accepted: int, refusals: Mapping[tuple[int, str], int],
                seconds: Buckets) -> None:
    if accepted:
        f.handshakes.add_metric([route, "101", ""], accepted)
    for (status, reason), n in sorted(refusals.items()):
        f.handshakes.add_metric([route, str(status), reason], n)
    _histogram(f.handshake_seconds, route, seconds)


def _histogram(family: HistogramMetricFamily, route: str, observed: Buckets) -> None:
    family.add_metric([route], [(floatToGoString(b), float(n)) for b, n in observed.cumulative()], observed.sum)


def _ordered(configured: list[str], seen: Iterable[str]) -> list[str]:
    """The configured routes in file order, then routes only the counts know (removed by a reload)."""
    known = set(configured)
    return configured + sorted(r for r in seen if r not in known)


def register_build_info(registry: CollectorRegistry) -> None:
    """``wsgateway_build_info{version,python,twisted,autobahn} 1``: what this process runs, for joins in PromQL."""
    info = build_info()
    gauge = Gauge("wsgateway_build_info", "Always 1; the labels say which wsgateway, Python, Twisted and Autobahn run.",
                  list(info), registry=registry)
    gauge.labels(**info).set(1)


class GatewayMetrics:
    """
    The gateway's registry and the metrics updated as events happen. One per
    GatewayService; hand it to each Upstream as its ``observer``
    (``upstream.ConnectObserver``).
    """

    def __init__(self, view: MetricsView, *, upstreams: Iterable[str] = ()) -> None:
        # prometheus_client would add a "<name>_created" gauge family beside
        # every counter and histogram: names docs/metrics.md does not have.
        # (Process-wide switch; this daemon is the only user of the library.)
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.registry.register(GatewayCollector(view))
        # process_cpu_seconds_total, process_resident_memory_bytes,
        # process_open_fds...: what every Prometheus target is expected to have.
        ProcessCollector(registry=self.registry)
        register_build_info(self.registry)
        self.connect_seconds = Histogram(
            "wsgateway_upstream_connect_seconds",
            "Upstream handshakes that succeeded: seconds from the attempt's start to the upstream's 101.",
            ["upstream"],
            buckets=CONNECT_BUCKETS,
            registry=self.registry,
        )
        self.retries = Counter(
            "wsgateway_upstream_retries",
            "Upstream connect attempts after the first one of a connection (retries after a failed attempt).",
            ["upstream"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "wsgateway_config_reloads",
            "Configuration reloads (SIGHUP) by result.",
            ["result"],
            registry=self.registry,
        )
        for result in RELOAD_RESULTS:
            self.reloads.labels(result)
        # Broadcast and the durable queue arrive with their own issues; their
        # metrics are registered now (at 0) so dashboards and alerts can be
        # written against them, and are moved through the methods below.
        self.broadcast_messages = Counter(
            "wsgateway_broadcast_messages",
            "Messages published to broadcast channels (counted once per message, not per subscriber).",
            registry=self.registry,
        )
        self.redis_up = Gauge(
            "wsgateway_redis_up",
            "1 while this process can send commands to the shard's Redis (with Sentinel: its current master), "
            "else 0. shard: the [redis] url's host:port/db, or the master name.",
            ["shard"],
            registry=self.registry,
        )
        self.redis_failovers = Counter(
            "wsgateway_redis_failovers",
            "Times this process found a shard's master at a new address (Sentinel failover) and followed it.",
            ["shard"],
            registry=self.registry,
        )
        self.history_recoveries = Counter(
            "wsgateway_history_recoveries",
            "Clients that reconnected with ?since= on a broadcast route: result=recovered (every missed message "
            "sent) or gap (told recovered: false).",
            ["route", "result"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "wsgateway_queue_depth", "Messages waiting in the durable queue.", registry=self.registry
        )
        self.queue_bytes = Gauge(
            "wsgateway_queue_bytes",
            "Bytes the durable queue holds (entries and dead letters, as [queue] max_bytes counts them).",
            registry=self.registry,
        )
        self.queue_delivered = Counter(
            "wsgateway_queue_delivered",
            "Messages delivered from the durable queue.",
            registry=self.registry,
        )
        self.queue_failures = Counter(
            "wsgateway_queue_failures",
            "Durable queue operations that failed (disk full, read-only file, Redis down), by operation; "
            "each append failure closed a client with 1011.",
            ["operation"],
            registry=self.registry,
        )
        for operation in ("append", "read"):
            self.queue_failures.labels(operation)
        for name in upstreams:
            self.connect_seconds.labels(name)
            self.retries.labels(name)

    # -- upstream.ConnectObserver ------------------------------------------

    def upstream_connected(self, upstream: str, seconds: float) -> None:
        self.connect_seconds.labels(upstream).observe(seconds)

    def upstream_retry(self, upstream: str) -> None:
        self.retries.labels(upstream).inc()

    # -- for the SIGHUP reload, broadcast and the queue ----------------------

    def reload_result(self, ok: bool) -> None:
        """One reload done: ``ok`` when the new config (or certificate) was taken, False when it was rejected."""
        self.reloads.labels("ok" if ok else "error").inc()

    def broadcast_published(self, count: int = 1) -> None:
        """Messages published to a channel (once per message, whatever the number of subscribers)."""
        self.broadcast_messages.inc(count)

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def set_queue_bytes(self, size: int) -> None:
        self.queue_bytes.set(size)

    def queue_delivered_count(self, count: int = 1) -> None:
        self.queue_delivered.inc(count)

    def queue_failed(self, operation: str) -> None:
        self.queue_failures.labels(operation).inc()


class BrokerMetrics:
    """The broker's observer: channel traffic into the gateway's metrics and log."""

    log = Logger()

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def broker_published(self, channel: str, deliveries: int) -> None:
        # once per message published here, whatever the number of subscribers
        self._metrics.broadcast_published()

    def broker_received(self, channel: str, deliveries: int, outside: bool) -> None:
        pass  # counted by the node that published it

    def broker_dropped(self, channel: str, reason: str) -> None:
        self.log.debug("broker dropped a message for {channel}: {why}", channel=channel, why=reason)

    def broker_state(self, up: bool) -> None:
        pass  # the broker logs its own ups and downs, once each

    def history_recovered(self, route: str, result: str) -> None:
        self._metrics.history_recoveries.labels(route, result).inc()

    def redis_state(self, shard: str, up: bool) -> None:
        self._metrics.redis_up.labels(shard).set(1 if up else 0)

    def redis_failover(self, shard: str) -> None:
        self._metrics.redis_failovers.labels(shard).inc()
