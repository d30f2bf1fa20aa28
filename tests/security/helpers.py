"""
Helpers of the hostile-input suite: upstreams that record what reached them,
tokens put together the way an attacker would, raw-socket handshakes, and the
registry of every secret a test sent (the last test greps the logs for them).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import socket
import ssl
import textwrap
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import trustme
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve

from support.gateway import Gateway
from support.rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    FrameReader,
    accept_for,
    frame,
    parse_head,
    raw_connect,
    read_all,
    read_head,
    upgrade_request,
)
from support.waiting import wait_for

ISSUER = "https://issuer.wsgw.test"
AUDIENCE = "wsgw-security-suite"
ALLOWED_ORIGIN = "https://app.example.com"


# -- what the suite sent that must never be logged --------------------------


# Host values that are not a valid host[:port] (400 on every route): the
# "host-header poisoning" set nginx refuses, and a few more.
MALFORMED_HOSTS = [
    "evil.example, a.internal.example",
    "evil.example/a.internal.example",
    "evil.example a.internal.example",
    "evil.example?a.internal.example",
    "evil.example;a.internal.example",
    "evil.example\ta.internal.example",
    "a.internal.example:99999",
    "a.internal.example:0",
    "evil.example#a.internal.example",
    "evil@a.internal.example",
]


class Secrets:
    """Every token, key and credential a test sent, and every log to grep for them."""

    def __init__(self) -> None:
        self.values: set[str] = set()
        self.logs: list[Path] = []
        self._lock = threading.Lock()

    def add(self, value: str) -> str:
        with self._lock:
            self.values.add(value)
            # a JWT's signature alone is as telling as the whole token
            parts = value.split(".")
            if len(parts) == 3 and len(parts[2]) >= 16:
                self.values.add(parts[2])
        return value

    def watch(self, gw: Gateway) -> Gateway:
        self.logs.append(gw.log_path)
        return gw



# -- tokens ---------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(header_: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A JWT put together by hand: whatever header, whatever signature bytes."""
    head = b64url(json.dumps(header_, separators=(",", ":")).encode())
    body = b64url(json.dumps(claims, separators=(",", ":")).encode())
    return f"{head}.{body}.{b64url(signature)}"


def hs256_by_hand(key: bytes, claims: dict[str, Any], extra_header: dict[str, Any] | None = None) -> str:
    """HS256 with any bytes as the key (PyJWT refuses a PEM as an HMAC key, an attacker does not)."""
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT", **(extra_header or {})}, separators=(",", ":")).encode())
    body = b64url(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(sig)}"


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims for the main gateway; ``None`` removes a claim."""
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "alice",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,  # so no two tokens are the same string
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


# -- upstreams --------------------------------------------------------------


@dataclass
class Seen:
    """One WebSocket connection as the upstream saw it."""

    request: Any  # websockets Request: .path, .headers
    received: list[str | bytes] = field(default_factory=list)
    close: tuple[int | None, str | None] | None = None
    ended: threading.Event = field(default_factory=threading.Event)


class Backend:
    """
    A ``websockets`` echo server that records each connection under its path
    (without the query). It picks the subprotocol ``chat`` when offered and
    none otherwise.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.seen: dict[str, Seen] = {}
        self._lock = threading.Lock()

        def pick(conn: ServerConnection, offered: Sequence[str]) -> str | None:
            return "chat" if "chat" in offered else None

        kwargs.setdefault("max_size", None)
        kwargs.setdefault("compression", None)
        self.server = serve(self._run, "127.0.0.1", 0, select_subprotocol=pick, **kwargs)
        self.port = self.server.socket.getsockname()[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def node(self, scheme: str = "ws", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}"

    def _run(self, ws: ServerConnection) -> None:
        s = Seen(ws.request)
        with self._lock:
            self.seen[ws.request.path.partition("?")[0]] = s
        try:
            for msg in ws:
                s.received.append(msg)
                try:
                    ws.send(msg)
                except ConnectionClosed:
                    pass  # closing: keep reading what was sent before the close
        except Exception:
            pass
        finally:
            s.close = (ws.close_code, ws.close_reason)
            s.ended.set()

    def get(self, path: str, timeout: float = 5.0) -> Seen:
        assert wait_for(lambda: path in self.seen, timeout), f"the upstream never got {path}"
        return self.seen[path]

    def paths_with(self, marker: str) -> list[str]:
        with self._lock:
            return [p for p, s in self.seen.items() if marker in p or marker in s.request.path]

    def stop(self) -> None:
        self.server.shutdown()


@dataclass
class RawSeen:
    """One connection at the raw recorder: its request head as bytes, and every frame the gateway sent."""

    head: bytes
    frames: list[Frame] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)

    def data(self) -> list[tuple[int, bytes]]:
        """(opcode, payload) of every frame but closes, pings and pongs."""
        return [(f.opcode, f.payload) for f in self.frames if f.opcode in (0, OP_TEXT, OP_BINARY)]

    def closes(self) -> list[tuple[int | None, str]]:
        return [f.close for f in self.frames if f.opcode == OP_CLOSE]


