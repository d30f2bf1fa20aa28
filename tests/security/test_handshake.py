"""
Hostile upgrade requests against the long-lived main gateway (docs/protocol.md#handshake-statuses).

Already covered elsewhere, not repeated here: malformed key/method/HTTP/1.0
(400), wrong version (426), oversized head (431), no route (404), stalled and
trickled handshakes (tests/test_edges.py); a spoofed X-Forwarded-For from an
untrusted peer and Authorization/Cookie not forwarded (tests/test_tls_routing.py).
"""

from __future__ import annotations

import select
import socket
import time

import pytest

from support.rawws import raw_connect

from .helpers import ALLOWED_ORIGIN, Main, echo_ok, handshake, refused, say_goodbye, uid, upgrade

# -- Origin (cross-site WebSocket hijacking) ----------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "https://app.example.com.evil.example",  # the allowed origin as a prefix
        "http://app.example.com",  # same host, other scheme
        "https://app.example.com:8443",  # same host, other port
        "null",  # sandboxed iframes and file: pages
        "https://a.example.com",  # the route-level wildcard of /origin must not leak to /open
    ],
)
def test_origin_not_allowed_at_gateway_level_is_403(main: Main, origin: str) -> None:
    path = "/open/" + uid("origin")
    line, _ = refused(main.port, path, [("Origin", origin)])
    assert line == "HTTP/1.1 403 Forbidden"
    time.sleep(0.05)
    assert main.backend.paths_with(path) == []


@pytest.mark.parametrize("origin", [ALLOWED_ORIGIN, "HTTPS://APP.EXAMPLE.COM", "https://app.example.com:443", None])
def test_allowed_origin_or_no_origin_is_accepted(main: Main, origin: str | None) -> None:
    """A request without Origin is a non-browser client: allowed (a browser always sends one)."""
    path = "/open/" + uid("origin-ok")
    line, _, sock, reader = handshake(main.port, path, origin=origin)
    assert line == "HTTP/1.1 101 Switching Protocols"
    echo_ok(sock, reader)
    say_goodbye(sock, reader)
    assert main.backend.get(path).received == ["ok"]


@pytest.mark.parametrize(
    "origin, status",
    [
        ("https://a.example.com", 101),
        ("https://deep.sub.example.com", 101),
        ("https://example.com", 403),  # the apex is not a subdomain
        ("https://evilexample.com", 403),  # suffix without the dot
        ("https://example.com.evil.example", 403),
        ("http://a.example.com", 403),  # scheme is part of the origin
        ("https://a.example.com:8443", 403),
        ("https://evil.example", 403),
    ],
)
def test_route_level_wildcard_origin(main: Main, origin: str, status: int) -> None:
    path = "/origin/" + uid("wild")
    line, headers, sock, reader = handshake(main.port, path, [("Origin", origin)])
    with sock:
        assert line.split(" ")[1] == str(status), line
        if status == 101:
            echo_ok(sock, reader)
    time.sleep(0.05)
    assert (main.backend.paths_with(path) != []) == (status == 101)


# -- header values that would split or corrupt the upstream request -----------

BAD_BYTES = {
    "CR": b"\r",
    "LF": b"\n",
    "NUL": b"\x00",
    "SOH": b"\x01",
    "US": b"\x1f",
    "DEL": b"\x7f",
    "VT": b"\x0b",
    "FF": b"\x0c",
    "FS": b"\x1c",
    "GS": b"\x1d",
    "RS": b"\x1e",
    "NEL-utf8": "\x85".encode(),  # C2 85
    "NEL-latin1": b"\x85",
}


def _raw_request(path: str, header_line: bytes) -> bytes:
    req = upgrade(path)
    return req[:-2] + header_line + b"\r\n\r\n"


@pytest.mark.parametrize("name", list(BAD_BYTES))
def test_control_or_line_break_in_header_value_is_400_and_never_reaches_upstream(main: Main, name: str) -> None:
    marker = uid("inject")
    path = f"/raw/{marker}"
    line, _ = refused(main.port, path, raw=_raw_request(path, b"X-Note: a" + BAD_BYTES[name] + b"Injected: yes"))
    assert line == "HTTP/1.1 400 Bad Request"
    time.sleep(0.1)
    assert main.recorder.heads_with(marker.encode()) == []


def test_tab_in_header_value_is_fine_and_passes_byte_for_byte(main: Main) -> None:
    """The control case: HTAB is legal in a field value (RFC 9110 5.5); the route works."""
    marker = uid("tab")
    path = f"/raw/{marker}"
    line, _, sock, reader = handshake(main.port, path, raw=_raw_request(path, b"X-Note: a\tb c"))
    assert line == "HTTP/1.1 101 Switching Protocols"
    echo_ok(sock, reader)
    say_goodbye(sock, reader)
    [head] = main.recorder.heads_with(marker.encode())
    assert b"\r\nX-Note: a\tb c\r\n" in head


