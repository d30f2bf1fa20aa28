"""
permessage-deflate on broadcast routes (docs/protocol.md#compression-on-broadcast-routes)
through a real gateway: what it answers to the ``websockets`` client's offer,
compressed messages in and out, clients without compression on the same
route, ``compression = off``, a compression bomb, and the metric.
"""

from __future__ import annotations

import zlib
from functools import partial
from typing import Any

from support import rawws
from support.gateway import free_port
from support.metrics_text import get, scrape
from support.waiting import wait_for
from support.wsclient import Listener
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.sync.client import ClientConnection, connect

TOKEN = "compression-admin-token"
MAX_MESSAGE = 1024 * 1024  # [limits] max_message_size = 1M below


def ini(admin: int) -> str:
    return f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1

        [admin]
        listen = tcp:{admin}:interface=127.0.0.1
        token = {TOKEN}

        [limits]
        max_message_size = 1M
        close_timeout = 1

        [log]
        format = text
        level = info

        [route:room]
        path = /room/{{room}}
        mode = broadcast
        channel = room:{{room}}
        auth = none

        [route:quiet]
        path = /quiet/{{room}}
        mode = broadcast
        channel = quiet:{{room}}
        auth = none
        compression = off
        """



def compressed_active(admin: int, route: str) -> float | None:
    return get(scrape(admin), "wsgateway_compressed_connections_active", route=route)


def answer(ws: ClientConnection) -> str | None:
    """The gateway's Sec-WebSocket-Extensions to this client (None: no extension)."""
    assert ws.response is not None
    return ws.response.headers.get("Sec-WebSocket-Extensions")


def got_at_least(c: Listener, n: int) -> bool:
    return len(c.got) >= n


def message(n: int) -> str:
    # compressible, and each one different: a frame mixed up with another shows
    return f'{{"seq": {n}, "event": "tick", "symbol": "ABC", "pad": "{"x" * 400}"}}'


def raw_subscriber(port: int, path: str) -> tuple[Any, rawws.FrameReader, list[tuple[str, str]]]:
    """A raw client that offers permessage-deflate, so the test sees the frames as they are on the wire."""
    sock = rawws.raw_connect(port)
    sock.sendall(rawws.upgrade_request(path, extra=[("Sec-WebSocket-Extensions", "permessage-deflate")]))
    head, rest = rawws.read_head(sock)
    _, code, headers = rawws.parse_head(head)
    assert code == 101, head
    return sock, rawws.FrameReader(sock, rest), headers


def test_compressed_publishes_reach_every_subscriber_intact_and_in_order(start_gateway: Any) -> None:
    admin = free_port()
    gw = start_gateway(ini(admin))
    url = f"{gw.url}/room/lobby"
    subs = [Listener(url) for _ in range(4)]
    # a client asking for a smaller window gets its own compressed copy
    small = Listener(url, compression=None,
                     extensions=[ClientPerMessageDeflateFactory(server_max_window_bits=10)])
    sock, reader, headers = raw_subscriber(gw.port, "/room/lobby")
    for c in subs:
        said = answer(c.ws) or ""
        assert said.startswith("permessage-deflate") and "server_no_context_takeover" in said
    assert "server_max_window_bits=10" in (answer(small.ws) or "")
    assert rawws.header(headers, "Sec-WebSocket-Extensions") == ["permessage-deflate; server_no_context_takeover"]
    try:
        with connect(url, open_timeout=10) as publisher:
            assert "server_no_context_takeover" in (answer(publisher) or "")
            assert wait_for(lambda: compressed_active(admin, "room") == 7, 10)
            for n in range(100):
                publisher.send(message(n))
            expected = [message(n) for n in range(100)]
            for c in [*subs, small]:
                assert wait_for(partial(got_at_least, c, 100), 15)
                assert c.got == expected
            # on the wire: each message deflated alone (RSV1), readable without the ones before it
            for n in range(100):
                f = reader.read_frame(timeout=5)
                assert f.opcode == rawws.OP_TEXT and f.rsv == 4 and not f.masked
                assert len(f.payload) < len(expected[n]) // 2
                assert zlib.decompressobj(-15).decompress(f.payload + b"\x00\x00\xff\xff") == expected[n].encode()
    finally:
        sock.close()
        for c in [*subs, small]:
            c.ws.close()


