"""
/metrics (docs/metrics.md) through a real gateway with real clients and
upstreams: every metric moves. The collector and the connect observer on a
fake clock are tests/unit/ops/test_metrics.py.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from typing import Any

import jwt
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from support.metrics_text import Samples, get, parse
from support.gateway import free_port
from support.waiting import wait_for
from wsgateway.ops.metrics import NO_ROUTE_LABEL
from wsgateway.ops.stats import C2U, U2C




# -- through a real gateway ---------------------------------------------------

SECRET = "k" * 32


def scrape(admin: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        return parse(r.read().decode())


def ini(admin: int, upstream: str, routes: str = "", extra: str = "") -> str:
    return f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1

        [admin]
        listen = tcp:{admin}:interface=127.0.0.1
        token = metrics-test-token

        [log]
        format = text
        {extra}

        [upstream:backend]
        {upstream}

        {routes or '''[route:main]
        path = /**
        upstream = backend'''}
        """


def test_a_connection_moves_the_route_metrics(make_upstream: Any, start_gateway: Any) -> None:
    up = make_upstream()
    admin = free_port()
    gw = start_gateway(ini(admin, f"nodes = {up.node}"))
    m = scrape(admin)
    assert get(m, "wsgateway_connections_active", route="main") == 0
    assert get(m, "wsgateway_messages_total", route="main", direction=C2U) == 0
    assert get(m, "wsgateway_upstream_connect_seconds_count", upstream="backend") == 0
    assert get(m, "wsgateway_upstream_retries_total", upstream="backend") == 0
    assert get(m, "wsgateway_upstream_node_healthy", upstream="backend", node=up.node) == 1
    # the reload test itself is with the SIGHUP work; here: present, at 0
    assert get(m, "wsgateway_config_reloads_total", result="ok") == 0
    assert get(m, "wsgateway_config_reloads_total", result="error") == 0
    assert get(m, "wsgateway_broadcast_messages_total") == 0
    assert get(m, "wsgateway_queue_depth") == 0
    assert get(m, "wsgateway_queue_delivered_total") == 0
    assert get(m, "process_resident_memory_bytes") > 0

    with connect(gw.url + "/room", ping_interval=None, compression=None, open_timeout=5) as ws:
        m = scrape(admin)
        assert get(m, "wsgateway_connections_active", route="main") == 1
        assert get(m, "wsgateway_handshakes_total", route="main", status="101", reason="") == 1
        assert get(m, "wsgateway_upstream_connect_seconds_count", upstream="backend") == 1
        assert 0 < get(m, "wsgateway_upstream_connect_seconds_sum", upstream="backend") < 2
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        m = scrape(admin)
        assert get(m, "wsgateway_messages_total", route="main", direction=C2U) == 1
        assert get(m, "wsgateway_messages_total", route="main", direction=U2C) == 1
        # whole frames as read: client 2 + 4 (mask) + 5, upstream 2 + 5
        assert get(m, "wsgateway_bytes_total", route="main", direction=C2U) == 11
        assert get(m, "wsgateway_bytes_total", route="main", direction=U2C) == 7
        ws.close(4001, "done here")
    assert wait_for(lambda: get(scrape(admin), "wsgateway_connections_active", route="main") == 0)
    m = scrape(admin)
    assert get(m, "wsgateway_closes_total", route="main", code="4001") == 1
    assert get(m, "wsgateway_messages_total", route="main", direction=C2U) == 1  # closing is no message
    assert get(m, "wsgateway_handshakes_total", route="main", status="101", reason="") == 1
    assert get(m, "wsgateway_upstream_retries_total", upstream="backend") == 0


def status_of(url: str) -> int:
    try:
        with connect(url, open_timeout=5):
            return 101
    except InvalidStatus as e:
        return e.response.status_code


