"""
The independent WebSocket codec of the tests: the HTTP upgrade and the
frames written and read byte by byte with ``socket``, so a test can break the
protocol on purpose and no client library "helps" (used by the edge-case,
security and durable tests). Nothing here imports wsgateway.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import time
import uuid
from dataclasses import dataclass


OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


# -- frames ---------------------------------------------------------------


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    mask: bool = True,
    rsv: int = 0,
    length: int | None = None,
) -> bytes:
    """A frame built by hand: anything goes, including what RFC 6455 forbids.

    ``rsv`` is the 3-bit RSV1..RSV3 field (4 = RSV1); ``length`` overrides the
    announced payload length (the payload bytes are written as given).
    """
    b0 = (0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0x0F)
    n = len(payload) if length is None else length
    b1 = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, b1 | n))
    elif n < 0x10000:
        head = bytes((b0, b1 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, b1 | 127)) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _xor(payload, key)


def _xor(data: bytes, key: bytes) -> bytes:
    if not data:
        return b""
    stream = (key * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(len(data), "big")


def close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode()


@dataclass
class Frame:
    fin: bool
    rsv: int
    opcode: int
    masked: bool
    length: int
    payload: bytes = b""

    @property
    def close(self) -> tuple[int | None, str]:
        if len(self.payload) < 2:
            return None, ""
        return int.from_bytes(self.payload[:2], "big"), self.payload[2:].decode("utf-8", "replace")


class FrameReader:
    """Reads frames off a socket; every header is recorded in ``headers`` as soon as it is complete."""

    def __init__(self, sock: socket.socket, buf: bytes = b"") -> None:
        self.sock = sock
        self.buf = buf
        self.headers: list[Frame] = []
        self._announced = False

    def _need(self, n: int, deadline: float) -> None:
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete frame in time ({len(self.buf)} of {n} bytes)")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                raise EOFError(f"connection reset: {e!r}") from None
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk

    def read_frame(self, timeout: float = 5.0) -> Frame:
        deadline = time.monotonic() + timeout
        self._need(2, deadline)
        b0, b1 = self.buf[0], self.buf[1]
        n = b1 & 0x7F
        pos = 2
        if n == 126:
            self._need(4, deadline)
            n = int.from_bytes(self.buf[2:4], "big")
            pos = 4
        elif n == 127:
            self._need(10, deadline)
            n = int.from_bytes(self.buf[2:10], "big")
            pos = 10
        masked = bool(b1 & 0x80)
        key = b""
        if masked:
            self._need(pos + 4, deadline)
            key = self.buf[pos : pos + 4]
            pos += 4
        head = Frame(bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0x0F, masked, n)
        if not self._announced:
            self.headers.append(head)
            self._announced = True
        self._need(pos + n, deadline)
        payload = self.buf[pos : pos + n]
        self.buf = self.buf[pos + n :]
        self._announced = False
        head.payload = _xor(payload, key) if masked else payload
        return head

    def wait_eof(self, timeout: float) -> bytes:
        """Read until the peer closes or resets; returns what came meanwhile. TimeoutError if it stays open."""
        deadline = time.monotonic() + timeout
        got = self.buf
        self.buf = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the connection is still open")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return got
            if not chunk:
                return got
            got += chunk


# -- HTTP by hand ---------------------------------------------------------


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


def upgrade_request(
    path: str,
    *,
    method: str = "GET",
    http: str = "HTTP/1.1",
    key: str | None = KEY,
    version: str | None = "13",
    host: str | None = "127.0.0.1",
    extra: list[tuple[str, str]] | None = None,
) -> bytes:
    lines = [f"{method} {path} {http}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += ["Upgrade: websocket", "Connection: Upgrade"]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    for name, value in extra or []:
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_head(head: bytes) -> tuple[str, int, list[tuple[str, str]]]:
    """(status line, status code, headers) of an HTTP response head."""
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    status_line = lines[0]
    parts = status_line.split(" ", 2)
    code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1
    headers = []
    for line in lines[1:]:
        if not line:
            break
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return status_line, code, headers


def header(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in headers if n.lower() == name.lower()]


def read_head(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, bytes]:
    """Read an HTTP response head; returns (head, bytes after it). The head is partial if the peer closed first."""
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no HTTP response head in {timeout}s, got {buf!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        buf += chunk
    head, sep, rest = buf.partition(b"\r\n\r\n")
    return head + sep, rest


def read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything until the peer closes (an error response must be followed by a close)."""
    buf = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the gateway did not close the connection in {timeout}s; got {buf!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return buf
        if not chunk:
            return buf
        buf += chunk


def raw_connect(port: int, *, timeout: float = 5.0, source: str | None = None) -> socket.socket:
    """A TCP connection to the gateway on 127.0.0.1, from ``source`` (another 127/8 address) if given."""
    return socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None
    )


def http_exchange(port: int, request: bytes, timeout: float = 5.0, source: str | None = None) -> bytes:
    with raw_connect(port, timeout=timeout, source=source) as s:
        s.sendall(request)
        return read_all(s, timeout)


def ws_open(
    port: int,
    path: str,
    *,
    first: bytes = b"",
    timeout: float = 5.0,
    extra: list[tuple[str, str]] | None = None,
    source: str | None = None,
) -> tuple[socket.socket, FrameReader]:
    """
    A raw client after a successful upgrade (``first``: bytes sent in the same
    sendall as the request; ``extra``: more request headers; ``source``: the
    loopback address to connect from, e.g. 127.0.0.2).
    """
    sock = raw_connect(port, timeout=timeout, source=source)
    sock.sendall(upgrade_request(path, extra=extra) + first)
    head, rest = read_head(sock, timeout)
    status_line, code, headers = parse_head(head)
    assert code == 101, f"upgrade of {path} refused: {head!r}"
    assert header(headers, "Sec-WebSocket-Accept") == [accept_for(KEY)]
    return sock, FrameReader(sock, rest)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
