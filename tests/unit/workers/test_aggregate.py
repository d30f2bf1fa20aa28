"""
wsgateway/workers/aggregate.py: what the parent of worker processes makes of their
answers. Pure units: metrics pages as the workers' real registries write
them, and their JSON views.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from wsgateway.workers.aggregate import (
    REDIS_QUEUE_GAUGES,
    MetricsAggregate,
    combine_status,
    merge_routes,
    merge_upstreams,
)


def page(handshakes: int, active: int, healthy: int, reloads: int, observations: list[float],
         start: float = 100.0) -> str:
    """A worker's /metrics, made by prometheus_client as the gateway's are."""
    disable_created_metrics()
    r = CollectorRegistry()
    Counter("wsgateway_handshakes", "h", ["route", "status"], registry=r).labels("main", "101").inc(handshakes)
    Gauge("wsgateway_connections_active", "a", ["route"], registry=r).labels("main").set(active)
    Gauge("wsgateway_upstream_node_healthy", "n", ["upstream", "node"], registry=r).labels("b", "ws://n").set(healthy)
    Counter("wsgateway_config_reloads", "r", ["result"], registry=r).labels("ok").inc(reloads)
    hist = Histogram("wsgateway_upstream_connect_seconds", "c", ["upstream"], buckets=(0.01, 0.1), registry=r)
    for value in observations:
        hist.labels("b").observe(value)
    Gauge("process_start_time_seconds", "s", registry=r).set(start)
    return generate_latest(r).decode()


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def test_counters_and_histograms_are_summed_gauges_by_their_rule() -> None:
    agg = MetricsAggregate()
    agg.update(101, page(handshakes=3, active=2, healthy=1, reloads=1, observations=[0.005, 0.05], start=200.0))
    agg.update(102, page(handshakes=4, active=5, healthy=0, reloads=1, observations=[0.5], start=150.0))
    own = page(handshakes=0, active=0, healthy=1, reloads=1, observations=[], start=100.0)
    text = agg.render(own)
    found = samples(text)
    assert value(found, "wsgateway_handshakes_total", route="main", status="101") == 7
    assert value(found, "wsgateway_connections_active", route="main") == 7
    assert value(found, "wsgateway_upstream_node_healthy", upstream="b", node="ws://n") == 0  # the minimum
    assert value(found, "wsgateway_config_reloads_total", result="ok") == 1  # the maximum: one SIGHUP
    assert value(found, "wsgateway_upstream_connect_seconds_bucket", upstream="b", le="0.01") == 1
    assert value(found, "wsgateway_upstream_connect_seconds_bucket", upstream="b", le="0.1") == 2
    assert value(found, "wsgateway_upstream_connect_seconds_bucket", upstream="b", le="+Inf") == 3
    assert value(found, "wsgateway_upstream_connect_seconds_count", upstream="b") == 3
    assert value(found, "wsgateway_upstream_connect_seconds_sum", upstream="b") == 0.555
    assert value(found, "process_start_time_seconds") == 100.0
    # one family each, labels in the order the gateway writes them, buckets in order
    out = text.decode()
    assert out.count("# TYPE wsgateway_handshakes_total counter") == 1
    assert 'wsgateway_handshakes_total{route="main",status="101"} 7.0' in out
    buckets = [line.split("le=")[1][:6] for line in out.splitlines() if "_bucket" in line]
    assert buckets == ['"0.01"', '"0.1",', '"+Inf"']


def test_a_dead_worker_keeps_its_counters_not_its_gauges() -> None:
    agg = MetricsAggregate()
    agg.update(101, page(handshakes=10, active=4, healthy=1, reloads=2, observations=[0.05]))
    agg.update(102, page(handshakes=5, active=1, healthy=1, reloads=2, observations=[]))
    agg.retire(101)
    agg.retire(101)  # twice changes nothing
    agg.update(103, page(handshakes=1, active=1, healthy=1, reloads=0, observations=[0.05]))  # its replacement
    found = samples(agg.render(""))
    assert value(found, "wsgateway_handshakes_total", route="main", status="101") == 16  # never goes down
    assert value(found, "wsgateway_connections_active", route="main") == 2  # only the live ones
    assert value(found, "wsgateway_upstream_connect_seconds_count", upstream="b") == 2
    assert value(found, "wsgateway_config_reloads_total", result="ok") == 2  # the live maximum


def test_routes_and_upstreams_merge() -> None:
    def route(connections: int, msgs: int) -> dict[str, Any]:
        return {"name": "main", "path": "/**", "connections": connections,
                "messages": {"client_to_upstream": msgs, "upstream_to_client": 0},
                "bytes": {"client_to_upstream": msgs * 10, "upstream_to_client": 0}}

    merged = merge_routes([[route(2, 3)], [route(5, 1), {**route(1, 1), "name": "new"}]])
    assert [(r["name"], r["connections"], r["messages"]["client_to_upstream"], r["bytes"]["client_to_upstream"])
            for r in merged] == [("main", 7, 4, 40), ("new", 1, 1, 10)]

    def node(state: str, active: int, failure: str | None = None) -> dict[str, Any]:
        return {"url": "ws://n", "active": active, "state": state, "last_failure": failure, "ejected_for": 0.0,
                "ejections": 1}

    a = {"b": {"ready": True, "balance": "round_robin", "nodes": [node("healthy", 2)]}}
    b = {"b": {"ready": False, "balance": "round_robin", "nodes": [node("unhealthy", 3, "refused")]}}
    [up] = merge_upstreams([a, b]).values()
    assert up["ready"] is False
    assert up["nodes"] == [{"url": "ws://n", "active": 5, "state": "unhealthy", "last_failure": "refused",
                            "ejected_for": 0.0, "ejections": 2}]
    assert a["b"]["nodes"][0]["state"] == "healthy"  # the inputs are not changed


def test_status_of_the_whole_gateway() -> None:
    assert combine_status(False, ["ready", "ready"]) == "ready"
    assert combine_status(False, ["ready", "degraded"]) == "degraded"
    assert combine_status(False, ["ready", "starting"]) == "unready"
    assert combine_status(False, ["ready", "down"]) == "unready"
    assert combine_status(False, []) == "unready"
    assert combine_status(True, ["ready", "ready"]) == "draining"


def test_a_gauge_every_worker_reads_from_one_place_is_counted_once() -> None:
    def depth_page(depth: int) -> str:
        disable_created_metrics()
        r = CollectorRegistry()
        Gauge("wsgateway_queue_depth", "d", registry=r).set(depth)
        return generate_latest(r).decode()

    # SQLite: a file per worker, so the depths add up
    agg = MetricsAggregate()
    agg.update(101, depth_page(5))
    agg.update(102, depth_page(3))
    assert value(samples(agg.render("")), "wsgateway_queue_depth") == 8
    # Redis: each worker reports the one cluster queue (5 just now, 6 a moment later)
    agg = MetricsAggregate(REDIS_QUEUE_GAUGES)
    agg.update(101, depth_page(5))
    agg.update(102, depth_page(6))
    assert value(samples(agg.render("")), "wsgateway_queue_depth") == 6


def test_the_redis_queue_size_is_counted_once_and_each_sqlite_file_adds_up() -> None:
    def size_page(size: int) -> str:
        disable_created_metrics()
        r = CollectorRegistry()
        Gauge("wsgateway_queue_bytes", "b", registry=r).set(size)
        return generate_latest(r).decode()

    agg = MetricsAggregate(REDIS_QUEUE_GAUGES)
    agg.update(101, size_page(4096))
    agg.update(102, size_page(4100))
    assert value(samples(agg.render("")), "wsgateway_queue_bytes") == 4100
    agg = MetricsAggregate()
    agg.update(101, size_page(4096))
    agg.update(102, size_page(100))
    assert value(samples(agg.render("")), "wsgateway_queue_bytes") == 4196


# -- the gateway's own registries, as a worker and the parent serve them ------


class _View:
    def __init__(self) -> None:
        from wsgateway.ops.stats import GatewayStats

        self.routes = [type("R", (), {"name": "main"})()]
        self.upstreams: dict[str, Any] = {}
        self.stats = GatewayStats()

    def now(self) -> float:
        return 1000.0


def worker_page(worker: int, durations: list[float]) -> str:
    """What worker ``worker`` serves its parent (workers/child.py): its registry, fd gauges labelled."""
    from wsgateway.ops.exposition import worker_registry
    from wsgateway.ops.metrics import GatewayMetrics
    from wsgateway.ops.stats import Connection

    view = _View()
    metrics = GatewayMetrics(view)
    for i, seconds in enumerate(durations):
        relay = type("Relay", (), {"messages_c2u": 0, "messages_u2c": 0, "bytes_c2u": 0, "bytes_u2c": 0})()
        view.stats.opened(Connection(f"c{i}", "main", "", "", "tcp4:127.0.0.1:1", "t", None, 0.0, relay))
        view.stats.handshake_time("main", 0.003)
        view.stats.closed(relay, 1000, now=seconds)
    view.stats.handshake(None, 404, "no_route", 0.0002)
    return generate_latest(worker_registry(metrics.registry, worker)).decode()


def parent_page() -> str:
    from prometheus_client.process_collector import ProcessCollector

    disable_created_metrics()
    r = CollectorRegistry()
    ProcessCollector(registry=r)
    return generate_latest(r).decode()


def test_each_process_keeps_its_descriptor_series_under_a_worker_label() -> None:
    agg = MetricsAggregate()
    agg.update(101, worker_page(1, [5.0, 400.0]))
    agg.update(102, worker_page(2, [4000.0]))
    found = samples(agg.render(parent_page()))
    for name in ("process_open_fds", "process_max_fds"):
        series = {dict(k[1]).get("worker"): v for k, v in found.items() if k[0] == name}
        assert set(series) == {"1", "2", "parent"}, series  # three processes, none summed
        assert all(v > 0 for v in series.values())
    # what is not per process is merged as before: the histograms, bucket by bucket
    assert value(found, "wsgateway_connection_duration_seconds_count", route="main") == 3
    assert value(found, "wsgateway_connection_duration_seconds_bucket", route="main", le="10.0") == 1
    assert value(found, "wsgateway_connection_duration_seconds_bucket", route="main", le="900.0") == 2
    assert value(found, "wsgateway_connection_duration_seconds_bucket", route="main", le="+Inf") == 3
    assert value(found, "wsgateway_connection_duration_seconds_sum", route="main") == 4405.0
    assert value(found, "wsgateway_handshake_duration_seconds_count", route="main") == 3
    assert value(found, "wsgateway_handshake_duration_seconds_count", route="(none)") == 2
    assert value(found, "wsgateway_handshakes_total", route="(none)", status="404", reason="no_route") == 2
    assert value(found, "wsgateway_handshakes_total", route="main", status="101", reason="") == 3
    # a dead worker's descriptors go with it
    agg.retire(101)
    found = samples(agg.render(parent_page()))
    assert {dict(k[1])["worker"] for k in found if k[0] == "process_open_fds"} == {"2", "parent"}


def test_openmetrics_when_the_scraper_asks_for_it() -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

    agg = MetricsAggregate()
    agg.update(101, worker_page(1, [5.0]))
    own = parent_page()
    body, kind = agg.exposition(own, b"application/openmetrics-text;version=1.0.0;q=0.5,text/plain;q=0.3")
    assert kind.startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(text)}
    assert families["wsgateway_handshakes"].type == "counter"
    assert families["wsgateway_connection_duration_seconds"].type == "histogram"
    body, kind = agg.exposition(own, None)
    assert kind.startswith("text/plain; version=0.0.4") and not body.decode().endswith("# EOF\n")
    assert agg.render(own) == body
