"""
Issue 16, items 4, 6, 7, 8 and 12, on the wire (docs/protocol.md, docs/configuration.md):

- a Host that is not ``host[:port]`` gets 400 and never reaches the upstream,
  and host rules match whole labels only;
- a JWT whose ``exp``, ``nbf`` or ``iat`` is not a number gets 401;
- no client-sent ``X-Wsgateway-*`` header reaches an upstream;
- connections still in their handshake count towards
  ``max_connections_per_ip``, and past ``max_pending_handshakes`` the oldest
  are dropped;
- the token query parameter is absent upstream in every spelling.

The Host and pending cases need their own limits and a host route: a
module-scoped gateway (per-IP share 20, 40 pending at most). The rest runs
against the main gateway's ``/raw`` and ``/auth`` routes.
"""

from __future__ import annotations

import resource
import selectors
import socket
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from support.gateway import Gateway, spawn_gateway
from support.rawws import raw_connect, upgrade_request
from support.waiting import wait_for

from .helpers import MALFORMED_HOSTS, Main, RawRecorder, Secrets, echo_ok, handshake, refused, say_goodbye, uid

PER_IP = 20
MAX_PENDING = 40
OK = "HTTP/1.1 101 Switching Protocols"


@dataclass
class Edge:
    gw: Gateway
    recorder: RawRecorder

    @property
    def port(self) -> int:
        return self.gw.port


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, sent: Secrets) -> Iterator[Edge]:
    recorder = RawRecorder()
    body = textwrap.dedent(
        f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1
        drain_grace = 0
        shutdown_timeout = 1

        [limits]
        max_connections_per_ip = {PER_IP}
        max_pending_handshakes = {MAX_PENDING}
        handshake_timeout = 10
        ping_interval = 0

        [log]
        level = info
        format = json

        [upstream:raw]
        nodes = {recorder.node}
        connect_timeout = 2
        retries = 0

        [route:internal]
        path = /h/**
        host = *.internal.example
        upstream = raw

        [route:open]
        path = /open/**
        upstream = raw
        """
    )
    gw = sent.watch(spawn_gateway(tmp_path_factory.mktemp("edge"), body, name="edge"))
    yield Edge(gw, recorder)
    gw.stop()
    recorder.stop()


def _status(port: int, path: str, host: str) -> str:
    line, _ = refused(port, path, raw=upgrade_request(path, host=host))
    return line


# -- Host (item 4) ---------------------------------------------------------------------


@pytest.mark.parametrize("host", MALFORMED_HOSTS)
def test_malformed_host_is_400_and_never_reaches_the_upstream(edge: Edge, host: str) -> None:
    marker = uid("host")
    assert _status(edge.port, f"/h/{marker}", host) == "HTTP/1.1 400 Bad Request"
    assert _status(edge.port, f"/open/{marker}", host) == "HTTP/1.1 400 Bad Request"  # every route, not only host ones
    time.sleep(0.1)
    assert edge.recorder.heads_with(marker.encode()) == []


@pytest.mark.parametrize("host", ["a.internal.example", "A.Internal.Example:8443", "b.a.internal.example."])
def test_valid_host_reaches_the_host_route_as_x_forwarded_host(edge: Edge, host: str) -> None:
    marker = uid("host-ok")
    path = f"/h/{marker}"
    line, _, sock, reader = handshake(edge.port, path, raw=upgrade_request(path, host=host))
    assert line == OK
    echo_ok(sock, reader)
    say_goodbye(sock, reader)
    [head] = edge.recorder.heads_with(marker.encode())
    assert f"\r\nX-Forwarded-Host: {host}\r\n".encode() in head


@pytest.mark.parametrize("host", ["evilinternal.example", "internal.example", "a.internal.example.evil.example"])
def test_host_rule_matches_whole_labels_only(edge: Edge, host: str) -> None:
    marker = uid("host-404")
    assert _status(edge.port, f"/h/{marker}", host) == "HTTP/1.1 404 Not Found"
    time.sleep(0.05)
    assert edge.recorder.heads_with(marker.encode()) == []


# -- connections still in their handshake (item 8) --------------------------------------


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def _closed_by_gateway(socks: list[socket.socket], seconds: float, enough: int | None = None) -> dict[int, bytes]:
    """
    Which of ``socks`` the gateway closed within ``seconds`` (or once
    ``enough`` of them are): index -> what it sent first (b"" for a reset).
    """
    sel = selectors.DefaultSelector()
    got: dict[int, bytes] = {}
    for i, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    bufs = {i: b"" for i in range(len(socks))}
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and (enough is None or len(got) < enough):
            for key, _ in sel.select(timeout=0.1):
                i = key.data
                try:
                    chunk = socks[i].recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if chunk:
                    bufs[i] += chunk
                    continue
                got[i] = bufs[i]
                sel.unregister(socks[i])
    finally:
        sel.close()
        for s in socks:
            s.setblocking(True)
    return got


def _close(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def test_half_open_sockets_count_towards_max_connections_per_ip(edge: Edge) -> None:
    """
    300 connections from one address that never send a request, against a
    share of 20: 20 wait for their request (handshake_timeout, 10 s here),
    the other 280 are dropped, at once or after a short grace. Meanwhile a
    client of this address that does send its request gets 429, another
    address is served, and once the 20 go this address has its share again.
    """
    _raise_nofile(2048)
    socks: list[socket.socket] = []
    try:
        for _ in range(300):
            socks.append(raw_connect(edge.port, timeout=5))
        closed = _closed_by_gateway(socks, 8, enough=300 - PER_IP)
        assert len(closed) == 300 - PER_IP, len(closed)
        assert set(closed.values()) == {b""}  # dropped without an answer: they never asked anything
        waiting = [s for i, s in enumerate(socks) if i not in closed]
        assert _closed_by_gateway(waiting, 0.5) == {}  # the 20 are held, not dropped
        # a normal client from another address is served meanwhile
        path = "/open/" + uid("other-ip")
        line, _, sock, reader = handshake(edge.port, path, origin=None, source="127.0.0.2")
        assert line == OK
        echo_ok(sock, reader)
        say_goodbye(sock, reader)
        # this address is at its share: its own client, request sent, gets its 429
        line, _ = refused(edge.port, "/open/" + uid("same-ip"), origin=None)
        assert line == "HTTP/1.1 429 Too Many Requests"
    finally:
        _close(socks)

    def served() -> bool:
        line, _, sock, reader = handshake(edge.port, "/open/" + uid("back"), origin=None)
        if line != OK:
            sock.close()
            return False
        echo_ok(sock, reader)
        say_goodbye(sock, reader)
        return True

    assert wait_for(served, 5), "the half-open sockets' places never came back"


def test_past_max_pending_handshakes_the_oldest_are_dropped(edge: Edge) -> None:
    """
    40 half-open sockets from 40 addresses (each well within its share), then
    5 more: the 5 oldest are dropped, the others held; a normal client still
    gets through (at the cost of the next oldest).
    """
    time.sleep(0.3)  # the previous test's sockets are gone from the gateway's count
    socks: list[socket.socket] = []
    try:
        for i in range(MAX_PENDING):
            socks.append(raw_connect(edge.port, timeout=5, source=f"127.0.3.{i + 1}"))
        time.sleep(0.3)  # all 40 accepted, in this order, before the next ones
        assert _closed_by_gateway(socks, 0.3) == {}
        for i in range(5):
            socks.append(raw_connect(edge.port, timeout=5, source=f"127.0.4.{i + 1}"))
        closed = _closed_by_gateway(socks, 5, enough=5)
        assert sorted(closed) == [0, 1, 2, 3, 4], sorted(closed)
        assert set(closed.values()) == {b""}  # dropped without an answer
        assert _closed_by_gateway([s for i, s in enumerate(socks) if i not in closed], 0.5) == {}
        path = "/open/" + uid("normal")
        line, _, sock, reader = handshake(edge.port, path, origin=None, source="127.0.0.2")
        assert line == OK
        echo_ok(sock, reader)
        say_goodbye(sock, reader)
    finally:
        _close(socks)


# -- X-Wsgateway-* from clients (item 7) ---------------------------------------------------


def test_client_x_wsgateway_headers_never_reach_an_at_most_once_upstream(main: Main) -> None:
    marker = uid("xwsgw")
    path = f"/raw/{marker}"
    forged = [("X-Wsgateway-Conn-Id", "forged-conn"), ("X-Wsgateway-Seq", "999"),
              ("X-Wsgateway-Replay", "1"), ("x-wsgateway-anything", "forged")]
    line, _, sock, reader = handshake(main.port, path, forged + [("X-App", "kept")])
    assert line == OK
    echo_ok(sock, reader)
    say_goodbye(sock, reader)
    [head] = main.recorder.heads_with(marker.encode())
    assert b"x-wsgateway-" not in head.lower()
    assert b"forged" not in head
    assert b"\r\nX-App: kept\r\n" in head


# -- NumericDate (item 6) -------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"exp": "4102444800"},  # 2100-01-01, as a string
        {"exp": str(int(time.time()) + 300)},
        {"nbf": "0"},
        {"iat": "0"},
        {"iat": True},
    ],
    ids=["exp-far-string", "exp-string", "nbf-string", "iat-string", "iat-bool"],
)
def test_time_claim_that_is_not_a_number_is_401(main: Main, sent: Secrets, overrides: dict[str, object]) -> None:
    token = main.token(sent, **overrides)
    path = "/auth/" + uid("numericdate")
    line, headers = refused(main.port, path, [("Authorization", f"Bearer {token}")])
    assert line == "HTTP/1.1 401 Unauthorized"
    time.sleep(0.05)
    assert main.backend.paths_with(path) == []


# -- the token query parameter (item 12) -----------------------------------------------------

TOKEN_SPELLINGS = ["access_token", ";access_token", "ACCESS_TOKEN", "Access_Token", "access_token[]",
                   "access_token%5B%5D", "access_token[0]", "access%5Ftoken", "access.token", "access+token"]


@pytest.mark.parametrize("name", TOKEN_SPELLINGS)
def test_token_parameter_in_any_spelling_is_absent_upstream(main: Main, sent: Secrets, name: str) -> None:
    token = main.token(sent)
    marker = uid("tokparam")
    path = f"/raw/{marker}"
    sep = "" if name.startswith(";") else "&"
    line, _, sock, reader = handshake(main.port, f"{path}?room=1{sep}{name}={token}&b=2")
    assert line == OK
    echo_ok(sock, reader)
    say_goodbye(sock, reader)
    [head] = main.recorder.heads_with(marker.encode())
    request_line = head.split(b"\r\n", 1)[0]
    assert request_line == f"GET {path}?room=1&b=2 HTTP/1.1".encode(), request_line
    assert token.encode() not in head and token.split(".")[2].encode() not in head
