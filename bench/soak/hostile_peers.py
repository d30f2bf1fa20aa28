"""
The hostile-peer catalogue of scenario_hostile.py: raw-socket peers that
each break one rule of the edge (the hardening issue's catalogue,
tests/security/test_hostile_peers.py and its focused tests), written here
with a few raw HTTP/WebSocket helpers so that the soak does not depend on
the test suite's support code.

Each attack is a function ``(target, count) -> list of outcomes``: it
opens at most ``count`` connections (half-open floods: ``count`` x 10),
from its own loopback source addresses (127.0.K.x, never 127.0.0.1 where
the normal clients are, so the per-address limit judges the attackers and
not them), is bounded in time (each waits at most a few seconds for the
gateway), closes every socket it opened, and never raises: what the gateway
answered is an outcome string such as ``"close 1009"`` or ``"431"``. The
scenario tallies them and compares each with what the edge is documented to
answer (``EXPECTED``): an unexpected answer is reported, not judged (the
target is about normal clients and resources).
"""

from __future__ import annotations

import base64
import os
import select
import socket
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# tests/support/rawws.py: the independent frame codec the security tests check the gateway with
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from support.rawws import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, frame  # noqa: E402

KEY = base64.b64encode(b"soak-hostile-key").decode()
MIB = 1024 * 1024


@dataclass
class Target:
    port: int  # the WebSocket listener
    admin_port: int


# -- raw helpers ------------------------------------------------------------------------------------


def upgrade(path: str, extra: list[tuple[str, str]] | None = None, host: str = "127.0.0.1") -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}" for k, v in extra or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def connect(port: int, source: str, timeout: float = 5.0) -> socket.socket:
    s = socket.socket()
    s.settimeout(timeout)
    try:
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
    except OSError:
        s.close()
        raise
    return s


def read_head(s: socket.socket, timeout: float = 5.0) -> tuple[str, bytes]:
    """(status line, bytes after the head); status "" on EOF or reset, "timeout" when nothing came."""
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout", b""
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            return "timeout", b""
        except OSError:
            return "", b""
        if not chunk:
            return (buf.split(b"\r\n", 1)[0].decode("latin-1") if buf else ""), b""
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode("latin-1"), rest


def status(line: str) -> str:
    """The status code of a status line ("EOF" when the gateway closed without answering)."""
    parts = line.split(" ")
    if line in ("", "timeout"):
        return "EOF" if line == "" else "timeout"
    return parts[1] if len(parts) > 1 else line[:20]


def close_code(s: socket.socket, rest: bytes, timeout: float = 8.0) -> str:
    """Read frames until the gateway's close: "close CODE", "EOF" (no close frame) or "timeout"."""
    buf = bytearray(rest)
    deadline = time.monotonic() + timeout
    while True:
        while len(buf) >= 2:
            op, n, hl = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, hl = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, hl = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < hl + n:
                break
            payload = bytes(buf[hl:hl + n])
            del buf[:hl + n]
            if op == OP_CLOSE:
                try:  # answer it, as a client should; the gateway then ends the TCP connection
                    s.sendall(frame(OP_CLOSE, payload[:2]))
                except OSError:
                    pass
                return f"close {int.from_bytes(payload[:2], 'big')}" if len(payload) >= 2 else "close (no code)"
            if op == OP_PING:
                try:
                    s.sendall(frame(OP_PONG, payload))
                except OSError:
                    pass
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout"
        s.settimeout(left)
        try:
            chunk = s.recv(1 << 20)
        except TimeoutError:
            return "timeout"
        except OSError:
            return "reset"
        if not chunk:
            return "EOF"
        buf += chunk


