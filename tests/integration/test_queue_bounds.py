"""
The durable queue's bounds on the wire (issue 16 item 1, docs/configuration.md,
docs/durable-delivery.md#bounds-and-disk-space): with the upstream of an
``at_least_once`` route down, a client that keeps sending is closed with
1013 "queue full" once its share (``[queue] max_bytes_per_connection``)
is used, the queue file stays near that bound, and the file gives its disk
space back after a purge and after delivery. ``wsgateway_queue_bytes``
reports what is held. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.gateway import free_port, quiet_port
from support.metrics_text import get, scrape
from support.waiting import wait_for
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.sync.server import ServerConnection, serve

TOKEN = "queue-bounds-token-5c2a9e7d41f0b3a6e8d2c1f4"
SHARE = 64 * 1024
MESSAGE = 4 * 1024
SQLITE_OVERHEAD = 256 * 1024  # pages and indexes of the file itself
WAL_BOUND = 5 * 1024 * 1024  # the WAL: up to an auto-checkpoint (1000 pages) plus a batch, cut back to 4 MiB


def call(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    req.add_header("Authorization", f"Bearer {TOKEN}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()



def ini(admin: int, node_port: int) -> str:
    return f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1

        [admin]
        listen = tcp:{admin}:interface=127.0.0.1
        token = {TOKEN}

        [log]
        format = text

        [queue]
        path = q.sqlite
        max_bytes_per_connection = {SHARE}

        [upstream:x]
        nodes = ws://127.0.0.1:{node_port}
        connect_timeout = 1
        retries = 0

        [route:main]
        path = /**
        upstream = x
        delivery = at_least_once
        """


def file_size(folder: Path, suffix: str = "") -> int:
    return os.path.getsize(folder / f"q.sqlite{suffix}") if os.path.exists(folder / f"q.sqlite{suffix}") else 0


def on_disk(folder: Path) -> int:
    return sum(os.path.getsize(folder / f"q.sqlite{s}") for s in ("", "-wal")
               if os.path.exists(folder / f"q.sqlite{s}"))


def fill_until_refused(url: str) -> tuple[int, tuple[int | None, str | None]]:
    """Send 4 KiB messages (paced: each is read before the next comes) until the gateway closes; (sent, close)."""
    sent = 0
    with connect(url, open_timeout=5, close_timeout=5) as ws:
        try:
            for _ in range(4 * SHARE // MESSAGE):  # far more than the share takes
                ws.send(os.urandom(MESSAGE))
                sent += 1
                time.sleep(0.05)
            ws.recv(timeout=5)
        except (ConnectionClosed, TimeoutError):
            pass
        rcvd = ws.protocol.close_rcvd
        return sent, ((rcvd.code, rcvd.reason) if rcvd is not None else (None, None))


@pytest.fixture
def gateway(start_gateway: Any, tmp_path: Path) -> tuple[Any, int, int, Path]:
    admin, node = free_port(), quiet_port()
    gw = start_gateway(ini(admin, node))
    return gw, admin, node, tmp_path


def test_a_client_past_its_share_gets_1013_and_the_file_shrinks_after_a_purge(
        gateway: tuple[Any, int, int, Path]) -> None:
    gw, admin, _, folder = gateway
    sent, close = fill_until_refused(f"{gw.url}/room/1")
    assert close == (1013, "queue full"), (sent, close, gw.log()[-2000:])
    assert sent < 2 * SHARE // MESSAGE  # refused at its share, not long after
    status, body = call(admin, "GET", "/admin/queue")
    assert status == 200 and 0 < body["depth"] <= SHARE // MESSAGE  # what was accepted stays queued
    assert file_size(folder) < SHARE + SQLITE_OVERHEAD, file_size(folder)
    assert file_size(folder, "-wal") < WAL_BOUND, file_size(folder, "-wal")
    assert wait_for(lambda: (get(scrape(admin), "wsgateway_queue_bytes") or 0) > body["depth"] * MESSAGE, timeout=15)
    # a full share is no failing store
    assert get(scrape(admin), "wsgateway_queue_failures_total", operation="append") == 0.0

    # another client has its own share
    _, close = fill_until_refused(f"{gw.url}/room/2")
    assert close == (1013, "queue full")
    grown = on_disk(folder)
    assert file_size(folder) < 2 * SHARE + SQLITE_OVERHEAD, file_size(folder)
    assert file_size(folder, "-wal") < WAL_BOUND, file_size(folder, "-wal")

    status, body = call(admin, "POST", "/admin/queue/purge", {"all": True})
    assert status == 200 and body["purged"] > 0
    assert wait_for(lambda: on_disk(folder) < 64 * 1024, timeout=10), (grown, on_disk(folder))
    assert wait_for(lambda: get(scrape(admin), "wsgateway_queue_bytes") == 0.0, timeout=15)


def test_the_file_shrinks_once_the_queue_is_delivered(gateway: tuple[Any, int, int, Path]) -> None:
    gw, admin, node, folder = gateway
    _, close = fill_until_refused(f"{gw.url}/room/1")
    assert close == (1013, "queue full")
    grown = on_disk(folder)
    assert grown > SHARE // 2

    received: list[Any] = []

    def echo(ws: ServerConnection) -> None:
        for m in ws:
            received.append(m)

    server = serve(echo, "127.0.0.1", node, compression=None, max_size=None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert wait_for(lambda: call(admin, "GET", "/admin/queue")[1]["depth"] == 0, timeout=30), gw.log()[-2000:]
        assert len(received) >= 1
        assert wait_for(lambda: on_disk(folder) < 64 * 1024, timeout=10), (grown, on_disk(folder))
    finally:
        server.shutdown()
