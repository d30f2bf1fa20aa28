"""
Mirroring (route ``mirror``): a copy of every client message goes to another
upstream; nothing it does reaches or slows the primary.
"""

from __future__ import annotations

import contextlib
import threading
import time

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from support.gateway import free_port
from support.waiting import wait_for


def ini(primary: str, mirror: str, limits: str = "") -> str:
    return f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1

        [limits]
        max_message_size = 4M
        write_buffer = 64K
        {limits}

        [log]
        level = info
        format = text

        [upstream:primary]
        nodes = {primary}

        [upstream:shadow]
        nodes = {mirror}
        retries = 0
        connect_timeout = 1

        [route:main]
        path = /**
        upstream = primary
        mirror = shadow
        """


def test_mirror_gets_a_copy_of_every_client_message(make_upstream, start_gateway):
    def shadow_handler(up, ws):
        for msg in ws:
            up.received.append(msg)
            # The gateway may have copied the client's close and closed the
            # mirror's connection already: this answer then fails, but the
            # copies still queued here must be read, not lost with the loop.
            with contextlib.suppress(ConnectionClosed):
                ws.send("the mirror's answers are discarded")

    primary, shadow = make_upstream(), make_upstream(shadow_handler)
    gw = start_gateway(ini(primary.node, shadow.node))
    with connect(gw.url + "/m?x=1", compression=None) as ws:
        assert wait_for(lambda: len(shadow.requests) == 1)
        sent = ["one", b"\x00two", "three" * 1000, ["frag", "mented"]]
        for m in sent:
            ws.send(m)
        got = [ws.recv(timeout=5) for _ in sent]
        # the client only ever sees the primary's answers
        assert got == ["one", b"\x00two", "three" * 1000, "fragmented"]
    assert wait_for(lambda: len(shadow.received) == 4)
    assert shadow.received == ["one", b"\x00two", "three" * 1000, "fragmented"]
    assert shadow.requests[0].path == "/m?x=1"
    assert wait_for(lambda: shadow.closes)  # closed along with the client


def test_mirror_down_changes_nothing_for_the_client(make_upstream, start_gateway):
    primary = make_upstream()
    gw = start_gateway(ini(primary.node, f"ws://127.0.0.1:{free_port()}"))
    for _ in range(3):
        with connect(gw.url + "/m", compression=None) as ws:
            for i in range(50):
                ws.send(f"m{i}")
                assert ws.recv(timeout=5) == f"m{i}"


def test_slow_mirror_is_cut_off_and_never_slows_the_primary(make_upstream, start_gateway):
    stuck = threading.Event()

    def never_reads(up, ws):
        stuck.wait(30)

    primary, shadow = make_upstream(), make_upstream(never_reads, max_queue=1)
    gw = start_gateway(ini(primary.node, shadow.node))
    payload = b"\x33" * (1024 * 1024)
    try:
        with connect(gw.url + "/m", max_size=None, compression=None) as ws:
            assert wait_for(lambda: len(shadow.requests) == 1)
            # far more than the mirror's socket buffers and write_buffer can hold
            for i in range(60):
                ws.send(payload)
                assert ws.recv(timeout=10) == payload
        assert wait_for(lambda: "mirror_dropped=" in gw.log() and "mirror too slow" in gw.log())
        line = [l for l in gw.log().splitlines() if "closed " in l][-1]
        dropped = int(line.split("mirror_dropped=")[1].split()[0])
        assert 0 < dropped < 60
    finally:
        stuck.set()


def test_the_mirror_gets_what_the_client_sends_first_even_when_it_is_slow_to_open(make_upstream, start_gateway):
    """
    The mirror's handshake takes 0.5 s; the client says hello the moment it
    is connected. The mirror's leg opens alongside the primary's and the
    client's frames are held for it, so it still sees the session from its
    first message (issue 16 item 11).
    """

    def slow_handshake(connection, request):
        time.sleep(0.5)
        return None

    def shadow_handler(up, ws):
        for msg in ws:
            up.received.append(msg)

    primary = make_upstream()
    shadow = make_upstream(shadow_handler, process_request=slow_handshake)
    gw = start_gateway(ini(primary.node, shadow.node))
    with connect(gw.url + "/first", compression=None) as ws:
        ws.send("hello")
        ws.send("subscribe")
        assert ws.recv(timeout=5) == "hello"
        assert ws.recv(timeout=5) == "subscribe"
        assert wait_for(lambda: len(shadow.received) >= 2, 5)
        assert shadow.received[:2] == ["hello", "subscribe"]
        ws.send("third")
        assert ws.recv(timeout=5) == "third"
    assert wait_for(lambda: len(shadow.received) == 3, 5)
    assert shadow.received == ["hello", "subscribe", "third"]
