"""
The twisted.web hooks wsgateway/ops/jsonapi.py (AdminRequest, AdminConnection)
relies on to judge an admin request before its body is read (see
tests/unit/compat/helpers.py). Not private names, but documented as "not
intended for users": if Twisted moves them, an admin port would again spool
unauthenticated bodies to /tmp, so this fails loudly first.

No reactor runs: an HTTPChannel over a StringTransport.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .helpers import relied_on

LIB = "twisted"
OURS = "wsgateway/ops/jsonapi.py"


class Leaf(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return b"ok"


def _channel(events: list[tuple[str, Any]], transport: Any = None) -> tuple[Any, Any]:
    class Recording(Request):
        def gotLength(self, length: int | None) -> None:
            events.append(("gotLength", (length, self.requestHeaders.getRawHeaders(b"authorization"),
                                         self.transport)))
            super().gotLength(length)

        def handleContentChunk(self, data: bytes) -> None:
            events.append(("chunk", data))
            super().handleContentChunk(data)

        def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
            events.append(("requestReceived", (command, path)))
            super().requestReceived(command, path, version)

    site = Site(Leaf())
    site.requestFactory = Recording
    channel = site.buildProtocol(None)
    t = transport if transport is not None else StringTransport()
    channel.makeConnection(t)
    return channel, t


def test_got_length_comes_after_every_header_and_before_the_first_byte_of_the_body() -> None:
    events: list[tuple[str, Any]] = []
    with relied_on(LIB, "Request.gotLength(length) once the head is complete, before handleContentChunk; "
                        "requestHeaders filled then; requestReceived after the last chunk", OURS):
        channel, t = _channel(events)
        channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nAuthorization: Bearer abc\r\n\r\n")
        assert events == [("gotLength", (6, [b"Bearer abc"], t))]
        channel.dataReceived(b"abc")
        channel.dataReceived(b"def")
        assert [e for e, _ in events] == ["gotLength", "chunk", "chunk", "requestReceived"]
        assert [d for e, d in events if e == "chunk"] == [b"abc", b"def"]
        channel.connectionLost(Failure(ConnectionDone()))


def test_a_chunked_body_gives_got_length_none_and_no_body_gives_zero() -> None:
    events: list[tuple[str, Any]] = []
    with relied_on(LIB, "Request.gotLength(None) for a chunked body, gotLength(0) without a body", OURS):
        channel, _ = _channel(events)
        channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert events[0][0] == "gotLength" and events[0][1][0] is None
        channel.dataReceived(b"3\r\nabc\r\n")
        assert events[1] == ("chunk", b"abc")
        channel.connectionLost(Failure(ConnectionDone()))
        events.clear()
        channel, _ = _channel(events)
        channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
        assert events[0][0] == "gotLength" and events[0][1][0] == 0
        channel.connectionLost(Failure(ConnectionDone()))


def test_expect_continue_is_read_from_request_headers_after_got_length() -> None:
    events: list[tuple[str, Any]] = []
    with relied_on(LIB, "HTTPChannel answers 'Expect: 100-continue' from request.requestHeaders after gotLength",
                   OURS):
        channel, t = _channel(events)
        channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        assert t.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
        channel.connectionLost(Failure(ConnectionDone()))

        class Quiet(Request):
            def gotLength(self, length: int | None) -> None:
                self.requestHeaders.removeHeader(b"expect")
                super().gotLength(length)

        site = Site(Leaf())
        site.requestFactory = Quiet
        channel = site.buildProtocol(None)
        t = StringTransport()
        channel.makeConnection(t)
        channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        assert t.value() == b""
        channel.connectionLost(Failure(ConnectionDone()))


def test_the_parser_stops_after_got_length_once_its_transport_is_disconnecting() -> None:
    seen: list[str] = []

    class Refusing(Request):
        def gotLength(self, length: int | None) -> None:
            seen.append("gotLength")
            super().gotLength(length)
            self.transport.disconnecting = True  # what AdminConnection.refuse does

        def handleContentChunk(self, data: bytes) -> None:
            seen.append("chunk")

        def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
            seen.append("requestReceived")

    with relied_on(LIB, "HTTPChannel (a LineReceiver) stops parsing when transport.disconnecting turns true "
                        "at the end of the head", OURS):
        site = Site(Leaf())
        site.requestFactory = Refusing
        channel = site.buildProtocol(None)
        t = StringTransport()
        channel.makeConnection(t)
        channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n0123456789"
                             b"GET /y HTTP/1.1\r\nHost: h\r\n\r\n")
        assert seen == ["gotLength"]
        channel.connectionLost(Failure(ConnectionDone()))


def test_request_transport_is_the_channel_transport() -> None:
    events: list[tuple[str, Any]] = []
    with relied_on(LIB, "Request.transport is the channel's transport (our AdminConnection wrapper)", OURS):
        t = StringTransport()
        channel, _ = _channel(events, t)
        channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
        assert events[0][1][2] is t
        channel.connectionLost(Failure(ConnectionDone()))
