# -*- test-case-name: tests.unit.ops.test_metrics -*-
"""
How a registry leaves the process: ``GET /metrics`` (L{MetricsResource}) in
the Prometheus text format or OpenMetrics (L{exposition}), and, in workers
mode, each worker's per-process series labelled with its number
(L{worker_registry}) so the parent does not sum them.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request

__all__ = ["PER_PROCESS_FAMILIES", "WORKER_LABEL", "MetricsResource", "exposition", "worker_registry"]


def exposition(registry: CollectorRegistry, accept: bytes | str | None) -> tuple[bytes, str]:
    """
    (body, content type) of ``registry`` for a scraper whose Accept header
    is ``accept``: OpenMetrics when it asks for ``application/openmetrics-text``,
    else the Prometheus text format (prometheus_client's choice of encoder).
    """
    if isinstance(accept, bytes):
        accept = accept.decode("latin-1")
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type


# Gauges of one process that a sum over worker processes would hide: one
# worker near its descriptor limit. In workers mode each process's series
# carry a ``worker`` label (its number, "parent" for the parent), unsummed.
PER_PROCESS_FAMILIES = frozenset({"process_open_fds", "process_max_fds"})
WORKER_LABEL = "worker"


class _WorkerLabelled(Collector):
    """A registry's metrics, the ``PER_PROCESS_FAMILIES`` with a ``worker`` label."""

    def __init__(self, registry: CollectorRegistry, worker: str) -> None:
        self.registry = registry
        self.worker = worker

    def collect(self) -> Iterable[Metric]:
        for metric in self.registry.collect():
            if metric.name not in PER_PROCESS_FAMILIES:
                yield metric
                continue
            labelled = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            for sample in metric.samples:
                labelled.add_sample(sample.name, {**sample.labels, WORKER_LABEL: self.worker}, sample.value,
                                    sample.timestamp, sample.exemplar)
            yield labelled


def worker_registry(registry: CollectorRegistry, worker: int) -> CollectorRegistry:
    """What worker ``worker`` serves its parent: ``registry`` with its per-process series labelled."""
    out = CollectorRegistry(auto_describe=False)
    out.register(_WorkerLabelled(registry, str(worker)))
    return out


class MetricsResource(Resource):
    """
    ``GET /metrics``: the registry in Prometheus text format, or OpenMetrics
    when the scraper asks for it; no authentication (docs/admin-api.md).
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        body, content_type = exposition(self.registry, request.getHeader(b"accept"))
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body
