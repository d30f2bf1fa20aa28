"""
The proxy core end to end: a real twistd gateway between the ``websockets``
library as client and as upstream (docs/protocol.md).
"""

from __future__ import annotations

import socket
import threading
import time
from http import HTTPStatus

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import CloseCode
from websockets.sync.client import connect

from support.gateway import free_port, proxy_ini
from support.waiting import wait_for

MiB = 1024 * 1024


@pytest.fixture
def echo_gateway(make_upstream, start_gateway):
    up = make_upstream()
    gw = start_gateway(proxy_ini(up.node))
    return up, gw


@pytest.mark.parametrize(
    "message",
    [
        "hello",
        "",
        "é" * 3,
        b"",
        b"\x00",
        b"\xff" * 65536,
        "x" * 65536,
        bytes(range(256)) * (16 * 4096),  # 16 MiB
    ],
    ids=["text", "empty-text", "utf8", "empty-binary", "one-byte", "64KiB-binary", "64KiB-text", "16MiB"],
)
def test_echo_keeps_type_and_content(echo_gateway, message):
    up, gw = echo_gateway
    with connect(gw.url + "/echo", max_size=None, compression=None, open_timeout=10) as ws:
        ws.send(message)
        got = ws.recv(timeout=30)
    assert type(got) is type(message)
    assert got == message
    assert up.received == [message]


def test_ten_thousand_messages_in_order(echo_gateway):
    _, gw = echo_gateway
    n = 10_000
    with connect(gw.url + "/echo", compression=None) as ws:
        sender = threading.Thread(target=lambda: [ws.send(f"m{i}") for i in range(n)])
        sender.start()
        got = [ws.recv(timeout=30) for _ in range(n)]
        sender.join()
    assert got == [f"m{i}" for i in range(n)]


def test_fragmented_message_from_client_arrives_whole(echo_gateway):
    up, gw = echo_gateway
    with connect(gw.url + "/echo", compression=None) as ws:
        ws.send(["frag", "mented", " text"])
        assert ws.recv(timeout=10) == "fragmented text"
        ws.send([b"\x01" * 70000, b"\x02", b"\x03" * 10])
        assert ws.recv(timeout=10) == b"\x01" * 70000 + b"\x02" + b"\x03" * 10
    assert up.received == ["fragmented text", b"\x01" * 70000 + b"\x02" + b"\x03" * 10]


def test_subprotocol_chosen_by_upstream(make_upstream, start_gateway):
    up = make_upstream(subprotocols=["chat.v2"])
    gw = start_gateway(proxy_ini(up.node))
    with connect(gw.url + "/", subprotocols=["chat.v1", "chat.v2"]) as ws:
        assert ws.subprotocol == "chat.v2"
        ws.send("hi")
        assert ws.recv(timeout=5) == "hi"
    offered = [p.strip() for p in up.requests[0].headers["Sec-WebSocket-Protocol"].split(",")]
    assert offered == ["chat.v1", "chat.v2"]


def test_upstream_refusal_status_reaches_client(make_upstream, start_gateway):
    def refuse(connection, request):
        return connection.respond(HTTPStatus.FORBIDDEN, "go away\n")

    up = make_upstream(process_request=refuse)
    gw = start_gateway(proxy_ini(up.node))
    with pytest.raises(InvalidStatus) as e:
        connect(gw.url + "/x")
    assert e.value.response.status_code == 403


def test_upstream_port_closed_is_502(start_gateway):
    gw = start_gateway(proxy_ini(f"ws://127.0.0.1:{free_port()}"))
    with pytest.raises(InvalidStatus) as e:
        connect(gw.url + "/x")
    assert e.value.response.status_code == 502
    # a fixed reason, never internal text
    assert e.value.response.reason_phrase == "Bad Gateway"


