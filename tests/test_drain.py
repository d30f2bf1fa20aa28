"""
Graceful shutdown (SPEC section 9): SIGTERM stops accepting, /readyz says
draining, and after drain_grace every client gets 1001 "going away" at its
own random moment of the drain window (no reconnect stampede), without
losing a message it sent before it saw the close; then twistd exits 0.

The relay's part is tested with a fake clock; the rest with a real twistd,
real clients and a real upstream.
"""

from __future__ import annotations

import contextlib
import json
import random
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

from conftest import free_port, proxy_ini, wait_for
from test_relay import c_frame, make, parse_frames, u_frame
from wsgateway.relay.codec import OP_CLOSE, OP_TEXT, encode_close
from wsgateway.service import drain_schedule

# -- the relay: drain() closes the client first -------------------------------


def test_drain_closes_the_client_first_and_forwards_what_it_sent_meanwhile() -> None:
    h = make(close_timeout=5.0)
    h.relay.drain()
    [close] = parse_frames(h.client.value())
    assert close.opcode == OP_CLOSE and not close.masked
    assert close.close == (1001, "server shutting down")
    assert h.upstream.value() == b""  # the upstream hears nothing yet
    assert (h.relay.closed_by, h.relay.close_code) == ("gateway", 1001)

    # sent by the client before our close reached it: still forwarded
    late = c_frame(OP_TEXT, b"in flight")
    answer = encode_close(1001, "", mask=True)
    h.relay.client_data(late + answer)
    assert h.upstream.value() == late + answer  # the message first, then the client's close
    # nothing from the upstream goes to the client after our close
    h.client.clear()
    h.relay.upstream_data(u_frame(OP_TEXT, b"too late") + encode_close(1001, "", mask=False))
    assert h.client.value() == b""
    h.clock.advance(0)
    assert h.client.kinds()[-1] == "lose"  # handshake complete: the server side closes TCP
    h.relay.client_connection_lost()
    assert h.upstream.kinds()[-1] == "lose"
    h.relay.upstream_connection_lost()
    h.assert_finished()
    assert h.client.abort_calls == 0 and h.upstream.abort_calls == 0


def test_drain_of_a_client_that_never_answers_still_closes_the_upstream() -> None:
    h = make(close_timeout=3.0)
    h.relay.drain()
    h.clock.advance(3.0)
    assert h.client.abort_calls == 1
    [close] = parse_frames(h.upstream.value())
    assert close.masked and close.close[0] == 1001
    assert h.upstream.kinds() == ["write", "lose"]  # a close, not a dropped connection
    h.lose_both()
    h.assert_finished()


def test_drain_of_a_connection_already_closing_changes_nothing() -> None:
    h = make()
    h.relay.client_data(encode_close(4000, "bye", mask=True))
    upstream_before, client_before = h.upstream.value(), h.client.value()
    h.relay.drain()
    assert (h.upstream.value(), h.client.value()) == (upstream_before, client_before)
    assert (h.relay.closed_by, h.relay.close_code) == ("client", 4000)


# -- the schedule: spread over the window, not all at once --------------------


def test_drain_schedule_spreads_closes_uniformly_over_half_the_shutdown_timeout() -> None:
    rng = random.Random(7)
    delays = drain_schedule(1000, shutdown_timeout=10.0, rng=rng)
    assert len(delays) == 1000
    assert all(0 <= d <= 5.0 for d in delays)
    # uniform: every second of the window gets its share
    for second in range(5):
        share = sum(1 for d in delays if second <= d < second + 1)
        assert 150 <= share <= 250, (second, share)
    assert drain_schedule(3, shutdown_timeout=0.0, rng=rng) == [0.0, 0.0, 0.0]


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
    closes: list[tuple[float, int | None, str | None]] = [(0.0, None, None)] * n
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
            closes[i] = (time.monotonic(), e.rcvd.code if e.rcvd else None, e.rcvd.reason if e.rcvd else None)

    threads = [threading.Thread(target=f, args=(i,)) for i in range(n) for f in (sender, receiver)]
    for t in threads:
        t.start()
    assert wait_for(lambda: all(len(s) >= 3 for s in sent), 10)
    assert readyz(admin)[0] == 200
    t0 = time.monotonic()
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

    assert [(code, reason) for _, code, reason in closes] == [(1001, "server shutting down")] * n
    times = sorted(t for t, _, _ in closes)
    assert times[0] - t0 >= 0.25  # drain_grace first
    # spread with jitter: not one burst (window: 0.3 + U(0, 2) s)
    assert times[-1] - times[0] > 0.05, times
    assert times[-1] - t0 < 0.3 + 2.0 + 1.0
    for i in range(n):
        assert sent[i], i
        assert received[f"/c{i}"] == sent[i], f"client {i}: sent {len(sent[i])}, upstream got {len(received[f'/c{i}'])}"
    assert sorted(code for code, _ in up.closes) == [1001] * n
    log = gw.log()
    assert "draining 20 connections" in log
