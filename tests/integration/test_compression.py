"""
permessage-deflate on proxy routes, end to end (docs/protocol.md#compression):
the client's offers reach the upstream, the upstream's answer (plus
client_no_context_takeover) reaches the client, compressed frames are
relayed as they are, and max_message_size counts what a compressed client
message inflates to.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import zlib
from typing import Any

import pytest
from support import rawws
from support.gateway import free_port, proxy_ini
from support.metrics_text import get, scrape
from support.waiting import wait_for
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

OFFER = ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")


def deflated(payload: bytes) -> bytes:
    """One message as a permessage-deflate sender writes it (RFC 7692 7.2.1), with a fresh context."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def events(n: int) -> list[str]:
    """JSON-like text that compresses several times over."""
    return [json.dumps([{"id": i * 100 + j, "kind": "trade", "symbol": "ACME", "price": 100 + j % 7, "qty": j}
                        for j in range(40)]) for i in range(n)]


def extensions(ws: Any) -> str:
    return ws.response.headers.get("Sec-WebSocket-Extensions", "")


@pytest.fixture
def deflating(make_upstream, start_gateway):
    """A gateway (with an admin port) in front of an upstream that accepts permessage-deflate."""
    up = make_upstream(compression="deflate")
    admin = free_port()
    ini = proxy_ini(up.node).replace("max_message_size = 32M", "max_message_size = 1M")
    gw = start_gateway(ini + f"\n[admin]\nlisten = tcp:{admin}:interface=127.0.0.1\n")
    return up, gw, admin


def test_both_legs_negotiate_and_messages_pass_intact_and_in_order(deflating) -> None:
    up, gw, admin = deflating
    sent = events(50) + ["", "é" * 1000]
    with connect(gw.url + "/c", open_timeout=10, max_size=None) as ws:
        answer = extensions(ws)
        assert answer.startswith("permessage-deflate") and "client_no_context_takeover" in answer
        for text in sent:
            ws.send(text)
        got = [ws.recv(timeout=10) for _ in sent]
        ws.send(b"\x00\xff" * 40000)
        assert ws.recv(timeout=10) == b"\x00\xff" * 40000
        samples = scrape(admin)
        assert get(samples, "wsgateway_compressed_connections_active", route="main") == 1
    assert got == sent
    assert up.received == sent + [b"\x00\xff" * 40000]
    # the upstream got the client's offer, and only that extension
    assert up.requests[0].headers.get_all("Sec-WebSocket-Extensions") == ["permessage-deflate; client_max_window_bits"]
    # relayed compressed: far fewer bytes on the client's leg than the text it sent
    closed = re.compile(r"closed \S+ route=main .* bytes_in=(\d+) .* compressed=True")
    assert wait_for(lambda: closed.search(gw.log()), 10)
    line = closed.search(gw.log())
    assert line and int(line.group(1)) < sum(len(t.encode()) for t in sent) / 3


def test_an_upstream_that_declines_leaves_the_connection_uncompressed(make_upstream, start_gateway) -> None:
    up = make_upstream()  # compression=None
    gw = start_gateway(proxy_ini(up.node))
    with connect(gw.url + "/c", open_timeout=10) as ws:
        assert extensions(ws) == ""
        ws.send("plain")
        assert ws.recv(timeout=5) == "plain"
    assert up.requests[0].headers.get("Sec-WebSocket-Extensions") == "permessage-deflate; client_max_window_bits"
    assert wait_for(lambda: "compressed=False" in gw.log(), 10)


def test_compression_off_declines_and_sends_no_offer_upstream(make_upstream, start_gateway) -> None:
    up = make_upstream(compression="deflate")
    gw = start_gateway(proxy_ini(up.node, extra_route="compression = off"))
    with connect(gw.url + "/c", open_timeout=10) as ws:
        assert extensions(ws) == ""
        ws.send("x" * 1000)
        assert ws.recv(timeout=5) == "x" * 1000
    assert up.requests[0].headers.get("Sec-WebSocket-Extensions") is None


def test_other_extensions_are_not_passed_on(make_upstream, start_gateway) -> None:
    up = make_upstream(compression="deflate")
    gw = start_gateway(proxy_ini(up.node))
    offer = "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=10, foo; bar=1"
    sock, reader = rawws.ws_open(gw.port, "/c", extra=[("Sec-WebSocket-Extensions", offer)])
    sock.close()
    assert wait_for(lambda: len(up.requests) == 1, 5)
    assert up.requests[0].headers.get_all("Sec-WebSocket-Extensions") == ["permessage-deflate; server_max_window_bits=10"]


