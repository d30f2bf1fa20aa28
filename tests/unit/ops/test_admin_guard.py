"""
The admin port's bounds (wsgateway.ops.jsonapi, docs/configuration.md) on a fake
clock and a StringTransport: bodies judged at the end of the head (401 and
413 before a byte of the body is kept), the lingering close after an early
answer, the request deadline that no byte restarts, and the connection cap.
The same behaviours end to end: tests/integration/test_admin_limits.py.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from wsgateway.ops.jsonapi import LINGER, REQUEST_DEADLINE, AdminFactory, AdminSite, JSONResource, read_body

TOKEN = "t" * 40
AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()
ADDR = IPv4Address("TCP", "127.0.0.1", 40000)


class Echo(JSONResource):
    """Answers the size of the body it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[int] = []

    def render_POST(self, request: Request) -> bytes:
        body = read_body(request)
        self.bodies.append(len(body))
        return self.answer(request, 200, {"bytes": len(body)})


class Slow(JSONResource):
    """Answers only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Request] = []

    def render_GET(self, request: Request) -> Any:
        self.waiting.append(request)
        return NOT_DONE_YET


class Port:
    def __init__(self, *, token: str | None = TOKEN, max_body: int = 4096, max_connections: int = 4) -> None:
        self.clock = Clock()
        root = Resource()
        self.echo = Echo()
        self.slow = Slow()
        root.putChild(b"echo", self.echo)
        root.putChild(b"slow", self.slow)
        site = AdminSite(root, token=token, max_body=max_body, access_log=False, reactor=self.clock)
        self.factory = AdminFactory(site, clock=self.clock, max_connections=max_connections)

    def connect(self) -> tuple[Any, StringTransport]:
        proto = self.factory.buildProtocol(ADDR)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport


def lose(proto: Any) -> None:
    proto.connectionLost(Failure(ConnectionDone()))


@pytest.fixture
def no_temp_files(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Twisted's spill of bodies over 100 kB: must never happen on an admin port."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a request body went to a temporary file")
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    yield


def status(transport: StringTransport) -> int:
    line = transport.value().split(b"\r\n", 1)[0]
    return int(line.split(b" ")[1]) if line else 0


def answer_body(transport: StringTransport) -> Any:
    return json.loads(transport.value().split(b"\r\n\r\n", 1)[1])


def test_a_body_without_the_token_is_401_before_any_of_it_is_kept(no_temp_files: None) -> None:
    port = Port()
    proto, t = port.connect()
    proto.dataReceived(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 200000000\r\n"
                       b"Expect: 100-continue\r\n\r\n" + b"x" * 1000)
    assert status(t) == 401
    head = t.value().split(b"\r\n\r\n")[0]
    assert b'WWW-Authenticate: Bearer realm="wsgateway-admin"' in head and b"Connection: close" in head
    assert b"100 Continue" not in t.value()  # no invitation to send the refused body
    assert answer_body(t) == {"error": "a valid admin bearer token is required"}
    answered = t.value()
    for _ in range(100):  # what still comes is read and dropped
        proto.dataReceived(b"x" * 65536)
    assert t.value() == answered and port.echo.bodies == []
    assert not t.disconnecting
    port.clock.advance(LINGER)  # the lingering close
    assert t.disconnecting
    lose(proto)
    assert port.clock.getDelayedCalls() == []


def test_a_wrong_token_with_a_body_is_401_too() -> None:
    port = Port()
    proto, t = port.connect()
    proto.dataReceived(b"PUT /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN[:-1].encode()
                       + b"\r\nContent-Length: 10\r\n\r\n")
    assert status(t) == 401
    lose(proto)


def test_a_content_length_over_max_body_is_413_at_the_end_of_the_head(no_temp_files: None) -> None:
    port = Port(max_body=4096)
    proto, t = port.connect()
    proto.dataReceived(b"POST /echo HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: 4097\r\n\r\n")
    assert status(t) == 413 and answer_body(t) == {"error": "request body too large"}
    lose(proto)


def test_a_chunked_body_is_413_as_soon_as_it_passes_max_body(no_temp_files: None) -> None:
    port = Port(max_body=4096)
    proto, t = port.connect()
    proto.dataReceived(b"POST /echo HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n\r\n")
    for _ in range(4):
        proto.dataReceived(b"400\r\n" + b"x" * 1024 + b"\r\n")
    assert t.value() == b""  # 4096 bytes: still within
    proto.dataReceived(b"1\r\nx\r\n")
    assert status(t) == 413
    lose(proto)


def test_a_body_within_max_body_with_the_token_is_read_in_memory(no_temp_files: None) -> None:
    port = Port(max_body=300_000)  # over the 100 kB where Twisted would use a temporary file
    proto, t = port.connect()
    proto.dataReceived(b"POST /echo HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: 150000\r\n\r\n")
    proto.dataReceived(b"x" * 150_000)
    assert status(t) == 200 and port.echo.bodies == [150_000]
    lose(proto)


def test_without_a_token_configured_bodies_are_only_bounded() -> None:
    port = Port(token=None, max_body=4096)
    proto, t = port.connect()
    proto.dataReceived(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    assert status(t) == 200 and port.echo.bodies == [5]
    lose(proto)
    proto, t = port.connect()
    proto.dataReceived(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4097\r\n\r\n")
    assert status(t) == 413
    lose(proto)


def test_a_request_without_a_body_needs_no_token_at_the_head() -> None:
    port = Port()
    proto, t = port.connect()
    proto.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    assert t.value() == b"" and len(port.slow.waiting) == 1
    lose(proto)


def test_a_slowloris_is_closed_at_the_deadline_however_often_it_sends() -> None:
    port = Port()
    proto, t = port.connect()
    proto.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    steps = int(REQUEST_DEADLINE / 0.1) - 1
    for _ in range(steps):
        port.clock.advance(0.1)
        proto.dataReceived(b"a")
    assert not t.disconnecting
    port.clock.advance(0.2)
    assert t.disconnecting and t.value() == b""
    port.clock.advance(LINGER)  # a peer that never reads: aborted
    assert t.disconnected
    lose(proto)
    assert port.clock.getDelayedCalls() == []


def test_a_slow_body_is_closed_at_the_same_deadline() -> None:
    port = Port()
    proto, t = port.connect()
    proto.dataReceived(b"POST /echo HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: 1000\r\n\r\n")
    for _ in range(int(REQUEST_DEADLINE)):
        port.clock.advance(1)
        if t.disconnecting:
            break
        proto.dataReceived(b"x")
    assert t.disconnecting and port.echo.bodies == []
    lose(proto)


def test_no_deadline_while_a_request_is_answered_then_one_for_the_next() -> None:
    port = Port()
    proto, t = port.connect()
    proto.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    port.clock.advance(REQUEST_DEADLINE * 10)
    assert not t.disconnecting
    request = port.slow.waiting.pop()
    request.write(b"done")
    request.finish()
    assert b"done" in t.value() and not t.disconnecting
    port.clock.advance(REQUEST_DEADLINE - 0.5)
    assert not t.disconnecting
    port.clock.advance(0.5)  # an idle keep-alive is closed too
    assert t.disconnecting
    lose(proto)


def test_pipelined_requests_are_all_answered() -> None:
    port = Port()
    proto, t = port.connect()
    one = b"POST /echo HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: 3\r\n\r\nabc"
    proto.dataReceived(one * 3)
    assert t.value().count(b"HTTP/1.1 200") == 3 and port.echo.bodies == [3, 3, 3]
    assert not t.disconnecting
    lose(proto)


def test_connections_beyond_the_cap_get_503_and_are_closed() -> None:
    port = Port(max_connections=2)
    held = [port.connect() for _ in range(2)]
    extra, t = port.connect()
    assert status(t) == 503 and answer_body(t) == {"error": "too many admin connections"}
    assert t.disconnecting
    port.clock.advance(LINGER)
    assert t.disconnected  # aborted if the peer does not let the close finish
    lose(extra)
    for proto, _ in held[:1]:
        lose(proto)
    again, t2 = port.connect()  # a freed slot is taken again
    again.dataReceived(b"POST /echo HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: 2\r\n\r\nok")
    assert status(t2) == 200
    lose(again)
    lose(held[1][0])
    assert port.clock.getDelayedCalls() == []
