"""
The durable queue through the admin port of a real gateway (docs/durable-delivery.md,
docs/admin-api.md, docs/metrics.md): ``GET /admin/queue`` (depth and oldest age per route, dead letters),
``POST /admin/queue/purge`` and ``POST /admin/queue/replay``, and the
``wsgateway_queue_depth`` / ``wsgateway_queue_delivered_total`` metrics.

The upstream node is a port where nothing listens, so clients of the
``at_least_once`` route are accepted in degraded mode and their messages
queued. Later a raw upstream that accepts the WebSocket and then drops the
TCP connection without a close handshake makes a replay fail (dead letters
with ``max_attempts = 1``), and finally an echo upstream on that same port
receives what the queue kept.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from support.gateway import free_port, quiet_port
from support.metrics_text import get, scrape
from support.rawws import accept_for, header, parse_head, read_head
from support.waiting import wait_for
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.sync.server import Server, ServerConnection, serve

TOKEN = "queue-admin-token-8e1f"


def call(port: int, method: str, path: str, body: Any = None, token: str | None = TOKEN) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read()
        return e.code, json.loads(text) if text.startswith(b"{") else text


def queue(admin: int, query: str = "") -> dict[str, Any]:
    status, body = call(admin, "GET", "/admin/queue" + query)
    assert status == 200, body
    return body  # type: ignore[no-any-return]



def ini(admin: int, node_port: int, *, max_attempts: int = 20, delivery: str = "at_least_once") -> str:
    return f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1

        [admin]
        listen = tcp:{admin}:interface=127.0.0.1
        token = {TOKEN}

        [log]
        format = text
        level = info

        [queue]
        path = q.sqlite
        max_attempts = {max_attempts}

        [upstream:x]
        nodes = ws://127.0.0.1:{node_port}
        connect_timeout = 1
        retries = 0

        [route:other]
        path = /other
        upstream = x
        delivery = {delivery}

        [route:main]
        path = /**
        upstream = x
        delivery = {delivery}
        """


def send(url: str, messages: list[str | bytes]) -> None:
    """A client whose messages the gateway takes (queued: no upstream) before it closes normally."""
    with connect(url, open_timeout=5) as ws:
        for m in messages:
            ws.send(m)


