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
from wsgateway.config.routes import RouteConfig
from wsgateway.config.upstreams import NodeConfig, UpstreamConfig
from wsgateway.ops.admin import admin_site
from wsgateway.ops.dashboard import DashboardJSON, dashboard_page, resources
from wsgateway.ops.demopage import demo_page, demo_target
from wsgateway.ops.stats import Connection, GatewayStats
from wsgateway.upstream.pool import Upstream

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


@dataclass
class View:
    routes: list[Any]
    upstreams: dict[str, Any]
    stats: GatewayStats = field(default_factory=GatewayStats)
    draining: bool = False
    clock: Clock = field(default_factory=Clock)
    broker: Any = field(default_factory=lambda: InProcessBroker("gw-test", clock=Clock()))

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


def test_dashboard_json_has_status_routes_and_every_node():
    request, body = get(DashboardJSON(hostile_view()))
    assert header(request, b"content-type") == "application/json"
    assert header(request, b"x-content-type-options") == "nosniff"
    assert header(request, b"cache-control") == "no-store"
    data = json.loads(body)
    assert data["status"] == "ready"  # node 1 still takes connections
    assert data["routes"] == [{
        "name": HOSTILE, "path": "/x/**", "host": None, "mode": "proxy", "upstream": "u", "auth": "none",
        "connections": 1,
        "messages": {"client_to_upstream": 3, "upstream_to_client": 4},
        "bytes": {"client_to_upstream": 30, "upstream_to_client": 40},
    }]
    nodes = data["upstreams"]["u"]["nodes"]
    assert [(n["url"], n["state"], n["active"]) for n in nodes] == [
        ("ws://127.0.0.1:1001", "healthy", 0), ("ws://127.0.0.1:1002", "unhealthy", 0),
    ]
    assert nodes[1]["last_failure"] == HOSTILE  # JSON carries it as is: the page renders it as text
    assert data["upstreams"]["u"]["ready"] is True and data["upstreams"]["u"]["balance"] == "round_robin"


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
    assert "http" not in html and "//" not in html  # no URL, absolute or scheme-relative
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
    assert csp["connect-src"] == "ws: wss:"
    assert "innerHTML" not in _inline(html, "script")
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
