"""
Backpressure (docs/protocol.md#forwarding-and-close-codes): a flooding client in front of a slow upstream
is paused by TCP; the gateway does not buffer what the upstream cannot take.
"""

from __future__ import annotations

import threading
import time

from websockets.sync.client import connect

from support.gateway import proxy_ini

MiB = 1024 * 1024


def test_flooding_client_is_paused_and_gateway_memory_stays_bounded(make_upstream, start_gateway):
    release = threading.Event()
    received: list[int] = []

    def slow(up, ws):
        release.wait(30)  # reads nothing until the test says so
        for msg in ws:
            received.append(len(msg))
            if len(received) == total:
                ws.send("done")

    total = 200  # 200 MiB offered
    up = make_upstream(slow, max_queue=1)
    gw = start_gateway(proxy_ini(up.node, limits="write_buffer = 256K"))
    sent = 0
    payload = b"\x5a" * MiB
    with connect(gw.url + "/flood", max_size=None, compression=None) as ws:
        ws.send(b"warm-up" * 1000)  # first leg open, the relay running
        rss_before = gw.rss_kib()

        def flood():
            nonlocal sent
            for _ in range(total - 1):
                ws.send(payload)
                sent += 1

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        time.sleep(4)
        stalled_at = sent
        rss_stalled = gw.rss_kib()
        # What is in flight fits in socket buffers on both sides plus the
        # upstream's one-message queue: far below what the client offered.
        assert stalled_at < 64, f"client was never paused: {stalled_at} MiB accepted"
        assert sender.is_alive()
        growth_mib = (rss_stalled - rss_before) / 1024
        assert growth_mib < 24, f"gateway RSS grew {growth_mib:.1f} MiB while the upstream was not reading"

        release.set()
        sender.join(60)
        assert not sender.is_alive()
        assert ws.recv(timeout=60) == "done"
    # nothing lost or cut: every message arrived whole
    assert received[1:] == [MiB] * (total - 1)


def test_flooding_upstream_is_paused_while_the_client_does_not_read(make_upstream, start_gateway):
    sent = 0
    go = threading.Event()
    total = 200

    def flood(up, ws):
        nonlocal sent
        ws.recv()  # the client is there
        go.set()
        for _ in range(total):
            ws.send(b"\xa5" * MiB)
            sent += 1
        ws.recv()  # wait for the client's close

    up = make_upstream(flood)
    gw = start_gateway(proxy_ini(up.node, limits="write_buffer = 256K"))
    with connect(gw.url + "/down", max_size=None, compression=None, max_queue=1) as ws:
        rss_before = gw.rss_kib()
        ws.send("start")
        assert go.wait(5)
        time.sleep(4)  # the client reads nothing meanwhile
        stalled_at, rss_stalled = sent, gw.rss_kib()
        assert stalled_at < 64, f"upstream was never paused: {stalled_at} MiB accepted"
        growth_mib = (rss_stalled - rss_before) / 1024
        assert growth_mib < 24, f"gateway RSS grew {growth_mib:.1f} MiB while the client was not reading"
        got = [len(ws.recv(timeout=30)) for _ in range(total)]
    assert got == [MiB] * total
