"""
/metrics (docs/metrics.md): the collector over GatewayStats and node health,
and the connect observer on a fake clock. Every metric moving through a real
gateway is tests/integration/test_metrics.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from prometheus_client import generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from support.metrics_text import get, parse
from wsgateway.config.upstreams import NodeConfig, UpstreamConfig
from wsgateway.ops.metrics import NO_ROUTE_LABEL, GatewayMetrics, close_code_label
from wsgateway.ops.stats import C2U, U2C, Connection, GatewayStats
from wsgateway.upstream.pool import Upstream, UpstreamRequest




# -- units ------------------------------------------------------------------


@dataclass
class FakeRelay:
    messages_c2u: int = 0
    messages_u2c: int = 0
    bytes_c2u: int = 0
    bytes_u2c: int = 0


def node_config(port: int) -> NodeConfig:
    return NodeConfig(
        url=f"ws://127.0.0.1:{port}", scheme="ws", host="127.0.0.1", port=port, path="",
        weight=1, zone=None, version=None, labels={},
    )


def upstream_config(name: str, ports: list[int], retries: int = 0) -> UpstreamConfig:
    return UpstreamConfig(
        name=name, nodes=tuple(node_config(p) for p in ports), balance="round_robin", zone=None,
        version_header=None, connect_timeout=3.0, retries=retries, backoff_initial=0.1, backoff_max=2.0,
        tls_ca=None, tls_cert=None, tls_key=None, health_check="none", health_interval=5.0, health_timeout=2.0,
        healthy_threshold=2, unhealthy_threshold=3, reconnect_buffer=1024 * 1024,
    )


class Attempts:
    """connect_node for Upstream: each attempt a Deferred the test fires."""

    def __init__(self) -> None:
        self.calls: list[Deferred[Any]] = []

    def __call__(self, node: Any, req: Any, timeout: float) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append(d)
        return d


@dataclass
class View:
    routes: list[Any]
    upstreams: dict[str, Any]
    stats: GatewayStats = field(default_factory=GatewayStats)
    t: float = 100.0

    def now(self) -> float:
        return self.t


def conn(relay: FakeRelay, route: str, cid: str) -> Connection:
    return Connection(cid, route, "up", "ws://n", "tcp4:127.0.0.1:1", "t" * 32, None, 0.0, relay)


def test_collector_reads_stats_and_node_health_at_scrape_time() -> None:
    clock = Clock()
    up = Upstream(upstream_config("backend", [1, 2, 3, 4]), clock, Attempts())
    view = View(routes=[SimpleNamespace(name="chat"), SimpleNamespace(name="idle")], upstreams={"backend": up})
    metrics = GatewayMetrics(view, upstreams=["backend"])
    stats = view.stats
    a, b = FakeRelay(), FakeRelay()
    stats.opened(conn(a, "chat", "c1"))
    stats.opened(conn(b, "chat", "c2"))
    stats.handshake("chat", 401, "auth", 0.002)
    stats.handshake("chat", 403, "origin", 0.0005)
    stats.handshake("chat", 403)  # no reason given: the status's (a missing role)
    stats.handshake(None, 404, "no_route", 0.0001)
    stats.handshake(None, 404, "no_route")  # no request head read (no time observed)
    stats.handshake_time("chat", 0.02)
    stats.handshake_time("chat", 45.0)
    a.messages_c2u, a.bytes_c2u, a.messages_u2c, a.bytes_u2c = 2, 22, 3, 33
    b.messages_c2u, b.bytes_c2u = 1, 10
    up.drain(up.nodes[1].url)
    up.nodes[2].health.healthy = False  # failed its active checks
    up.nodes[3].health.ejected_until = view.t + 30  # passively ejected while others serve

    m = parse(generate_latest(metrics.registry).decode())
    assert get(m, "wsgateway_connections_active", route="chat") == 2
    assert get(m, "wsgateway_connections_active", route="idle") == 0  # configured, nothing yet: 0, not absent
    handshakes = {tuple(v for _, v in k[1]): n for k, n in m.items() if k[0] == "wsgateway_handshakes_total"}
    assert handshakes == {  # (reason, route, status): labels sorted by name
        ("", "chat", "101"): 2, ("auth", "chat", "401"): 1, ("origin", "chat", "403"): 1,
        ("forbidden", "chat", "403"): 1, ("no_route", NO_ROUTE_LABEL, "404"): 2,
    }
    # from the request head to the 101 or the refusal: 0.0005 0.002 0.02 45 on chat, 0.0001 without a route
    assert get(m, "wsgateway_handshake_duration_seconds_count", route="chat") == 4
    assert get(m, "wsgateway_handshake_duration_seconds_bucket", route="chat", le="0.001") == 1
    assert get(m, "wsgateway_handshake_duration_seconds_bucket", route="chat", le="0.0025") == 2
    assert get(m, "wsgateway_handshake_duration_seconds_bucket", route="chat", le="30.0") == 3
    assert get(m, "wsgateway_handshake_duration_seconds_bucket", route="chat", le="+Inf") == 4
    assert abs(get(m, "wsgateway_handshake_duration_seconds_sum", route="chat") - 45.0225) < 1e-9
    assert get(m, "wsgateway_handshake_duration_seconds_count", route=NO_ROUTE_LABEL) == 1
    # every configured route has its histograms, at 0
    assert get(m, "wsgateway_handshake_duration_seconds_count", route="idle") == 0
    assert get(m, "wsgateway_connection_duration_seconds_bucket", route="idle", le="86400.0") == 0
    assert get(m, "wsgateway_connection_duration_seconds_count", route="chat") == 0
    assert get(m, "wsgateway_upstream_connections_active", upstream="backend", node=up.nodes[0].url) == 0
    assert get(m, "wsgateway_messages_total", route="chat", direction=C2U) == 3  # live relays included
    assert get(m, "wsgateway_messages_total", route="chat", direction=U2C) == 3
    assert get(m, "wsgateway_bytes_total", route="chat", direction=C2U) == 32
    assert get(m, "wsgateway_bytes_total", route="idle", direction=U2C) == 0
    assert not [k for k in m if dict(k[1]).get("route") == NO_ROUTE_LABEL
                and not k[0].startswith(("wsgateway_handshakes_total", "wsgateway_handshake_duration_seconds"))]
    healthy = {url: get(m, "wsgateway_upstream_node_healthy", upstream="backend", node=url) for url in
               (n.url for n in up.nodes)}
    assert list(healthy.values()) == [1, 0, 0, 0]

    # closed relays keep their counts; codes outside the registered ranges fold into "other"
    stats.closed(a, 4001, now=90.0)  # opened at 0.0: 90 s
    stats.closed(b, None, now=7200.5)  # no close frame: 1006; two hours
    up.nodes[0].active = 3  # three legs open to it (connect() counts them)
    for code in (1000, 999, 2000, 5000, 65535):
        stats.opened(conn(FakeRelay(messages_c2u=1), "chat", f"x{code}"))
        stats.closed(next(c.relay for c in stats.connections() if c.conn_id == f"x{code}"), code)
    # every node but the ejected one gone: panic mode takes the ejected one again
    up.undrain(up.nodes[1].url)
    up.nodes[0].health.healthy = up.nodes[1].health.healthy = False
    m = parse(generate_latest(metrics.registry).decode())
    assert get(m, "wsgateway_connections_active", route="chat") == 0
    closes = {dict(k[1])["code"]: v for k, v in m.items() if k[0] == "wsgateway_closes_total"}
    assert closes == {"1000": 1, "1006": 1, "4001": 1, "other": 4}
    assert get(m, "wsgateway_messages_total", route="chat", direction=C2U) == 8
    # the connections' durations: observed only when the close time is known (a and b)
    assert get(m, "wsgateway_connection_duration_seconds_count", route="chat") == 2
    assert get(m, "wsgateway_connection_duration_seconds_bucket", route="chat", le="60.0") == 0
    assert get(m, "wsgateway_connection_duration_seconds_bucket", route="chat", le="300.0") == 1
    assert get(m, "wsgateway_connection_duration_seconds_bucket", route="chat", le="7200.0") == 1
    assert get(m, "wsgateway_connection_duration_seconds_bucket", route="chat", le="14400.0") == 2
    assert get(m, "wsgateway_connection_duration_seconds_sum", route="chat") == 7290.5
    assert get(m, "wsgateway_upstream_connections_active", upstream="backend", node=up.nodes[0].url) == 3
    assert [get(m, "wsgateway_upstream_node_healthy", upstream="backend", node=n.url) for n in up.nodes] == [0, 0, 0, 1]
    # a reload's new upstreams are what the next scrape shows
    view.upstreams = {"other": Upstream(upstream_config("other", [9]), clock, Attempts())}
    m = parse(generate_latest(metrics.registry).decode())
    assert [k for k in m if k[0] == "wsgateway_upstream_node_healthy"] == [
        ("wsgateway_upstream_node_healthy", (("node", "ws://127.0.0.1:9"), ("upstream", "other")))
    ]


def test_close_code_labels_are_bounded() -> None:
    assert [close_code_label(c) for c in (1000, 1015, 1016, 2999, 3000, 4999, 5000, 0)] == [
        "1000", "1015", "other", "other", "3000", "4999", "other", "other"
    ]


def test_connect_time_and_retries_on_the_injected_clock() -> None:
    clock, attempts = Clock(), Attempts()
    view = View(routes=[], upstreams={})
    metrics = GatewayMetrics(view, upstreams=["u", "quiet"])
    up = Upstream(upstream_config("u", [1, 2], retries=2), clock, attempts, rng=random.Random(1),
                  observer=metrics)
    view.upstreams = {"u": up}
    result = Deferred.fromCoroutine(up.connect(UpstreamRequest(resource="/", headers={})))
    clock.advance(0.5)
    attempts.calls[0].errback(Failure(ConnectionRefusedError()))
    clock.advance(0.1)  # the first backoff is at most backoff_initial
    assert len(attempts.calls) == 2
    clock.advance(0.02)  # the second attempt's handshake takes 20 ms
    attempts.calls[1].callback("leg")
    assert result.called

    m = parse(generate_latest(metrics.registry).decode())
    assert get(m, "wsgateway_upstream_retries_total", upstream="u") == 1
    assert get(m, "wsgateway_upstream_retries_total", upstream="quiet") == 0  # pre-created
    assert get(m, "wsgateway_upstream_connect_seconds_count", upstream="u") == 1
    assert abs(get(m, "wsgateway_upstream_connect_seconds_sum", upstream="u") - 0.02) < 1e-9
    assert get(m, "wsgateway_upstream_connect_seconds_bucket", upstream="u", le="0.025") == 1
    assert get(m, "wsgateway_upstream_connect_seconds_bucket", upstream="u", le="0.01") == 0
    assert not [k for k in m if k[0].endswith("_created")]


def test_reload_broadcast_and_queue_metrics_exist_at_zero_and_move() -> None:
    metrics = GatewayMetrics(View(routes=[], upstreams={}))
    m = parse(generate_latest(metrics.registry).decode())
    for key in (("wsgateway_config_reloads_total", {"result": "ok"}),
                ("wsgateway_config_reloads_total", {"result": "error"}),
                ("wsgateway_broadcast_messages_total", {}), ("wsgateway_queue_depth", {}),
                ("wsgateway_queue_delivered_total", {})):
        assert get(m, key[0], **key[1]) == 0, key
    metrics.reload_result(True)
    metrics.reload_result(False)
    metrics.reload_result(False)
    metrics.broadcast_published(3)
    metrics.set_queue_depth(7)
    metrics.queue_delivered_count(2)
    m = parse(generate_latest(metrics.registry).decode())
    assert get(m, "wsgateway_config_reloads_total", result="ok") == 1
    assert get(m, "wsgateway_config_reloads_total", result="error") == 2
    assert get(m, "wsgateway_broadcast_messages_total") == 3
    assert get(m, "wsgateway_queue_depth") == 7
    assert get(m, "wsgateway_queue_delivered_total") == 2


def test_scrape_with_a_thousand_open_connections() -> None:
    view = View(routes=[SimpleNamespace(name=f"r{i}") for i in range(10)], upstreams={})
    metrics = GatewayMetrics(view)
    for i in range(1000):
        view.stats.opened(conn(FakeRelay(1, 2, 30, 40), f"r{i % 10}", f"c{i}"))
    m = parse(generate_latest(metrics.registry).decode())
    assert sum(v for k, v in m.items() if k[0] == "wsgateway_connections_active") == 1000
    assert get(m, "wsgateway_bytes_total", route="r3", direction=U2C) == 4000


# -- through a real gateway ---------------------------------------------------
