"""
RFC 6455 conformance through the gateway, case by case after the frame-level
sections of Autobahn|Testsuite (1-7, 9, 10), which is Python 2 only and is
not run itself. Each test id is the Autobahn case it corresponds to ("2.5":
a 126-byte ping); an id with a suffix ("7.7-1014") is a neighbouring case
Autobahn does not have.

The gateway is in front of an echo upstream built on Autobahn
(tests/support/autobahn_echo.py: Autobahn's strict checks, UTF-8 validation
on, close codes echoed, failing with a close frame; under /drop/ with
Autobahn's default of failing by dropping TCP). The client is the raw codec
of tests/support/rawws.py, so it can break the protocol on purpose. Every
test asserts what the client observes on the wire: the echoed frames (type,
payload, length encoding), the close frame (code and reason; who sent it is
told by the reason: the gateway's reasons are in docs/protocol.md, the
upstream's are Autobahn's), and the TCP connection closed afterwards. A few
also ask the upstream what reached it (``seen``).

The table in docs/protocol.md#conformance-rfc-6455 maps each rule group to
these tests. Hostile-frame tests that look at what reached a recording
upstream are in tests/integration/test_edges.py and
tests/security/test_frames.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from support.autobahn_echo import AutobahnEcho, autobahn_echo  # noqa: F401  (the fixture)
from support.gateway import Gateway, spawn_gateway
from support.rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    FrameReader,
    close_payload,
    frame,
    uid,
    ws_open,
)
from support.waiting import wait_for

MAX_MESSAGE = 4 * 1024 * 1024  # [limits] max_message_size = 4M below


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, autobahn_echo: AutobahnEcho) -> Iterator[Gateway]:  # noqa: F811
    """One gateway for the module: every path to the Autobahn echo; no gateway pings (they would interleave)."""
    body = textwrap.dedent(
        f"""\
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1
        drain_grace = 0
        shutdown_timeout = 1

        [limits]
        max_message_size = 4M
        ping_interval = 0
        close_timeout = 2

        [log]
        level = info
        format = text

        [upstream:autobahn]
        nodes = {autobahn_echo.node}
        connect_timeout = 2
        retries = 0

        [route:all]
        path = /**
        upstream = autobahn
        """
    )
    gateway = spawn_gateway(tmp_path_factory.mktemp("conformance"), body, name="conformance")
    yield gateway
    gateway.stop()


# -- the client ---------------------------------------------------------------


class LengthReader(FrameReader):
    """A FrameReader that also records each frame's 7-bit length field (125 or less, 126, 127)."""

    def __init__(self, sock: socket.socket, buf: bytes = b"") -> None:
        super().__init__(sock, buf)
        self.length_fields: list[int] = []

    def read_frame(self, timeout: float = 5.0) -> Frame:
        self._need(2, time.monotonic() + timeout)
        self.length_fields.append(self.buf[1] & 0x7F)
        return super().read_frame(timeout)


@dataclass
class Client:
    sock: socket.socket
    reader: LengthReader
    path: str

    def send(self, *frames: bytes, chop: int = 0) -> None:
        """Write the frames in one write, or in writes of ``chop`` bytes (TCP_NODELAY: small segments)."""
        data = b"".join(frames)
        if not chop:
            self.sock.sendall(data)
            return
        for i in range(0, len(data), chop):
            self.sock.sendall(data[i : i + chop])

    def read(self, timeout: float = 5.0) -> Frame:
        return self.reader.read_frame(timeout)

    def expect(self, *expected: tuple[int, bytes], timeout: float = 5.0) -> list[Frame]:
        """The next frames are exactly these (opcode, payload), each final, unmasked, RSV 0."""
        got = [self.read(timeout) for _ in expected]
        assert [(f.opcode, f.payload) for f in got] == list(expected), [(f.opcode, f.payload[:40]) for f in got]
        assert all(f.fin and f.rsv == 0 and not f.masked for f in got), got
        return got

    def until_close(self, timeout: float = 5.0) -> tuple[list[Frame], Frame]:
        """Frames before the first close frame, and that close frame."""
        before: list[Frame] = []
        deadline = time.monotonic() + timeout
        for _ in range(10_000):
            f = self.read(max(deadline - time.monotonic(), 0.01))
            if f.opcode == OP_CLOSE:
                assert f.fin and f.rsv == 0 and not f.masked, f
                return before, f
            before.append(f)
        raise AssertionError("no close frame among 10000 frames")

    def closed(self, timeout: float = 5.0) -> None:
        """The peer ends the TCP connection and nothing more came before."""
        assert self.reader.wait_eof(timeout) == b"", "bytes after the close frame"

    def close_normally(self) -> None:
        """Close 1000, get 1000 back (the upstream echoes codes), then the TCP close."""
        self.send(frame(OP_CLOSE, close_payload(1000)))
        before, close = self.until_close()
        assert before == [] and close.close == (1000, ""), (before, close.close)
        self.closed()


@pytest.fixture
def connect(gw: Gateway) -> Iterator[Any]:
    """connect(case, prefix="/c/") -> Client on a fresh path through the gateway; sockets closed at the end."""
    opened: list[socket.socket] = []

    def open_(case: str, prefix: str = "/c/") -> Client:
        path = prefix + uid("case-" + case.replace(".", "_"))
        sock, reader = ws_open(gw.port, path)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        opened.append(sock)
        return Client(sock, LengthReader(sock, reader.buf), path)

    yield open_
    for sock in opened:
        sock.close()


def seen(echo: AutobahnEcho, path: str, *, closed: bool = True, timeout: float = 5.0) -> dict[str, Any]:
    """What the Autobahn upstream recorded for ``path`` (once its connection closed, by default)."""
    from websockets.sync.client import connect as ws_connect

    record: dict[str, Any] = {}

    def look() -> bool:
        with ws_connect(f"{echo.node}/_seen{path}", open_timeout=3, compression=None) as ws:
            got = json.loads(ws.recv(timeout=3))
        record["v"] = got
        return got is not None and (not closed or got["close"] is not None)

    assert wait_for(look, timeout), f"the upstream has no (closed) record of {path}: {record.get('v')}"
    return record["v"]


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def fails(c: Client, code: int, reason: str | None) -> Frame:
    """
    The connection is failed: the next frame is a close with ``code`` (and
    ``reason``, when given); after the client's close answer the TCP
    connection ends.
    """
    before, close = c.until_close()
    assert [(f.opcode, f.payload[:40]) for f in before] == [], "frames before the close"
    assert close.close[0] == code, close.close
    if reason is not None:
        assert close.close[1] == reason, close.close
    try:
        c.send(frame(OP_CLOSE, close_payload(code)))
    except OSError:
        pass  # the gateway has already ended the connection: what matters is that it ends
    c.closed()
    return close


TEXT, BIN = OP_TEXT, OP_BINARY


def text(n: int) -> bytes:
    return (b"*" * n) if n < 1000 else (b"0123456789abcdef" * (n // 16 + 1))[:n]


def binary(n: int) -> bytes:
    return bytes(range(256)) * (n // 256) + bytes(range(n % 256))


def fragments(opcode: int, payload: bytes, size: int) -> list[bytes]:
    """``payload`` as a message in frames of ``size`` bytes (at least one frame)."""
    parts = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
    return [frame(opcode if i == 0 else OP_CONT, p, fin=i == len(parts) - 1) for i, p in enumerate(parts)]


def length_field(n: int) -> int:
    return n if n < 126 else 126 if n < 65536 else 127


# == 1. framing ===================================================================

FRAMING = [
    pytest.param(op, n, chop, id=f"1.{group}.{i}")
    for group, op in ((1, TEXT), (2, BIN))
    for i, (n, chop) in enumerate(
        [(0, 0), (125, 0), (126, 0), (127, 0), (128, 0), (65535, 0), (65536, 0), (65536, 997)], start=1
    )
]


@pytest.mark.parametrize(("opcode", "size", "chop"), FRAMING)
def test_1_messages_of_every_length_encoding_are_echoed(connect, opcode: int, size: int, chop: int) -> None:
    """0-125 bytes: 7-bit length; 126-65535: 16-bit; 65536: 64-bit; 1.x.8 writes in 997-byte pieces."""
    c = connect(f"1-{size}")
    payload = text(size) if opcode == TEXT else binary(size)
    c.send(frame(opcode, payload), chop=chop)
    c.expect((opcode, payload))
    assert c.reader.length_fields == [length_field(size)]
    c.close_normally()


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"\x81\xfe\x00\x05", id="1.x-16bit-for-5-bytes"),
        pytest.param(b"\x81\xff" + (5).to_bytes(8, "big"), id="1.x-64bit-for-5-bytes"),
    ],
)
def test_1_a_length_not_in_its_minimal_encoding_is_refused_by_the_gateway(connect, autobahn_echo, head: bytes) -> None:
    """RFC 6455 5.2 wants the minimal length encoding: the gateway's own 1002, nothing relayed."""
    c = connect("1.x")
    c.send(head + b"\0\0\0\0" + b"hello")  # mask key 0: the payload as it is
    fails(c, 1002, "bad frame length")
    assert seen(autobahn_echo, c.path)["messages"] == []


# == 2. pings and pongs ===========================================================

PING_BINARY = b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff"


@pytest.mark.parametrize(
    ("payload", "chop"),
    [
        pytest.param(b"", 0, id="2.1"),
        pytest.param(b"Hello, world!", 0, id="2.2"),
        pytest.param(PING_BINARY, 0, id="2.3"),
        pytest.param(b"\xfe" * 125, 0, id="2.4"),
        pytest.param(b"\xfe" * 125, 1, id="2.6"),
    ],
)
def test_2_a_ping_gets_a_pong_with_the_same_payload(connect, payload: bytes, chop: int) -> None:
    c = connect("2")
    c.send(frame(OP_PING, payload), chop=chop)
    c.expect((OP_PONG, payload))
    c.close_normally()


def test_2_5_a_126_byte_ping_fails_the_connection(connect) -> None:
    c = connect("2.5")
    c.send(frame(OP_PING, b"\xfe" * 126))
    fails(c, 1002, "bad control frame")


@pytest.mark.parametrize(
    "pong",
    [pytest.param(b"", id="2.7"), pytest.param(b"unsolicited pong payload", id="2.8"), pytest.param(b"x", id="2.9")],
)
def test_2_an_unsolicited_pong_is_ignored(connect, pong: bytes) -> None:
    """Nothing answers the pong: the next frame the client gets is the pong to its following ping."""
    c = connect("2-pong")
    c.send(frame(OP_PONG, pong), frame(OP_PING, b"after the pong"))
    c.expect((OP_PONG, b"after the pong"))
    c.close_normally()


@pytest.mark.parametrize("chop", [pytest.param(0, id="2.10"), pytest.param(1, id="2.11")])
def test_2_ten_pings_get_ten_pongs_in_order(connect, chop: int) -> None:
    c = connect("2-ten")
    payloads = [f"payload-{i}".encode() for i in range(10)]
    c.send(*(frame(OP_PING, p) for p in payloads), chop=chop)
    c.expect(*((OP_PONG, p) for p in payloads))
    c.close_normally()


def test_2_pings_interleaved_with_data_are_answered_in_order(connect) -> None:
    c = connect("2-mixed")
    c.send(
        frame(TEXT, b"one"), frame(OP_PING, b"p1"), frame(BIN, b"\x00two"), frame(OP_PING, b"p2"),
        frame(TEXT, b"three"),
    )
    c.expect((TEXT, b"one"), (OP_PONG, b"p1"), (BIN, b"\x00two"), (OP_PONG, b"p2"), (TEXT, b"three"))
    c.close_normally()


# == 3. reserved bits ==============================================================

RSV_REASON = "reserved bits set"


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(frame(TEXT, b"Hello, world!", rsv=4), id="3.1"),  # RSV1 (the compression bit)
        pytest.param(frame(BIN, bytes(range(256)), rsv=4), id="3.5"),
        pytest.param(frame(OP_PING, b"Hello, world!", rsv=5), id="3.6"),
        pytest.param(frame(OP_CLOSE, close_payload(1000), rsv=6), id="3.7"),
        pytest.param(frame(OP_PONG, b"pong", rsv=7), id="3.7-pong"),
    ],
)
def test_3_a_reserved_bit_fails_the_connection(connect, bad: bytes) -> None:
    c = connect("3")
    c.send(bad)
    fails(c, 1002, RSV_REASON)


def test_3_2_a_violation_right_behind_a_valid_message_is_reported_after_relaying_it(connect, autobahn_echo) -> None:  # noqa: F811
    """
    Text, then RSV2 text, then a ping, in one write. The first message was
    relayed (the upstream got it), but its echo does not reach the client:
    the gateway fails the connection as soon as it reads the bad frame, before
    the echo is back. Autobahn grades that NON-STRICT; an endpoint would echo
    first.
    """
    c = connect("3.2")
    c.send(frame(TEXT, b"Hello, world!"), frame(TEXT, b"Hello, world!", rsv=2), frame(OP_PING))
    fails(c, 1002, RSV_REASON)  # no echo: it would come after the close
    record = seen(autobahn_echo, c.path)
    assert [m[1:] for m in record["messages"]] == [[13, digest(b"Hello, world!")]]
    assert record["close"] == [1001, "client closed"]


@pytest.mark.parametrize(("rsv", "chop"), [pytest.param(3, 0, id="3.3"), pytest.param(4, 1, id="3.4")])
def test_3_a_reserved_bit_after_an_echoed_message_fails_the_connection(connect, rsv: int, chop: int) -> None:
    c = connect("3")
    c.send(frame(TEXT, b"Hello, world!"))
    c.expect((TEXT, b"Hello, world!"))
    c.send(frame(TEXT, b"Hello, world!", rsv=rsv), frame(OP_PING), chop=chop)
    fails(c, 1002, RSV_REASON)


# == 4. opcodes ====================================================================


@pytest.mark.parametrize(
    ("opcode", "payload", "echo_first"),
    [
        pytest.param(3, b"", False, id="4.1.1"),
        pytest.param(4, b"reserved opcode payload", False, id="4.1.2"),
        pytest.param(5, b"", True, id="4.1.3"),
        pytest.param(6, b"reserved opcode payload", True, id="4.1.4"),
        pytest.param(7, b"reserved opcode payload", True, id="4.1.5"),
        pytest.param(11, b"", False, id="4.2.1"),
        pytest.param(12, b"reserved opcode payload", False, id="4.2.2"),
        pytest.param(13, b"", True, id="4.2.3"),
        pytest.param(14, b"reserved opcode payload", True, id="4.2.4"),
        pytest.param(15, b"reserved opcode payload", True, id="4.2.5"),
    ],
)
def test_4_a_reserved_opcode_fails_the_connection(connect, opcode: int, payload: bytes, echo_first: bool) -> None:
    c = connect("4")
    if echo_first:
        c.send(frame(TEXT, b"Hello, world!"))
        c.expect((TEXT, b"Hello, world!"))
    c.send(frame(opcode, payload), frame(OP_PING))
    fails(c, 1002, "reserved opcode")


# == 5. fragmentation ==============================================================


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([frame(OP_PING, b"fragment1", fin=False), frame(OP_CONT, b"fragment2")], id="5.1"),
        pytest.param([frame(OP_PONG, b"fragment1", fin=False), frame(OP_CONT, b"fragment2")], id="5.2"),
        pytest.param([frame(OP_CLOSE, close_payload(1000), fin=False), frame(OP_CONT, b"")], id="5.2-close"),
    ],
)
def test_5_a_fragmented_control_frame_fails_the_connection(connect, frames: list[bytes]) -> None:
    c = connect("5")
    c.send(*frames)
    fails(c, 1002, "bad control frame")


@pytest.mark.parametrize(
    ("opcode", "mode"),
    [
        pytest.param(TEXT, "together", id="5.3"),
        pytest.param(TEXT, "frame-wise", id="5.4"),
        pytest.param(TEXT, "chopped", id="5.5"),
        pytest.param(BIN, "together", id="5.3-binary"),
    ],
)
def test_5_a_fragmented_message_is_echoed_whole(connect, opcode: int, mode: str) -> None:
    c = connect("5")
    frames = [frame(opcode, b"fragment1", fin=False), frame(OP_CONT, b"fragment2")]
    if mode == "frame-wise":
        for f in frames:
            c.send(f)
    else:
        c.send(*frames, chop=1 if mode == "chopped" else 0)
    c.expect((opcode, b"fragment1fragment2"))
    c.close_normally()


@pytest.mark.parametrize("mode", [pytest.param("together", id="5.6"), pytest.param("frame-wise", id="5.7"),
                                  pytest.param("chopped", id="5.8")])
def test_5_a_ping_between_fragments_is_answered_first(connect, mode: str) -> None:
    c = connect("5")
    frames = [frame(TEXT, b"fragment1", fin=False), frame(OP_PING, b"ping payload"), frame(OP_CONT, b"fragment2")]
    if mode == "frame-wise":
        for f in frames:
            c.send(f)
    else:
        c.send(*frames, chop=1 if mode == "chopped" else 0)
    c.expect((OP_PONG, b"ping payload"), (TEXT, b"fragment1fragment2"))
    c.close_normally()


ORPHAN = "unexpected continuation frame"


@pytest.mark.parametrize(
    ("fin", "mode"),
    [
        pytest.param(True, "together", id="5.9"),
        pytest.param(True, "frame-wise", id="5.10"),
        pytest.param(True, "chopped", id="5.11"),
        pytest.param(False, "together", id="5.12"),
        pytest.param(False, "frame-wise", id="5.13"),
        pytest.param(False, "chopped", id="5.14"),
    ],
)
def test_5_a_continuation_with_no_message_started_fails_the_connection(connect, fin: bool, mode: str) -> None:
    c = connect("5")
    frames = [frame(OP_CONT, b"non-continuation payload", fin=fin), frame(TEXT, b"Hello, world!")]
    if mode == "frame-wise":
        c.send(frames[0])
        frames = frames[1:]
    try:
        c.send(*frames, chop=1 if mode == "chopped" else 0)
    except OSError:
        pass  # frame-wise: the connection may already be failed when the text goes out
    fails(c, 1002, ORPHAN)


def test_5_15_an_orphan_continuation_after_a_complete_message(connect) -> None:
    """Both fragments of a message, an orphan continuation, a text, in one write: as 3.2, no echo (NON-STRICT)."""
    c = connect("5.15")
    c.send(
        frame(TEXT, b"fragment1", fin=False), frame(OP_CONT, b"fragment2"),
        frame(OP_CONT, b"fragment3", fin=False), frame(TEXT, b"fragment4"),
    )
    fails(c, 1002, ORPHAN)


@pytest.mark.parametrize("fin", [pytest.param(False, id="5.16"), pytest.param(True, id="5.17")])
def test_5_an_orphan_continuation_before_fragmented_messages(connect, fin: bool) -> None:
    c = connect("5")
    once = [frame(OP_CONT, b"fragment1", fin=fin), frame(TEXT, b"fragment2", fin=False), frame(OP_CONT, b"fragment3")]
    c.send(*once, *once)
    fails(c, 1002, ORPHAN)


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([frame(TEXT, b"fragment1", fin=False), frame(TEXT, b"fragment2")], id="5.18"),
        pytest.param([frame(TEXT, b"fragment1", fin=False), frame(BIN, b"fragment2")], id="5.18-binary"),
    ],
)
def test_5_a_new_data_frame_inside_a_fragmented_message_fails_the_connection(connect, frames: list[bytes]) -> None:
    c = connect("5.18")
    c.send(*frames)
    fails(c, 1002, "expected continuation frame")


@pytest.mark.parametrize("frame_wise", [pytest.param(False, id="5.19"), pytest.param(True, id="5.20")])
def test_5_pings_inside_a_message_in_five_fragments(connect, frame_wise: bool) -> None:
    """Autobahn waits 1 s in the middle; here the client waits for the first pong instead."""
    c = connect("5.19")
    first = [frame(TEXT, b"fragment1", fin=False), frame(OP_CONT, b"fragment2", fin=False), frame(OP_PING, b"pongme 1!")]
    second = [frame(OP_CONT, b"fragment3", fin=False), frame(OP_CONT, b"fragment4", fin=False),
              frame(OP_PING, b"pongme 2!"), frame(OP_CONT, b"fragment5")]
    for group in (first, second):
        if frame_wise:
            for f in group:
                c.send(f)
        else:
            c.send(*group)
        if group is first:
            c.expect((OP_PONG, b"pongme 1!"))
    c.expect((OP_PONG, b"pongme 2!"), (TEXT, b"fragment1fragment2fragment3fragment4fragment5"))
    c.close_normally()


# == 6. UTF-8 =======================================================================
# The gateway relays text payloads unread: the Autobahn upstream validates them
# (utf8validateIncoming) and its verdict reaches the client.

HELLO = "Hello-µ@ßöäüàá-UTF-8!!".encode()
KOSME = "κόσμε".encode()


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param([b""], id="6.1.1"),
        pytest.param([b"", b"", b""], id="6.1.2"),
        pytest.param([b"", b"middle frame payload", b""], id="6.1.3"),
        pytest.param([HELLO], id="6.2.1"),
        pytest.param([HELLO[:12], HELLO[12:]], id="6.2.2"),  # on a code point boundary
        pytest.param([HELLO[i : i + 1] for i in range(len(HELLO))], id="6.2.3"),  # 1 byte each: inside code points
        pytest.param([b"\xf0\xa4\xad", b"\xa2"], id="6.2.4-4byte"),  # U+24B62 cut before its last byte
        pytest.param([KOSME], id="6.5.1"),
        pytest.param([KOSME[i : i + 1] for i in range(len(KOSME))], id="6.6.1"),
    ],
)
def test_6_valid_utf8_is_echoed_whatever_the_fragmentation(connect, parts: list[bytes]) -> None:
    c = connect("6")
    c.send(*(frame(TEXT if i == 0 else OP_CONT, p, fin=i == len(parts) - 1) for i, p in enumerate(parts)))
    c.expect((TEXT, b"".join(parts)))
    c.close_normally()


VALID_SEQUENCES = {
    "6.7.1": b"\x00", "6.7.2": b"\xc2\x80", "6.7.3": b"\xe0\xa0\x80", "6.7.4": b"\xf0\x90\x80\x80",
    "6.9.1": b"\x7f", "6.9.2": b"\xdf\xbf", "6.9.3": b"\xef\xbf\xbf", "6.9.4": b"\xf4\x8f\xbf\xbf",
    "6.11.1": b"\xed\x9f\xbf", "6.11.2": b"\xee\x80\x80", "6.11.3": b"\xef\xbf\xbd",
    "6.22.1": b"\xef\xbf\xbe",  # a noncharacter is still valid UTF-8
}
INVALID_SEQUENCES = {
    "6.3.1": b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80\x65\x64\x69\x74\x65\x64",
    "6.8.1": b"\xf8\x88\x80\x80\x80", "6.8.2": b"\xfc\x84\x80\x80\x80\x80",
    "6.10.1": b"\xf7\xbf\xbf\xbf", "6.11.5": b"\xf4\x90\x80\x80",
    "6.12.1": b"\x80", "6.12.2": b"\xbf", "6.13.1": b"\xc0 \xc1 ", "6.14.1": b"\xc0",
    "6.16.1": b"\xfe", "6.16.2": b"\xff", "6.17.1": b"\xc0\xaf", "6.17.2": b"\xe0\x80\xaf",
    "6.18.1": b"\xc1\xbf", "6.19.1": b"\xc0\x80", "6.20.1": b"\xed\xa0\x80", "6.21.1": b"\xed\xa0\x80\xed\xb0\x80",
}


@pytest.mark.parametrize("payload", [pytest.param(v, id=k) for k, v in VALID_SEQUENCES.items()])
def test_6_valid_sequences_are_echoed(connect, payload: bytes) -> None:
    c = connect("6-valid")
    c.send(frame(TEXT, payload))
    c.expect((TEXT, payload))
    c.close_normally()


@pytest.mark.parametrize("payload", [pytest.param(v, id=k) for k, v in INVALID_SEQUENCES.items()])
def test_6_invalid_utf8_gets_the_upstreams_1007(connect, payload: bytes) -> None:
    """The gateway relays the payload; Autobahn fails the connection with 1007 and that close reaches the client."""
    c = connect("6-invalid")
    c.send(frame(TEXT, payload))
    close = fails(c, 1007, None)
    assert "UTF-8" in close.close[1], close.close  # Autobahn's reason, not one of the gateway's


def test_6_3_2_invalid_utf8_in_one_byte_fragments_gets_1007(connect) -> None:
    c = connect("6.3.2")
    payload = INVALID_SEQUENCES["6.3.1"]
    c.send(*fragments(TEXT, payload, 1))
    fails(c, 1007, None)


@pytest.mark.parametrize(
    ("valid", "breaking", "rest"),
    [
        pytest.param(KOSME, b"\xf4\x90\x80\x80", b"edited", id="6.4.1"),  # U+110000: out of range
        pytest.param(KOSME + b"\xf4", b"\x90", b"\x80\x80edited", id="6.4.2"),
    ],
)
def test_6_4_invalid_utf8_fails_fast_before_the_message_ends(connect, valid: bytes, breaking: bytes, rest: bytes) -> None:
    """
    The fragment that makes the text invalid is enough: the 1007 comes while
    the message is still open (the last fragment is never sent), because the
    gateway streams fragments and Autobahn validates them as they come.
    """
    c = connect("6.4")
    c.send(frame(TEXT, valid, fin=False), frame(OP_CONT, breaking, fin=False))
    fails(c, 1007, None)
    assert rest  # never sent


def test_6_invalid_utf8_to_an_upstream_that_fails_by_dropping_gets_1014(connect, autobahn_echo) -> None:  # noqa: F811
    """
    Autobahn's own default (failByDrop) answers invalid UTF-8 by dropping
    TCP without a close frame: the client gets the gateway's 1014 "upstream
    lost", not 1007. Which of the two a client sees is the upstream's choice.
    """
    c = connect("6-drop", prefix="/drop/")
    c.send(frame(TEXT, INVALID_SEQUENCES["6.3.1"]))
    fails(c, 1014, "upstream lost")
    assert seen(autobahn_echo, c.path)["clean"] is False


# == 7. close handling ==============================================================


def test_7_1_1_a_message_then_a_close(connect) -> None:
    c = connect("7.1.1")
    c.send(frame(TEXT, b"Hello World!"), frame(OP_CLOSE, close_payload(1000)))
    c.expect((TEXT, b"Hello World!"))
    before, close = c.until_close()
    assert before == [] and close.close == (1000, "")
    c.closed()


@pytest.mark.parametrize(
    "after",
    [
        pytest.param([frame(OP_CLOSE, close_payload(1001))], id="7.1.2"),
        pytest.param([frame(OP_PING, b"Hello World!")], id="7.1.3"),
        pytest.param([frame(TEXT, b"Hello World!")], id="7.1.4"),
    ],
)
def test_7_frames_after_the_clients_close_are_ignored(connect, autobahn_echo, after: list[bytes]) -> None:  # noqa: F811
    """Close, then more frames in the same write: one close answer, nothing else, then the TCP close."""
    c = connect("7.1")
    c.send(frame(OP_CLOSE, close_payload(1000)), *after)
    before, close = c.until_close()
    assert before == [] and close.close == (1000, "")
    c.closed()
    record = seen(autobahn_echo, c.path)
    assert record["messages"] == [] and record["close"] == [1000, None] and record["clean"] is True


def test_7_1_5_a_close_inside_a_fragmented_message(connect, autobahn_echo) -> None:  # noqa: F811
    c = connect("7.1.5")
    c.send(frame(TEXT, b"fragment1", fin=False), frame(OP_CLOSE, close_payload(1000)), frame(OP_CONT, b"fragment2"))
    before, close = c.until_close()
    assert before == [] and close.close == (1000, "")
    c.closed()
    assert seen(autobahn_echo, c.path)["messages"] == []


def test_7_1_6_a_large_message_then_a_close_then_a_ping(connect) -> None:
    """The message sent before the close is echoed, then the close answer; the ping after the close is not."""
    c = connect("7.1.6")
    payload = binary(256 * 1024)
    c.send(frame(BIN, payload), frame(OP_CLOSE, close_payload(1000)), frame(OP_PING, b"Hello World!"))
    c.expect((BIN, payload))
    before, close = c.until_close()
    assert before == [] and close.close == (1000, "")
    c.closed()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="7.3.1"),
        pytest.param(close_payload(1000), id="7.3.3"),
        pytest.param(close_payload(1000, "Hello World!"), id="7.3.4"),
        pytest.param(close_payload(1000, "*" * 123), id="7.3.5"),
        pytest.param(close_payload(1000, "κόσμε, a UTF-8 reason"), id="7.3.4-utf8"),
    ],
)
def test_7_3_a_valid_close_is_answered_with_the_same_payload(connect, payload: bytes) -> None:
    """The close goes to the upstream unchanged and its answer (Autobahn echoes code and reason) comes back."""
    c = connect("7.3")
    c.send(frame(OP_CLOSE, payload))
    before, close = c.until_close()
    assert before == [] and close.payload == payload
    c.closed()


@pytest.mark.parametrize(
    ("payload", "code", "reason"),
    [
        pytest.param(b"\x03", 1002, "bad close frame", id="7.3.2"),
        pytest.param(close_payload(1000, "*" * 124), 1002, "bad control frame", id="7.3.6"),
        pytest.param(close_payload(1000) + b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited", 1007,
                     "invalid UTF-8 in close reason", id="7.5.1"),
    ],
)
def test_7_a_malformed_close_is_answered_by_the_gateway(connect, payload: bytes, code: int, reason: str) -> None:
    c = connect("7.3")
    c.send(frame(OP_CLOSE, payload))
    fails(c, code, reason)


VALID_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999]


@pytest.mark.parametrize(
    "code",
    [pytest.param(code, id=f"7.7.{i}") for i, code in enumerate(VALID_CODES, start=1)]
    + [pytest.param(1012, id="7.7-1012"), pytest.param(1013, id="7.7-1013")],
)
def test_7_7_a_valid_close_code_is_relayed_and_echoed(connect, autobahn_echo, code: int) -> None:  # noqa: F811
    c = connect("7.7")
    c.send(frame(OP_CLOSE, close_payload(code)))
    before, close = c.until_close()
    assert before == [] and close.close == (code, "")
    c.closed()
    assert seen(autobahn_echo, c.path)["close"] == [code, None]


def test_7_7_1014_is_relayed_and_refused_by_autobahn(connect, autobahn_echo) -> None:  # noqa: F811
    """
    1014 (Bad Gateway) is IANA-assigned, so the gateway relays it; Autobahn
    does not know it, fails the connection and, failing during its closing
    handshake, drops TCP: the client gets the gateway's 1014 "upstream lost".
    """
    c = connect("7.7-1014")
    c.send(frame(OP_CLOSE, close_payload(1014)))
    before, close = c.until_close()
    assert before == [] and close.close == (1014, "upstream lost")
    c.closed()


INVALID_CODES = [0, 999, 1004, 1005, 1006, 1016, 1100, 2000, 2999]


@pytest.mark.parametrize(
    "code",
    [pytest.param(code, id=f"7.9.{i}") for i, code in enumerate(INVALID_CODES, start=1)]
    + [pytest.param(5000, id="7.13.1"), pytest.param(65535, id="7.13.2"), pytest.param(1015, id="7.9-1015")],
)
def test_7_9_an_invalid_close_code_gets_1002_from_the_gateway(connect, autobahn_echo, code: int) -> None:  # noqa: F811
    c = connect("7.9")
    c.send(frame(OP_CLOSE, close_payload(code)))
    fails(c, 1002, "bad close code")
    assert seen(autobahn_echo, c.path)["close"] == [1001, "client closed"]  # never the invalid code


# == 9. limits and large messages =====================================================

SIZES_9 = [64 * 1024, 256 * 1024, 1024 * 1024, 4 * 1024 * 1024]  # 4 MiB = max_message_size exactly


@pytest.mark.parametrize(
    ("opcode", "size"),
    [pytest.param(TEXT, n, id=f"9.1.{i}") for i, n in enumerate(SIZES_9, start=1)]
    + [pytest.param(BIN, n, id=f"9.2.{i}") for i, n in enumerate(SIZES_9, start=1)],
)
def test_9_a_large_message_in_one_frame_is_echoed_intact(connect, opcode: int, size: int) -> None:
    c = connect("9")
    payload = text(size) if opcode == TEXT else os.urandom(size)
    c.send(frame(opcode, payload))
    f = c.read(timeout=15)
    assert (f.opcode, f.fin, f.length) == (opcode, True, size)
    assert f.payload == payload
    c.close_normally()


FRAGMENT_SIZES_9 = [64, 256, 1024, 4096, 16384, 65536, 256 * 1024, 1024 * 1024, 4 * 1024 * 1024]


@pytest.mark.parametrize(
    ("opcode", "fragment"),
    [pytest.param(TEXT, n, id=f"9.3.{i}") for i, n in enumerate(FRAGMENT_SIZES_9, start=1)]
    + [pytest.param(BIN, n, id=f"9.4.{i}") for i, n in enumerate(FRAGMENT_SIZES_9, start=1)],
)
def test_9_a_4mib_message_in_fragments_is_echoed_intact(connect, opcode: int, fragment: int) -> None:
    """4 MiB (max_message_size exactly) in fragments of 64 bytes (65536 frames) to 4 MiB (one frame)."""
    c = connect("9.3")
    size = MAX_MESSAGE
    payload = text(size) if opcode == TEXT else os.urandom(size)
    c.send(*fragments(opcode, payload, fragment))
    f = c.read(timeout=15)
    assert (f.opcode, f.fin, f.length) == (opcode, True, size)
    assert f.payload == payload
    c.close_normally()


CHOPS_9 = [64, 128, 256, 512, 1024, 2048]


@pytest.mark.parametrize(
    ("opcode", "chop"),
    [pytest.param(TEXT, n, id=f"9.5.{i}") for i, n in enumerate(CHOPS_9, start=1)]
    + [pytest.param(BIN, n, id=f"9.6.{i}") for i, n in enumerate(CHOPS_9, start=1)],
)
def test_9_a_1mib_message_written_in_small_pieces_is_echoed_intact(connect, opcode: int, chop: int) -> None:
    c = connect("9.5")
    payload = text(1024 * 1024) if opcode == TEXT else os.urandom(1024 * 1024)
    c.send(frame(opcode, payload), chop=chop)
    f = c.read(timeout=15)
    assert (f.opcode, f.length, f.payload == payload) == (opcode, len(payload), True)
    c.close_normally()


ROUND_TRIP_SIZES_9 = [0, 16, 64, 256, 1024, 4096]


@pytest.mark.parametrize(
    ("opcode", "size"),
    [pytest.param(TEXT, n, id=f"9.7.{i}") for i, n in enumerate(ROUND_TRIP_SIZES_9, start=1)]
    + [pytest.param(BIN, n, id=f"9.8.{i}") for i, n in enumerate(ROUND_TRIP_SIZES_9, start=1)],
)
def test_9_a_thousand_round_trips(connect, opcode: int, size: int) -> None:
    """1000 messages, each sent once the previous one came back."""
    c = connect("9.7")
    payload = text(size) if opcode == TEXT else binary(size)
    for _ in range(1000):
        c.send(frame(opcode, payload))
        f = c.read()
        assert (f.opcode, f.payload) == (opcode, payload)
    c.close_normally()


@pytest.mark.parametrize(
    "frames",
    [
        # the header alone announces the size: nothing of the payload is needed
        pytest.param([frame(BIN, b"", length=MAX_MESSAGE + 1)], id="9.x-one-frame"),
        pytest.param([frame(TEXT, b"", length=8 * 1024 * 1024)], id="9.1.5"),  # Autobahn's 8 MiB text
        pytest.param([frame(BIN, b"", length=16 * 1024 * 1024)], id="9.2.6"),  # and 16 MiB binary
        # 3 MiB in fragments, then a fragment whose header alone takes the message over
        pytest.param(fragments(BIN, b"\x00" * (3 * 1024 * 1024), 1024 * 1024)[:-1]
                     + [frame(OP_CONT, b"\x00" * (1024 * 1024), fin=False), frame(OP_CONT, b"", length=1024 * 1024 + 1)],
                     id="9.x-header-of-a-fragment"),
        pytest.param(fragments(TEXT, b"*" * MAX_MESSAGE, 1024 * 1024)[:-1]
                     + [frame(OP_CONT, b"*" * (1024 * 1024), fin=False), frame(OP_CONT, b"*")], id="9.x-last-fragment"),
    ],
)
def test_9_a_message_over_max_message_size_gets_1009(connect, autobahn_echo, frames: list[bytes]) -> None:  # noqa: F811
    c = connect("9.x")
    try:
        c.send(*frames)
    except OSError:
        pass  # the gateway may end the connection while the rest is still being written
    fails(c, 1009, "message too big")
    record = seen(autobahn_echo, c.path)
    assert record["messages"] == [] and record["close"] == [1001, "client closed"]


# == 10. a 64 KiB message whatever the fragmentation =================================


@pytest.mark.parametrize(
    "fragment",
    [pytest.param(1300, id="10.1.1"), pytest.param(4096, id="10.1.1-4096"),
     pytest.param(65535, id="10.1.1-65535"), pytest.param(65536, id="10.1.1-unfragmented")],
)
def test_10_a_65536_byte_message_is_echoed_whole(connect, fragment: int) -> None:
    c = connect("10.1.1")
    payload = text(65536)
    c.send(*fragments(TEXT, payload, fragment))
    c.expect((TEXT, payload))
    assert c.reader.length_fields == [127]
    c.close_normally()