def test_refused_handshakes_by_route_and_without_one(make_upstream: Any, start_gateway: Any) -> None:
    up = make_upstream()
    admin = free_port()
    routes = """[route:secure]
        path = /secure/**
        upstream = backend
        auth = required"""
    gw = start_gateway(ini(admin, f"nodes = {up.node}", routes, extra=f"[auth]\n        secret = {SECRET}"))
    assert status_of(gw.url + "/elsewhere") == 404
    assert status_of(gw.url + "/secure/x") == 401
    assert status_of(gw.url + "/secure/x?access_token=not.a.jwt") == 401
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")
    assert status_of(gw.url + f"/secure/x?access_token={token}") == 101
    assert raw_status(gw.port, b"GET /secure/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") == 426  # plain HTTP
    m = scrape(admin)
    handshakes = {tuple(sorted(dict(k[1]).items())): v for k, v in m.items() if k[0] == "wsgateway_handshakes_total"}
    assert handshakes == {
        (("reason", "no_route"), ("route", NO_ROUTE_LABEL), ("status", "404")): 1,
        (("reason", "upgrade_required"), ("route", NO_ROUTE_LABEL), ("status", "426")): 1,
        (("reason", "auth"), ("route", "secure"), ("status", "401")): 2,
        (("reason", ""), ("route", "secure"), ("status", "101")): 1,
    }
    # from the request head to the answer: 404 and 426 (Autobahn's own) without a route, 401 401 101 on secure
    assert get(m, "wsgateway_handshake_duration_seconds_count", route="secure") == 3
    assert get(m, "wsgateway_handshake_duration_seconds_bucket", route="secure", le="+Inf") == 3
    assert get(m, "wsgateway_handshake_duration_seconds_count", route=NO_ROUTE_LABEL) == 1  # Autobahn's 426 has none
    assert get(m, "wsgateway_connection_duration_seconds_count", route="secure") == 1
    # one access line per refusal, at info, with its reason; never the token
    assert wait_for(lambda: len([line for line in gw.log().splitlines() if " refused " in line]) == 4), gw.log()
    log = gw.log()
    lines = [line for line in log.splitlines() if " refused " in line]
    assert all("#info]" in line for line in lines), lines
    assert sum("with 404 route=- reason=no_route " in line for line in lines) == 1, lines
    # Autobahn's own refusals: the token only, its text (which may hold request text) at debug
    assert sum("with 426 route=- reason=upgrade_required " in line and line.endswith(" suppressed=0")
               for line in lines) == 1, lines
    assert sum("with 401 route=secure reason=auth " in line and "suppressed=0: " in line for line in lines) == 2
    assert "not.a.jwt" not in log and token not in log