class Dropper:
    """
    An upstream that completes the WebSocket handshake, reads what comes,
    then drops the TCP connection without a close frame (reset).
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        self.sock.settimeout(0.05)
        self.handshakes: list[list[tuple[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    head, rest = read_head(conn)
                    _, _, headers = parse_head(head)
                    key = header(headers, "Sec-WebSocket-Key")[0]
                    conn.sendall(
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        + f"Sec-WebSocket-Accept: {accept_for(key)}\r\n\r\n".encode()
                    )
                    self.handshakes.append(headers)
                    if not rest:
                        conn.recv(65536)
                except (OSError, IndexError, TimeoutError):
                    pass
                # no close frame, and a reset rather than a FIN
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class Echo:
    """A websockets echo upstream on a fixed port, recording requests and messages."""

    def __init__(self, port: int) -> None:
        self.requests: list[Any] = []
        self.received: list[str | bytes] = []

        def handler(ws: ServerConnection) -> None:
            self.requests.append(ws.request)
            for m in ws:
                self.received.append(m)
                try:
                    ws.send(m)
                except ConnectionClosed:
                    pass  # a replay connection closes right after its last message

        self.server: Server = serve(handler, "127.0.0.1", port, compression=None, max_size=None)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def closing() -> Iterator[list[Any]]:
    """Upstreams started by a test, closed after it."""
    started: list[Any] = []
    yield started
    for s in started:
        s.close()


def test_queue_endpoints_need_the_token(start_gateway: Any) -> None:
    admin = free_port()
    start_gateway(ini(admin, quiet_port()))
    for method, path, body in (("GET", "/admin/queue", None), ("POST", "/admin/queue/purge", {"all": True}),
                               ("POST", "/admin/queue/replay", {"dead": True})):
        for token in (None, "wrong", TOKEN + "x"):
            status, answer = call(admin, method, path, body, token=token)
            assert (status, answer) == (401, {"error": "a valid admin bearer token is required"}), (path, token)


def test_depth_per_route_metrics_and_purge(start_gateway: Any) -> None:
    admin = free_port()
    gw = start_gateway(ini(admin, quiet_port()))
    empty = queue(admin)
    assert (empty["depth"], empty["dead"], empty["routes"], empty["dead_letters"]) == (0, 0, {}, [])
    assert empty["backend"] == "QueueStore"

    main = [f"main-{i}" for i in range(6)] + [b"\x00\xffbinary"]
    other = ["o-1", "o-2", "o-3"]
    # one client of each route stays connected, its messages queued while no node answers
    with connect(f"{gw.url}/chat", open_timeout=5) as a, connect(f"{gw.url}/other", open_timeout=5) as b:
        for m in main:
            a.send(m)
        for m in other:
            b.send(m)
        assert wait_for(lambda: queue(admin)["depth"] == len(main) + len(other))
        q = queue(admin)
        assert q["routes"].keys() == {"main", "other"}
        assert {r: (v["depth"], v["dead"]) for r, v in q["routes"].items()} == {"main": (7, 0), "other": (3, 0)}
        for v in q["routes"].values():
            assert isinstance(v["oldest_age"], (int, float)) and v["oldest_age"] >= 0
        assert q["live_connections"] == 2 and q["dead"] == 0 and q["dead_letters"] == []
        # the oldest entry only gets older
        first_age = q["routes"]["main"]["oldest_age"]
        assert wait_for(lambda: queue(admin)["routes"]["main"]["oldest_age"] > first_age)

        only_other = queue(admin, "?route=other")
        assert (only_other["depth"], list(only_other["routes"])) == (3, ["other"])
        assert call(admin, "GET", "/admin/queue?limit=many")[0] == 400

        # refreshed on each deliverer pass
        assert wait_for(lambda: get(scrape(admin), "wsgateway_queue_depth") == 10.0)

        for bad in ({}, {"route": "main", "all": True}, {"route": 7}, {"all": "yes"}, {"all": True, "dead": 1}):
            status, body = call(admin, "POST", "/admin/queue/purge", bad)
            assert status == 400, bad
            assert "error" in body
        assert queue(admin)["depth"] == 10  # a refused purge purged nothing

        status, body = call(admin, "POST", "/admin/queue/purge", {"route": "main"})
        assert (status, body) == (200, {"purged": 7, "dead": False, "route": "main"})
        q = queue(admin)
        assert q["depth"] == 3 and q["routes"].keys() == {"other"}
        assert wait_for(lambda: get(scrape(admin), "wsgateway_queue_depth") == 3.0)

        status, body = call(admin, "POST", "/admin/queue/purge", {"all": True})
        assert (status, body) == (200, {"purged": 3, "dead": False, "route": None})
        assert queue(admin)["depth"] == 0
        assert wait_for(lambda: get(scrape(admin), "wsgateway_queue_depth") == 0.0)
        # the clients were not disconnected by it
        a.ping().wait(5)
        b.ping().wait(5)


def test_dead_letters_then_replay_and_delivery(start_gateway: Any, closing: list[Any]) -> None:
    admin, node = free_port(), quiet_port()
    gw = start_gateway(ini(admin, node, max_attempts=1))
    assert get(scrape(admin), "wsgateway_queue_delivered_total") == 0.0
    messages: list[str | bytes] = ["one", b"\x02two", "three"]
    send(f"{gw.url}/room/1", messages)
    assert wait_for(lambda: queue(admin)["depth"] == 3)
    assert wait_for(lambda: queue(admin)["live_connections"] == 0)  # the client left: the Deliverer's now
    # Nothing listens on the node: a replay cannot even start, so no attempt
    # is counted (with max_attempts = 1 one would make them dead letters).
    # Two more refused replays (logged at debug level: the Deliverer retries quietly).
    gw.stop()
    gw = start_gateway(ini(admin, node, max_attempts=1).replace("level = info", "level = debug"),
                       port=gw.port)
    failed = f"upstream x node ws://127.0.0.1:{node} attempt 1 failed"
    before = gw.log().count(failed)
    assert wait_for(lambda: gw.log().count(failed) >= before + 2, timeout=10)
    q = queue(admin)
    assert (q["dead"], q["depth"]) == (0, 3)

    # an upstream that takes the messages and vanishes without closing: the attempt failed
    dropper = Dropper(node)
    closing.append(dropper)
    assert wait_for(lambda: queue(admin)["dead"] == 3, timeout=10), queue(admin)
    q = queue(admin)
    assert q["depth"] == 0 and q["routes"]["main"]["dead"] == 3 and q["routes"]["main"]["depth"] == 0
    dead = q["dead_letters"]
    assert [(d["route"], d["seq"], d["reason"], d["attempts"], d["binary"]) for d in dead] == [
        ("main", 1, "max_attempts", 1, False), ("main", 2, "max_attempts", 1, True),
        ("main", 3, "max_attempts", 1, False)]
    assert [d["bytes"] for d in dead] == [3, 4, 5]
    conn_id = dead[0]["conn_id"]
    assert conn_id and all(d["conn_id"] == conn_id for d in dead)
    assert len({d["entry_id"] for d in dead}) == 3
    replay_heads = [h for h in dropper.handshakes if header(h, "X-Wsgateway-Replay")]
    assert replay_heads and header(replay_heads[0], "X-Wsgateway-Conn-Id") == [conn_id]
    dropper.close()
    assert get(scrape(admin), "wsgateway_queue_delivered_total") == 0.0

    # back in the queue, with fresh attempts (nothing listens again: they stay there)
    for bad in ({"dead": "yes"}, {"route": 3}, {"ids": "all"}):
        assert call(admin, "POST", "/admin/queue/replay", bad)[0] == 400, bad
    # one by its id, then the route's others (none on route other)
    status, body = call(admin, "POST", "/admin/queue/replay", {"ids": [dead[0]["id"]]})
    assert (status, body) == (200, {"replayed": 1, "delivering": True})
    q = queue(admin)
    assert (q["depth"], q["dead"], [d["seq"] for d in q["dead_letters"]]) == (1, 2, [2, 3])
    assert call(admin, "POST", "/admin/queue/replay", {"dead": True, "route": "other"}) == (
        200, {"replayed": 0, "delivering": True})
    status, body = call(admin, "POST", "/admin/queue/replay", {"dead": True})
    assert (status, body) == (200, {"replayed": 2, "delivering": True})
    q = queue(admin)
    assert (q["depth"], q["dead"], q["dead_letters"]) == (3, 0, [])
    assert q["routes"]["main"] == {"depth": 3, "oldest_age": q["routes"]["main"]["oldest_age"], "dead": 0}

    # a healthy upstream on that port: the Deliverer replays them, in order, once
    echo = Echo(node)
    closing.append(echo)
    assert wait_for(lambda: echo.received == messages, timeout=10), echo.received
    assert wait_for(lambda: queue(admin)["depth"] == 0)
    assert wait_for(lambda: get(scrape(admin), "wsgateway_queue_delivered_total") == 3.0)
    assert wait_for(lambda: get(scrape(admin), "wsgateway_queue_depth") == 0.0)
    q = queue(admin)
    assert (q["depth"], q["dead"], q["routes"], q["delivered"]) == (0, 0, {}, 3)
    request = echo.requests[0]
    assert request.headers["X-Wsgateway-Replay"] == "1"
    assert request.headers["X-Wsgateway-Conn-Id"] == conn_id
    assert request.headers["X-Wsgateway-Seq"] == "1"
    assert request.path == "/room/1"
    assert echo.received == messages  # not twice


def test_no_queue_without_an_at_least_once_route(start_gateway: Any) -> None:
    admin = free_port()
    start_gateway(ini(admin, quiet_port(), delivery="at_most_once"))
    for method, path, body in (("GET", "/admin/queue", None), ("POST", "/admin/queue/purge", {"all": True}),
                               ("POST", "/admin/queue/replay", {})):
        status, answer = call(admin, method, path, body)
        assert status == 404, (path, answer)
        assert "at_least_once" in answer["error"]
    assert get(scrape(admin), "wsgateway_queue_depth") == 0.0
