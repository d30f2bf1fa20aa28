# -*- test-case-name: tests.unit.ops.test_dashboard -*-
"""
The admin port's pages for people (docs/admin-api.md):

- ``GET /``: the dashboard (L{wsgateway.ops.dashboard_page}), one
  self-contained HTML page that polls ``GET /dashboard.json`` every second,
  derives rates from its cumulative counters and keeps 15 minutes of them
  for its charts;
- ``GET /dashboard.json``: that data, token-free like ``/readyz`` (the same
  readiness and route builders of ``wsgateway.ops.admin``), plus what only
  the page needs: this node's id, version, uptime and log level, the
  refused handshakes by status, upstream connect latency (the
  ``wsgateway_upstream_connect_seconds`` sum and count), each node's
  traffic and the state the page colours it by (L{node_health});
- ``GET /demo``: L{wsgateway.ops.demopage}.

With workers (``wsgateway.workers.admin``), each worker answers its own
``/dashboard.json`` and the parent merges them with L{merge_worker_views}.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from twisted.web.resource import Resource
from twisted.web.server import Request

from wsgateway.config.loader import GatewayConfig
from wsgateway.ops import logs
from wsgateway.ops.admin import GatewayView, readiness, routes_view
from wsgateway.ops.dashboard_page import dashboard_page
from wsgateway.ops.demopage import demo_page, demo_target
from wsgateway.ops.jsonapi import JSONResource
from wsgateway.ops.metrics import GatewayMetrics
from wsgateway.ops.stats import C2U, U2C
from wsgateway.version import version

__all__ = ["HEALTH_RANK", "DashboardJSON", "DashboardView", "NodeTraffic", "dashboard_page", "dashboard_view",
           "merge_worker_views", "node_health", "pages", "resources"]

# The page's four node colours, from best to worst: a node is shown as the
# worst any worker sees (draining wins: it is the operator's own decision).
HEALTHY, UNCHECKED, UNHEALTHY, DRAINING = "healthy", "unchecked", "unhealthy", "draining"
HEALTH_RANK = {HEALTHY: 0, UNCHECKED: 1, UNHEALTHY: 2, DRAINING: 3}


class DashboardView(GatewayView, Protocol):
    """What the dashboard reads beyond the admin API's view (GatewayService has it)."""

    config: GatewayConfig
    metrics: GatewayMetrics


def node_health(node: Any, checks: bool, now: float) -> str:
    """
    How the page shows an upstream node (an ``upstream.pool.Node``):

    - ``draining``: drained through the admin API;
    - ``unhealthy``: failing its active checks, ejected, or failing now:
      its last connect attempts failed (passive failures since its last
      success), which is all a gateway knows of a node without checks;
    - ``unchecked``: its upstream has ``health_check = none`` and it has
      not failed: nobody vouches for it;
    - ``healthy``: it passes its active checks and has not failed since.

    A node that refused every connection of an upstream without health
    checks keeps ``state`` = ``healthy`` in /readyz (nothing else is known
    of it), but is ``unhealthy`` here.
    """
    health = node.health
    if node.draining:
        return DRAINING
    if not health.available(now) or health.passive_failures or health.panic:
        return UNHEALTHY
    return HEALTHY if checks else UNCHECKED


class NodeTraffic:
    """
    Messages and bytes per upstream node, for the page's per-node rates.
    The stats count per route only; each read here adds what every open
    connection did to its node, and keeps the last counts read of a
    connection once it has closed. What a connection did between the last
    read and its close is not counted (a second at most, while a page polls).
    """

    def __init__(self) -> None:
        self._closed: dict[str, Counter[str]] = {}
        self._open: dict[str, tuple[str, tuple[int, int, int, int]]] = {}  # conn_id -> (node, counts)

    def read(self, connections: Iterable[Any]) -> dict[str, dict[str, dict[str, int]]]:
        """``connections``: ``stats.Connection``s now open -> {node url: {"messages": .., "bytes": ..}}."""
        now_open: dict[str, tuple[str, tuple[int, int, int, int]]] = {}
        for conn in connections:
            if conn.node:
                r = conn.relay
                now_open[conn.conn_id] = (conn.node, (r.messages_c2u, r.messages_u2c, r.bytes_c2u, r.bytes_u2c))
        for conn_id, (node, counts) in self._open.items():
            if conn_id not in now_open:
                _add(self._closed.setdefault(node, Counter()), counts)
        self._open = now_open
        totals = {node: Counter(c) for node, c in self._closed.items()}
        for node, counts in now_open.values():
            _add(totals.setdefault(node, Counter()), counts)
        return {node: {"messages": {C2U: c["mc"], U2C: c["mu"]}, "bytes": {C2U: c["bc"], U2C: c["bu"]}}
                for node, c in totals.items()}


