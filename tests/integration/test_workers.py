"""
``[gateway] workers = 2`` (wsgateway/workers/parent.py, wsgateway/workers/child.py): a real
twistd parent and its real worker processes, real clients and upstreams on
loopback. Which worker served a connection is told by the node id of its
access line (``gw-1/w1``, ``gw-1/w2``, JSON logs).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from support.gateway import free_port, Gateway, proxy_ini
from support.waiting import wait_for
from support.tlsclient import drained
from wsgateway.config.loader import ConfigError, load

ADMIN_TOKEN = "workers-test-admin-token-0123456789"
LISTEN = "listen = tcp:{port}:interface=127.0.0.1"


def workers_ini(node: str, admin: int, *, listen: str = LISTEN, gateway: str = "", routes: str = "") -> str:
    body = proxy_ini(node, routes=routes).replace(
        LISTEN,
        f"{listen}\n        node_id = gw-1\n        workers = 2\n        {gateway}\n\n"
        f"        [admin]\n        listen = tcp:{admin}:interface=127.0.0.1\n        token = {ADMIN_TOKEN}",
    )
    return body.replace("format = text", "format = json").replace("[limits]", "[limits]\n        ping_interval = 0")


def get(admin: int, path: str, *, token: bool = False) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"} if token else {}
    req = urllib.request.Request(f"http://127.0.0.1:{admin}{path}", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, kind, body = r.status, r.headers.get_content_type(), r.read()
    except urllib.error.HTTPError as e:
        status, kind, body = e.code, e.headers.get_content_type(), e.read()
    return status, json.loads(body) if kind == "application/json" else body.decode()


def put(admin: int, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{admin}{path}", data=json.dumps(body).encode(), method="PUT",
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read())


def ready(admin: int, timeout: float = 20.0) -> dict[str, Any]:
    """Wait until /readyz says ready with both workers up; its body."""
    seen: list[Any] = []

    def check() -> bool:
        try:
            seen[:] = [get(admin, "/readyz")]
        except OSError:
            return False
        status, body = seen[0]
        return status == 200 and [w["status"] for w in body["workers"]] == ["ready", "ready"]

    assert wait_for(check, timeout), seen
    return seen[0][1]


def worker_pids(admin: int) -> dict[int, int]:
    return {w["id"]: w["pid"] for w in get(admin, "/readyz")[1]["workers"]}


def log_lines(gw: Gateway) -> list[dict[str, Any]]:
    out = []
    for line in gw.log().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def access_lines(gw: Gateway) -> list[dict[str, Any]]:
    return [e for e in log_lines(gw) if e.get("event", "").startswith("closed ")]


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus text page (labels in any order)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, rest = head.partition("{")
        found = dict(p.split("=", 1) for p in rest.rstrip("}").split(",") if p) if rest else {}
        if sample == name and {k: v.strip('"') for k, v in found.items()} == labels:
            return float(value)
    raise KeyError(f"{name}{labels} not in the page")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def echo_once(url: str, text: str) -> None:
    with connect(url, open_timeout=10) as ws:
        ws.send(text)
        assert ws.recv(timeout=5) == text


# -- both workers serve, and the admin port sums them ---------------------------


def test_two_workers_share_the_port_and_the_admin_port_sums_them(make_upstream, start_gateway):
    up = make_upstream()
    admin = free_port()
    gw = start_gateway(workers_ini(up.node, admin))
    body = ready(admin)
    pids = {w["id"]: w["pid"] for w in body["workers"]}
    assert set(pids) == {1, 2}
    assert all(parent_of(pid) == gw.proc.pid for pid in pids.values())  # children of the twistd process
    assert body["status"] == "ready" and body["upstreams"]["backend"]["ready"] is True

    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(connect(f"{gw.url}/c{i}", open_timeout=10)) for i in range(20)]
        for i, ws in enumerate(clients):
            ws.send(f"m{i}")
            assert ws.recv(timeout=5) == f"m{i}"
        # while all 20 are open: each worker's share, summed
        page = get(admin, "/metrics")[1]
        assert metric(page, "wsgateway_connections_active", route="main") == 20
        assert metric(page, "wsgateway_upstream_connections_active", upstream="backend", node=up.node) == 20
        status, conns = get(admin, "/admin/connections", token=True)
        assert status == 200 and len(conns) == 20
        by_worker = Counter(c["worker"] for c in conns)
        status, routes = get(admin, "/admin/routes", token=True)
        assert [(r["name"], r["connections"]) for r in routes] == [("main", 20)]
        status, dash = get(admin, "/dashboard.json")
        assert dash["status"] == "ready" and dash["routes"][0]["connections"] == 20
        status, ups = get(admin, "/admin/upstreams", token=True)
        assert ups["backend"]["nodes"][0]["active"] == 20
    assert wait_for(lambda: len(access_lines(gw)) == 20, 10)
    lines = access_lines(gw)
    served = Counter(e["node_id"] for e in lines)
    # the kernel hands connections to whichever worker accepts first: both get some
    assert set(served) == {"gw-1/w1", "gw-1/w2"}, served
    assert all(e["node_id"] == f"gw-1/w{e['worker']}" for e in lines)
    assert sorted(served.values()) == sorted(by_worker.values())

    page = get(admin, "/metrics")[1]
    assert metric(page, "wsgateway_handshakes_total", route="main", status="101", reason="") == 20
    assert metric(page, "wsgateway_messages_total", route="main", direction="client_to_upstream") == 20
    assert metric(page, "wsgateway_connections_active", route="main") == 0
    assert metric(page, "wsgateway_upstream_connect_seconds_count", upstream="backend") == 20
    assert metric(page, "wsgateway_upstream_connect_seconds_bucket", upstream="backend", le="+Inf") == 20
    # a gauge that is not a count: 1 when every worker may use the node, never 2
    assert metric(page, "wsgateway_upstream_node_healthy", upstream="backend", node=up.node) == 1
    assert metric(page, "wsgateway_config_reloads_total", result="ok") == 0
    assert metric(page, "process_cpu_seconds_total") > 0
    assert metric(page, "wsgateway_workers_running") == 2
    assert metric(page, "wsgateway_worker_restarts_total") == 0
    assert page.count("# TYPE wsgateway_handshakes_total counter") == 1
    assert metric(page, "wsgateway_upstream_connections_active", upstream="backend", node=up.node) == 0
    assert metric(page, "wsgateway_connection_duration_seconds_count", route="main") == 20
    assert metric(page, "wsgateway_handshake_duration_seconds_bucket", route="main", le="+Inf") == 20
    # descriptors per process, not summed: an alert sees the one near its limit
    for name in ("process_open_fds", "process_max_fds"):
        assert all(metric(page, name, worker=w) > 0 for w in ("1", "2", "parent")), name
        assert not [line for line in page.splitlines() if line.startswith(name + " ")]  # no unlabelled sum

    # the log level set through the parent reaches the workers
    assert put(admin, "/admin/log-level", {"level": "debug"}) == (200, {"level": "debug"})
    echo_once(f"{gw.url}/debug", "x")
    assert wait_for(lambda: any(e["level"] == "debug" and e.get("worker") for e in log_lines(gw)), 5)
    assert get(admin, "/healthz") == (200, {"status": "ok"})
    assert get(admin, "/admin/routes")[0] == 401


# -- a dead worker is replaced ------------------------------------------------


def test_a_killed_worker_is_replaced_and_the_gateway_keeps_serving(make_upstream, start_gateway):
    up = make_upstream()
    admin = free_port()
    gw = start_gateway(workers_ini(up.node, admin))
    ready(admin)
    for i in range(6):
        echo_once(f"{gw.url}/before{i}", "x")
    before = metric(get(admin, "/metrics")[1], "wsgateway_handshakes_total", route="main", status="101", reason="")
    assert before == 6
    pids = worker_pids(admin)
    os.kill(pids[1], signal.SIGKILL)
    # the other worker takes every connection meanwhile
    for i in range(10):
        echo_once(f"{gw.url}/during{i}", "y")
    assert wait_for(lambda: worker_pids(admin)[1] not in (None, pids[1]), 10)
    body = ready(admin)
    new = {w["id"]: w for w in body["workers"]}
    assert new[2]["pid"] == pids[2] and new[2]["restarts"] == 0
    assert new[1]["pid"] != pids[1] and new[1]["restarts"] == 1
    assert parent_of(new[1]["pid"]) == gw.proc.pid
    assert not alive(pids[1])
    log = gw.log()
    assert f"worker 1 (pid {pids[1]}) was killed by signal 9 (SIGKILL)" in log
    assert f"worker 1 started again: pid {new[1]['pid']} (restart 1)" in log
    # both serve again
    assert wait_for(lambda: (echo_once(f"{gw.url}/after", "z"), {e["node_id"] for e in access_lines(gw)[16:]})[1]
                    == {"gw-1/w1", "gw-1/w2"}, 20)
    # counters never go down with a worker: what the dead one counted is kept
    after = metric(get(admin, "/metrics")[1], "wsgateway_handshakes_total", route="main", status="101", reason="")
    assert after >= before + 10
    assert metric(get(admin, "/metrics")[1], "wsgateway_worker_restarts_total") == 1


# -- SIGTERM drains every worker -------------------------------------------------


def test_sigterm_drains_every_worker_then_the_parent_exits_0(make_upstream, start_gateway):
    up = make_upstream()
    admin = free_port()
    gw = start_gateway(workers_ini(up.node, admin, gateway="drain_grace = 0.3\n        shutdown_timeout = 3"))
    ready(admin)
    pids = worker_pids(admin)
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(connect(f"{gw.url}/c{i}", open_timeout=10)) for i in range(20)]
        for ws in clients:
            ws.send("hi")
            assert ws.recv(timeout=5) == "hi"
        status, conns = get(admin, "/admin/connections", token=True)
        assert {c["worker"] for c in conns} == {1, 2}, "both workers hold connections"
        gw.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: get(admin, "/readyz")[1]["status"] == "draining", 3)
        assert get(admin, "/readyz")[0] == 503
        closes = []
        for ws in clients:
            with pytest.raises(ConnectionClosed) as e:
                ws.recv(timeout=10)
            closes.append((e.value.rcvd.code, e.value.rcvd.reason))
    assert closes == [(1001, "server shutting down")] * 20  # drain_grace, then the window: tests/unit/core/test_drain.py
    # no new connections while draining: the sockets are closed in every process
    with pytest.raises(OSError):
        connect(f"{gw.url}/late", open_timeout=2)
    assert gw.proc.wait(15) == 0
    assert not any(alive(pid) for pid in pids.values())
    log = gw.log()
    assert "draining" in log and "worker 1 (pid" in log and "exited with status 0" in log
    assert sorted(code for code, _ in up.closes) == [1001] * 20


def test_the_workers_exit_when_the_parent_is_killed(make_upstream, start_gateway):
    up = make_upstream()
    admin = free_port()
    gw = start_gateway(workers_ini(up.node, admin))
    ready(admin)
    pids = worker_pids(admin)
    gw.proc.kill()
    gw.proc.wait(5)
    # EOF on the pipe from the parent: each worker drains (nothing open here) and exits
    assert wait_for(lambda: not any(alive(pid) for pid in pids.values()), 10)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gw.port), timeout=2).close()


# -- SIGHUP ------------------------------------------------------------------------


def test_sighup_reaches_every_worker(make_upstream, start_gateway):
    up = make_upstream()
    admin = free_port()
    first = workers_ini(up.node, admin).replace("path = /**", "path = /a/**")
    gw = start_gateway(first)
    ready(admin)
    with pytest.raises(InvalidStatus) as e:
        connect(f"{gw.url}/b/x", open_timeout=10)
    assert e.value.response.status_code == 404
    tmp = gw.ini_path.with_suffix(".new")
    tmp.write_text(first.replace("{port}", gw.ini_port) + "\n[route:b]\npath = /b/**\nupstream = backend\n")
    os.replace(tmp, gw.ini_path)
    before = len(gw.log())
    gw.proc.send_signal(signal.SIGHUP)

    def reloaded() -> set[str]:
        return {e["node_id"] for e in log_lines(gw) if e["event"].startswith("reloaded ")}

    assert wait_for(lambda: reloaded() == {"gw-1/w1", "gw-1/w2"}, 10), gw.log()[before:]
    assert "SIGHUP: " in gw.log()[before:] and "checked, no errors" in gw.log()[before:]
    seen = len(access_lines(gw))
    served: set[str] = set()
    # the kernel picks the worker for each connection: go on (up to 60) until both served one
    for i in range(60):
        echo_once(f"{gw.url}/b/{i}", "new route")
        if i >= 19:
            assert wait_for(lambda: len(access_lines(gw)) >= seen + i + 1, 10)
            served = {e["node_id"] for e in access_lines(gw)[seen:] if e["route"] == "b"}
            if served == {"gw-1/w1", "gw-1/w2"}:
                break
    assert served == {"gw-1/w1", "gw-1/w2"}, served  # the new route works in both
    page = get(admin, "/metrics")[1]
    assert metric(page, "wsgateway_config_reloads_total", result="ok") == 1  # one SIGHUP, counted once

    # an invalid file: the parent says why, every worker keeps its config
    gw.ini_path.write_text(gw.ini_path.read_text() + "\n[route:broken]\npath = /c\nupstream = nowhere\n")
    before = len(gw.log())
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: gw.log()[before:].count("rejected") >= 2, 10), gw.log()[before:]
    assert "no section [upstream:nowhere]" in gw.log()[before:]
    echo_once(f"{gw.url}/b/still", "still")
    assert metric(get(admin, "/metrics")[1], "wsgateway_config_reloads_total", result="error") == 1
    assert gw.proc.poll() is None


# -- TLS: each worker has its own reloadable certificate -------------------------


def test_ssl_listener_shared_by_workers_and_a_renewed_certificate_reaches_both(make_upstream, start_gateway,
                                                                               tmp_path: Path):
    old_ca, new_ca = trustme.CA(), trustme.CA()
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"

    def install(ca: trustme.CA) -> None:
        leaf = ca.issue_cert("localhost")
        for path, data in ((key, leaf.private_key_pem.bytes()), (cert, leaf.cert_chain_pems[0].bytes())):
            path.with_suffix(".tmp").write_bytes(data)
            path.with_suffix(".tmp").chmod(0o600)  # the key must be private (docs/configuration.md)
            os.replace(path.with_suffix(".tmp"), path)

    def trusting(ca: trustme.CA) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        return ctx

    install(old_ca)
    up = make_upstream()
    admin = free_port()
    listen = f"listen = ssl:{{port}}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    gw = start_gateway(workers_ini(up.node, admin, listen=listen))
    ready(admin)

    def wss_echo(ca: trustme.CA, n: int, since: int = 0) -> None:
        """``n`` wss echoes, then more (up to 60) until both workers served one: the kernel
        hands each connection to whichever worker accepts first, so a busy machine may
        give a dozen in a row to one of them."""
        for i in range(60):
            if i >= n:
                assert wait_for(lambda: len(access_lines(gw)) >= since + i, 10)
                if {e["node_id"] for e in access_lines(gw)[since:]} == {"gw-1/w1", "gw-1/w2"}:
                    return
            sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            with connect(f"wss://localhost:{gw.port}/t{i}", sock=sock, ssl=drained(trusting(ca)), open_timeout=10) as ws:
                ws.send("tls")
                assert ws.recv(timeout=5) == "tls"

    wss_echo(old_ca, 10)
    assert {e["node_id"] for e in access_lines(gw)} == {"gw-1/w1", "gw-1/w2"}
    install(new_ca)
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: gw.log().count("reloaded, now serving") == 2, 10)
    seen = len(access_lines(gw))
    wss_echo(new_ca, 12, since=seen)  # fails if any worker still served the old certificate
    assert wait_for(lambda: len(access_lines(gw)) >= seen + 12, 10)
    assert {e["node_id"] for e in access_lines(gw)[seen:]} == {"gw-1/w1", "gw-1/w2"}


# -- config ---------------------------------------------------------------------------


def test_workers_need_redis_for_channels(tmp_path: Path):
    ini = tmp_path / "gw.ini"
    ini.write_text(
        "[gateway]\nworkers = 2\n\n"
        "[route:room]\npath = /room/{name}\nmode = broadcast\nchannel = room:{name}\n\n"
        "[route:api]\npath = /api\nupstream = api\nsubscribe = user:x\n\n"
        "[upstream:api]\nnodes = ws://127.0.0.1:9\n"
    )
    with pytest.raises(ConfigError) as e:
        load(str(ini), {})
    assert e.value.errors == [
        f"{ini}: [gateway] workers: 2 worker processes need a [redis] section for channels: [route:room], "
        "[route:api] use broadcast or subscribe, and the in-process broker cannot reach the clients of other "
        "workers; add [redis] or set workers = 1"
    ]
    # fine with Redis, or with one process
    ini.write_text(ini.read_text() + "\n[redis]\nurl = redis://127.0.0.1:6379/0\n")
    assert load(str(ini), {}).gateway.workers == 2
    ini.write_text(ini.read_text().replace("workers = 2", "workers = 1").split("[redis]")[0])
    assert load(str(ini), {}).gateway.workers == 1


def test_workers_cannot_share_a_unix_listener(tmp_path: Path):
    ini = tmp_path / "gw.ini"
    ini.write_text(f"[gateway]\nworkers = 2\nlisten = unix:{tmp_path}/ws.sock\n\n"
                   "[route:api]\npath = /api\nupstream = api\n\n[upstream:api]\nnodes = ws://127.0.0.1:9\n")
    with pytest.raises(ConfigError) as e:
        load(str(ini), {})
    assert e.value.errors == [
        f"{ini}: [gateway] workers: listen entry 'unix:{tmp_path}/ws.sock' cannot be shared with worker processes: "
        "with workers > 1 use tcp:, tcp6:, ssl:"
    ]


# -- channels span the workers through Redis ---------------------------------------


def test_a_room_spans_both_workers_through_redis(make_upstream, start_gateway, tmp_path: Path):
    from support.redis_server import running_redis
    from support.wsclient import Listener

    up = make_upstream()
    admin = free_port()
    room = """
        [route:room]
        path = /room/{room}
        mode = broadcast
        channel = room:{room}
        """
    with running_redis(tmp_path / "redis") as redis:
        body = workers_ini(up.node, admin, routes=room).replace(
            "[log]", f"[redis]\n        url = {redis.url}\n        prefix = w\n\n        [log]")
        gw = start_gateway(body)
        ready(admin)
        def presence() -> list[dict[str, Any]]:
            return get(admin, "/admin/channels/room:lobby", token=True)[1]["connections"]

        # The kernel hands each connection to whichever worker accepts first,
        # so on a busy machine a dozen may all land on one: join until the
        # room has members in both workers.
        clients = [Listener(f"{gw.url}/room/lobby") for _ in range(12)]
        while len(clients) < 60:
            assert wait_for(lambda: len(presence()) == len(clients), 10)
            if {e["node"] for e in presence()} == {"gw-1/w1", "gw-1/w2"}:
                break
            clients.append(Listener(f"{gw.url}/room/lobby"))
        n = len(clients)
        assert {e["node"] for e in presence()} == {"gw-1/w1", "gw-1/w2"}  # the room has members in both
        for i, c in enumerate(clients):
            c.ws.send(f"from {i}")
        assert wait_for(lambda: all(len(c.got) == n - 1 for c in clients), 10), [len(c.got) for c in clients]
        for i, c in enumerate(clients):
            assert sorted(c.got) == sorted(f"from {j}" for j in range(n) if j != i)
        req = urllib.request.Request(
            f"http://127.0.0.1:{admin}/admin/publish", method="POST",
            data=json.dumps({"channel": "room:lobby", "message": "to all"}).encode(),
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.loads(r.read())["published"] is True
        assert wait_for(lambda: all(c.got[-1:] == ["to all"] for c in clients), 10)
        page = get(admin, "/metrics")[1]
        assert metric(page, "wsgateway_broadcast_messages_total") == n + 1  # each counted once, by its worker
        for c in clients:
            c.ws.close()
        gw.stop()


def durable_route(*, down: int | None = None) -> str:
    """An at_least_once route: to the test's backend, or (``down``: a free port) to a node that is not there."""
    if down is None:
        return """
        [route:durable]
        path = /durable/**
        upstream = backend
        delivery = at_least_once
        """
    return f"""
        [upstream:down]
        nodes = ws://127.0.0.1:{down}
        connect_timeout = 1
        retries = 0

        [route:durable]
        path = /durable/**
        upstream = down
        delivery = at_least_once
        """


