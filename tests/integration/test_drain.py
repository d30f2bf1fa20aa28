"""
Graceful shutdown (docs/operations.md#signals-and-lifecycle): SIGTERM stops accepting, /readyz says
draining, and after drain_grace every client gets 1001 "going away" at its
own random moment of the drain window (no reconnect stampede), without
losing a message it sent before it saw the close; then twistd exits 0.

A real twistd, real clients and a real upstream; the relay's part on a fake
clock is tests/unit/core/test_drain.py.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from support.gateway import free_port, proxy_ini
from support.waiting import wait_for

# -- the relay: drain() closes the client first -------------------------------


# -- the schedule: spread over the window, not all at once --------------------


# -- the daemon ------------------------------------------------------------------


def drain_ini(node: str, admin_port: int, *, grace: float, timeout: float) -> str:
    return proxy_ini(node).replace(
        "listen = tcp:{port}:interface=127.0.0.1",
        f"listen = tcp:{{port}}:interface=127.0.0.1\n        drain_grace = {grace}\n"
        f"        shutdown_timeout = {timeout}\n\n        [admin]\n"
        f"        listen = tcp:{admin_port}:interface=127.0.0.1",
    ).replace("[limits]", "[limits]\n        ping_interval = 0")


def readyz(admin_port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_sigterm_spreads_1001_over_the_window_and_loses_no_client_message(make_upstream, start_gateway):
    """
    20 clients, each sending a numbered message every few milliseconds
    until its close arrives. Each gets 1001 "server shutting down"; the
    closes are spread (by the clients' own clocks); every message a client
    managed to send reached the upstream, in order; twistd exits 0.
    """
    received: dict[str, list[str]] = defaultdict(list)

    def sink(up: Any, ws: Any) -> None:
        path = ws.request.path
        for msg in ws:
            received[path].append(msg)

    up = make_upstream(sink)
    admin = free_port()
    gw = start_gateway(drain_ini(up.node, admin, grace=0.3, timeout=4))
    n = 20
    stack = contextlib.ExitStack()
    clients = [stack.enter_context(connect(f"{gw.url}/c{i}")) for i in range(n)]
    sent: list[list[str]] = [[] for _ in range(n)]
    closes: list[tuple[int | None, str | None]] = [(None, None)] * n
    stop_sending = threading.Event()

    def sender(i: int) -> None:
        ws, k = clients[i], 0
        while not stop_sending.is_set():
            try:
                ws.send(f"{i}:{k}")
            except ConnectionClosed:
                return
            sent[i].append(f"{i}:{k}")
            k += 1
            time.sleep(0.005)

    def receiver(i: int) -> None:
        try:
            clients[i].recv(timeout=30)
        except ConnectionClosed as e:
            closes[i] = (e.rcvd.code if e.rcvd else None, e.rcvd.reason if e.rcvd else None)

    threads = [threading.Thread(target=f, args=(i,)) for i in range(n) for f in (sender, receiver)]
    for t in threads:
        t.start()
    assert wait_for(lambda: all(len(s) >= 3 for s in sent), 10)
    assert readyz(admin)[0] == 200
    gw.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: readyz(admin)[1]["status"] == "draining", 3)
    assert readyz(admin)[0] == 503
    # the listener is closed as soon as the drain begins
    with pytest.raises(OSError):
        connect(f"{gw.url}/late", open_timeout=2)
    for t in threads[1::2]:
        t.join(20)
    stop_sending.set()
    for t in threads[::2]:
        t.join(5)
    assert gw.proc.wait(15) == 0
    stack.close()

    # when each close goes (drain_grace, then spread over the window):
    # tests/unit/core/test_drain.py::test_drain_schedule_spreads_closes_uniformly_over_half_the_shutdown_timeout
    assert closes == [(1001, "server shutting down")] * n
    for i in range(n):
        assert sent[i], i
        assert received[f"/c{i}"] == sent[i], f"client {i}: sent {len(sent[i])}, upstream got {len(received[f'/c{i}'])}"
    assert sorted(code for code, _ in up.closes) == [1001] * n
    log = gw.log()
    assert "draining 20 connections" in log
