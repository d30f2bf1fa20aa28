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
        assert get(m, "wsgateway_handshakes_total", route="main", status="101") == 1
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
    assert get(m, "wsgateway_handshakes_total", route="main", status="101") == 1
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
    m = scrape(admin)
    handshakes = {tuple(sorted(dict(k[1]).items())): v for k, v in m.items() if k[0] == "wsgateway_handshakes_total"}
    assert handshakes == {
        (("route", NO_ROUTE_LABEL), ("status", "404")): 1,
        (("route", "secure"), ("status", "401")): 2,
        (("route", "secure"), ("status", "101")): 1,
    }


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
    assert get(m, "wsgateway_handshakes_total", route="main", status="101") == 1


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
