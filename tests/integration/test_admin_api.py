"""
The token-protected /admin/* JSON API (docs/admin-api.md) of a real gateway:
authorization, every endpoint's status codes and JSON shape, and the
effects of log-level and drain.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from websockets.sync.client import connect

from support.gateway import free_port
from support.waiting import wait_for

TOKEN = "admin-token-5f2d8c"


def call(port: int, method: str, path: str, body: Any = None, token: str | None = TOKEN,
         raw: bytes | None = None) -> tuple[int, Any, dict[str, str]]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        text = e.read()
        return e.code, json.loads(text) if text.startswith(b"{") else text, dict(e.headers)


def ini(admin: int, nodes: str, token: str = TOKEN) -> str:
    return f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1

        [admin]
        listen = tcp:{admin}:interface=127.0.0.1
        token = {token}

        [log]
        format = json
        level = info

        [upstream:backend]
        nodes =
            {nodes}

        [route:main]
        path = /main/**
        upstream = backend

        [route:other]
        path = /other
        upstream = backend
        """


@pytest.fixture
def admin(make_upstream: Any, start_gateway: Any) -> tuple[int, Any, Any, Any]:
    a, b = make_upstream(), make_upstream()
    port = free_port()
    gw = start_gateway(ini(port, f"{a.node}\n            {b.node}"))
    return port, gw, a, b


def test_every_admin_endpoint_needs_the_token(admin: tuple[int, Any, Any, Any]) -> None:
    port, gw, _a, _b = admin
    for method, path in (("GET", "/admin/routes"), ("GET", "/admin/upstreams"), ("GET", "/admin/connections"),
                         ("PUT", "/admin/log-level"), ("POST", "/admin/upstreams/backend/drain"),
                         ("GET", "/admin/nope")):
        for token in (None, "wrong", TOKEN + "x", TOKEN[:-1]):
            status, body, headers = call(port, method, path, {"level": "debug"}, token=token)
            assert status == 401, (method, path, token)
            assert headers["WWW-Authenticate"].startswith("Bearer")
            assert body == {"error": "a valid admin bearer token is required"}
    # a basic-auth header holding the token is not a bearer token
    req = urllib.request.Request(f"http://127.0.0.1:{port}/admin/routes")
    req.add_header("Authorization", f"Basic {TOKEN}")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=5)
    assert info.value.code == 401
    gw.stop()
    assert TOKEN not in gw.log()


def test_routes_upstreams_and_connections(admin: tuple[int, Any, Any, Any]) -> None:
    port, _gw, a, b = admin
    status, routes, _ = call(port, "GET", "/admin/routes")
    assert status == 200
    assert [(r["name"], r["path"], r["upstream"], r["connections"]) for r in routes] == [
        ("main", "/main/**", "backend", 0), ("other", "/other", "backend", 0)]
    status, ups, _ = call(port, "GET", "/admin/upstreams")
    assert status == 200 and ups["backend"]["ready"] is True
    assert {n["url"] for n in ups["backend"]["nodes"]} == {a.node, b.node}
    assert all(n["state"] == "healthy" for n in ups["backend"]["nodes"])

    with connect(f"ws://127.0.0.1:{_gw.port}/main/x", additional_headers={
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}) as ws:
        for m in ("one", "two"):
            ws.send(m)
            assert ws.recv(timeout=5) == m
        status, conns, _ = call(port, "GET", "/admin/connections")
        assert status == 200 and len(conns) == 1
        c = conns[0]
        assert (c["route"], c["upstream"], c["trace_id"]) == ("main", "backend", "4bf92f3577b34da6a3ce929d0e0e4736")
        assert c["node"] in (a.node, b.node) and c["peer"].startswith("tcp4:127.0.0.1:")
        assert c["messages"] == {"client_to_upstream": 2, "upstream_to_client": 2}
        assert call(port, "GET", "/admin/connections?route=other")[1] == []
        assert call(port, "GET", "/admin/connections?route=main")[1][0]["conn_id"] == c["conn_id"]
        main = call(port, "GET", "/admin/routes")[1][0]
        assert main["connections"] == 1 and main["messages"]["client_to_upstream"] == 2
    assert wait_for(lambda: call(port, "GET", "/admin/connections")[1] == [])
    main = call(port, "GET", "/admin/routes")[1][0]
    assert main["connections"] == 0 and main["messages"]["upstream_to_client"] == 2


