"""
Shared fixtures: real sockets on loopback only.

The gateway runs as a real ``twistd`` process built from this working tree;
upstreams and clients are the ``websockets`` library (an independent
implementation), run in threads.
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.server import Server, ServerConnection, serve

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; its last truth."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def source_env(**extra: str) -> dict[str, str]:
    """Environment that makes a subprocess run this working tree's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


@dataclass
class Gateway:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    ini_path: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """
    start_gateway(ini_body, port=None) -> Gateway: writes the INI (``{port}``
    in it is replaced by the gateway's port), runs ``twistd -n wsgateway``
    and waits until it listens.
    """
    started: list[Gateway] = []

    def start(body: str, *, port: int | None = None, scheme_port: int | None = None, env: dict[str, str] | None = None) -> Gateway:
        return spawn_gateway(tmp_path, textwrap.dedent(body), env=env, name=f"gw-{len(started)}", port=port,
                             scheme_port=scheme_port, on_spawn=started.append)

    yield start
    for gw in started:
        gw.stop()


def spawn_gateway(
    tmpdir: Path,
    body: str,
    *,
    env: dict[str, str] | None = None,
    name: str = "gw",
    port: int | None = None,
    scheme_port: int | None = None,
    on_spawn: Callable[[Gateway], object] | None = None,
) -> Gateway:
    """
    Like ``start_gateway``, for module- and session-scoped fixtures; the
    caller stops it. ``{port}`` in the body becomes the gateway's port;
    ``scheme_port`` is the port to wait for when that is another listener.
    """
    port = port or free_port()
    ini = tmpdir / f"{name}.ini"
    ini.write_text(body.replace("{port}", str(port)))
    log_path = tmpdir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "wsgateway", "--config", str(ini)],
            cwd=tmpdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=source_env(**(env or {})),
        )
    gw = Gateway(port=port, proc=proc, log_path=log_path, ini_path=ini)
    if on_spawn is not None:
        on_spawn(gw)
    try:
        wait_port(scheme_port or port, proc=proc)
    except Exception:
        gw.stop()
        raise RuntimeError(f"gateway did not start:\n{gw.log()}") from None
    return gw


@dataclass
class Upstream:
    """A websockets server in a thread, recording what it saw."""

    server: Server
    port: int
    requests: list[Any] = field(default_factory=list)
    closes: list[tuple[int | None, str | None]] = field(default_factory=list)
    received: list[Any] = field(default_factory=list)
    connections: list[ServerConnection] = field(default_factory=list)

    @property
    def node(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


@pytest.fixture
def make_upstream() -> Iterator[Callable[..., Upstream]]:
    """
    make_upstream(handler=echo, **serve_kwargs) -> Upstream. The handler gets
    (upstream, connection).
    """
    servers: list[Upstream] = []

    def make(handler: Callable[[Upstream, ServerConnection], None] | None = None, **kwargs: Any) -> Upstream:
        up = serve_upstream(handler, **kwargs)
        servers.append(up)
        return up

    yield make
    for up in servers:
        up.server.shutdown()


def echo_handler(up: Upstream, ws: ServerConnection) -> None:
    for msg in ws:
        up.received.append(msg)
        ws.send(msg)


def serve_upstream(handler: Callable[[Upstream, ServerConnection], None] | None = None, **kwargs: Any) -> Upstream:
    """What ``make_upstream`` makes, for wider-scoped fixtures: the caller calls ``up.server.shutdown()``."""
    handler = handler or echo_handler
    holder: dict[str, Upstream] = {}

    def run(ws: ServerConnection) -> None:
        up = holder["up"]
        up.requests.append(ws.request)
        up.connections.append(ws)
        try:
            handler(up, ws)
        except Exception:
            pass
        finally:
            up.closes.append((ws.close_code, ws.close_reason))

    kwargs.setdefault("max_size", None)
    kwargs.setdefault("compression", None)
    server = serve(run, "127.0.0.1", 0, **kwargs)
    up = Upstream(server=server, port=server.socket.getsockname()[1])
    holder["up"] = up
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return up


def proxy_ini(node: str, *, extra_route: str = "", limits: str = "", upstream: str = "", routes: str = "") -> str:
    """A one-route gateway config in front of ``node``."""
    return f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1

        [limits]
        max_message_size = 32M
        {limits}

        [log]
        level = info
        format = text

        [upstream:backend]
        nodes = {node}
        connect_timeout = 2
        retries = 0
        {upstream}

        [route:main]
        path = /**
        upstream = backend
        {extra_route}
        {routes}
        """


# -- raw WebSocket by hand (shared by test_edges and tests/security) -------
#
# Clients written with ``socket``: the HTTP upgrade and the frames byte by
# byte, so a test can break the protocol on purpose and no client library
# "helps".

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