def ws_open(t: Target, path: str, source: str, extra: list[tuple[str, str]] | None = None
            ) -> tuple[socket.socket, bytes] | str:
    """An upgraded raw connection (socket, bytes already read), or the refusal's status."""
    try:
        s = connect(t.port, source)
    except OSError as e:
        return f"connect failed ({e.__class__.__name__})"
    try:
        s.sendall(upgrade(path, extra))
        line, rest = read_head(s)
    except OSError:
        s.close()
        return "reset at upgrade"
    if status(line) != "101":
        s.close()
        return f"refused {status(line)}"
    return s, rest


def keep_sending(s: socket.socket, chunks: list[bytes], seconds: float) -> int:
    """Write ``chunks`` without reading, for at most ``seconds``; the bytes written before a reset or the end."""
    sent = 0
    deadline = time.monotonic() + seconds
    s.settimeout(1.0)
    for chunk in chunks:
        if time.monotonic() > deadline:
            break
        try:
            s.sendall(chunk)
        except (TimeoutError, OSError):
            break  # the gateway stopped reading (backpressure) or closed: either way, stop
        sent += len(chunk)
    return sent


def source(block: int, i: int) -> str:
    """Attack ``block``'s i-th source address: 127.0.block.(1..200)."""
    return f"127.0.{block}.{i % 200 + 1}"


# -- the catalogue ------------------------------------------------------------------------------------


def slowloris(t: Target, count: int) -> list[str]:
    """
    Request heads sent a few bytes every 0.5 s, never finished: the gateway
    must drop each one at handshake_timeout (5 s by default). Outcome: when it
    was dropped ("dropped <= 6 s", later, or "still open after 9 s").
    """
    socks: dict[socket.socket, float] = {}
    out: list[str] = []
    for i in range(count):
        try:
            s = connect(t.port, source(20, i))
            s.sendall(b"GET /echo/slowloris HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            socks[s] = time.monotonic()
        except OSError:
            out.append("refused at connect")
    deadline = time.monotonic() + 9.0
    tick = 0
    while socks and time.monotonic() < deadline:
        tick += 1
        for s in select.select(list(socks), [], [], 0.5)[0]:
            try:
                s.recv(4096)
            except OSError:
                pass
            # readable: EOF, a reset or an answer; either way the gateway is done with it
            waited = time.monotonic() - socks.pop(s)
            out.append("dropped <= 6 s" if waited <= 6.0 else "dropped later")
            s.close()
        for s in list(socks):
            try:
                s.sendall(b"X-Slow-%d: y\r\n" % tick)
            except OSError:
                pass  # read as dropped on the next select
    for s in socks:
        out.append("still open after 9 s")
        s.close()
    return out


def oversized_head(t: Target, count: int) -> list[str]:
    """A request head of 256 KiB (64 headers of 4 KiB): 431 once it passes 16 KiB, without reading the rest."""
    out = []
    head = b"GET /echo/big HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(
        b"X-Big-%d: %s\r\n" % (i, b"a" * 4096) for i in range(64))
    for i in range(count):
        try:
            with connect(t.port, source(21, i)) as s:
                keep_sending(s, [head[j:j + 16384] for j in range(0, len(head), 16384)], 3.0)
                out.append(status(read_head(s)[0]))
        except OSError:
            out.append("refused at connect")
    return out


def first_reads(socks: list[socket.socket], seconds: float) -> dict[socket.socket, bytes]:
    """What each socket first reads within ``seconds``, in the order they answer (b"" for a close or a
    reset); the ones still silent are left out."""
    got: dict[socket.socket, bytes] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(got) < len(socks):
        for s in select.select([s for s in socks if s not in got], [], [], 0.2)[0]:
            try:
                got[s] = s.recv(4096)
            except OSError:
                got[s] = b""
    return got


def half_open(t: Target, count: int) -> list[str]:
    """
    ``count`` x 10 TCP connections that never send a byte: half from one
    address (past max_connections_per_ip, 256), half spread over 50. Held 3 s,
    then closed; outcome per socket: closed by the gateway in that time or not.
    """
    socks: list[socket.socket] = []
    out: list[str] = []
    total = count * 10
    for i in range(total):
        addr = "127.0.22.1" if i < total // 2 else source(23, i)
        try:
            socks.append(connect(t.port, addr, timeout=2))
        except OSError:
            out.append("refused at connect")
    closed = len(first_reads(socks, 3.0))
    out += ["closed by the gateway within 3 s"] * closed + ["held 3 s"] * (len(socks) - closed)
    for s in socks:
        s.close()
    return out


