# -*- test-case-name: tests.unit.workers.test_aggregate -*-
"""
What the parent of worker processes says on the admin port for all of them
(``[gateway] workers`` > 1): it asks each worker over a private unix socket
(``WorkerClient``) and merges the answers here. Pure functions and one
small stateful class; no process handling (that is ``wsgateway.workers.parent``).

Metrics: why scrape the workers rather than prometheus_client's
multiprocess mode. Multiprocess mode needs every metric to be a real
prometheus_client object writing to files in a shared
PROMETHEUS_MULTIPROC_DIR; ours are mostly read at scrape time from the
relays' own counters (``metrics.GatewayCollector``), which that mode cannot
see, and its files outlive crashed workers in ways that need cleaning up.
Scraping keeps one code path for one process and many: each worker serves
its normal ``/metrics`` (text format) on its socket, the parent parses them
and merges per family and label set:

- counters and histograms (bucket by bucket): summed;
- ``process_open_fds`` and ``process_max_fds`` (``metrics.PER_PROCESS_FAMILIES``):
  not merged at all. Each worker labels its own with ``worker="N"``
  (``metrics.worker_registry``) and the parent its own with
  ``worker="parent"``, so an alert on ``process_open_fds / process_max_fds``
  fires for the one process near its limit (a sum would hide it);
- gauges: summed (open connections, upstream legs, memory), except
  where a sum means nothing: ``wsgateway_upstream_node_healthy`` is the
  minimum (1 only when every worker may use the node), and so are
  ``wsgateway_redis_up`` (0 when any worker is cut off from a shard) and
  ``process_start_time_seconds`` (the parent's start);
- ``wsgateway_config_reloads_total``: the maximum, since every process
  counts the same SIGHUP (the parent, which never restarts, included);
  ``wsgateway_redis_failovers_total`` too (every worker follows the same failover);
- ``wsgateway_build_info``: the maximum, each process's series being 1;
- ``shared`` gauges, which every worker reads from one place: the maximum.
  ``REDIS_QUEUE_GAUGES`` are such with ``[queue] backend = redis`` (each
  worker reports the cluster's whole queue), not with SQLite (one file each).

Counters never go down when a worker dies: its last scraped counters
(the parent scrapes every few seconds, and at every request) are kept as
"retired" and added to the sum. What a worker counted after its last
scrape and before it died is lost.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, _HTTP11ClientFactory, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from wsgateway.ops.exposition import PER_PROCESS_FAMILIES, WORKER_LABEL, exposition

MIN_FAMILIES = frozenset({"wsgateway_upstream_node_healthy", "process_start_time_seconds", "wsgateway_redis_up"})
# build_info: every process reports the same series at 1 (a sum would say 1 + N);
# a Sentinel failover is followed by every worker, each counting it once
MAX_FAMILIES = frozenset({"wsgateway_config_reloads", "wsgateway_build_info", "wsgateway_redis_failovers"})
_CARRIED = ("counter", "histogram", "summary")  # kept from a dead worker

SampleKey = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, labels in order)


@dataclass
class Family:
    name: str
    doc: str
    type: str
    samples: dict[SampleKey, float] = field(default_factory=dict)


def parse(text: str) -> dict[str, Family]:
    """Prometheus text format -> families by name (counter names without ``_total``, as the parser gives them)."""
    out: dict[str, Family] = {}
    for parsed in text_string_to_metric_families(text):
        family = out.setdefault(parsed.name, Family(parsed.name, parsed.documentation, parsed.type))
        for s in parsed.samples:
            family.samples[(s.name, tuple(s.labels.items()))] = s.value  # every process writes labels in one order
    return out


# The queue gauges every worker reads from the one Redis queue (its depth and its size).
REDIS_QUEUE_GAUGES = frozenset({"wsgateway_queue_depth", "wsgateway_queue_bytes"})


def rule(name: str, shared: frozenset[str] = frozenset()) -> str:
    return "min" if name in MIN_FAMILIES else "max" if name in MAX_FAMILIES or name in shared else "sum"


def merge(sources: Iterable[dict[str, Family]], shared: frozenset[str] = frozenset()) -> dict[str, Family]:
    """Families from several processes -> one set, per ``rule``."""
    out: dict[str, Family] = {}
    for source in sources:
        for name, family in source.items():
            mine = out.get(name)
            if mine is None:
                out[name] = Family(name, family.doc, family.type, dict(family.samples))
                continue
            how = rule(name, shared)
            for key, value in family.samples.items():
                if key not in mine.samples:
                    mine.samples[key] = value
                elif how == "sum":
                    mine.samples[key] += value
                elif how == "min":
                    mine.samples[key] = min(mine.samples[key], value)
                else:
                    mine.samples[key] = max(mine.samples[key], value)
    return out


def _order(family: Family) -> list[SampleKey]:
    if family.type != "histogram":
        return list(family.samples)
    rank = {"_bucket": 0, "_count": 1, "_sum": 2}

    def key(k: SampleKey) -> tuple[Any, ...]:
        name, labels = k
        series = tuple(p for p in labels if p[0] != "le")
        le = dict(labels).get("le", "+Inf")
        suffix = next((r for s, r in rank.items() if name.endswith(s)), 3)
        return series, suffix, float(le)

    return sorted(family.samples, key=key)


class _Fixed(Collector):
    def __init__(self, families: dict[str, Family]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        for family in self.families.values():
            metric = Metric(family.name, family.doc, family.type)
            for name, labels in _order(family):
                metric.add_sample(name, dict(labels), family.samples[(name, labels)])
            yield metric


def render(families: dict[str, Family]) -> bytes:
    """``families`` in the Prometheus text format."""
    return encode(families, None)[0]


def encode(families: dict[str, Family], accept: bytes | str | None) -> tuple[bytes, str]:
    """(body, content type): OpenMetrics when ``accept`` (the scraper's Accept header) asks for it, else text."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    return exposition(registry, accept)


def label_process(families: dict[str, Family], worker: str) -> dict[str, Family]:
    """``families`` with the ``PER_PROCESS_FAMILIES`` series labelled ``worker``, where they have no such label yet."""
    for name in PER_PROCESS_FAMILIES:
        family = families.get(name)
        if family is not None:
            family.samples = {
                (sample, labels if any(k == WORKER_LABEL for k, _ in labels) else (*labels, (WORKER_LABEL, worker))):
                    value
                for (sample, labels), value in family.samples.items()
            }
    return families


class MetricsAggregate:
    """
    The last scrape of each live worker (by pid), and what dead ones
    counted. ``shared``: gauges every worker reads from one place (merged
    as the maximum, not summed).
    """

    def __init__(self, shared: frozenset[str] = frozenset()) -> None:
        self._last: dict[int, dict[str, Family]] = {}
        self._retired: dict[str, Family] = {}
        self.shared = shared

    def update(self, pid: int, text: str) -> None:
        self._last[pid] = parse(text)

    def retire(self, pid: int) -> None:
        """Worker ``pid`` is gone: keep its counters (so sums never go down), drop its gauges."""
        last = self._last.pop(pid, None)
        if last is None:
            return
        kept = {n: f for n, f in last.items() if f.type in _CARRIED and rule(n, self.shared) == "sum"}
        self._retired = merge([self._retired, kept])

    def render(self, own: str) -> bytes:
        """The merged exposition; ``own`` is the parent's own registry (its process, its reload count)."""
        return self.exposition(own)[0]

    def exposition(self, own: str, accept: bytes | str | None = None) -> tuple[bytes, str]:
        """
        (body, content type) of the merged exposition, for a scraper whose
        Accept header is ``accept`` (OpenMetrics when it asks for it).
        """
        mine = label_process(parse(own), "parent")
        return encode(merge([*self._last.values(), self._retired, mine], self.shared), accept)


# -- JSON views (the admin port's /readyz, /dashboard.json, /admin/*) ---------

STATE_RANK = {"healthy": 0, "draining": 1, "ejected": 2, "unhealthy": 3}


def merge_routes(views: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``admin.routes_view`` of each worker -> one list: connections, messages and bytes summed per route."""
    out: dict[str, dict[str, Any]] = {}
    for view in views:
        for route in view:
            mine = out.get(route["name"])
            if mine is None:
                out[route["name"]] = json.loads(json.dumps(route))  # a deep copy
                continue
            mine["connections"] = mine.get("connections", 0) + route.get("connections", 0)
            for key in ("messages", "bytes"):
                for direction, n in route.get(key, {}).items():
                    mine[key][direction] = mine[key].get(direction, 0) + n
    return list(out.values())


def merge_upstreams(views: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """
    ``admin.upstreams_view`` of each worker -> one: an upstream is ready when
    it is for every worker; a node's ``active`` and ``ejections`` are summed
    and its state is the worst any worker sees (with that worker's reason).
    """
    out: dict[str, Any] = {}
    for view in views:
        for name, up in view.items():
            mine = out.get(name)
            if mine is None:
                out[name] = json.loads(json.dumps(up))
                continue
            mine["ready"] = bool(mine.get("ready")) and bool(up.get("ready"))
            nodes = {n["url"]: n for n in mine["nodes"]}
            for node in up.get("nodes", []):
                have = nodes.get(node["url"])
                if have is None:
                    mine["nodes"].append(dict(node))
                    continue
                have["active"] = have.get("active", 0) + node.get("active", 0)
                have["ejections"] = have.get("ejections", 0) + node.get("ejections", 0)
                if STATE_RANK.get(node.get("state"), 4) > STATE_RANK.get(have.get("state"), 4):
                    for key in ("state", "last_failure", "ejected_for"):
                        have[key] = node.get(key)
    return out


def combine_status(draining: bool, statuses: Sequence[str]) -> str:
    """The gateway's status from its workers' (``starting`` or ``down`` for one that did not answer)."""
    if draining:
        return "draining"
    if not statuses or any(s not in ("ready", "degraded") for s in statuses):
        return "unready"
    return "degraded" if "degraded" in statuses else "ready"


# -- the private channel to one worker ---------------------------------------


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory" line per request: the parent asks every few seconds


@implementer(IAgentEndpointFactory)
class _UnixEndpoints:
    def __init__(self, reactor: Any, path: str, timeout: float) -> None:
        self.reactor = reactor
        self.path = path
        self.timeout = timeout

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(self.reactor, self.path, timeout=self.timeout)


class WorkerClient:
    """HTTP to one worker's private unix socket (``worker.WorkerSetup.control``)."""

    def __init__(self, reactor: Any, path: str, token: str, *, timeout: float = 3.0) -> None:
        self.reactor = reactor
        self.path = path
        self._token = token.encode("ascii")
        self.timeout = timeout
        pool = HTTPConnectionPool(reactor, persistent=False)
        pool._factory = _QuietFactory
        self._agent = Agent.usingEndpointFactory(reactor, _UnixEndpoints(reactor, path, timeout), pool=pool)

    def request(self, method: bytes, uri: bytes, body: bytes | None = None) -> Deferred[tuple[int, bytes]]:
        """-> (status, body); fails on a connection error or after ``timeout`` seconds."""
        headers = Headers({b"authorization": [b"Bearer " + self._token]})
        if body is not None:
            headers.addRawHeader(b"content-type", b"application/json")
        producer = FileBodyProducer(BytesIO(body)) if body is not None else None
        d = self._agent.request(method, b"http://worker" + uri, headers, producer)

        def read(response: Any) -> Deferred[tuple[int, bytes]]:
            return readBody(response).addCallback(lambda data: (response.code, data))

        d.addCallback(read)
        d.addTimeout(self.timeout, self.reactor)
        return d


def merge_queue(views: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """
    ``/admin/queue`` of every worker ((worker id, body) pairs) as one:
    counts summed, ages the oldest. With the Redis store every worker
    already reports the whole cluster's queue: its depths are taken once.
    """
    shared = views[0][1].get("backend") == "RedisQueueStore"
    stores = views[:1] if shared else views
    routes: dict[str, dict[str, Any]] = {}
    for _, body in stores:
        for name, r in body.get("routes", {}).items():
            m = routes.setdefault(name, {"depth": 0, "oldest_age": 0.0, "dead": 0})
            m["depth"] += r.get("depth", 0)
            m["dead"] += r.get("dead", 0)
            m["oldest_age"] = max(m["oldest_age"], r.get("oldest_age", 0.0))
    first = views[0][1]
    return {
        "backend": first.get("backend"),
        "depth": sum(b.get("depth", 0) for _, b in stores),
        "dead": sum(b.get("dead", 0) for _, b in stores),
        "routes": dict(sorted(routes.items())),
        "live_connections": sum(b.get("live_connections", 0) for _, b in views),
        "delivered": sum(b.get("delivered", 0) for _, b in views),
        "failures": sum(b.get("failures", 0) for _, b in views),
        "dead_letters": [{**d, "worker": wid} if not shared else d for wid, b in stores
                         for d in b.get("dead_letters", [])],
    }
