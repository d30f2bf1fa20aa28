"""
Floods and limits (docs/configuration.md [limits], section 2: 429 and 503, section 3:
1008 "rate limit exceeded").

The 1 000-connection flood runs against the main gateway (max_connections_per_ip
= 50), so the survival checks see what it left behind. The rest needs other
gateway-wide limits: a module-scoped gateway that trusts 127.0.0.1 as a proxy,
allows 2 connections per client address and 5 in all, and 5 messages a
second per connection (burst 10).
"""

from __future__ import annotations

import random
import resource
import socket
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from support.gateway import Gateway, spawn_gateway
from support.rawws import OP_CLOSE, OP_TEXT, frame, FrameReader, parse_head, read_head
from support.waiting import wait_for

from .helpers import (
    Backend,
    Main,
    Secrets,
    echo_ok,
    expect_close,
    fd_count,
    handshake,
    refused,
    say_goodbye,
    uid,
    upgrade,
)

# -- the flood ------------------------------------------------------------------------


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def _attempt(port: int, path: str, spoof: bool) -> tuple[int, socket.socket | None]:
    """One handshake: (status, the socket if upgraded)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    extra = [("X-Forwarded-For", f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}")]
    sock.sendall(upgrade(path, extra if spoof else None))
    head, _ = read_head(sock, 10)
    _, code, _ = parse_head(head)
    if code == 101:
        return code, sock
    sock.close()
    return code, None


def _flood(port: int, prefix: str, n: int, *, spoof: bool = False) -> tuple[dict[int, int], list[socket.socket]]:
    """``n`` handshakes (paths PREFIX-0 ...) from 24 threads at once; the upgraded sockets are kept open."""
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda i: _attempt(port, f"{prefix}-{i}", spoof), range(n)))
    counts: dict[int, int] = {}
    for code, _ in results:
        counts[code] = counts.get(code, 0) + 1
    return counts, [s for _, s in results if s is not None]


def _close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        try:
            s.sendall(frame(OP_CLOSE, (1000).to_bytes(2, "big")))
        except OSError:
            pass
        s.close()


def test_thousand_connections_from_one_ip_get_exactly_fifty(main: Main) -> None:
    """
    1 000 concurrent handshakes from 127.0.0.1, each with a different forged
    X-Forwarded-For (the gateway trusts no proxy, so it must count them all
    against 127.0.0.1): exactly 50 upgraded, 950 refused with 429, none
    reaching the upstream. Meanwhile another loopback address is admitted,
    and once the 50 close, 127.0.0.1 has exactly its 50 slots again.
    """
    _raise_nofile(4096)
    # no connection of an earlier test still counts against 127.0.0.1
    assert wait_for(lambda: fd_count(main.gw) <= main.baseline_fds, 5)
    marker = uid("flood")
    counts, kept = _flood(main.port, f"/open/{marker}", 1000, spoof=True)
    try:
        assert counts == {101: 50, 429: 950}, counts
        # another client address is not affected by 127.0.0.1's share
        other = "/open/" + uid("other-ip")
        line, _, sock, reader = handshake(main.port, other, source="127.0.0.2")
        assert line == "HTTP/1.1 101 Switching Protocols"
        echo_ok(sock, reader)
        say_goodbye(sock, reader)
        assert main.backend.get(other).request.headers.get_all("X-Forwarded-For") == ["127.0.0.2"]
        # the upstream saw the 50 only, each with the socket's address, never a forged one
        flooded = [main.backend.seen[p] for p in main.backend.paths_with(marker)]
        assert len(flooded) == 50
        assert {tuple(s.request.headers.get_all("X-Forwarded-For")) for s in flooded} == {("127.0.0.1",)}
    finally:
        _close_all(kept)
    # every slot comes back, the 950 refused ones never took one
    deadline = time.monotonic() + 5
    while True:
        again, reopened = _flood(main.port, f"/open/{marker}-again", 51)
        _close_all(reopened)
        if again == {101: 50, 429: 1} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert again == {101: 50, 429: 1}, again


# -- the limits gateway ------------------------------------------------------------------


@dataclass
class Limited:
    gw: Gateway
    backend: Backend

    @property
    def port(self) -> int:
        return self.gw.port


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, sent: Secrets) -> Iterator[Limited]:
    backend = Backend()
    body = textwrap.dedent(
        f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1
        trusted_proxies = 127.0.0.1/32
        drain_grace = 0
        shutdown_timeout = 1

        [limits]
        max_connections = 5
        max_connections_per_ip = 2
        messages_per_second = 5
        ping_interval = 0

        [log]
        level = debug
        format = json

        [upstream:backend]
        nodes = {backend.node()}
        connect_timeout = 2
        retries = 0

        [route:all]
        path = /**
        upstream = backend
        """
    )
    gw = sent.watch(spawn_gateway(tmp_path_factory.mktemp("limited"), body, name="limited"))
    yield Limited(gw, backend)
    gw.stop()
    backend.stop()