class AnsweringUpstream:
    """An upstream that answers every upgrade with a fixed Sec-WebSocket-Extensions value."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(10)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        for _ in range(8):  # bounded: a test makes at most a few upgrades
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head, _rest = rawws.read_head(conn, 5)
                key = re.search(rb"Sec-WebSocket-Key: (\S+)", head, re.I)
                if key is None:
                    continue
                conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              f"Sec-WebSocket-Accept: {rawws.accept_for(key.group(1).decode())}\r\n"
                              f"Sec-WebSocket-Extensions: {self.answer}\r\n\r\n").encode())
                rawws.read_all(conn, 2)


@pytest.mark.parametrize(
    "answer",
    [
        "permessage-deflate; client_max_window_bits=10; server_max_window_bits=12",  # fine: offered what the client offered
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; unknown_param",
        "permessage-deflate, permessage-deflate",
        "x-other",
    ],
    ids=["allowed", "bad-window", "unknown-param", "two-answers", "not-offered"],
)
def test_an_answer_that_accepts_no_offer_is_502(start_gateway, answer: str) -> None:
    up = AnsweringUpstream(answer)
    gw = start_gateway(proxy_ini(f"ws://127.0.0.1:{up.port}"))
    if answer.startswith("permessage-deflate; client_max_window_bits=10"):
        sock, _ = rawws.ws_open(gw.port, "/c", extra=[OFFER])
        sock.close()
        return
    with pytest.raises(InvalidStatus) as refused:
        connect(gw.url + "/c", open_timeout=10)
    assert refused.value.response.status_code == 502


def test_a_window_the_client_did_not_offer_to_take_is_502(start_gateway) -> None:
    up = AnsweringUpstream("permessage-deflate; client_max_window_bits=10")
    gw = start_gateway(proxy_ini(f"ws://127.0.0.1:{up.port}"))
    sock = rawws.raw_connect(gw.port)
    sock.sendall(rawws.upgrade_request("/c", extra=[("Sec-WebSocket-Extensions", "permessage-deflate")]))
    head, _ = rawws.read_head(sock)
    assert rawws.parse_head(head)[1] == 502


def _open_compressed(port: int) -> tuple[socket.socket, rawws.FrameReader, str]:
    sock = rawws.raw_connect(port)
    sock.sendall(rawws.upgrade_request("/c", extra=[OFFER]))
    head, rest = rawws.read_head(sock)
    _, code, headers = rawws.parse_head(head)
    assert code == 101, head
    [answer] = rawws.header(headers, "Sec-WebSocket-Extensions")
    return sock, rawws.FrameReader(sock, rest), answer


def test_a_raw_compressed_message_is_relayed_as_it_is_and_answered_compressed(deflating) -> None:
    up, gw, _ = deflating
    sock, reader, answer = _open_compressed(gw.port)
    assert "client_no_context_takeover" in answer
    text = events(1)[0].encode()
    # first frame compressed (RSV1), then a continuation without RSV1: one message
    body = deflated(text)
    sock.sendall(rawws.frame(rawws.OP_TEXT, body[:10], fin=False, rsv=4) + rawws.frame(rawws.OP_CONT, body[10:]))
    got = reader.read_frame(timeout=5)
    assert got.opcode == rawws.OP_TEXT
    assert up.received == [text.decode()]
    sock.close()


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([rawws.frame(rawws.OP_TEXT, deflated(b"a"), fin=False, rsv=4), rawws.frame(rawws.OP_CONT, b"x", rsv=4)],
         "reserved bits set"),  # RSV1 on a continuation frame
        ([rawws.frame(rawws.OP_PING, b"p", rsv=4)], "reserved bits set"),  # on a control frame
        ([rawws.frame(rawws.OP_TEXT, deflated(b"a"), rsv=2)], "reserved bits set"),  # RSV2: no extension of ours
        # fragmented, so inflated however small (a one-frame message that cannot reach the limit is not)
        ([rawws.frame(rawws.OP_TEXT, b"\xff\xff", fin=False, rsv=4), rawws.frame(rawws.OP_CONT, b"\xff\xff")],
         "invalid compressed data"),
    ],
    ids=["rsv1-continuation", "rsv1-ping", "rsv2", "not-deflate"],
)
def test_rsv1_misuse_and_bad_deflate_data_close_the_client(deflating, frames: list[bytes], reason: str) -> None:
    _, gw, _ = deflating
    sock, reader, _ = _open_compressed(gw.port)
    sock.sendall(b"".join(frames))
    close = reader.read_frame(timeout=5)
    assert close.opcode == rawws.OP_CLOSE
    assert close.close == (1007 if "compressed" in reason else 1002, reason)
    sock.close()


def test_rsv1_without_negotiation_is_still_1002(make_upstream, start_gateway) -> None:
    up = make_upstream()  # declines: no compression on this connection
    gw = start_gateway(proxy_ini(up.node))
    sock, reader = _open_plain(gw.port)
    sock.sendall(rawws.frame(rawws.OP_TEXT, deflated(b"hello"), rsv=4))
    assert reader.read_frame(timeout=5).close == (1002, "reserved bits set")
    sock.close()


def _open_plain(port: int) -> tuple[socket.socket, rawws.FrameReader]:
    sock = rawws.raw_connect(port)
    sock.sendall(rawws.upgrade_request("/c", extra=[OFFER]))
    head, rest = rawws.read_head(sock)
    _, code, headers = rawws.parse_head(head)
    assert code == 101 and not rawws.header(headers, "Sec-WebSocket-Extensions"), head
    return sock, rawws.FrameReader(sock, rest)


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "many-writes"])
def test_a_compression_bomb_is_closed_1009_and_the_gateway_stays_small(deflating, split: bool) -> None:
    """64 MiB of zeros is 64 KiB deflated: refused against max_message_size = 1M as it inflates."""
    up, gw, _ = deflating
    before = gw.rss_kib()
    bomb = deflated(bytes(64 * 1024 * 1024))
    assert len(bomb) < 100 * 1024
    sock, reader, _ = _open_compressed(gw.port)
    wire = rawws.frame(rawws.OP_BINARY, bomb, rsv=4)
    if split:
        for i in range(0, len(wire), 1000):
            try:
                sock.sendall(wire[i:i + 1000])
            except OSError:
                break
    else:
        sock.sendall(wire)
    close = reader.read_frame(timeout=10)
    assert close.close == (1009, "message too big")
    sock.close()
    assert up.received == []
    # what a bomb may make the gateway hold is one window and one 64 KiB step, not the 64 MiB
    assert gw.rss_kib() - before < 16 * 1024
    # and it still serves
    with connect(gw.url + "/c", open_timeout=10) as ws:
        ws.send("after")
        assert ws.recv(timeout=5) == "after"


def test_a_compressed_message_just_under_the_limit_passes(deflating) -> None:
    up, gw, _ = deflating
    sock, reader, _ = _open_compressed(gw.port)
    payload = bytes(1024 * 1024)  # exactly max_message_size, inflated
    sock.sendall(rawws.frame(rawws.OP_BINARY, deflated(payload), rsv=4))
    echo = reader.read_frame(timeout=10)
    assert echo.opcode == rawws.OP_BINARY
    assert wait_for(lambda: up.received == [payload], 5)
    sock.close()


def test_the_client_leg_stays_compressed_across_many_messages(deflating) -> None:
    """Context takeover on the upstream's side, none on the client's (what the gateway answered)."""
    up, gw, _ = deflating
    sent = [f"tick {i} " + "same words again " * 20 for i in range(300)]
    with connect(gw.url + "/c", open_timeout=10) as ws:
        for m in sent:
            ws.send(m)
        assert [ws.recv(timeout=5) for _ in sent] == sent
    assert up.received == sent


def test_a_client_that_keeps_its_context_anyway_is_1007(deflating) -> None:
    """It was answered client_no_context_takeover: a message that refers to the previous one cannot be read."""
    _, gw, _ = deflating
    sock, reader, _ = _open_compressed(gw.port)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    text = b"the same sentence, sent twice over " * 4
    first = c.compress(text) + c.flush(zlib.Z_SYNC_FLUSH)
    second = c.compress(text) + c.flush(zlib.Z_SYNC_FLUSH)  # back-references into the first
    sock.sendall(rawws.frame(rawws.OP_TEXT, first[:-4], rsv=4))
    assert reader.read_frame(timeout=5).opcode == rawws.OP_TEXT
    # in two frames: inflated, since a fragmented message's size is not known from its first frame
    second = second[:-4]
    sock.sendall(rawws.frame(rawws.OP_TEXT, second[:3], fin=False, rsv=4) + rawws.frame(rawws.OP_CONT, second[3:]))
    got = reader.read_frame(timeout=5)
    assert got.opcode == rawws.OP_CLOSE and got.close == (1007, "invalid compressed data")
    sock.close()



def test_the_metric_counts_open_compressed_connections_only(deflating, make_upstream) -> None:
    _, gw, admin = deflating
    with connect(gw.url + "/c", open_timeout=10) as a, connect(gw.url + "/c", open_timeout=10, compression=None) as b:
        a.send("1")
        b.send("2")
        assert (a.recv(timeout=5), b.recv(timeout=5)) == ("1", "2")
        samples = scrape(admin)
        assert get(samples, "wsgateway_compressed_connections_active", route="main") == 1
        assert get(samples, "wsgateway_connections_active", route="main") == 2
    assert wait_for(lambda: get(scrape(admin), "wsgateway_compressed_connections_active", route="main") == 0,
                    10)
