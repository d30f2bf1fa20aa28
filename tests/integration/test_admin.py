"""The admin port's health endpoints: /healthz and /readyz with every node's state."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request

from websockets.sync.client import connect

from support.gateway import free_port
from support.waiting import wait_for


def get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ini(admin: int, nodes: str) -> str:
    return f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1
        drain_grace = 1
        shutdown_timeout = 3

        [admin]
        listen = tcp:{admin}:interface=127.0.0.1

        [log]
        format = text

        [upstream:backend]
        nodes =
            {nodes}
        health_check = tcp
        health_interval = 0.2
        health_timeout = 0.5
        unhealthy_threshold = 1
        healthy_threshold = 1

        [route:main]
        path = /**
        upstream = backend
        """


def test_healthz_and_readyz_follow_the_nodes(make_upstream, start_gateway):
    a, b = make_upstream(), make_upstream()
    admin = free_port()
    gw = start_gateway(ini(admin, f"{a.node} zone=x\n            {b.node}"))
    assert get(admin, "/healthz") == (200, {"status": "ok"})
    status, body = get(admin, "/readyz")
    assert status == 200 and body["status"] == "ready"
    nodes = body["upstreams"]["backend"]["nodes"]
    assert [(n["url"], n["state"]) for n in nodes] == [(a.node, "healthy"), (b.node, "healthy")]

    a.server.shutdown()
    assert wait_for(lambda: get(admin, "/readyz")[1]["upstreams"]["backend"]["nodes"][0]["state"] == "unhealthy")
    status, body = get(admin, "/readyz")
    assert status == 200 and body["status"] == "ready"  # node b still takes connections
    node_a = body["upstreams"]["backend"]["nodes"][0]
    assert node_a["last_failure"].startswith("tcp: ")

    b.server.shutdown()
    assert wait_for(lambda: get(admin, "/readyz")[0] == 503)
    status, body = get(admin, "/readyz")
    assert body["status"] == "unready" and body["upstreams"]["backend"]["ready"] is False
    assert {n["state"] for n in body["upstreams"]["backend"]["nodes"]} == {"unhealthy"}
    assert "Traceback" not in gw.log()


def test_readyz_says_draining_after_sigterm(make_upstream, start_gateway):
    a = make_upstream()
    admin = free_port()
    gw = start_gateway(ini(admin, a.node))
    with connect(gw.url + "/x") as ws:
        ws.send("keep me open")
        ws.recv(timeout=5)
        gw.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: get(admin, "/readyz")[1]["status"] == "draining")
        assert get(admin, "/readyz")[0] == 503
    assert gw.proc.wait(15) == 0


def test_unknown_admin_paths_are_404(make_upstream, start_gateway):
    a = make_upstream()
    admin = free_port()
    start_gateway(ini(admin, a.node))
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{admin}/admin/routes", timeout=5)
        raise AssertionError("expected 404")
    except urllib.error.HTTPError as e:
        assert e.code == 404