def test_log_level_at_runtime(admin: tuple[int, Any, Any, Any]) -> None:
    port, gw, _a, _b = admin

    def debug_opens() -> int:
        return sum(1 for line in gw.log().splitlines() if '"level": "debug"' in line and " route=main" in line)

    with connect(f"ws://127.0.0.1:{gw.port}/main/1"):
        pass
    assert debug_opens() == 0
    assert call(port, "PUT", "/admin/log-level", {"level": "debug"})[:2] == (200, {"level": "debug"})
    with connect(f"ws://127.0.0.1:{gw.port}/main/2"):
        pass
    assert wait_for(lambda: debug_opens() == 1), gw.log()
    assert call(port, "PUT", "/admin/log-level", {"level": "warn"})[0] == 200
    with connect(f"ws://127.0.0.1:{gw.port}/main/3"):
        pass
    assert wait_for(lambda: "log level set to warn" in gw.log())
    assert debug_opens() == 1


@pytest.mark.parametrize(
    ("method", "path", "body", "raw", "status"),
    [
        ("PUT", "/admin/log-level", {"level": "verbose"}, None, 400),
        ("PUT", "/admin/log-level", None, b"{not json", 400),
        ("PUT", "/admin/log-level", None, b"[1, 2]", 400),
        ("PUT", "/admin/log-level", None, b"x" * 70000, 413),
        ("GET", "/admin/log-level", None, None, 405),
        ("DELETE", "/admin/routes", None, None, 405),
        ("GET", "/admin/nope", None, None, 404),
        ("POST", "/admin/upstreams/nope/drain", {"node": "ws://127.0.0.1:1"}, None, 404),
        ("POST", "/admin/upstreams/backend/drain", {"node": "ws://127.0.0.1:1"}, None, 404),
        ("POST", "/admin/upstreams/backend/drain", None, None, 404),
    ],
)
def test_bad_requests(admin: tuple[int, Any, Any, Any], method: str, path: str, body: Any, raw: bytes | None,
                      status: int) -> None:
    port = admin[0]
    got, answer, headers = call(port, method, path, body, raw=raw)
    assert got == status
    assert isinstance(answer, dict) and "error" in answer
    assert headers["Content-Type"] == "application/json"


def test_drain_and_undrain_a_node(admin: tuple[int, Any, Any, Any]) -> None:
    port, gw, a, b = admin
    status, body, _ = call(port, "POST", "/admin/upstreams/backend/drain", {"node": a.node})
    assert status == 200 and body == {"upstream": "backend", "node": a.node, "draining": True, "active": 0}
    for i in range(4):
        with connect(f"ws://127.0.0.1:{gw.port}/main/{i}") as ws:
            ws.send("x")
            ws.recv(timeout=5)
    assert (len(a.requests), len(b.requests)) == (0, 4)
    states = {n["url"]: n["state"] for n in call(port, "GET", "/admin/upstreams")[1]["backend"]["nodes"]}
    assert states == {a.node: "draining", b.node: "healthy"}
    assert call(port, "POST", "/admin/upstreams/backend/undrain", {"node": a.node})[0] == 200
    for i in range(4):
        with connect(f"ws://127.0.0.1:{gw.port}/main/{i}") as ws:
            ws.send("x")
            ws.recv(timeout=5)
    assert len(a.requests) == 2


def test_no_token_means_no_admin_api(make_upstream: Any, start_gateway: Any) -> None:
    port = free_port()
    start_gateway(ini(port, make_upstream().node, token=""))
    status, _body, _ = call(port, "GET", "/admin/routes")
    assert status == 404
    assert call(port, "GET", "/healthz", token=None)[:2] == (200, {"status": "ok"})