def queue_forty(url: str) -> None:
    """Eight clients of the durable route, five messages each."""
    for i in range(8):
        with connect(f"{url}/durable/{i}", open_timeout=10) as ws:
            for k in range(5):
                ws.send(f"{i}:{k}")


def test_the_workers_durable_queues_through_the_parent_admin(make_upstream, start_gateway):
    up = make_upstream()
    admin = free_port()
    routes = durable_route(down=free_port())
    gw = start_gateway(workers_ini(up.node, admin, routes=routes))
    ready(admin)
    queue_forty(gw.url)

    def queue() -> Any:
        return get(admin, "/admin/queue", token=True)[1]

    # each worker queues into its own file; the parent adds them up
    assert wait_for(lambda: queue()["depth"] == 40, 10), queue()
    q = queue()
    assert q["routes"]["durable"]["depth"] == 40 and q["dead"] == 0
    files = sorted(p.name for p in (gw.ini_path.parent / "var").glob("queue.sqlite.w*") if "-" not in p.name)
    assert files and set(files) <= {"queue.sqlite.w1", "queue.sqlite.w2"}
    req = urllib.request.Request(
        f"http://127.0.0.1:{admin}/admin/queue/purge", method="POST", data=json.dumps({"all": True}).encode(),
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.loads(r.read())["purged"] == 40
    assert queue()["depth"] == 0


def test_with_a_redis_queue_the_parent_counts_the_shared_depth_once(make_upstream, start_gateway, tmp_path: Path):
    from support.redis_server import running_redis

    up = make_upstream()
    admin = free_port()
    routes = durable_route(down=free_port())
    with running_redis(tmp_path / "redis") as redis:
        body = workers_ini(up.node, admin, routes=routes).replace(
            "[log]", f"[redis]\n        url = {redis.url}\n        prefix = wq\n\n"
                     f"        [queue]\n        backend = redis\n\n        [log]")
        gw = start_gateway(body)
        ready(admin)
        queue_forty(gw.url)

        def depth() -> float:
            return metric(get(admin, "/metrics")[1], "wsgateway_queue_depth")

        # both workers see the one Redis queue of 40; summed, it would read 80
        assert wait_for(lambda: depth() == 40, 20), depth()
        assert get(admin, "/admin/queue", token=True)[1]["depth"] == 40
        seen = set()
        for _ in range(20):  # a few delivery passes of both workers
            seen.add(depth())
            time.sleep(0.25)
        assert seen == {40}
        gw.stop()


async def _orphan_queue_file(path: Path, prefix: str = "") -> None:
    """A queue file as a worker of an earlier run left it: two connections' entries and a dead letter."""
    from support.queue_stores import write_queue_file
    from wsgateway.durable.entries import NewEntry
    from wsgateway.durable.replay import stored_headers

    headers = stored_headers("/durable/old", {}, None, None)

    def entry(conn: str, seq: int) -> NewEntry:
        return NewEntry(route="durable", conn_key=conn, seq=seq, message=f"{conn}:{seq}".encode(), headers=headers)

    await write_queue_file(path, [entry(f"{prefix}{c}", seq) for c in ("c1", "c2") for seq in range(1, 4)],
                           dead=[entry(f"{prefix}c3", 1)])


@pytest.mark.parametrize(("workers", "orphans", "target"), [
    (2, ["queue.sqlite.w3"], "queue.sqlite.w1"),  # fewer workers than before
    (1, ["queue.sqlite.w1", "queue.sqlite.w2"], "queue.sqlite"),  # back to one process
])
@pytest_twisted.ensureDeferred
async def test_queue_files_of_another_workers_setting_are_delivered(make_upstream, start_gateway, tmp_path: Path,
                                                                   workers: int, orphans: list[str], target: str):
    def record(up: Any, ws: Any) -> None:
        # not an echo: a replay connection closes right after its last message
        for msg in ws:
            up.received.append(msg)

    up = make_upstream(record)
    admin = free_port()
    (tmp_path / "var").mkdir()
    for i, name in enumerate(orphans):
        await _orphan_queue_file(tmp_path / "var" / name, prefix=f"{i}-")
    body = workers_ini(up.node, admin, routes=durable_route())
    if workers == 1:
        body = body.replace("workers = 2", "workers = 1")
    gw = start_gateway(body)
    ready(admin) if workers > 1 else wait_for(lambda: get(admin, "/readyz")[0] == 200, 20)
    # what the processes that are gone queued was moved into a file in use, and is delivered from there
    want = [f"{i}-{c}:{s}" for i in range(len(orphans)) for c in ("c1", "c2") for s in range(1, 4)]
    assert wait_for(lambda: sorted(m for m in up.received if ":" in m) == sorted(want), 20), up.received
    for i in range(len(orphans)):
        for c in ("c1", "c2"):
            mine = f"{i}-{c}:"
            assert [m for m in up.received if m.startswith(mine)] == [f"{mine}{s}" for s in range(1, 4)]  # in order
    for name in orphans:
        assert not (tmp_path / "var" / name).exists()
        assert f"queue file {tmp_path / 'var' / name} (workers = {workers} now) moved into {target}: 7 entries" \
            in gw.log()
    assert (tmp_path / "var" / target).exists()
    q = get(admin, "/admin/queue", token=True)[1]
    assert q["depth"] == 0 and q["dead"] == len(orphans)  # the dead letters moved too
