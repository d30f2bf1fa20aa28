"""
Hostile and edge-case peers over real loopback sockets (docs/protocol.md).

Clients here are raw ``socket``s that write the HTTP upgrade and the frames
byte by byte, so they can break the protocol on purpose; upstreams are either
the ``websockets`` library or a tiny raw server (``RawUpstream``) that does
the server handshake by hand and records every frame header and frame it
receives, per request path.

Gateways are module-scoped where their config can be shared (one per set of
limits), and each test uses its own request path, so the raw upstream can
tell its connections apart.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from websockets.sync.client import connect
from websockets.sync.server import ServerConnection, serve

from support.gateway import Gateway, free_port, spawn_gateway
from support.rawws import (
    KEY,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    FrameReader,
    accept_for,
    close_payload,
    frame,
    http_exchange,
    parse_head,
    header,
    read_all,
    read_head,
    uid,
    upgrade_request,
    ws_open,
)
from support.waiting import wait_for

# -- a raw upstream that records what reaches it --------------------------


@dataclass
class RawConn:
    path: str
    request: bytes
    reader: FrameReader
    frames: list[Frame] = field(default_factory=list)
    closes: list[tuple[int | None, str]] = field(default_factory=list)
    send_errors: list[str] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)

    @property
    def headers(self) -> list[Frame]:
        """Every frame header the gateway sent, complete frame or not."""
        return self.reader.headers

    def data_headers(self) -> list[tuple[int, bool, int]]:
        """(opcode, fin, length) of every non-close header, in order."""
        return [(h.opcode, h.fin, h.length) for h in self.headers if h.opcode != OP_CLOSE]


Behavior = Callable[["RawUpstream", RawConn, socket.socket], None]


def echo_loop(up: RawUpstream, rc: RawConn, sock: socket.socket) -> None:
    """
    Echo data frames as they are, answer pings, answer a close and hang up.
    A failed write does not stop the reading: what the gateway sent before
    it hung up is still recorded.
    """

    def send(data: bytes) -> None:
        try:
            sock.sendall(data)
        except OSError as e:
            rc.send_errors.append(repr(e))

    while True:
        try:
            f = rc.reader.read_frame(timeout=60)
        except (EOFError, TimeoutError, OSError):
            return
        rc.frames.append(f)
        if f.opcode == OP_PING:
            send(frame(OP_PONG, f.payload, mask=False))
        elif f.opcode == OP_CLOSE:
            rc.closes.append(f.close)
            send(frame(OP_CLOSE, f.payload[:2], mask=False))
            return
        elif f.opcode in (OP_CONT, OP_TEXT, OP_BINARY):
            send(frame(f.opcode, f.payload, fin=f.fin, mask=False))


class RawUpstream:
    """
    A WebSocket server written by hand in threads. The first path segment
    picks a behavior (default: ``echo_loop``); connections are kept per path.
    """

    def __init__(self, behaviors: dict[str, Behavior] | None = None) -> None:
        self.behaviors = behaviors or {}
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.conns: dict[str, RawConn] = {}
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def node(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def conn(self, path: str, timeout: float = 5.0) -> RawConn:
        assert wait_for(lambda: path in self.conns, timeout), f"the upstream never got {path}"
        return self.conns[path]

    def close(self) -> None:
        self._stopped = True
        self.listener.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.close()
                except OSError:
                    pass

    def _accept(self) -> None:
        while not self._stopped:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self._socks.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        rc: RawConn | None = None
        try:
            buf = b""
            sock.settimeout(10)
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            key = next(l.split(":", 1)[1].strip() for l in lines[1:] if l.lower().startswith("sec-websocket-key:"))
            sock.sendall(
                (
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Accept: {accept_for(key)}\r\n\r\n"
                ).encode()
            )
            rc = RawConn(path=path, request=head, reader=FrameReader(sock, rest))
            self.conns[path] = rc
            segment = path.lstrip("/").split("/", 1)[0]
            self.behaviors.get(segment, echo_loop)(self, rc, sock)
        except Exception:
            pass
        finally:
            try:
                sock.close()
            except OSError:
                pass
            if rc is not None:
                rc.ended.set()


# -- gateways -------------------------------------------------------------


def edge_ini(node: str, *, path: str = "/**", limits: str = "") -> str:
    """One route to ``node``; quick shutdown so module teardown stays fast."""
    return textwrap.dedent(
        f"""\
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1
        drain_grace = 0
        shutdown_timeout = 1

        [limits]
        """
    ) + textwrap.dedent(limits) + textwrap.dedent(
        f"""

        [log]
        level = info
        format = text

        [upstream:backend]
        nodes = {node}
        connect_timeout = 2
        retries = 0

        [route:main]
        path = {path}
        upstream = backend
        """
    )


@dataclass
class EchoServer:
    port: int
    paths: list[str] = field(default_factory=list)

    @property
    def node(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def hs(tmp_path_factory) -> Iterator[tuple[Gateway, EchoServer]]:
    """Handshake tests: only /ok/** is routed, to a ``websockets`` echo server; handshake_timeout 8 s."""
    holder: dict[str, EchoServer] = {}

    def echo(ws: ServerConnection) -> None:
        holder["up"].paths.append(ws.request.path)
        for msg in ws:
            ws.send(msg)

    server = serve(echo, "127.0.0.1", 0, max_size=None, compression=None)
    up = EchoServer(port=server.socket.getsockname()[1])
    holder["up"] = up
    threading.Thread(target=server.serve_forever, daemon=True).start()
    gw = spawn_gateway(tmp_path_factory.mktemp("hs"), edge_ini(up.node, path="/ok/**", limits="handshake_timeout = 8\n"))
    yield gw, up
    gw.stop()
    server.shutdown()


@pytest.fixture(scope="module")
def slow_gw(tmp_path_factory) -> Iterator[Gateway]:
    """handshake_timeout = 1; nothing ever gets far enough to need the upstream."""
    gw = spawn_gateway(
        tmp_path_factory.mktemp("slow"),
        edge_ini(f"ws://127.0.0.1:{free_port()}", limits="handshake_timeout = 1\n"),
    )
    yield gw
    gw.stop()


def _masked_frame_upstream(up: RawUpstream, rc: RawConn, sock: socket.socket) -> None:
    rc.frames.append(rc.reader.read_frame(timeout=10))
    sock.sendall(frame(OP_TEXT, b"evil-masked-by-upstream", mask=True))
    echo_loop(up, rc, sock)


def _rst_mid_frame_upstream(up: RawUpstream, rc: RawConn, sock: socket.socket) -> None:
    rc.frames.append(rc.reader.read_frame(timeout=10))
    sock.sendall(frame(OP_TEXT, b"before", mask=False))
    # a binary frame announcing 1000 bytes, of which 10 are sent
    sock.sendall(b"\x82\x7e" + (1000).to_bytes(2, "big") + b"P" * 10)
    time.sleep(0.3)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST


def _raw_gateway(tmp_path_factory, name: str, limits: str, handlers=None) -> Iterator[tuple[Gateway, RawUpstream]]:
    up = RawUpstream(handlers)
    gw = spawn_gateway(tmp_path_factory.mktemp(name), edge_ini(up.node, limits=limits))
    yield gw, up
    gw.stop()
    up.close()


@pytest.fixture(scope="module")
def strict(tmp_path_factory) -> Iterator[tuple[Gateway, RawUpstream]]:
    """max_message_size = 1K, no pings, raw recording upstream."""
    yield from _raw_gateway(
        tmp_path_factory,
        "strict",
        "max_message_size = 1K\nping_interval = 0\n",
        {"masked": _masked_frame_upstream, "rst": _rst_mid_frame_upstream},
    )


@pytest.fixture(scope="module")
def pinging(tmp_path_factory) -> Iterator[tuple[Gateway, RawUpstream]]:
    """ping_interval = 1, ping_timeout = 1, raw recording upstream (it answers pings)."""
    yield from _raw_gateway(tmp_path_factory, "ping", "ping_interval = 1\nping_timeout = 1\n")


@pytest.fixture(scope="module")
def idle(tmp_path_factory) -> Iterator[tuple[Gateway, RawUpstream]]:
    """idle_timeout = 1, no pings, raw recording upstream."""
    yield from _raw_gateway(tmp_path_factory, "idle", "idle_timeout = 1\nping_interval = 0\n")


# == 1. handshake statuses (docs/protocol.md#handshake-statuses) ================================


def _assert_fixed_status(resp: bytes, status_line: str) -> None:
    assert resp.split(b"\r\n", 1)[0].decode("latin-1") == status_line, resp
    assert b"<script>" not in resp, resp
    assert b"autobahn" not in resp.lower(), resp


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"key": None},
        {"key": "dGhlIHNhbXBsZSBub25jZQ"},  # 22 chars, not a 16-byte base64 value
        {"key": "<script>AAAAAAAAAAAAAA=="},  # right length, not base64, echoes nothing
        {"key": "<script>"},
        {"method": "POST"},
        {"method": "<script>"},
        {"http": "HTTP/1.0"},
        {"host": None},
    ],
    ids=["missing-key", "short-key", "non-base64-key", "script-key", "POST", "script-method", "http-1.0", "no-host"],
)
def test_malformed_upgrade_is_400_with_fixed_reason(hs, request_kwargs):
    gw, up = hs
    path = "/ok/" + uid("bad")
    resp = http_exchange(gw.port, upgrade_request(path, extra=[("X-Probe", "<script>alert(1)</script>")], **request_kwargs))
    _assert_fixed_status(resp, "HTTP/1.1 400 Bad Request")
    time.sleep(0.1)
    assert path not in up.paths  # never reached the upstream


@pytest.mark.parametrize("version", ["8", "12", "14"])
def test_wrong_version_is_426_naming_13(hs, version):
    gw, up = hs
    resp = http_exchange(gw.port, upgrade_request("/ok/v", version=version, extra=[("X-Probe", "<script>")]))
    _assert_fixed_status(resp, "HTTP/1.1 426 Upgrade Required")
    _, _, headers = parse_head(resp)
    assert header(headers, "Sec-WebSocket-Version") == ["13"]


def test_unparsable_version_does_not_echo(hs):
    gw, _ = hs
    resp = http_exchange(gw.port, upgrade_request("/ok/v", version="<script>"))
    status_line, code, _ = parse_head(resp)
    assert code in (400, 426), resp
    assert status_line in ("HTTP/1.1 400 Bad Request", "HTTP/1.1 426 Upgrade Required")
    assert b"<script>" not in resp


def test_missing_version_is_refused(hs):
    gw, _ = hs
    resp = http_exchange(gw.port, upgrade_request("/ok/v", version=None))
    status_line, code, _ = parse_head(resp)
    assert status_line in ("HTTP/1.1 400 Bad Request", "HTTP/1.1 426 Upgrade Required"), resp
    assert b"hixie" not in resp.lower() and b"autobahn" not in resp.lower()


def test_no_route_is_404(hs):
    gw, up = hs
    resp = http_exchange(gw.port, upgrade_request("/nope/<script>"))
    _assert_fixed_status(resp, "HTTP/1.1 404 Not Found")
    assert b"nope" not in resp


def _big_head(variant: str) -> bytes:
    start = upgrade_request("/ok/big")[:-2]  # without the final CRLF
    if variant == "many-headers":
        body = b"".join(b"X-H%d: <script>%s\r\n" % (i, b"b" * 40) for i in range(450))
    else:
        body = b"X-Big: <script>" + b"a" * 20480 + b"\r\n"
    return start + body + b"\r\n"


@pytest.mark.parametrize("variant", ["one-header-in-pieces", "many-headers", "whole-in-one-send"])
def test_oversized_request_head_is_431_promptly(hs, variant):
    gw, up = hs
    head = _big_head(variant)
    assert len(head) > 20 * 1024
    n_paths = len(up.paths)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        if variant == "whole-in-one-send":
            s.sendall(head)
        else:
            # 1 KiB at a time, stopping as soon as the gateway answers; the
            # final CRLF CRLF is the last piece, so a gateway that waits for
            # the end of the head gets there only after 20 KiB
            for i in range(0, len(head), 1024):
                try:
                    s.sendall(head[i : i + 1024])
                except OSError:
                    break
                if select.select([s], [], [], 0.02)[0]:
                    break
        # promptly: read_all gives up after 6 s, before handshake_timeout (8 s) could end it without a 431
        resp = read_all(s, timeout=6)
    _assert_fixed_status(resp, "HTTP/1.1 431 Request Header Fields Too Large")
    time.sleep(0.1)
    assert len(up.paths) == n_paths


def test_head_just_under_16k_is_accepted(hs):
    """The limit is on the head, not on what a normal big-ish handshake carries."""
    gw, up = hs
    path = "/ok/" + uid("near")
    base = len(upgrade_request(path, extra=[("X-Pad-1", ""), ("X-Pad-2", "")]))
    pad = (16 * 1024 - base - 64) // 2
    # two headers: the websockets upstream itself refuses lines over 8 KiB (with 431)
    req = upgrade_request(path, extra=[("X-Pad-1", "p" * pad), ("X-Pad-2", "q" * pad)])
    assert 15 * 1024 < len(req) < 16 * 1024
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(req)
        head, _ = read_head(s)
    assert parse_head(head)[1] == 101, head


# == 2. webStatus off ========================================================


@pytest.mark.parametrize(
    "target",
    ["/", "/ok/", "/?redirect=http://evil.example", "/?redirect=http%3A%2F%2Fevil.example&after=0"],
)
def test_plain_http_get_gets_no_status_page_nor_redirect(hs, target):
    gw, _ = hs
    resp = http_exchange(gw.port, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    status_line, code, headers = parse_head(resp)
    assert code in (400, 404, 426), resp
    assert not (200 <= code < 400)
    assert header(headers, "Location") == []
    low = resp.lower()
    assert b"autobahn" not in low
    assert b"<html" not in low and b"<!doctype" not in low
    assert b"evil" not in low
    assert not any("autobahn" in v.lower() for v in header(headers, "Server"))


def test_101_reveals_no_server_software(hs):
    gw, _ = hs
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(upgrade_request("/ok/" + uid("srv")))
        head, _ = read_head(s)
    _, code, headers = parse_head(head)
    assert code == 101, head
    assert header(headers, "Sec-WebSocket-Accept") == [accept_for(KEY)]
    assert b"autobahn" not in head.lower()
    assert not any(any(c.isdigit() for c in v) for v in header(headers, "Server")), head
    assert header(headers, "X-Powered-By") == []


# == 8. data in the same segment as the handshake =========================


@pytest.mark.parametrize(
    "messages",
    [
        [(OP_TEXT, b"hello-same-segment")],
        [(OP_BINARY, bytes(range(256)) * 80)],  # 20 KiB: head + frame over 16 KiB in one read
        [(OP_TEXT, b"one"), (OP_BINARY, b"\x00two"), (OP_TEXT, b"three")],
    ],
    ids=["text", "20KiB-binary", "three-frames"],
)
def test_frames_sent_with_the_upgrade_request_are_not_lost(hs, messages):
    gw, _ = hs
    first = b"".join(frame(op, payload) for op, payload in messages)
    sock, reader = ws_open(gw.port, "/ok/" + uid("seg"), first=first)
    with sock:
        got = [reader.read_frame(timeout=5) for _ in messages]
    assert [(f.opcode, f.payload) for f in got] == messages


# == 3. handshake_timeout (slowloris) =====================================


def test_trickled_request_is_dropped_after_handshake_timeout(slow_gw):
    """One byte every 0.1 s: progress must not extend the deadline."""
    req = upgrade_request("/ok/trickle", extra=[("X-Pad", "t" * 100)])
    assert len(req) * 0.1 > 10  # would take over 10 s to finish
    got = b""
    closed_after = None
    with socket.create_connection(("127.0.0.1", slow_gw.port), timeout=5) as s:
        for i, byte in enumerate(req):
            try:
                s.send(bytes([byte]))
            except OSError:
                closed_after = i
                break
            if select.select([s], [], [], 0.1)[0]:
                try:
                    chunk = s.recv(4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    closed_after = i
                    break
                got += chunk
    # dropped long before its last byte (over 10 s away); when exactly is
    # test_proxy_units.py::test_handshake_timeout_drops_a_client_that_never_finishes_its_request (a Clock)
    assert closed_after is not None, "the trickling client was never dropped"
    assert closed_after < len(req) // 2, f"dropped only after {closed_after} of {len(req)} bytes"
    assert b" 101 " not in got


def test_fractional_handshake_timeout_gives_prompt_clients_their_time(make_upstream, start_gateway):
    """
    handshake_timeout = 0.6 (durations may be floats): clients that send
    their whole upgrade 0.1 s after connecting are well within it. Four of
    them, 0.25 s apart, so the outcome does not depend on when in a second
    the test happens to run.
    """
    up = make_upstream()
    gw = start_gateway(edge_ini(up.node, limits="handshake_timeout = 0.6\n"))
    outcomes = []
    for i in range(4):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
            t0 = time.monotonic()
            time.sleep(0.1)
            try:
                s.sendall(upgrade_request(f"/prompt-{i}"))
                head, _ = read_head(s, timeout=3)
            except OSError as e:
                head = repr(e).encode()
            outcomes.append((round(time.monotonic() - t0, 2), head.split(b"\r\n", 1)[0]))
        time.sleep(0.15)
    assert all(status == b"HTTP/1.1 101 Switching Protocols" for _, status in outcomes), outcomes


# == 4. client frame violations ============================================


def _open_and_echo_ok(gw: Gateway, up: RawUpstream, name: str) -> tuple[socket.socket, FrameReader, RawConn]:
    path = "/v/" + uid(name)
    sock, reader = ws_open(gw.port, path)
    sock.sendall(frame(OP_TEXT, b"ok"))
    f = reader.read_frame(timeout=5)
    assert (f.opcode, f.payload) == (OP_TEXT, b"ok")
    return sock, reader, up.conn(path)


def _expect_close(reader: FrameReader, timeout: float = 3.0) -> tuple[list[Frame], Frame]:
    """Frames before the first close frame, and the close frame."""
    before: list[Frame] = []
    deadline = time.monotonic() + timeout
    while True:
        f = reader.read_frame(timeout=max(deadline - time.monotonic(), 0.01))
        if f.opcode == OP_CLOSE:
            return before, f
        before.append(f)


VIOLATIONS = {
    "unmasked": frame(OP_TEXT, b"evil-unmasked", mask=False),
    "reserved-opcode-3": frame(0x3, b"evil-op3"),
    "reserved-opcode-0xB": frame(0xB, b"evil-opB"),
    "rsv1": frame(OP_TEXT, b"evil-rsv1", rsv=4),
    "rsv3": frame(OP_BINARY, b"evil-rsv3", rsv=1),
    "control-126-bytes": frame(OP_PING, b"evil" + b"e" * 122),
    "close-126-bytes": frame(OP_CLOSE, close_payload(1000, "evil" + "e" * 120)),
    "fragmented-ping": frame(OP_PING, b"evil-fping", fin=False),
    "orphan-continuation": frame(OP_CONT, b"evil-cont"),
    "new-message-inside-fragmented": frame(OP_TEXT, b"part", fin=False) + frame(OP_TEXT, b"evil-new"),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_client_protocol_violation_closes_1002_and_nothing_reaches_upstream(strict, name):
    gw, up = strict
    sock, reader, rc = _open_and_echo_ok(gw, up, name)
    with sock:
        sock.sendall(VIOLATIONS[name])
        before, close = _expect_close(reader)
        assert close.close[0] == 1002, close
        assert not close.masked
        assert [f for f in before if f.opcode != OP_CONT and f.payload != b"part"] == []
        reader.wait_eof(3)  # the gateway fails the connection
    expected = [(OP_TEXT, True, 2)]
    if name == "new-message-inside-fragmented":
        expected.append((OP_TEXT, False, 4))  # the first fragment streams on; the new message must not
    assert rc.ended.wait(3), "the upstream connection was left open"
    assert rc.data_headers() == expected
    assert not any(b"evil" in f.payload for f in rc.frames)
    assert rc.closes and rc.closes[0][0] is not None, "the upstream got no close frame"


def _too_big(name: str) -> bytes:
    if name == "one-frame":
        return frame(OP_BINARY, b"evil" * 500)  # 2000 bytes
    if name == "fragments":
        # 400 + 400 + 400 = 1200 > 1024: only the last fragment crosses the limit
        return (
            frame(OP_TEXT, b"a" * 400, fin=False)
            + frame(OP_CONT, b"b" * 400, fin=False)
            + frame(OP_CONT, b"LAST" * 100, fin=True)
        )
    if name == "many-small-fragments":
        return frame(OP_BINARY, b"x" * 100, fin=False) + b"".join(
            frame(OP_CONT, b"y" * 100, fin=False) for _ in range(9)
        ) + frame(OP_CONT, b"LAST" * 25, fin=True)
    if name == "declared-1TiB":
        # only the header and a few bytes: the announced length alone is over the limit
        return frame(OP_BINARY, b"evil" * 4, length=1 << 40)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["one-frame", "fragments", "many-small-fragments", "declared-1TiB"])
def test_message_over_max_message_size_closes_1009(strict, name):
    gw, up = strict
    sock, reader, rc = _open_and_echo_ok(gw, up, name)
    with sock:
        sock.sendall(_too_big(name))
        before, close = _expect_close(reader)
        assert close.close[0] == 1009, close
        # whatever fragments were echoed before, the message was never completed
        assert not any(f.fin and f.opcode in (OP_TEXT, OP_BINARY, OP_CONT) for f in before)
        reader.wait_eof(3)
    assert rc.ended.wait(3), "the upstream connection was left open"
    assert rc.closes and rc.closes[0][0] is not None, "the upstream got no close frame"
    data = rc.data_headers()
    assert data[0] == (OP_TEXT, True, 2)
    # the offending message never completes at the upstream: no final frame after "ok",
    # nothing of the frame that crossed the limit, at most 1024 bytes of it
    assert all(not fin for _, fin, _ in data[1:]), data
    assert sum(n for _, _, n in data[1:]) <= 1024, data
    assert not any(b"LAST" in f.payload or b"evil" in f.payload for f in rc.frames)


@pytest.mark.parametrize("sizes", [[1024], [512, 512], [1000, 24]], ids=["one-frame", "two-fragments", "uneven"])
def test_message_of_exactly_max_message_size_passes(strict, sizes):
    gw, up = strict
    sock, reader, rc = _open_and_echo_ok(gw, up, "limit")
    payloads = [os.urandom(n) for n in sizes]
    with sock:
        for i, p in enumerate(payloads):
            sock.sendall(frame(OP_BINARY if i == 0 else OP_CONT, p, fin=i == len(payloads) - 1))
        got = [reader.read_frame(timeout=5) for _ in payloads]
    assert [f.payload for f in got] == payloads
    assert sum(sizes) == 1024


def test_ping_between_fragments_is_legal_and_passes_through(strict):
    """RFC 6455 5.4: control frames may come between the fragments of a message."""
    gw, up = strict
    sock, reader, rc = _open_and_echo_ok(gw, up, "interleaved")
    with sock:
        sock.sendall(
            frame(OP_TEXT, b"frag-1 ", fin=False) + frame(OP_PING, b"mid") + frame(OP_CONT, b"frag-2", fin=True)
        )
        got = [reader.read_frame(timeout=5) for _ in range(3)]
    assert [(f.opcode, f.fin, f.payload) for f in got] == [
        (OP_TEXT, False, b"frag-1 "),
        (OP_PONG, True, b"mid"),
        (OP_CONT, True, b"frag-2"),
    ]
    # (after these, the upstream may already have the gateway's close for the vanished client)
    assert [(f.opcode, f.payload) for f in rc.frames[1:4]] == [
        (OP_TEXT, b"frag-1 "),
        (OP_PING, b"mid"),
        (OP_CONT, b"frag-2"),
    ]


# == 7. upstream protocol violations =====================================


def test_masked_frame_from_upstream_gives_client_1014(strict):
    gw, up = strict
    path = "/masked/" + uid("m")
    sock, reader = ws_open(gw.port, path)
    with sock:
        sock.sendall(frame(OP_TEXT, b"go"))
        before, close = _expect_close(reader)
        assert before == [], "the masked frame (or part of it) reached the client"
        assert close.close[0] == 1014, close
    rc = up.conn(path)
    assert rc.ended.wait(3), "the offending upstream connection was left open"


def test_upstream_reset_mid_frame_drops_client(strict):
    gw, up = strict
    path = "/rst/" + uid("r")
    sock, reader = ws_open(gw.port, path)
    with sock:
        sock.sendall(frame(OP_TEXT, b"go"))
        f = reader.read_frame(timeout=5)
        assert (f.opcode, f.payload) == (OP_TEXT, b"before")
        with pytest.raises(EOFError):
            # the 1000-byte frame can never be completed: the gateway must end
            # the client connection rather than leave it hanging (or pad it);
            # a TimeoutError (5 s without a byte) means it was left hanging
            while True:
                f = reader.read_frame(timeout=5)
                assert not (f.opcode in (OP_BINARY, OP_CONT) and f.length == 1000), "a partial frame was completed"


# == 5. pings ================================================================


def test_client_that_never_answers_pings_is_dropped(pinging):
    gw, up = pinging
    path = "/p/" + uid("silent")
    sock, reader = ws_open(gw.port, path)
    frames: list[Frame] = []
    with sock:
        # pinged, then dropped (EOF; a TimeoutError would mean it was kept). When:
        # tests/unit/relay/test_relay.py::test_missing_pong_aborts_that_transport (a Clock)
        with pytest.raises(EOFError):
            while True:
                frames.append(reader.read_frame(timeout=4))
    assert [f for f in frames if f.opcode == OP_PING], f"no ping from the gateway: {frames}"
    assert not [f for f in frames if f.opcode != OP_PING], f"only pings, then the drop: {frames}"
    rc = up.conn(path)
    assert rc.ended.wait(3), "the upstream connection outlived the dead client"


def test_websockets_client_answering_pings_stays_connected(pinging):
    gw, _ = pinging
    with connect(gw.url + "/p/" + uid("alive"), ping_interval=None, compression=None, open_timeout=5) as ws:
        time.sleep(3.5)
        ws.send("still here")
        assert ws.recv(timeout=3) == "still here"


def _read_answering_pings(sock: socket.socket, reader: FrameReader, until: Callable[[Frame], bool], timeout: float, log: list[Frame]) -> Frame:
    """Read frames, answering the gateway's pings, until ``until(frame)``."""
    deadline = time.monotonic() + timeout
    while True:
        f = reader.read_frame(timeout=max(deadline - time.monotonic(), 0.01))
        log.append(f)
        if until(f):
            return f
        if f.opcode == OP_PING:
            sock.sendall(frame(OP_PONG, f.payload))
        assert f.opcode != OP_CLOSE, f"closed: {f.close}"


def test_pongs_to_gateway_pings_stay_on_their_hop_and_client_pings_pass_through(pinging):
    gw, up = pinging
    path = "/p/" + uid("pong")
    sock, reader = ws_open(gw.port, path)
    seen: list[Frame] = []
    with sock:
        gw_ping = _read_answering_pings(sock, reader, lambda f: f.opcode == OP_PING, 3, seen)
        sock.sendall(frame(OP_PONG, gw_ping.payload))
        # the client's own ping goes to the upstream, whose pong comes back
        sock.sendall(frame(OP_PING, b"client-ping-123"))
        pong = _read_answering_pings(sock, reader, lambda f: f.opcode == OP_PONG, 3, seen)
        assert pong.payload == b"client-ping-123"
        # keep answering for two more ping rounds: the gateway must accept our pongs
        t_end = time.monotonic() + 2.2
        with pytest.raises(TimeoutError):
            _read_answering_pings(sock, reader, lambda f: False, t_end - time.monotonic(), seen)
        sock.sendall(frame(OP_TEXT, b"alive"))
        echo = _read_answering_pings(sock, reader, lambda f: f.opcode == OP_TEXT, 3, seen)
        assert echo.payload == b"alive"
    rc = up.conn(path)
    assert wait_for(lambda: any(f.opcode == OP_TEXT for f in rc.frames))
    assert [h for h in rc.headers if h.opcode == OP_PONG] == [], "a client pong was forwarded to the upstream"
    assert any(f.opcode == OP_PING and f.payload == b"client-ping-123" for f in rc.frames)
    # the upstream's pongs to the gateway's pings are not leaked to the client either
    assert [f.payload for f in seen if f.opcode == OP_PONG] == [b"client-ping-123"]
    assert sum(f.opcode == OP_PING for f in seen) >= 2


# == 6. idle timeout =========================================================


def test_idle_connection_is_closed_1001_idle_timeout(idle):
    gw, up = idle
    path = "/i/" + uid("idle")
    sock, reader = ws_open(gw.port, path)
    with sock:
        # when it fires, and what counts as activity: tests/unit/relay/test_relay.py (a Clock)
        before, close = _expect_close(reader, timeout=2.5)
        assert before == []
        assert close.close == (1001, "idle timeout")
        sock.sendall(frame(OP_CLOSE, close_payload(1001)))
        reader.wait_eof(3)
    rc = up.conn(path)
    assert rc.ended.wait(3)
    assert rc.closes == [(1001, "idle timeout")]