def _add(into: Counter[str], counts: tuple[int, int, int, int]) -> None:
    for key, n in zip(("mc", "mu", "bc", "bu"), counts):
        into[key] += n


def _connect_latency(metrics: GatewayMetrics) -> dict[str, dict[str, float]]:
    """Per upstream: successful connects and their seconds in all (the histogram's _count and _sum)."""
    out: dict[str, dict[str, float]] = {}
    for family in metrics.connect_seconds.collect():
        for sample in family.samples:
            kind = "count" if sample.name.endswith("_count") else "seconds" if sample.name.endswith("_sum") else None
            if kind is not None:
                found = out.setdefault(sample.labels["upstream"], {"count": 0, "seconds": 0.0})
                found[kind] = int(sample.value) if kind == "count" else sample.value
    return out


def dashboard_view(view: DashboardView, started: float, traffic: NodeTraffic | None = None) -> dict[str, Any]:
    """The body of ``/dashboard.json``; ``started``: when this process started (uptime)."""
    now = view.now()
    status, upstreams = readiness(view)
    totals = view.stats.routes
    routes = routes_view(view)
    for route in routes:
        found = totals.get(route["name"])
        route["handshakes"] = {str(s): n for s, n in sorted(found.handshakes.items())} if found else {}
    refused: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for found in totals.values():
        for s, n in found.handshakes.items():
            if s != 101:
                refused[str(s)] += n
        # by (status, reason), in the stats of a gateway that names its refusals' reasons
        for (_, reason), n in getattr(found, "refusals", {}).items():
            reasons[reason] += n
    by_node = (traffic or NodeTraffic()).read(view.stats.connections())
    latency = _connect_latency(view.metrics)
    for name, up in upstreams.items():
        pool = view.upstreams[name]
        checks = pool.config.health_check != "none"
        up["health_check"] = pool.config.health_check
        up["connect"] = latency.get(name, {"count": 0, "seconds": 0.0})
        for shown, node in zip(up["nodes"], pool.nodes):
            shown["health"] = node_health(node, checks, now)
            shown["failures"] = node.health.passive_failures
            shown.update(by_node.get(node.url, _no_traffic()))
    return {
        "status": status,
        "node": _node(view.config, started, now),
        "time": round(now, 3),
        "routes": routes,
        "refusals": _refusals(refused, reasons),
        "upstreams": upstreams,
        # each Redis shard (the one Redis without shards): "up" or "down"; {} without [redis]
        "redis": {name: "up" if up else "down" for name, up in view.broker.shard_states().items()},
    }


def _node(config: GatewayConfig, started: float, now: float) -> dict[str, Any]:
    """This gateway: its node id, version, workers, start (Unix time), uptime (seconds), log level in effect."""
    return {"id": config.gateway.node_id, "version": version(), "workers": config.gateway.workers,
            "started": round(started, 3), "uptime": round(max(0.0, now - started), 3), "log_level": logs.LEVEL}


def _refusals(by_status: Counter[str], by_reason: Counter[str]) -> dict[str, Any]:
    """Refused handshakes since start, of every route and of none: by status, and by reason when the stats have them."""
    out: dict[str, Any] = {"by_status": dict(sorted(by_status.items()))}
    if by_reason:
        out["by_reason"] = dict(sorted(by_reason.items()))
    return out