def test_obs_fold_does_not_create_a_header_upstream(main: Main) -> None:
    """
    RFC 9112 5.2: a server must reject obs-fold with 400 or replace it with
    spaces; either way the continuation line must never become a header
    of its own (here, a forged identity header).
    """
    marker = uid("fold")
    path = f"/raw/{marker}"
    line, _, sock, reader = handshake(main.port, path, raw=_raw_request(path, b"X-Note: a\r\n X-User-Id: admin"))
    with sock:
        assert line in ("HTTP/1.1 400 Bad Request", "HTTP/1.1 101 Switching Protocols"), line
    time.sleep(0.1)
    heads = main.recorder.heads_with(marker.encode())
    if line.startswith("HTTP/1.1 400"):
        assert heads == []
    else:
        [head] = heads
        assert b"\r\nX-User-Id:" not in head and b"\r\nx-user-id:" not in head.lower()


@pytest.mark.parametrize("bad", [b"\x00", b"\x7f", "\x85".encode()], ids=["NUL", "DEL", "NEL-utf8"])
def test_control_byte_in_request_target_is_400_and_never_reaches_upstream(main: Main, bad: bytes) -> None:
    marker = uid("target")
    raw = upgrade(f"/raw/{marker}X").replace(b"X HTTP/1.1", bad + b"x HTTP/1.1", 1)
    line, _ = refused(main.port, f"/raw/{marker}", raw=raw)
    assert line == "HTTP/1.1 400 Bad Request"
    time.sleep(0.1)
    assert main.recorder.heads_with(marker.encode()) == []


@pytest.mark.parametrize("escape", ["..", "%2e%2e", "%2E%2E", ".%2e"])
def test_dot_segments_cannot_carry_an_open_route_request_to_a_protected_path(main: Main, escape: str) -> None:
    """
    /open and /auth share one backend. ``/open/../auth/x`` must not reach it
    unauthenticated: the gateway either refuses the dot segment (400) or
    normalises the path first and then asks for a token (401); it must never
    route the raw path by its /open prefix and send it on.
    """
    marker = uid("dots")
    path = f"/open/{escape}/auth/{marker}"
    line, headers = refused(main.port, path)
    assert line in ("HTTP/1.1 400 Bad Request", "HTTP/1.1 401 Unauthorized"), line
    time.sleep(0.1)
    assert main.backend.paths_with(marker) == []


# -- slow handshakes while others are served -----------------------------------


def test_many_slow_handshakes_are_dropped_and_do_not_block_a_prompt_client(main: Main) -> None:
    """
    Forty clients send their upgrade one byte per second (fewer than the
    per-IP limit of 50, so this is about the timeout, not the limit). Each
    is dropped at handshake_timeout (2 s) with nothing written to it, no
    upstream connection is made for any of them, and a prompt client is
    served meanwhile.
    """
    marker = uid("slow")
    req = upgrade(f"/open/{marker}")
    socks = [raw_connect(main.port) for _ in range(40)]
    started = time.monotonic()
    dropped: dict[socket.socket, float] = {}
    got: dict[socket.socket, bytes] = {s: b"" for s in socks}
    try:
        for s in socks:
            s.setblocking(False)
        i = 0
        prompt_checked = False
        while len(dropped) < len(socks) and time.monotonic() - started < 6:
            for s in socks:
                if s not in dropped:
                    try:
                        s.send(req[i : i + 1])
                    except OSError:
                        dropped[s] = time.monotonic() - started
            i += 1
            if not prompt_checked and i == 1:
                path = "/open/" + uid("prompt")
                line, _, sock, reader = handshake(main.port, path)
                assert line == "HTTP/1.1 101 Switching Protocols"
                echo_ok(sock, reader)
                say_goodbye(sock, reader)
                prompt_checked = True
            next_byte = time.monotonic() + 1.0
            while time.monotonic() < next_byte and len(dropped) < len(socks):
                pending = [s for s in socks if s not in dropped]
                ready, _, _ = select.select(pending, [], [], max(next_byte - time.monotonic(), 0))
                for s in ready:
                    try:
                        chunk = s.recv(4096)
                    except OSError:
                        chunk = b""
                    if chunk:
                        got[s] += chunk
                    else:
                        dropped[s] = time.monotonic() - started
    finally:
        for s in socks:
            s.close()
    # all dropped, after a few bytes each (the request takes over a minute at a byte a second); when
    # exactly is tests/test_proxy_units.py::test_handshake_timeout_drops_a_client_that_never_finishes_its_request
    assert len(dropped) == 40, f"{40 - len(dropped)} slow clients still connected after 6 s"
    assert all(data == b"" for data in got.values()), "a slow client was sent something"
    assert main.backend.paths_with(marker) == []