def raw_status(port: int, request: bytes) -> int:
    """The status a raw request is answered with."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        head = b""
        while b"\r\n" not in head and len(head) < 4096:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])


def test_an_upstream_retry_and_the_connect_histogram(make_upstream: Any, start_gateway: Any) -> None:
    up = make_upstream()
    admin = free_port()
    dead = f"ws://127.0.0.1:{free_port()}"  # nothing listens there: refused at once
    gw = start_gateway(ini(admin, f"""nodes =
            {dead}
            {up.node}
        balance = round_robin
        retries = 1
        backoff_initial = 0.01
        backoff_max = 0.02"""))
    with connect(gw.url + "/x", ping_interval=None, open_timeout=5) as ws:  # round robin: the dead node first
        ws.send("through")
        assert ws.recv(timeout=5) == "through"
    m = scrape(admin)
    assert get(m, "wsgateway_upstream_retries_total", upstream="backend") == 1
    assert get(m, "wsgateway_upstream_connect_seconds_count", upstream="backend") == 1  # successes only
    assert get(m, "wsgateway_upstream_connect_seconds_bucket", upstream="backend", le="+Inf") == 1
    assert get(m, "wsgateway_handshakes_total", route="main", status="101", reason="") == 1


def admin_post(admin: int, path: str, body: dict[str, Any]) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{admin}{path}", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": "Bearer metrics-test-token", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return int(r.status)


def test_node_health_follows_draining_and_active_checks(start_gateway: Any) -> None:
    port = free_port()
    node = f"ws://127.0.0.1:{port}"
    listener = socket.create_server(("127.0.0.1", port))  # a tcp health check only needs a listener
    admin = free_port()
    start_gateway(ini(admin, f"""nodes = {node}
        health_check = tcp
        health_interval = 0.2
        health_timeout = 0.5
        unhealthy_threshold = 1
        healthy_threshold = 1"""))

    def healthy() -> float | None:
        return get(scrape(admin), "wsgateway_upstream_node_healthy", upstream="backend", node=node)

    try:
        assert healthy() == 1
        assert admin_post(admin, "/admin/upstreams/backend/drain", {"node": node}) == 200
        assert healthy() == 0
        assert admin_post(admin, "/admin/upstreams/backend/undrain", {"node": node}) == 200
        assert healthy() == 1
        listener.close()
        assert wait_for(lambda: healthy() == 0)
        listener = socket.create_server(("127.0.0.1", port))
        assert wait_for(lambda: healthy() == 1)
    finally:
        listener.close()


def test_a_client_that_leaves_while_the_upstream_is_slow_is_client_gone_at_info(start_gateway: Any) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers the upgrade
    node = f"ws://127.0.0.1:{silent.getsockname()[1]}"
    admin = free_port()
    try:
        gw = start_gateway(ini(admin, f"nodes = {node}\n        connect_timeout = 10"))
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
            s.sendall(b"GET /room HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            assert wait_for(lambda: get(scrape(admin), "wsgateway_upstream_connections_active", upstream="backend",
                                        node=node) == 1)
        # gone before any answer: the connect is cancelled and its leg released
        assert wait_for(lambda: get(scrape(admin), "wsgateway_handshakes_total", route="main", status="503",
                                    reason="client_gone") == 1)
        m = scrape(admin)
        assert get(m, "wsgateway_upstream_connections_active", upstream="backend", node=node) == 0
        assert get(m, "wsgateway_handshake_duration_seconds_count", route="main") == 1
        assert wait_for(lambda: "reason=client_gone" in gw.log())
        (line,) = [line for line in gw.log().splitlines() if "reason=client_gone" in line]
        assert "#info]" in line and "with 503 route=main " in line  # the client's doing, not an operator's
    finally:
        silent.close()


def test_an_unreachable_upstream_is_a_502_refusal_at_warn(start_gateway: Any) -> None:
    admin = free_port()
    dead = f"ws://127.0.0.1:{free_port()}"  # nothing listens there: refused at once
    gw = start_gateway(ini(admin, f"nodes = {dead}\n        retries = 0"))
    assert status_of(gw.url + "/room") == 502
    m = scrape(admin)
    assert get(m, "wsgateway_handshakes_total", route="main", status="502", reason="upstream_failed") == 1
    assert get(m, "wsgateway_upstream_connections_active", upstream="backend", node=dead) == 0
    assert wait_for(lambda: "reason=upstream_failed" in gw.log())
    (line,) = [line for line in gw.log().splitlines() if "reason=upstream_failed" in line]
    assert "#warn]" in line and "refused tcp4:127.0.0.1:" in line and " with 502 route=main " in line


def test_a_broadcast_route_without_its_broker_is_broker_unavailable(make_upstream: Any, start_gateway: Any) -> None:
    from support.channelnodes import node_ini

    up = make_upstream()
    admin = free_port()
    gw = start_gateway(node_ini("gw-m", admin, up.node, f"redis://127.0.0.1:{free_port()}/0"))  # no Redis there
    assert status_of(gw.url + "/room/r1") == 503
    m = scrape(admin)
    assert get(m, "wsgateway_handshakes_total", route="room", status="503", reason="broker_unavailable") == 1
    assert wait_for(lambda: "reason=broker_unavailable" in gw.log())
    (line,) = [line for line in gw.log().splitlines() if "reason=broker_unavailable" in line]
    assert "#warn]" in line and " with 503 route=room " in line
