"""
What one /metrics scrape costs the reactor thread, by number of open connections.

Forwarding is untouched by metrics (nothing is counted per message: the
collector reads the relays' own counters at scrape time), so the cost to
watch is the scrape itself, which runs in the reactor thread.

    PYTHONPATH=. .venv/bin/python bench/scrape_cost.py [OPEN_CONNECTIONS...]
"""

from __future__ import annotations

import sys
import timeit
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from wsgateway.config.upstreams import NodeConfig, UpstreamConfig
from wsgateway.ops.metrics import GatewayCollector, GatewayMetrics
from wsgateway.ops.stats import Connection, GatewayStats
from wsgateway.upstream.pool import Upstream

ROUTES, UPSTREAMS, NODES = 10, 5, 4


@dataclass
class Relay:
    messages_c2u: int = 1
    messages_u2c: int = 2
    bytes_c2u: int = 30
    bytes_u2c: int = 40


@dataclass
class View:
    routes: list[Any]
    upstreams: dict[str, Any]
    stats: GatewayStats = field(default_factory=GatewayStats)

    def now(self) -> float:
        return 0.0


def upstream(name: str, first_port: int) -> Upstream[Any]:
    nodes = tuple(
        NodeConfig(url=f"ws://10.0.0.1:{p}", scheme="ws", host="10.0.0.1", port=p, path="", weight=1, zone=None,
                   version=None, labels={})
        for p in range(first_port, first_port + NODES)
    )
    cfg = UpstreamConfig(
        name=name, nodes=nodes, balance="round_robin", zone=None, version_header=None, connect_timeout=3.0,
        retries=2, backoff_initial=0.1, backoff_max=2.0, tls_ca=None, tls_cert=None, tls_key=None,
        health_check="none", health_interval=5.0, health_timeout=2.0, healthy_threshold=2, unhealthy_threshold=3,
        reconnect_buffer=1 << 20,
    )
    return Upstream(cfg, Clock(), lambda node, req, timeout: Deferred())


def measure(open_connections: int, repeat: int = 200) -> str:
    ups = {f"u{i}": upstream(f"u{i}", 9000 + 10 * i) for i in range(UPSTREAMS)}
    view = View(routes=[SimpleNamespace(name=f"r{i}") for i in range(ROUTES)], upstreams=ups)
    metrics = GatewayMetrics(view, upstreams=list(ups))
    stats = view.stats
    for i in range(open_connections):
        stats.opened(Connection(f"c{i}", f"r{i % ROUTES}", "u0", "n", "peer", "t", None, 0.0, Relay()))
    for i in range(200):  # some history: closes and refusals
        r = Relay()
        stats.opened(Connection(f"x{i}", f"r{i % ROUTES}", "u0", "n", "peer", "t", None, 0.0, r))
        stats.closed(r, (1000, 1001, 4001, 1006)[i % 4])
    for status in (401, 403, 404, 429, 502, 503):
        stats.handshake("r1", status)
    full = timeit.timeit(lambda: generate_latest(metrics.registry), number=repeat) / repeat
    alone = CollectorRegistry()
    alone.register(GatewayCollector(view))
    collector = timeit.timeit(lambda: generate_latest(alone), number=repeat) / repeat
    size = len(generate_latest(metrics.registry))
    return (f"{open_connections:7d} open connections: scrape {full * 1e3:.2f} ms "
            f"(GatewayCollector alone {collector * 1e3:.2f} ms), {size} bytes")


if __name__ == "__main__":
    for n in [int(a) for a in sys.argv[1:]] or [0, 1000, 10000]:
        print(measure(n))
