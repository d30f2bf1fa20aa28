"""
prometheus_client behaviours wsgateway relies on (see tests/unit/compat/helpers.py):
the parent of worker processes parses its workers' /metrics and re-renders
the merged families (wsgateway/workers/aggregate.py), matching families by name.
"""

from __future__ import annotations


from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .helpers import relied_on

LIB = "prometheus-client"
OURS = "wsgateway/workers/aggregate.py"


def _exposition() -> str:
    registry = CollectorRegistry(auto_describe=True)
    Counter("wsgateway_config_reloads", "reloads", ["result"], registry=registry).labels("ok").inc(2)
    Gauge("wsgateway_open", "open", registry=registry).set(3)
    Histogram("wsgateway_connect_seconds", "connect", buckets=(0.1, 1.0), registry=registry).observe(0.5)
    return generate_latest(registry).decode()


def test_the_parser_names_counter_families_without_total() -> None:
    # MAX_FAMILIES holds "wsgateway_config_reloads", not "..._total"
    with relied_on(LIB, "parser.text_string_to_metric_families (counter family names without _total; "
                        "Sample.name/.labels/.value)", OURS):
        families = {f.name: f for f in text_string_to_metric_families(_exposition())}
        reloads = families["wsgateway_config_reloads"]
        assert reloads.type == "counter"
        sample = next(s for s in reloads.samples if s.name == "wsgateway_config_reloads_total")
        assert sample.labels == {"result": "ok"} and sample.value == 2.0
        hist = families["wsgateway_connect_seconds"]
        names = {s.name for s in hist.samples}
        assert {"wsgateway_connect_seconds_bucket", "wsgateway_connect_seconds_count",
                "wsgateway_connect_seconds_sum"} <= names
        assert {s.labels.get("le") for s in hist.samples if s.name.endswith("_bucket")} == {"0.1", "1.0", "+Inf"}


def test_parsed_families_render_back_to_the_same_exposition() -> None:
    from wsgateway.workers.aggregate import parse, render

    with relied_on(LIB, "core.Metric(name, doc, type).add_sample / Collector / CollectorRegistry(auto_describe=False)"
                        " / generate_latest", OURS):
        text = _exposition()
        once = render(parse(text)).decode()
        assert parse(once) == parse(text)
        assert "wsgateway_config_reloads_total{result=\"ok\"} 2.0" in once
        assert 'wsgateway_connect_seconds_bucket{le="+Inf"} 1.0' in once
        assert isinstance(Metric("x", "d", "gauge"), Metric)


def test_process_collector_family_names() -> None:
    # aggregate.MIN_FAMILIES and the sum of process_max_fds name these
    from prometheus_client.process_collector import ProcessCollector

    with relied_on(LIB, "process_collector.ProcessCollector family names", OURS + ", wsgateway/ops/metrics.py"):
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        names = {f.name for f in registry.collect()}
        assert {"process_start_time_seconds", "process_open_fds", "process_max_fds"} <= names, names


def test_disable_created_metrics_drops_created_samples() -> None:
    from prometheus_client import disable_created_metrics

    with relied_on(LIB, "disable_created_metrics (no *_created families)", "wsgateway/ops/metrics.py, wsgateway/workers/parent.py"):
        disable_created_metrics()  # what wsgateway/ops/metrics.py and wsgateway/workers/parent.py do at start, process-wide
        assert "_created" not in _exposition()
