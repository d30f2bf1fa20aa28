"""
The admin port against peers without the token (docs/configuration.md, issue 16
items 2 and 3), on the wire: bodies judged before they are read (401, 413
for Content-Length and chunked), nothing spooled to disk, the connection
cap that leaves the WebSocket listener alone, and the request deadline that
drops a slowloris. One process's port, then the parent's of workers mode.
The timings themselves: tests/unit/ops/test_admin_guard.py (on a Clock).
"""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import stat
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.sync.client import connect

from support.gateway import Gateway, Upstream, free_port, proxy_ini, serve_upstream, spawn_gateway
from support.rawws import header, parse_head, raw_connect, read_all, read_head
from support.waiting import wait_for

TOKEN = "admin-limits-token-0123456789abcdef0123"
MAX_CONNECTIONS = 4
MAX_BODY = 64 * 1024


@dataclass
class Admin:
    gw: Gateway
    port: int
    tmpdir: Path


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = serve_upstream()
    yield up
    up.server.shutdown()


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Admin]:
    folder = tmp_path_factory.mktemp("admin-limits")
    tmpdir = folder / "tmp"  # the gateway's TMPDIR: where Twisted would spool bodies
    tmpdir.mkdir()
    port = free_port()
    body = textwrap.dedent(f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1
        drain_grace = 0
        shutdown_timeout = 1

        [admin]
        listen = tcp:{port}:interface=127.0.0.1
        token = {TOKEN}
        max_connections = {MAX_CONNECTIONS}

        [log]
        format = json
        level = info

        [upstream:backend]
        nodes = {upstream.node}

        [route:all]
        path = /**
        upstream = backend
        """)
    gw = spawn_gateway(folder, body, name="admin-limits", env={"TMPDIR": str(tmpdir)})
    try:
        assert wait_for(lambda: _status(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == 200, 10)
        yield Admin(gw, port, tmpdir)
    finally:
        gw.stop()


def _status(port: int, request: bytes) -> int:
    try:
        with raw_connect(port, timeout=5) as s:
            s.sendall(request)
            head, _ = read_head(s, 5)
    except OSError:
        return -1
    return parse_head(head)[1]


def spooled(pid: int, tmpdir: Path) -> int:
    """Bytes in the regular files the process holds open in its TMPDIR (deleted temporary files included)."""
    total = 0
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
            info = os.stat(f"{fd_dir}/{fd}")
        except OSError:
            continue  # closed meanwhile
        if stat.S_ISREG(info.st_mode) and target.startswith(str(tmpdir)):
            total += info.st_size
    return total


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _post_head(length: int | None, *, token: str | None, path: str = "/admin/publish") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _error_of(sock: socket.socket, head: bytes, rest: bytes) -> dict[str, str]:
    length = int(header(parse_head(head)[2], "Content-Length")[0])
    body = rest
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return json.loads(body[:length])


# -- bodies --------------------------------------------------------------------------------


def test_a_200_mb_body_without_the_token_gets_401_and_is_never_stored(admin: Admin) -> None:
    pid = admin.gw.proc.pid
    rss_before = admin.gw.rss_kib()
    size = 200 * 1024 * 1024
    with raw_connect(admin.port, timeout=5) as s:
        s.sendall(_post_head(size, token=None))
        head, rest = read_head(s, 5)  # before a byte of the body is sent
        status_line, code, headers = parse_head(head)
        assert code == 401, head
        assert header(headers, "WWW-Authenticate") == ['Bearer realm="wsgateway-admin"']
        assert _error_of(s, head, rest) == {"error": "a valid admin bearer token is required"}
        # the client goes on sending anyway: it is read and dropped, never kept
        sent, most_spooled, most_rss = 0, 0, 0
        chunk = b"x" * (1024 * 1024)
        deadline = time.monotonic() + 20
        while sent < size and time.monotonic() < deadline:
            try:
                s.sendall(chunk)
            except OSError:
                break  # the gateway closed after lingering
            sent += len(chunk)
            if sent % (16 * len(chunk)) == 0:
                most_spooled = max(most_spooled, spooled(pid, admin.tmpdir))
                most_rss = max(most_rss, admin.gw.rss_kib())
    most_spooled = max(most_spooled, spooled(pid, admin.tmpdir))
    assert most_spooled == 0 and _dir_bytes(admin.tmpdir) == 0
    assert max(most_rss, admin.gw.rss_kib()) - rss_before < 32 * 1024, (rss_before, most_rss)
    assert _status(admin.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == 200


def test_a_content_length_over_max_body_gets_413_before_the_body(admin: Admin) -> None:
    with raw_connect(admin.port, timeout=5) as s:
        s.sendall(_post_head(MAX_BODY + 1, token=TOKEN))
        head, rest = read_head(s, 5)
        assert parse_head(head)[1] == 413, head
        assert _error_of(s, head, rest) == {"error": "request body too large"}


def test_a_chunked_body_gets_413_as_soon_as_it_passes_max_body(admin: Admin) -> None:
    with raw_connect(admin.port, timeout=5) as s:
        s.sendall(_post_head(None, token=TOKEN))
        piece = b"%x\r\n%s\r\n" % (4096, b"x" * 4096)
        for _ in range(MAX_BODY // 4096):
            s.sendall(piece)
        # exactly max_body so far: nothing to answer yet (a short wait proves a non-event)
        assert select.select([s], [], [], 0.5)[0] == []
        s.sendall(b"1\r\nx\r\n")  # one byte past it; no last chunk ever comes
        head, rest = read_head(s, 5)
        assert parse_head(head)[1] == 413, head
        assert _error_of(s, head, rest) == {"error": "request body too large"}


def test_a_small_body_with_the_token_still_works(admin: Admin) -> None:
    body = json.dumps({"level": "info"}).encode()
    request = (f"PUT /admin/log-level HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    with raw_connect(admin.port, timeout=5) as s:
        s.sendall(request)
        answer = read_all(s, 5)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{\n "level": "info"\n}\n')


# -- connections ---------------------------------------------------------------------------


def test_idle_admin_connections_beyond_the_cap_leave_websocket_upgrades_alone(admin: Admin) -> None:
    """
    With the gateway's descriptor limit 40 above what it uses, 100 idle admin
    connections would exhaust it: only max_connections are kept, the others
    get 503 at once, and a WebSocket client still gets through.
    """
    pid = admin.gw.proc.pid
    original = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 40, original[1]))
    socks: list[socket.socket] = []
    try:
        for _ in range(100):
            socks.append(raw_connect(admin.port, timeout=5))
        # the refused ones are answered at once; the held ones stay silent
        pending, answers = set(socks), []
        deadline = time.monotonic() + 8
        while len(answers) < 100 - MAX_CONNECTIONS and time.monotonic() < deadline:
            for s in select.select(list(pending), [], [], 0.2)[0]:
                answers.append(read_all(s, 5))
                pending.discard(s)
        assert len(pending) == MAX_CONNECTIONS, (len(pending), set(answers))
        # refused: 503, or closed at once by Twisted itself when one accept
        # burst found the descriptor table full (its reserved-descriptor trick)
        busy = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        assert busy and all(a == b"" for a in answers if a not in busy), set(answers)
        assert b'"error": "too many admin connections"' in busy[0]
        assert select.select(list(pending), [], [], 0.3)[0] == []
        with connect(f"ws://127.0.0.1:{admin.gw.port}/through", open_timeout=5) as ws:
            ws.send("still here")
            assert ws.recv(timeout=5) == "still here"
        assert _status(admin.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == 503
    finally:
        for s in socks:
            s.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, original)
    assert wait_for(lambda: _status(admin.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == 200, 10)


def test_a_one_byte_per_100ms_slowloris_is_dropped(admin: Admin) -> None:
    with raw_connect(admin.port, timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        dropped = False
        for _ in range(200):  # 20 s: twice the deadline (the exact one: the unit test)
            if select.select([s], [], [], 0)[0]:
                dropped = s.recv(4096) == b""
                if dropped:
                    break
            try:
                s.send(b"a")
            except OSError:
                dropped = True
                break
            time.sleep(0.1)  # the pace is what is tested
        assert dropped


# -- the parent's admin port of workers mode --------------------------------------------------


def test_the_parent_admin_port_of_workers_has_the_same_bounds(tmp_path: Path, upstream: Upstream) -> None:
    admin_port = free_port()
    listen = "listen = tcp:{port}:interface=127.0.0.1"
    body = proxy_ini(upstream.node).replace(
        listen,
        f"{listen}\n        workers = 2\n\n        [admin]\n        listen = tcp:{admin_port}:interface=127.0.0.1\n"
        f"        token = {TOKEN}\n        max_connections = 2",
    )
    gw = spawn_gateway(tmp_path, textwrap.dedent(body), name="workers-admin")
    try:
        assert wait_for(lambda: _status(admin_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == 200, 20)
        with raw_connect(admin_port, timeout=5) as s:
            s.sendall(_post_head(200 * 1024 * 1024, token=None))
            head, _ = read_head(s, 5)
            assert parse_head(head)[1] == 401, head
        with raw_connect(admin_port, timeout=5) as s:
            s.sendall(_post_head(MAX_BODY + 1, token=TOKEN))
            head, _ = read_head(s, 5)
            assert parse_head(head)[1] == 413, head
        held = [raw_connect(admin_port, timeout=5) for _ in range(2)]
        try:
            assert wait_for(lambda: _status(admin_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == 503, 5)
        finally:
            for s in held:
                s.close()
        assert wait_for(lambda: _status(admin_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == 200, 10)
    finally:
        gw.stop()