GARBAGE = [
    lambda: os.urandom(4096),
    lambda: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(512),  # a TLS ClientHello on a plain port
    lambda: b"\x00" * 2048 + b"\r\n\r\n",
    lambda: b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\x00\x01\x02: \xff\xfe\r\n\r\n",
    lambda: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(64),  # an HTTP/2 preface
    lambda: b"GET /echo/x HTTP/9.9\r\n\r\n",
    lambda: b"\r\n" * 5000,
]


def garbage(t: Target, count: int) -> list[str]:
    """
    Bytes that are not an upgrade request before (or instead of) one: 400 or
    a close, never a hang. All ``count`` at once (some are only dropped at
    handshake_timeout, 5 s: one after the other they would make the round
    last a minute); each waits 7 s at most.
    """
    out = []
    socks: dict[socket.socket, bytes] = {}
    for i in range(count):
        try:
            s = connect(t.port, source(24, i))
            s.sendall(GARBAGE[i % len(GARBAGE)]())
            socks[s] = b""
        except OSError:
            out.append("reset")
    deadline = time.monotonic() + 7.0
    while socks and time.monotonic() < deadline:
        for s in select.select(list(socks), [], [], 0.2)[0]:
            try:
                chunk = s.recv(65536)
            except OSError:
                chunk = b""
            if chunk and b"\r\n" not in socks[s] + chunk:
                socks[s] += chunk  # the status line is not whole yet
                continue
            line = (socks.pop(s) + chunk).split(b"\r\n", 1)[0].decode("latin-1")
            out.append(status(line) if line else "EOF")
            s.close()
    for s in socks:
        out.append("timeout")
        s.close()
    return out


MALFORMED = [
    ("rsv2", frame(OP_TEXT, b"evil", rsv=2)),
    ("opcode 3", frame(0x3, b"evil")),
    ("unmasked", frame(OP_TEXT, b"evil", mask=False)),
    ("ping over 125 bytes", frame(OP_PING, b"x" * 126)),
    ("fragmented ping", frame(OP_PING, b"x", fin=False)),
    ("continuation first", frame(OP_CONT, b"evil")),
    ("close 1005", frame(OP_CLOSE, (1005).to_bytes(2, "big"))),
    ("close one byte", frame(OP_CLOSE, b"\x03")),
]


def malformed_frames(t: Target, count: int) -> list[str]:
    """Frames RFC 6455 forbids, after one valid message, on the proxy route and the broadcast route."""
    out = []
    for i in range(count):
        kind, bad = MALFORMED[i % len(MALFORMED)]
        path = "/echo/malformed" if i % 2 == 0 else f"/room/malformed{i % 3}"
        opened = ws_open(t, path, source(25, i))
        if isinstance(opened, str):
            out.append(opened)
            continue
        s, rest = opened
        with s:
            try:
                s.sendall(frame(OP_TEXT, b"valid first") + bad)
            except OSError:
                out.append("reset")
                continue
            out.append(close_code(s, rest))
    return out


def oversized_message(t: Target, count: int) -> list[str]:
    """A 64 MiB message announced (max_message_size 1M) and 4 MiB of it streamed without reading: 1009."""
    out = []
    chunk = b"\x00" * 65536
    for i in range(count):
        opened = ws_open(t, "/echo/oversized", source(26, i))
        if isinstance(opened, str):
            out.append(opened)
            continue
        s, rest = opened
        with s:
            keep_sending(s, [frame(OP_BINARY, b"", length=64 * MIB)] + [chunk] * 64, 4.0)
            out.append(close_code(s, rest))
    return out


