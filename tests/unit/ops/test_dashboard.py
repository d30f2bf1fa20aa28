"""
The dashboard's data and headers, without a browser (tests/browser/test_browser.py
drives the page itself): the JSON shape, where the pages are mounted, and a
Content-Security-Policy that allows exactly the page's own inline code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from wsgateway.channels.broker import InProcessBroker
from wsgateway.config.gateway import ServerConfig
from wsgateway.config.loader import GatewayConfig
from wsgateway.config.routes import RouteConfig
from wsgateway.config.upstreams import NodeConfig, UpstreamConfig
from wsgateway.ops import logs
from wsgateway.ops.admin import admin_site
from wsgateway.ops.dashboard import DashboardJSON, NodeTraffic, dashboard_page, merge_worker_views, resources
from wsgateway.ops.demopage import demo_page, demo_target
from wsgateway.ops.metrics import GatewayMetrics
from wsgateway.ops.stats import Connection, GatewayStats
from wsgateway.upstream.pool import Upstream
from wsgateway.version import version

HOSTILE = '<script>alert(1)</script><img src=x onerror="alert(2)">'


def node_config(port: int) -> NodeConfig:
    return NodeConfig(
        url=f"ws://127.0.0.1:{port}", scheme="ws", host="127.0.0.1", port=port, path="",
        weight=1, zone=None, version=None, labels={},
    )


@dataclass
class Relay:
    messages_c2u: int = 0
    messages_u2c: int = 0
    bytes_c2u: int = 0
    bytes_u2c: int = 0
    drained: list[tuple[int, str]] = field(default_factory=list)

    def drain(self, code: int, reason: str) -> None:
        self.drained.append((code, reason))


@dataclass
class View:
    routes: list[Any]
    upstreams: dict[str, Any]
    stats: GatewayStats = field(default_factory=GatewayStats)
    draining: bool = False
    clock: Clock = field(default_factory=Clock)
    broker: Any = field(default_factory=lambda: InProcessBroker("gw-test", clock=Clock()))
    config: GatewayConfig = field(
        default_factory=lambda: GatewayConfig(path="gw.ini", gateway=ServerConfig(node_id="gw-test", workers=1)))
    metrics: Any = None

    def __post_init__(self) -> None:
        self.metrics = GatewayMetrics(self, upstreams=self.upstreams)

    def listening(self) -> bool:
        return True

    def now(self) -> float:
        return self.clock.seconds()

    def set_log_level(self, level: str) -> None:
        pass


def hostile_view() -> View:
    clock = Clock()
    cfg = UpstreamConfig(name="u", nodes=(node_config(1001), node_config(1002)), health_check="tcp")
    up: Upstream[Any] = Upstream(cfg, clock, lambda *a: None)  # type: ignore[arg-type,return-value]
    up.nodes[1].health.check_failed(HOSTILE, unhealthy_threshold=1)
    route = RouteConfig(name=HOSTILE, path="/x/**", upstream="u")
    view = View(routes=[route], upstreams={"u": up}, clock=clock)
    view.stats.opened(Connection("c1", HOSTILE, "u", up.nodes[0].url, "tcp4:127.0.0.1:5", "t", None, 0.0,
                                 Relay(messages_c2u=3, messages_u2c=4, bytes_c2u=30, bytes_u2c=40)))
    return view


def get(resource: Any, path: list[bytes] | None = None) -> tuple[DummyRequest, bytes]:
    request = DummyRequest(path or [b""])
    body = resource.render(request)
    return request, body


def header(request: DummyRequest, name: bytes) -> str:
    (value,) = request.responseHeaders.getRawHeaders(name)
    return value.decode() if isinstance(value, bytes) else value


def test_dashboard_json_has_status_node_routes_refusals_and_every_node():
    view = hostile_view()
    view.stats.handshake(HOSTILE, 403)
    view.stats.handshake(None, 404)
    view.metrics.upstream_connected("u", 0.004)
    view.metrics.upstream_connected("u", 0.002)
    resource = DashboardJSON(view)
    view.clock.advance(75.5)
    request, body = get(resource)
    assert header(request, b"content-type") == "application/json"
    assert header(request, b"x-content-type-options") == "nosniff"
    assert header(request, b"cache-control") == "no-store"
    data = json.loads(body)
    assert data["status"] == "ready"  # node 1 still takes connections
    assert data["node"] == {"id": "gw-test", "version": version(), "workers": 1, "started": 0.0, "uptime": 75.5,
                            "log_level": logs.LEVEL}
    assert data["time"] == 75.5
    assert data["routes"] == [{
        "name": HOSTILE, "path": "/x/**", "host": None, "mode": "proxy", "upstream": "u", "auth": "none",
        "connections": 1,
        "messages": {"client_to_upstream": 3, "upstream_to_client": 4},
        "bytes": {"client_to_upstream": 30, "upstream_to_client": 40},
        "handshakes": {"101": 1, "403": 1},
    }]
    # every refusal, the route-less 404 included; by reason too where the stats name reasons
    assert data["refusals"]["by_status"] == {"403": 1, "404": 1}
    assert sum(data["refusals"].get("by_reason", {"x": 2}).values()) == 2
    up = data["upstreams"]["u"]
    assert up["ready"] is True and up["balance"] == "round_robin" and up["health_check"] == "tcp"
    assert up["connect"] == {"count": 2, "seconds": 0.006}
    nodes = up["nodes"]
    assert [(n["url"], n["state"], n["health"], n["active"], n["failures"]) for n in nodes] == [
        ("ws://127.0.0.1:1001", "healthy", "healthy", 0, 0), ("ws://127.0.0.1:1002", "unhealthy", "unhealthy", 0, 0),
    ]
    assert nodes[1]["last_failure"] == HOSTILE  # JSON carries it as is: the page renders it as text
    # the open connection's traffic, on its node
    assert nodes[0]["messages"] == {"client_to_upstream": 3, "upstream_to_client": 4}
    assert nodes[0]["bytes"] == {"client_to_upstream": 30, "upstream_to_client": 40}
    assert nodes[1]["messages"] == {"client_to_upstream": 0, "upstream_to_client": 0}


def unchecked_view(nodes: int = 2) -> tuple[View, Upstream[Any]]:
    clock = Clock()
    cfg = UpstreamConfig(name="plain", nodes=tuple(node_config(2001 + i) for i in range(nodes)))  # health_check none
    up: Upstream[Any] = Upstream(cfg, clock, lambda *a: None)  # type: ignore[arg-type,return-value]
    return View(routes=[RouteConfig(name="r", path="/**", upstream="plain")], upstreams={"plain": up},
                clock=clock), up


def node_states(view: View) -> list[tuple[str, str]]:
    nodes = json.loads(get(DashboardJSON(view))[1])["upstreams"]["plain"]["nodes"]
    return [(n["state"], n["health"]) for n in nodes]


def test_a_node_without_checks_is_unchecked_until_it_fails_then_unhealthy_though_readyz_says_healthy():
    view, up = unchecked_view(1)
    assert node_states(view) == [("healthy", "unchecked")]
    node = up.nodes[0]
    # it refused every connection: /readyz keeps "healthy" (the last node is never ejected), the page must not
    for _ in range(8):
        up.outliers.connect_failed(node.health, "connection refused")
    assert node.health.panic
    assert node_states(view) == [("healthy", "unhealthy")]
    # one failure is enough to stop vouching for it; a success clears it
    up.outliers.succeeded(node.health)
    assert node_states(view) == [("healthy", "unchecked")]
    up.outliers.connect_failed(node.health, "connection refused")
    assert node_states(view) == [("healthy", "unhealthy")]
    up.drain(node.url)
    assert node_states(view) == [("draining", "draining")]


def test_an_ejected_node_is_unhealthy_and_a_checked_one_healthy():
    view, up = unchecked_view(2)
    for _ in range(5):
        up.outliers.connect_failed(up.nodes[0].health, "connection refused")
    assert node_states(view) == [("ejected", "unhealthy"), ("healthy", "unchecked")]


@dataclass
class Conn:
    conn_id: str
    node: str
    relay: Relay


def test_node_traffic_keeps_what_a_closed_connection_did():
    traffic = NodeTraffic()
    a, b = Conn("a", "ws://n1", Relay(1, 2, 10, 20)), Conn("b", "ws://n2", Relay(5, 0, 50, 0))
    broadcast = Conn("c", "", Relay(7, 7, 7, 7))  # no node: not counted
    assert traffic.read([a, b, broadcast])["ws://n1"]["messages"] == {"client_to_upstream": 1, "upstream_to_client": 2}
    a.relay.messages_c2u = 4
    after = traffic.read([b])  # a closed after it sent 3 more (read before it closed)
    assert after["ws://n1"] == {"messages": {"client_to_upstream": 1, "upstream_to_client": 2},
                                "bytes": {"client_to_upstream": 10, "upstream_to_client": 20}}
    c = Conn("d", "ws://n1", Relay(1, 1, 1, 1))
    assert traffic.read([b, c])["ws://n1"]["messages"] == {"client_to_upstream": 2, "upstream_to_client": 3}
    assert traffic.read([])["ws://n2"]["bytes"] == {"client_to_upstream": 50, "upstream_to_client": 0}


def test_workers_views_merge_into_one_dashboard():
    def worker(started: float, now: float, health: str, c2u: int, latency: float) -> dict[str, Any]:
        return {
            "time": now, "node": {"started": started},
            "routes": [{"name": "r", "handshakes": {"101": 2, "502": 1}}],
            "refusals": {"by_status": {"502": 1}, "by_reason": {"upstream_failed": 1}},
            "upstreams": {"plain": {"health_check": "none", "connect": {"count": 2, "seconds": latency},
                                    "nodes": [{"url": "ws://n1", "health": health, "failures": 1,
                                               "messages": {"client_to_upstream": c2u, "upstream_to_client": 1},
                                               "bytes": {"client_to_upstream": 9, "upstream_to_client": 9}}]}},
        }

    ready = {"status": "ready", "workers": [{"id": 1}, {"id": 2}],
             "upstreams": {"plain": {"ready": True, "balance": "round_robin", "nodes": [
                 {"url": "ws://n1", "active": 3, "state": "healthy", "last_failure": None}]}}}
    config = GatewayConfig(path="gw.ini", gateway=ServerConfig(node_id="gw-1", workers=2))
    routes = [{"name": "r", "connections": 3}]
    data = merge_worker_views(ready, [worker(100.0, 160.0, "unchecked", 4, 0.01),
                                      worker(130.0, 161.0, "unhealthy", 6, 0.03)], routes, config)
    assert data["node"]["id"] == "gw-1" and data["node"]["workers"] == 2
    assert data["node"]["uptime"] == 61.0 and data["time"] == 161.0
    assert data["routes"] == [{"name": "r", "connections": 3, "handshakes": {"101": 4, "502": 2}}]
    assert data["refusals"] == {"by_status": {"502": 2}, "by_reason": {"upstream_failed": 2}}
    up = data["upstreams"]["plain"]
    assert up["connect"] == {"count": 4, "seconds": 0.04} and up["health_check"] == "none"
    (node,) = up["nodes"]
    assert node["health"] == "unhealthy" and node["failures"] == 2 and node["active"] == 3
    assert node["messages"] == {"client_to_upstream": 10, "upstream_to_client": 2}
    assert data["workers"] == [{"id": 1}, {"id": 2}]
    assert data["redis"] == {}  # no [redis]


def test_redis_shards_merge_down_when_any_worker_is_cut_off():
    ready = {"status": "degraded", "workers": [], "upstreams": {}}
    config = GatewayConfig(path="gw.ini", gateway=ServerConfig(node_id="gw-1", workers=2))
    views = [{"time": 1.0, "node": {"started": 0.0}, "redis": {"a:1/0": "up", "b:1/0": "up"}},
             {"time": 1.0, "node": {"started": 0.0}, "redis": {"a:1/0": "up", "b:1/0": "down"}}]
    assert merge_worker_views(ready, views, [], config)["redis"] == {"a:1/0": "up", "b:1/0": "down"}


def test_dashboard_json_says_draining():
    view = hostile_view()
    view.draining = True
    assert json.loads(get(DashboardJSON(view))[1])["status"] == "draining"


def _inline(html: str, tag: str) -> str:
    (source,) = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
    return source


def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def test_dashboard_page_is_self_contained_and_its_csp_allows_only_its_own_code():
    request, body = get(dashboard_page())
    html = body.decode()
    assert header(request, b"content-type") == "text/html; charset=utf-8"
    assert header(request, b"x-content-type-options") == "nosniff"
    assert header(request, b"cache-control") == "no-store"
    csp = dict(d.strip().split(" ", 1) for d in header(request, b"content-security-policy").split(";"))
    assert csp["default-src"] == "'none'"
    assert csp["script-src"] == _hash(_inline(html, "script"))  # that script and no other, no 'unsafe-inline'
    assert csp["style-src"] == _hash(_inline(html, "style"))
    assert csp["connect-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'" and csp["base-uri"] == "'none'"
    # nothing loaded from elsewhere, no inline handlers or style attributes the CSP would block
    assert not re.search(r"\s(src|href|style|on\w+)=", html)
    # no URL, absolute or scheme-relative (but the SVG namespace, a name the script creates elements in)
    without_ns = html.replace('"http://www.w3.org/2000/svg"', "")
    assert "http" not in without_ns and "//" not in without_ns
    # data goes into the DOM as text only
    script = _inline(html, "script")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function("):
        assert sink not in script
    assert "textContent" in script


def test_admin_site_serves_the_dashboard_at_the_root_and_demo_only_when_asked():
    view = hostile_view()
    site = admin_site(view, token=None, extra=resources(view))
    root = site.getResourceFor(DummyRequest([b""]))
    assert _inline(get(root)[1].decode(), "script") == _inline(get(dashboard_page())[1].decode(), "script")
    assert isinstance(site.getResourceFor(DummyRequest([b"dashboard.json"])), DashboardJSON)
    for missing in (b"demo", b"nope"):
        request, _ = get(site.getResourceFor(DummyRequest([missing])))
        assert request.responseCode == 404

    site = admin_site(view, token=None, extra=resources(view, ["tcp:8080", "ssl:8443:privateKey=k.pem"]))
    demo = get(site.getResourceFor(DummyRequest([b"demo"])))[1].decode()
    assert '<body data-scheme="wss" data-port="8443">' in demo


def test_demo_page_csp_and_default_target():
    request, body = get(demo_page(("wss", 8443)))
    html = body.decode()
    csp = dict(d.strip().split(" ", 1) for d in header(request, b"content-security-policy").split(";"))
    assert csp["script-src"] == _hash(_inline(html, "script"))
    assert csp["style-src"] == _hash(_inline(html, "style"))
    assert csp["connect-src"] == "ws: wss:"
    assert "innerHTML" not in _inline(html, "script")
    assert not re.search(r"\s(src|href|style|on\w+)=", html)  # nothing the CSP would block
    # the channel history panel (tests/browser/test_history_demo.py drives it)
    for part in ('id="history-log"', 'id="last-offset"', 'id="publish"', 'id="cut"', 'id="restore"'):
        assert part in html
    assert "<body>" in get(demo_page(None))[1].decode()


def test_demo_target_prefers_the_tls_listener():
    assert demo_target(["tcp:8080:interface=127.0.0.1", "ssl:8443:interface=127.0.0.1:privateKey=k.pem"]) == ("wss", 8443)
    assert demo_target(["tcp:port=9000:interface=\\:\\:1"]) == ("ws", 9000)
    assert demo_target(["tcp6:9001"]) == ("ws", 9001)
    assert demo_target(["unix:/run/ws.sock", "tcp:0"]) is None


def test_without_a_token_admin_paths_answer_json_saying_how_to_turn_the_api_on():
    view = hostile_view()
    site = admin_site(view, token=None, extra=resources(view))
    for path in ([b"admin"], [b"admin", b"routes"], [b"admin", b"queue", b"purge"]):
        request, body = get(site.getResourceFor(DummyRequest(path)))
        assert request.responseCode == 404
        assert header(request, b"content-type") == "application/json"
        assert json.loads(body) == {
            "error": "the admin API is off: set [admin] token to enable it (docs/admin-api.md)"
        }


def test_an_open_connection_is_closed_through_the_admin_api():
    """POST /admin/connections/ID/close: the dashboard's close button."""
    view = hostile_view()
    (conn,) = view.stats.connections()
    site = admin_site(view, token="t0ken", extra=resources(view))

    def post(conn_id: bytes, token: bytes = b"t0ken") -> tuple[int, Any]:
        request = DummyRequest([b"admin", b"connections", conn_id, b"close"])
        request.method = b"POST"
        request.requestHeaders.addRawHeader(b"authorization", b"Bearer " + token)
        body = site.getResourceFor(request).render(request)
        return request.responseCode or 200, json.loads(body)

    assert post(b"nope") == (404, {"error": "no such connection"})
    assert post(b"c1", b"wrong")[0] == 401
    assert conn.relay.drained == []
    assert post(b"c1") == (200, {"conn_id": "c1", "closing": True, "code": 1001})
    assert conn.relay.drained == [(1001, "closed by the gateway's operator")]