class RawRecorder:
    """
    An upstream written by hand that keeps the raw bytes of every request
    head it is sent, before any parser gets to judge them, completes the
    upgrade, records every frame (so a frame the gateway should have stopped
    is seen even when a real WebSocket server would have refused it too),
    echoes data frames and answers a close with a close.
    """

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.seen: dict[str, RawSeen] = {}
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def node(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def heads_with(self, marker: bytes) -> list[bytes]:
        return [h for h in list(self.heads) if marker in h]

    def get(self, path: str, timeout: float = 5.0) -> RawSeen:
        assert wait_for(lambda: path in self.seen, timeout), f"the raw upstream never got {path}"
        return self.seen[path]

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        seen: RawSeen | None = None
        with sock:
            try:
                sock.settimeout(10)
                buf = b""
                while b"\r\n\r\n" not in buf and len(buf) < 65536:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                head, sep, rest = buf.partition(b"\r\n\r\n")
                self.heads.append(head + sep)
                if not sep:
                    return
                lines = head.split(b"\r\n")
                key = next(
                    (line.split(b":", 1)[1].strip().decode("latin-1") for line in lines[1:]
                     if line.lower().startswith(b"sec-websocket-key:")),
                    None,
                )
                if key is None:
                    sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    return
                sock.sendall(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Accept: " + accept_for(key).encode() + b"\r\n\r\n"
                )
                target = lines[0].split(b" ")[1].decode("latin-1") if len(lines[0].split(b" ")) > 2 else ""
                seen = self.seen[target.partition("?")[0]] = RawSeen(head + sep)
                reader = FrameReader(sock, rest)
                while True:
                    f = reader.read_frame(timeout=30)
                    seen.frames.append(f)
                    if f.opcode == OP_CLOSE:
                        sock.sendall(frame(OP_CLOSE, f.payload[:2], mask=False))
                        return
                    if f.opcode == OP_PING:
                        sock.sendall(frame(OP_PONG, f.payload, mask=False))
                    elif f.opcode in (0, OP_TEXT, OP_BINARY):
                        sock.sendall(frame(f.opcode, f.payload, fin=f.fin, mask=False))
            except (OSError, EOFError, TimeoutError):
                return
            finally:
                if seen is not None:
                    seen.ended.set()


# -- raw client helpers -------------------------------------------------------


def status_of(resp: bytes) -> str:
    """The status line of an HTTP response ('' when nothing came)."""
    return resp.split(b"\r\n", 1)[0].decode("latin-1")


def upgrade(path: str, extra: list[tuple[str, str]] | None = None, *, origin: str | None = ALLOWED_ORIGIN) -> bytes:
    """
    An upgrade request as a browser on the allowed origin would send it
    (``origin=None``: no Origin header, as a non-browser client). An Origin
    in ``extra`` replaces the default.
    """
    extra = list(extra or [])
    if origin is not None and not any(name.lower() == "origin" for name, _ in extra):
        extra.append(("Origin", origin))
    return upgrade_request(path, extra=extra)


def handshake(
    port: int,
    path: str,
    extra: list[tuple[str, str]] | None = None,
    *,
    origin: str | None = ALLOWED_ORIGIN,
    source: str | None = None,
    raw: bytes | None = None,
    timeout: float = 5.0,
) -> tuple[str, list[tuple[str, str]], socket.socket, FrameReader]:
    """
    Send an upgrade request (see ``upgrade``; or ``raw`` bytes) and read the
    response head: (status line, headers, socket, reader). The caller closes
    the socket.
    """
    sock = raw_connect(port, timeout=timeout, source=source)
    sock.sendall(raw if raw is not None else upgrade(path, extra, origin=origin))
    head, rest = read_head(sock, timeout)
    line, _, headers = parse_head(head)
    return line, headers, sock, FrameReader(sock, rest)


def refused(port: int, path: str, extra: list[tuple[str, str]] | None = None, *, origin: str | None = ALLOWED_ORIGIN,
            raw: bytes | None = None, source: str | None = None) -> tuple[str, list[tuple[str, str]]]:
    """A handshake that must be refused: (status line, headers); the gateway must then close the connection."""
    line, headers, sock, reader = handshake(port, path, extra, origin=origin, raw=raw, source=source)
    with sock:
        assert " 101 " not in line + " ", f"{path} was upgraded: {line}"
        read_all(sock, 5)  # an error response is followed by the gateway closing
    return line, headers


def expect_close(reader: FrameReader, timeout: float = 5.0) -> tuple[list[Frame], tuple[int | None, str]]:
    """Frames before the first close frame, and that close's (code, reason)."""
    before: list[Frame] = []
    deadline = time.monotonic() + timeout
    while True:
        f = reader.read_frame(timeout=max(deadline - time.monotonic(), 0.01))
        if f.opcode == OP_CLOSE:
            return before, f.close
        before.append(f)


def say_goodbye(sock: socket.socket, reader: FrameReader, timeout: float = 5.0) -> None:
    """A clean close from the client: close frame out, the gateway's close back, then EOF."""
    with sock:
        sock.sendall(frame(OP_CLOSE, (1000).to_bytes(2, "big")))
        _, (code, _) = expect_close(reader, timeout)
        assert code == 1000
        reader.wait_eof(timeout)


def echo_ok(sock: socket.socket, reader: FrameReader, text: bytes = b"ok") -> None:
    sock.sendall(frame(OP_TEXT, text))
    f = reader.read_frame(timeout=5)
    assert (f.opcode, f.payload) == (OP_TEXT, text), f


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def json_events(gw: Gateway) -> list[dict[str, Any]]:
    """The gateway's log as JSON events (format = json); other lines are skipped."""
    out = []
    for line in gw.log().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            out.append(event)
    return out


def fd_count(gw: Gateway) -> int:
    return len(os.listdir(f"/proc/{gw.proc.pid}/fd"))


# -- the main gateway ---------------------------------------------------------


@dataclass
class Main:
    gw: Gateway
    backend: Backend
    recorder: RawRecorder
    secret: str
    api_key: str
    ca: trustme.CA
    tls_nodes: dict[str, str]
    baseline_rss_kib: int
    baseline_fds: int

    @property
    def port(self) -> int:
        return self.gw.port

    def token(self, sent: Secrets, **overrides: Any) -> str:
        return sent.add(jwt.encode(claims(**overrides), self.secret, algorithm="HS256"))


def tls_upstream(cert: trustme.LeafCert) -> Backend:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    return Backend(ssl=ctx)


def main_ini(backend: Backend, recorder: RawRecorder, tls_nodes: dict[str, str], ca_pem: Path,
             keys_file: Path) -> str:
    tls_upstreams = "".join(
        f"""
        [upstream:{name}]
        nodes = {node}
        tls_ca = {ca_pem}
        connect_timeout = 2
        retries = 0

        [route:{name}]
        path = /{name}/**
        upstream = {name}
        auth = none
        """
        for name, node in tls_nodes.items()
    )
    return textwrap.dedent(
        f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1
        allowed_origins = {ALLOWED_ORIGIN}
        drain_grace = 0
        shutdown_timeout = 1

        [limits]
        max_connections_per_ip = 50
        max_message_size = 64K
        handshake_timeout = 2
        ping_interval = 0

        [auth]
        algorithms = HS256
        secret = env:WSGW_SECURITY_SECRET
        issuer = {ISSUER}
        audience = {AUDIENCE}
        leeway = 0
        query_param = access_token
        subprotocol_prefix = bearer.
        forward_claims = sub=X-User-Id roles=X-User-Roles
        api_keys_file = {keys_file}
        api_key_header = X-API-Key

        [log]
        level = debug
        format = json

        [upstream:backend]
        nodes = {backend.node()}
        connect_timeout = 2
        retries = 0

        [upstream:raw]
        nodes = {recorder.node}
        connect_timeout = 2
        retries = 0

        [route:open]
        path = /open/**
        upstream = backend
        auth = none

        [route:auth]
        path = /auth/**
        upstream = backend

        [route:admin]
        path = /admin/**
        upstream = backend
        roles = admin

        [route:origin]
        path = /origin/**
        upstream = backend
        auth = none
        allowed_origins = https://*.example.com

        [route:raw]
        path = /raw/**
        upstream = raw
        auth = none
        """
    ) + textwrap.dedent(tls_upstreams)
