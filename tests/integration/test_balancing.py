"""
Upstream balancing, health and failover through a real gateway with several
real upstream servers (issue: upstream nodes).
"""

from __future__ import annotations

import collections
import time

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from support.gateway import free_port
from support.waiting import wait_for


def ini(nodes: str, *, upstream: str = "", route: str = "", limits: str = "") -> str:
    return f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1

        [limits]
        ping_interval = 0
        {limits}

        [log]
        level = info
        format = text

        [upstream:backend]
        nodes =
            {nodes}
        connect_timeout = 2
        {upstream}

        [route:main]
        path = /**
        upstream = backend
        {route}
        """


def which(ups, gw, n: int, path: str = "/x", headers: dict[str, str] | None = None) -> collections.Counter:
    """Open n connections one after another; count which upstream got each."""
    before = [len(u.requests) for u in ups]
    for _ in range(n):
        with connect(gw.url + path, additional_headers=headers or {}, open_timeout=10) as ws:
            ws.send("hi")
            ws.recv(timeout=5)
    return collections.Counter({i: len(u.requests) - before[i] for i, u in enumerate(ups)})


def test_weighted_90_10_over_1000_connections(make_upstream, start_gateway):
    a, b = make_upstream(), make_upstream()
    gw = start_gateway(ini(f"{a.node} weight=90\n            {b.node} weight=10", upstream="balance = weighted"))
    counts = which([a, b], gw, 1000)
    assert 870 <= counts[0] <= 930 and 70 <= counts[1] <= 130, counts


def test_hash_header_keeps_a_key_on_one_node(make_upstream, start_gateway):
    ups = [make_upstream() for _ in range(3)]
    nodes = "\n            ".join(u.node for u in ups)
    gw = start_gateway(ini(nodes, upstream="balance = hash:header:X-Session"))
    for key in ["alice", "bob", "carol", "dave"]:
        counts = which(ups, gw, 6, headers={"X-Session": key})
        assert sorted(counts.values()) == [0, 0, 6], (key, counts)


def test_least_conn_sends_new_connections_to_the_least_loaded_node(make_upstream, start_gateway):
    a, b = make_upstream(), make_upstream()
    gw = start_gateway(ini(f"{a.node}\n            {b.node}", upstream="balance = least_conn"))
    open_on: dict[int, list] = {0: [], 1: []}
    try:
        for i in range(4):
            before = len(a.requests)
            ws = connect(gw.url + "/hold").__enter__()
            # the upstream's handler thread records the request a moment later
            assert wait_for(lambda: len(a.requests) + len(b.requests) == i + 1)
            open_on[0 if len(a.requests) > before else 1].append(ws)
        assert len(open_on[0]) == len(open_on[1]) == 2  # equal load: alternate
        for ws in open_on[1]:
            ws.close()
        assert wait_for(lambda: len(b.closes) == 2)
        time.sleep(0.3)  # and the gateway has released both
        before_a = len(a.requests)
        for i in range(2):
            open_on[1].append(connect(gw.url + "/hold").__enter__())
            assert wait_for(lambda: len(a.requests) + len(b.requests) == 5 + i)
        assert len(a.requests) == before_a  # both new ones went to the idle node b
    finally:
        for ws in open_on[0] + open_on[1]:
            ws.close()


def test_node_down_fails_over_without_client_visible_error(make_upstream, start_gateway):
    a = make_upstream()
    dead = f"ws://127.0.0.1:{free_port()}"
    gw = start_gateway(ini(f"{dead}\n            {a.node}", upstream="retries = 2"))
    counts = which([a], gw, 10)
    assert counts[0] == 10


def test_unhealthy_node_gets_no_new_connections(make_upstream, start_gateway):
    a, b = make_upstream(), make_upstream()
    gw = start_gateway(
        ini(
            f"{a.node}\n            {b.node}",
            upstream="health_check = tcp\n        health_interval = 0.2\n        health_timeout = 0.5\n"
            "        unhealthy_threshold = 2\n        healthy_threshold = 1",
        )
    )
    assert sorted(which([a, b], gw, 4).values()) == [2, 2]
    b.server.shutdown()  # node b goes away
    time.sleep(2 * 0.2 * 1.1 + 0.6)  # unhealthy_threshold * health_interval, jitter and a probe timeout
    counts = which([a], gw, 10)
    assert counts[0] == 10
    assert "unhealthy" in gw.log()


def test_every_node_unhealthy_is_503_at_once(make_upstream, start_gateway):
    a = make_upstream()
    gw = start_gateway(
        ini(
            a.node,
            upstream="health_check = tcp\n        health_interval = 0.2\n        health_timeout = 0.5\n"
            "        unhealthy_threshold = 1",
        )
    )
    a.server.shutdown()
    time.sleep(1.0)
    with pytest.raises(InvalidStatus) as e:
        connect(gw.url + "/x", open_timeout=10)
    # without a connect attempt or a retry: tests/unit/upstream/test_upstream.py::
    # test_every_node_unhealthy_by_active_checks_is_503_without_attempts (a Clock)
    assert e.value.response.status_code == 503


def test_zone_preference_with_fallback(make_upstream, start_gateway):
    a, b = make_upstream(), make_upstream()
    gw = start_gateway(ini(f"{a.node} zone=a\n            {b.node} zone=b", upstream="zone = b"))
    assert which([a, b], gw, 6)[1] == 6
    b.server.shutdown()
    time.sleep(0.2)
    # zone b's node is gone: connections fall back to zone a, no error
    counts = which([a], gw, 3)
    assert counts[0] == 3


def test_version_header_picks_matching_nodes(make_upstream, start_gateway):
    v1, v2 = make_upstream(), make_upstream()
    gw = start_gateway(
        ini(f"{v1.node} version=v1\n            {v2.node} version=v2", upstream="version_header = X-Api-Version")
    )
    assert which([v1, v2], gw, 4, headers={"X-Api-Version": "v2"})[1] == 4
    assert which([v1, v2], gw, 4, headers={"X-Api-Version": "v1"})[0] == 4
    # no such version: fall back to all nodes rather than refuse
    counts = which([v1, v2], gw, 4, headers={"X-Api-Version": "v9"})
    assert counts[0] + counts[1] == 4


def test_unhealthy_node_keeps_its_open_connections(make_upstream, start_gateway):
    from http import HTTPStatus

    sick = {"a": False, "b": False}

    def health(name):
        def process_request(connection, request):
            if request.path == "/health":
                status = HTTPStatus.SERVICE_UNAVAILABLE if sick[name] else HTTPStatus.OK
                return connection.respond(status, "health\n")
            return None

        return process_request

    a, b = make_upstream(process_request=health("a")), make_upstream(process_request=health("b"))
    gw = start_gateway(
        ini(
            f"{a.node}\n            {b.node}",
            upstream="health_check = http:/health\n        health_interval = 0.2\n        health_timeout = 0.5\n"
            "        unhealthy_threshold = 1\n        healthy_threshold = 1",
        )
    )
    with connect(gw.url + "/one") as first, connect(gw.url + "/two") as second:
        assert wait_for(lambda: len(b.connections) == 1)
        on_b = first if b.connections[0].request.path == "/one" else second
        assert "unhealthy" not in gw.log()
        sick["b"] = True  # node b fails its checks but keeps serving what it has
        assert wait_for(lambda: "unhealthy" in gw.log() and b.node in gw.log())
        counts = which([a, b], gw, 6)
        assert counts[0] == 6 and counts[1] == 0, (counts, gw.log()[-3000:])
        on_b.send("still here")
        assert on_b.recv(timeout=5) == "still here"