def _bomb() -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(bytes(64 * MIB)) + c.flush(zlib.Z_SYNC_FLUSH)[:-4]


BOMB = _bomb()  # 64 MiB of zeros deflated: about 64 KiB on the wire, 64 times max_message_size inflated


def compression_bomb(t: Target, count: int) -> list[str]:
    """
    A permessage-deflate message of ~64 KiB that inflates to 64 MiB, on the
    compressed proxy route (/z, relayed compressed, its inflated size counted)
    and on the broadcast route (Autobahn inflates): 1009 at max_message_size.
    A connection whose 101 did not agree to compression sends nothing
    ("not negotiated").
    """
    out = []
    for i in range(count):
        path = "/z/bomb" if i % 2 == 0 else "/room/bomb"
        opened = ws_open(t, path, source(27, i), [("Sec-WebSocket-Extensions", "permessage-deflate")])
        if isinstance(opened, str):
            out.append(opened)
            continue
        s, rest = opened
        with s:
            keep_sending(s, [frame(OP_BINARY, BOMB, rsv=4)], 4.0)
            out.append(close_code(s, rest))
    return out


def compression_negotiated(t: Target) -> dict[str, bool]:
    """Whether /z and /room agree to permessage-deflate (checked once, so the bomb is not sent for nothing)."""
    got = {}
    for path in ("/z/check", "/room/check"):
        try:
            with connect(t.port, "127.0.27.250") as s:
                s.sendall(upgrade(path, [("Sec-WebSocket-Extensions", "permessage-deflate")]))
                buf = b""
                deadline = time.monotonic() + 5
                while b"\r\n\r\n" not in buf and time.monotonic() < deadline:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                got[path] = b"permessage-deflate" in buf.split(b"\r\n\r\n")[0].lower()
                s.sendall(frame(OP_CLOSE, (1000).to_bytes(2, "big")))
        except OSError:
            got[path] = False
    return got


def ping_flood(t: Target, count: int) -> list[str]:
    """
    20,000 pings of 125 bytes (2.6 MB) written without reading a pong, for at
    most 4 s, then a close: the pongs must be held back by the write buffer
    (the gateway stops reading this client), not pile up in memory.
    Outcome: the close answered (or not) after the flood.
    """
    out = []
    ping = frame(OP_PING, b"p" * 125)
    for i in range(count):
        opened = ws_open(t, "/echo/pingflood", source(28, i))
        if isinstance(opened, str):
            out.append(opened)
            continue
        s, rest = opened
        with s:
            sent = keep_sending(s, [ping * 100] * 200, 4.0)
            try:
                s.sendall(frame(OP_CLOSE, (1000).to_bytes(2, "big")))
            except OSError:
                out.append("reset after flood")
                continue
            # the pongs come first, then the close answer
            out.append(close_code(s, rest) + (" (all pings written)" if sent >= len(ping) * 20000 else
                                              " (writes blocked)"))
    return out


def invalid_close(t: Target, count: int) -> list[str]:
    """Close frames with forbidden codes or a reason that is not UTF-8: 1002 or 1007 from the gateway."""
    payloads = [(0).to_bytes(2, "big"), (999).to_bytes(2, "big"), (1006).to_bytes(2, "big"),
                (5000).to_bytes(2, "big"), (1000).to_bytes(2, "big") + b"bye \xff\xfe"]
    out = []
    for i in range(count):
        opened = ws_open(t, "/echo/badclose", source(29, i))
        if isinstance(opened, str):
            out.append(opened)
            continue
        s, rest = opened
        with s:
            try:
                s.sendall(frame(OP_CLOSE, payloads[i % len(payloads)]))
            except OSError:
                out.append("reset")
                continue
            out.append(close_code(s, rest))
    return out


MALFORMED_HOSTS = ["evil.example, a.internal.example", "evil.example/a.internal.example",
                   "evil.example a.internal.example", "a.internal.example:99999", "evil@a.internal.example",
                   "evil.example#a.internal.example"]