def test_upstream_that_never_answers_is_504_within_connect_timeout(start_gateway):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel accepts TCP; nobody ever reads or answers
    try:
        gw = start_gateway(
            proxy_ini(f"ws://127.0.0.1:{silent.getsockname()[1]}").replace("connect_timeout = 2", "connect_timeout = 1")
        )
        t0 = time.monotonic()
        with pytest.raises(InvalidStatus) as e:
            connect(gw.url + "/x", open_timeout=10)
        elapsed = time.monotonic() - t0
        assert e.value.response.status_code == 504
        # bounded by connect_timeout (1 s), with generous slack for a loaded CI machine
        assert elapsed < 5
    finally:
        silent.close()


def test_unmatched_path_is_404(make_upstream, start_gateway):
    up = make_upstream()
    gw = start_gateway(
        proxy_ini(up.node).replace("path = /**", "path = /only/here")
    )
    with pytest.raises(InvalidStatus) as e:
        connect(gw.url + "/elsewhere")
    assert e.value.response.status_code == 404
    assert up.requests == []


def test_close_code_and_reason_from_client_reach_upstream(echo_gateway):
    up, gw = echo_gateway
    with connect(gw.url + "/echo") as ws:
        ws.send("x")
        ws.recv(timeout=5)
        ws.close(4000, "bye")
    assert wait_for(lambda: up.closes)
    assert up.closes == [(4000, "bye")]


def test_close_code_and_reason_from_upstream_reach_client(make_upstream, start_gateway):
    def closer(up, ws):
        ws.recv()
        ws.close(4001, "see you")

    up = make_upstream(closer)
    gw = start_gateway(proxy_ini(up.node))
    with connect(gw.url + "/") as ws:
        ws.send("bye?")
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=5)
    assert e.value.rcvd.code == 4001
    assert e.value.rcvd.reason == "see you"


@pytest.mark.parametrize("code", [1001, 1011, 1012])
def test_server_close_codes_pass_through(make_upstream, start_gateway, code):
    def closer(up, ws):
        ws.recv()
        ws.close(code, "upstream says so")

    up = make_upstream(closer)
    gw = start_gateway(proxy_ini(up.node))
    with connect(gw.url + "/") as ws:
        ws.send("go")
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=5)
    assert e.value.rcvd.code == code


def test_upstream_killed_abruptly_gives_1014(make_upstream, start_gateway):
    def dies(up, ws):
        ws.recv()
        # RST without a close frame: the upstream vanished
        ws.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        ws.socket.close()

    up = make_upstream(dies)
    gw = start_gateway(proxy_ini(up.node))
    with connect(gw.url + "/") as ws:
        ws.send("die")
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=10)
    assert e.value.rcvd is not None
    assert e.value.rcvd.code == CloseCode.BAD_GATEWAY == 1014


def test_client_vanishing_closes_upstream_promptly(make_upstream, start_gateway):
    seen = threading.Event()

    def waits(up, ws):
        try:
            for msg in ws:
                pass
        finally:
            seen.set()

    up = make_upstream(waits)
    gw = start_gateway(proxy_ini(up.node))
    with connect(gw.url + "/") as ws:
        ws.send("hello")
        assert wait_for(lambda: up.connections)
        ws.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        ws.socket.close()
        assert seen.wait(5), "upstream connection still open after the client vanished"
    assert up.closes[0][0] == 1001


def test_upstream_speaking_first_is_not_lost(make_upstream, start_gateway):
    def greets(up, ws):
        ws.send("welcome")
        for msg in ws:
            ws.send(msg)

    up = make_upstream(greets)
    gw = start_gateway(proxy_ini(up.node))
    with connect(gw.url + "/") as ws:
        assert ws.recv(timeout=5) == "welcome"
        ws.send("then")
        assert ws.recv(timeout=5) == "then"


def test_message_over_max_message_size_closes_1009(make_upstream, start_gateway):
    up = make_upstream()
    gw = start_gateway(proxy_ini(up.node).replace("max_message_size = 32M", "max_message_size = 1K"))
    with connect(gw.url + "/") as ws:
        ws.send("a" * 1024)
        assert ws.recv(timeout=5) == "a" * 1024
        ws.send("a" * 1025)
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=5)
    assert e.value.rcvd.code == 1009
    assert up.received == ["a" * 1024]