class Held:
    """Open connections a test holds; closed cleanly at the end so the next test starts from zero."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conns: list[tuple[socket.socket, FrameReader]] = []

    def open(self, xff: str | None, *, source: str | None = None) -> str:
        extra = [("X-Forwarded-For", xff)] if xff else []
        line, _, sock, reader = handshake(self.port, "/" + uid("held"), extra, source=source)
        if line.startswith("HTTP/1.1 101"):
            self.conns.append((sock, reader))
        else:
            sock.close()
        return line

    def close(self) -> None:
        for sock, reader in self.conns:
            say_goodbye(sock, reader)
        self.conns.clear()


@pytest.fixture
def held(limited: Limited) -> Iterator[Held]:
    h = Held(limited.port)
    yield h
    h.close()


OK = "HTTP/1.1 101 Switching Protocols"
TOO_MANY = "HTTP/1.1 429 Too Many Requests"


def test_per_ip_limit_counts_the_client_behind_a_trusted_proxy(limited: Limited, held: Held) -> None:
    assert held.open("203.0.113.7") == OK
    assert held.open("203.0.113.7") == OK
    assert held.open("203.0.113.7") == TOO_MANY
    # the proxy's own address and other clients behind it have their own shares
    assert held.open("203.0.113.8") == OK
    assert held.open(None) == OK


@pytest.mark.parametrize(
    "xff",
    ["198.51.100.1, 203.0.113.7", "198.51.100.2,203.0.113.7", "not-an-ip, 203.0.113.7", "203.0.113.7, 127.0.0.1"],
    ids=["forged-left", "no-space", "garbage-left", "trusted-hop-right"],
)
def test_forged_entries_left_of_the_client_do_not_escape_its_limit(limited: Limited, held: Held, xff: str) -> None:
    """The client is the rightmost untrusted entry: what it wrote to the left of itself proves nothing."""
    assert held.open("203.0.113.7") == OK
    assert held.open("203.0.113.7") == OK
    assert held.open(xff) == TOO_MANY


def test_over_max_connections_is_503(limited: Limited, held: Held) -> None:
    for client in ("203.0.113.21", "203.0.113.22", "203.0.113.23", "203.0.113.24", "203.0.113.25"):
        assert held.open(client) == OK
    # a sixth client of its own, far from its per-IP share: the gateway is full
    assert held.open("203.0.113.26") == "HTTP/1.1 503 Service Unavailable"
    # one leaves, one more gets in (once the gateway has seen the first one go)
    sock, reader = held.conns.pop()
    say_goodbye(sock, reader)
    assert wait_for(lambda: held.open("203.0.113.26") == OK, 2)
    assert len(held.conns) == 5


def test_refused_handshakes_never_reach_the_upstream(limited: Limited, held: Held) -> None:
    assert held.open("203.0.113.31") == OK
    assert held.open("203.0.113.31") == OK
    path = "/" + uid("refused")
    line, _ = refused(limited.port, path, [("X-Forwarded-For", "203.0.113.31")])
    assert line == TOO_MANY
    time.sleep(0.05)
    assert limited.backend.paths_with(path) == []


def test_message_burst_over_the_rate_is_closed_1008(limited: Limited) -> None:
    """messages_per_second = 5, burst 10: thirty messages at once get at most the burst through, then 1008."""
    path = "/" + uid("burst")
    line, _, sock, reader = handshake(limited.port, path)
    assert line == OK
    with sock:
        sock.sendall(b"".join(frame(OP_TEXT, b"m%02d" % i) for i in range(30)))
        before, close = expect_close(reader)
        assert close == (1008, "rate limit exceeded")
        echoed = [f.payload for f in before if f.opcode == OP_TEXT]
        sock.sendall(frame(OP_CLOSE, (1008).to_bytes(2, "big")))
        reader.wait_eof(3)
    seen = limited.backend.get(path)
    assert seen.ended.wait(3)
    # the burst (10, plus at most one token refilled meanwhile), in order, and nothing after it
    assert 10 <= len(seen.received) <= 11, seen.received
    assert seen.received == [f"m{i:02d}" for i in range(len(seen.received))]
    assert echoed == [m.encode() for m in seen.received][: len(echoed)]


def test_messages_within_the_rate_are_never_closed(limited: Limited) -> None:
    """The control case: 14 messages over 1.3 s (burst 10 plus 5/s refill) all pass."""
    path = "/" + uid("steady")
    line, _, sock, reader = handshake(limited.port, path)
    assert line == OK
    for i in range(14):
        echo_ok(sock, reader, b"s%02d" % i)
        time.sleep(0.1)
    say_goodbye(sock, reader)
    assert limited.backend.get(path).received == [f"s{i:02d}" for i in range(14)]