def host_tricks(t: Target, count: int) -> list[str]:
    """Host headers that are not host[:port], on the host-restricted route: 400, never the upstream."""
    out = []
    for i in range(count):
        try:
            with connect(t.port, source(30, i)) as s:
                s.sendall(upgrade("/h/tricks", host=MALFORMED_HOSTS[i % len(MALFORMED_HOSTS)]))
                out.append(status(read_head(s)[0]))
        except OSError:
            out.append("reset")
    return out


def idle_admin(t: Target, count: int) -> list[str]:
    """
    ``count`` admin connections at once that send nothing (half of them half a
    request line): past [admin] max_connections (64) the extra ones get 503;
    the held ones are closed by the gateway at its 10 s request deadline, or
    by this peer after 4 s.
    """
    socks = []
    out: list[str] = []
    for i in range(count):
        try:
            s = connect(t.admin_port, source(31, i), timeout=2)
            if i % 2:
                s.sendall(b"GET /heal")
            socks.append(s)
        except OSError:
            out.append("refused at connect")
    answered = first_reads(socks, 4.0)
    out += [status(data.split(b"\r\n", 1)[0].decode("latin-1")) if data else "EOF" for data in answered.values()]
    out += ["held 4 s"] * (len(socks) - len(answered))
    for s in socks:
        s.close()
    return out


def admin_body_without_token(t: Target, count: int) -> list[str]:
    """A POST with a 50 MiB body and no token: 401 before the body; 8 MiB sent anyway, read and dropped."""
    out = []
    head = (b"POST /admin/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (50 * MIB))
    for i in range(count):
        try:
            with connect(t.admin_port, source(32, i)) as s:
                s.sendall(head)
                line, _ = read_head(s)
                keep_sending(s, [b"x" * MIB] * 8, 3.0)
                out.append(status(line))
        except OSError:
            out.append("reset")
    return out


Attack = Callable[[Target, int], list[str]]

# name -> (attack, connections per round in full mode, in quick mode)
CATALOGUE: dict[str, tuple[Attack, int, int]] = {
    "slowloris heads": (slowloris, 20, 10),
    "oversized heads": (oversized_head, 10, 5),
    "half-open TCP": (half_open, 60, 20),
    "garbage before the upgrade": (garbage, 14, 7),
    "malformed frames": (malformed_frames, 16, 8),
    "oversized messages": (oversized_message, 3, 2),
    "compression bombs": (compression_bomb, 4, 2),
    "ping floods": (ping_flood, 3, 2),
    "invalid close frames": (invalid_close, 5, 5),
    "Host header tricks": (host_tricks, 6, 6),
    "idle admin connections": (idle_admin, 80, 80),
    "admin bodies without a token": (admin_body_without_token, 3, 2),
}

# What the edge is documented to answer (docs/protocol.md, docs/configuration.md [limits] and [admin]).
EXPECTED: dict[str, Callable[[str], bool]] = {
    "slowloris heads": lambda o: o == "dropped <= 6 s",
    "oversized heads": lambda o: o == "431",
    "half-open TCP": lambda o: o in ("closed by the gateway within 3 s", "held 3 s"),
    "garbage before the upgrade": lambda o: o in ("400", "EOF", "reset", "426", "505"),
    "malformed frames": lambda o: o in ("close 1002", "close 1007"),
    "oversized messages": lambda o: o == "close 1009",
    "compression bombs": lambda o: o == "close 1009",
    "ping floods": lambda o: o.startswith("close 1000"),
    "invalid close frames": lambda o: o in ("close 1002", "close 1007"),
    "Host header tricks": lambda o: o == "400",
    "idle admin connections": lambda o: o in ("503", "held 4 s", "EOF"),
    # 503: the idle admin peers of the same round hold every admin connection (max_connections)
    "admin bodies without a token": lambda o: o in ("401", "503"),
}