def _no_traffic() -> dict[str, dict[str, int]]:
    return {"messages": {C2U: 0, U2C: 0}, "bytes": {C2U: 0, U2C: 0}}


def merge_worker_views(ready: dict[str, Any], views: Sequence[dict[str, Any]], merged_routes: list[dict[str, Any]],
                       config: GatewayConfig) -> dict[str, Any]:
    """
    The parent's ``/dashboard.json`` with workers: ``ready`` is its /readyz
    body (status, workers, upstreams merged), ``views`` each worker's
    ``/dashboard.json``, ``merged_routes`` their routes summed. Counts are
    summed over the workers; a node's ``health`` is the worst any worker
    sees; the uptime is the longest-running worker's.
    """
    now = max((v.get("time", 0.0) for v in views), default=0.0)
    started = min((v.get("node", {}).get("started", now) for v in views), default=now)
    refused: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    handshakes: dict[str, Counter[str]] = {}
    for v in views:
        refused.update(v.get("refusals", {}).get("by_status", {}))
        reasons.update(v.get("refusals", {}).get("by_reason", {}))
        for r in v.get("routes", []):
            handshakes.setdefault(r["name"], Counter()).update(r.get("handshakes", {}))
    for route in merged_routes:
        route["handshakes"] = dict(sorted(handshakes.get(route["name"], Counter()).items()))
    upstreams = ready["upstreams"]
    for name, up in upstreams.items():
        theirs = [v["upstreams"][name] for v in views if name in v.get("upstreams", {})]
        up["health_check"] = theirs[0].get("health_check", "none") if theirs else "none"
        up["connect"] = {"count": sum(t.get("connect", {}).get("count", 0) for t in theirs),
                         "seconds": sum(t.get("connect", {}).get("seconds", 0.0) for t in theirs)}
        for node in up["nodes"]:
            seen = [n for t in theirs for n in t.get("nodes", []) if n.get("url") == node["url"]]
            node["health"] = max((n.get("health", UNHEALTHY) for n in seen), key=lambda h: HEALTH_RANK.get(h, 2),
                                 default=UNHEALTHY)
            node["failures"] = sum(n.get("failures", 0) for n in seen)
            for key in ("messages", "bytes"):
                node[key] = {d: sum(n.get(key, {}).get(d, 0) for n in seen) for d in (C2U, U2C)}
    return {
        "status": ready["status"],
        "node": _node(config, started, now),
        "time": round(now, 3),
        "routes": merged_routes,
        "refusals": _refusals(refused, reasons),
        "upstreams": upstreams,
        "workers": ready["workers"],
        # down when any worker is cut off from the shard
        "redis": {name: "down" if any(v.get("redis", {}).get(name) == "down" for v in views) else "up"
                  for name in sorted({n for v in views for n in v.get("redis", {})})},
    }


class DashboardJSON(JSONResource):
    """What the dashboard shows: the gateway's status, its routes and upstreams, this node."""

    def __init__(self, view: DashboardView) -> None:
        super().__init__()
        self.view = view
        self.started = view.now()  # built once, as the process starts
        self.traffic = NodeTraffic()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"x-content-type-options", b"nosniff")
        return self.answer(request, 200, dashboard_view(self.view, self.started, self.traffic))


def pages(demo_listen: Sequence[str] | None = None) -> dict[bytes, Resource]:
    """
    The admin port's pages for people: the dashboard at ``/``, and ``/demo``
    when ``demo_listen`` (the gateway's listen strings) is given. The
    parent of workers mounts these beside its own merged ``dashboard.json``.
    """
    out: dict[bytes, Resource] = {b"": dashboard_page()}
    if demo_listen is not None:
        out[b"demo"] = demo_page(demo_target(demo_listen))
    return out


def resources(view: DashboardView, demo_listen: Sequence[str] | None = None) -> dict[bytes, Resource]:
    """What service.py mounts on the admin port (``admin_site``'s ``extra``): L{pages} and ``dashboard.json``."""
    return {**pages(demo_listen), b"dashboard.json": DashboardJSON(view)}