def test_a_client_without_compression_on_the_same_route_gets_plain_messages(start_gateway: Any) -> None:
    admin = free_port()
    gw = start_gateway(ini(admin))
    url = f"{gw.url}/room/mixed"
    compressed = Listener(url)
    plain = Listener(url, compression=None)
    sock = rawws.raw_connect(gw.port)
    try:
        sock.sendall(rawws.upgrade_request("/room/mixed"))
        head, rest = rawws.read_head(sock)
        assert rawws.parse_head(head)[1] == 101
        assert rawws.header(rawws.parse_head(head)[2], "Sec-WebSocket-Extensions") == []
        reader = rawws.FrameReader(sock, rest)
        assert answer(plain.ws) is None
        assert wait_for(lambda: compressed_active(admin, "room") == 1, 10)
        with connect(url, open_timeout=10, compression=None) as publisher:
            for n in range(20):
                publisher.send(message(n).encode())  # binary
        expected = [message(n).encode() for n in range(20)]
        for c in (compressed, plain):
            assert wait_for(partial(got_at_least, c, 20), 10)
            assert c.got == expected
        for n in range(20):
            f = reader.read_frame(timeout=5)
            assert (f.opcode, f.rsv, f.payload) == (rawws.OP_BINARY, 0, expected[n])
    finally:
        sock.close()
        compressed.ws.close()
        plain.ws.close()


def test_compression_off_declines_the_offer(start_gateway: Any) -> None:
    admin = free_port()
    gw = start_gateway(ini(admin))
    a, b = Listener(f"{gw.url}/quiet/x"), Listener(f"{gw.url}/quiet/x")
    try:
        assert answer(a.ws) is None
        b.ws.send(message(1))
        assert wait_for(lambda: a.got == [message(1)], 10)
        samples = scrape(admin)
        assert get(samples, "wsgateway_compressed_connections_active", route="quiet") == 0
    finally:
        a.ws.close()
        b.ws.close()


def test_a_compression_bomb_gets_1009_and_the_gateway_stays_small(start_gateway: Any) -> None:
    admin = free_port()
    gw = start_gateway(ini(admin))
    listener = Listener(f"{gw.url}/room/bomb")
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = c.compress(bytes(64 << 20)) + c.flush(zlib.Z_SYNC_FLUSH)[:-4]
    assert len(bomb) < MAX_MESSAGE // 8  # within the frame limit: only inflating it passes the limit
    before = gw.rss_kib()
    try:
        for _ in range(5):
            sock, reader, headers = raw_subscriber(gw.port, "/room/bomb")
            with sock:
                assert rawws.header(headers, "Sec-WebSocket-Extensions")
                sock.sendall(rawws.frame(rawws.OP_BINARY, bomb, rsv=4))
                got = reader.read_frame(timeout=10)
                assert got.opcode == rawws.OP_CLOSE and got.close[0] == 1009
                sock.sendall(rawws.frame(rawws.OP_CLOSE, (1009).to_bytes(2, "big")))
                # Autobahn reads nothing more after failing a frame mid-payload
                # (not even this answer): the connection ends at close_timeout
                reader.wait_eof(5)
        # 5 x 64 MiB inflated whole would be 320 MiB; bounded, it is the 1 MiB limit at most each time
        assert gw.rss_kib() - before < 48 * 1024, (before, gw.rss_kib())
        # nothing of it reached the channel, which works on
        with connect(f"{gw.url}/room/bomb", open_timeout=10) as publisher:
            publisher.send("after")
        assert wait_for(lambda: listener.got == ["after"], 10)
    finally:
        listener.ws.close()


def test_the_metric_counts_the_open_compressed_clients(start_gateway: Any) -> None:
    admin = free_port()
    gw = start_gateway(ini(admin))
    url = f"{gw.url}/room/metric"
    compressed = [Listener(url) for _ in range(3)]
    plain = [Listener(url, compression=None) for _ in range(2)]
    try:
        assert wait_for(lambda: get(scrape(admin), "wsgateway_connections_active", route="room") == 5, 10)
        assert compressed_active(admin, "room") == 3
        compressed[0].ws.close()
        plain[0].ws.close()
        assert wait_for(lambda: compressed_active(admin, "room") == 2, 10)
        for c in compressed[1:]:
            c.ws.close()
        assert wait_for(lambda: compressed_active(admin, "room") == 0, 10)
    finally:
        for c in compressed + plain:
            c.ws.close()
