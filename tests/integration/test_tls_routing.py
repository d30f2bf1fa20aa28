"""
TLS on both legs, routing wiring, forwarded headers and several upstream
nodes, end to end: a real ``twistd`` gateway between the ``websockets``
library as client and as upstream, over loopback sockets only (docs/configuration.md,
docs/protocol.md).

Clients always dial 127.0.0.1 (``sock=``) and put the wanted name in the URL,
so ``Host`` and the TLS server name are what the test says without any name
lookup leaving loopback.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
import trustme
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from support.gateway import free_port
from support.tlsclient import drained

MiB = 1024 * 1024


# -- helpers ----------------------------------------------------------------


def gateway_ini(
    *,
    upstreams: dict[str, tuple[list[str], str]],
    routes: dict[str, str],
    listen: str = "tcp:{port}:interface=127.0.0.1",
    gateway: str = "",
) -> str:
    """
    An INI with every key at column 0 (indented lines would be continuation
    lines). ``upstreams``: name -> (node URLs, extra key lines); ``routes``:
    name -> key lines.
    """
    lines = [
        "[gateway]",
        f"listen = {listen}",
        gateway,
        "",
        "[limits]",
        "max_message_size = 32M",
        "",
        "[log]",
        "level = info",
        "format = text",
        "",
    ]
    for name, (nodes, extra) in upstreams.items():
        lines += [f"[upstream:{name}]", "nodes ="] + [f"    {n}" for n in nodes]
        lines += ["connect_timeout = 2", extra if "retries" in extra else "retries = 0\n" + extra, ""]
    for name, body in routes.items():
        lines += [f"[route:{name}]", body, ""]
    return "\n".join(lines) + "\n"


def one_route_ini(node: str, *, route: str = "", upstream: str = "", listen: str | None = None, gateway: str = "") -> str:
    kwargs: dict[str, Any] = {}
    if listen is not None:
        kwargs["listen"] = listen
    return gateway_ini(
        upstreams={"backend": ([node], upstream)},
        routes={"main": "path = /**\nupstream = backend\n" + route},
        gateway=gateway,
        **kwargs,
    )


def dial(
    port: int,
    path: str = "/",
    *,
    host: str = "127.0.0.1",
    ssl_ctx: ssl.SSLContext | None = None,
    **kwargs: Any,
) -> ClientConnection:
    """Open a client connection to 127.0.0.1:port with ``Host: host:port`` (and SNI ``host`` for wss)."""
    scheme = "wss" if ssl_ctx is not None else "ws"
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    kwargs.setdefault("max_size", None)
    kwargs.setdefault("compression", None)
    kwargs.setdefault("open_timeout", 10)
    try:
        return connect(f"{scheme}://{host}:{port}{path}", sock=sock, ssl=ssl_ctx and drained(ssl_ctx), **kwargs)
    except BaseException:
        sock.close()
        raise


def echo_once(port: int, path: str = "/", message: str | bytes = "ping", **kwargs: Any) -> None:
    with dial(port, path, **kwargs) as ws:
        ws.send(message)
        assert ws.recv(timeout=10) == message


def refused_status(port: int, path: str = "/", **kwargs: Any) -> int:
    """The HTTP status of a handshake that must be refused."""
    with pytest.raises(InvalidStatus) as e:
        dial(port, path, **kwargs).close()
    return e.value.response.status_code


def write_leaf(tmp_path: Path, cert: trustme.LeafCert, stem: str) -> tuple[Path, Path]:
    key_path = tmp_path / f"{stem}.key.pem"
    cert_path = tmp_path / f"{stem}.cert.pem"
    cert.private_key_pem.write_to_path(str(key_path))
    key_path.chmod(0o600)  # trustme writes 0644; a private key must be private (docs/configuration.md)
    with open(cert_path, "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    return key_path, cert_path


def write_ca(tmp_path: Path, ca: trustme.CA, stem: str) -> Path:
    path = tmp_path / f"{stem}.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def server_context(cert: trustme.LeafCert, *, client_ca: trustme.CA | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        client_ca.configure_trust(ctx)
    return ctx


def client_context(ca: trustme.CA | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if ca is not None:
        ca.configure_trust(ctx)
    return ctx


def paths(up: Any) -> list[str]:
    return [r.path for r in up.requests]


def recording_refusal(status: HTTPStatus, seen: list[str]) -> Callable[..., Any]:
    def process_request(connection: Any, request: Any) -> Any:
        seen.append(request.path)
        return connection.respond(status, "no\n")

    return process_request


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


# -- 1. TLS listener ----------------------------------------------------------


@pytest.fixture
def tls_gateway(tmp_path, ca, make_upstream, start_gateway):
    key, cert = write_leaf(tmp_path, ca.issue_cert("localhost", "127.0.0.1"), "gw-server")
    up = make_upstream()
    gw = start_gateway(
        one_route_ini(up.node, listen=f"ssl:{{port}}:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    )
    return up, gw


def test_tls_listener_echoes_text_and_1mib_binary(tls_gateway, ca):
    up, gw = tls_gateway
    big = bytes(range(256)) * (MiB // 256)
    with dial(gw.port, "/secure/echo?q=1", host="localhost", ssl_ctx=client_context(ca)) as ws:
        assert isinstance(ws.socket, ssl.SSLSocket)
        ws.send("héllo over tls")
        got_text = ws.recv(timeout=10)
        ws.send(big)
        got_big = ws.recv(timeout=30)
    assert got_text == "héllo over tls"
    assert type(got_big) is bytes and len(got_big) == MiB and got_big == big
    assert up.received == ["héllo over tls", big]
    assert len(up.requests) == 1
    req = up.requests[0]
    assert req.path == "/secure/echo?q=1"
    assert req.headers.get_all("X-Forwarded-Proto") == ["https"]
    assert req.headers["X-Forwarded-Host"] == f"localhost:{gw.port}"


def test_tls_listener_rejects_client_that_does_not_trust_the_ca(tls_gateway, ca):
    up, gw = tls_gateway
    with pytest.raises(ssl.SSLCertVerificationError):
        dial(gw.port, "/x", host="localhost", ssl_ctx=client_context(None))
    # a CA the client trusts, but not the one that issued the gateway's certificate
    with pytest.raises(ssl.SSLCertVerificationError):
        dial(gw.port, "/x", host="localhost", ssl_ctx=client_context(trustme.CA()))
    assert up.requests == []
    # the listener is still fine for a client that trusts it
    echo_once(gw.port, "/x", host="localhost", ssl_ctx=client_context(ca))


# -- 2. wss upstreams -----------------------------------------------------------


def _wss_gateway(tmp_path, make_upstream, start_gateway, *, server_cert, trust_ca, client_ca=None, gw_cert=None, handler=None):
    up = make_upstream(handler, ssl=server_context(server_cert, client_ca=client_ca))
    extra = f"tls_ca = {write_ca(tmp_path, trust_ca, 'upstream-trust')}\n"
    if gw_cert is not None:
        key, cert = write_leaf(tmp_path, gw_cert, "gw-client")
        extra += f"tls_cert = {cert}\ntls_key = {key}\n"
    gw = start_gateway(one_route_ini(f"wss://localhost:{up.port}", upstream=extra))
    return up, gw


def test_wss_upstream_verified_against_tls_ca(tmp_path, ca, make_upstream, start_gateway):
    up, gw = _wss_gateway(
        tmp_path, make_upstream, start_gateway, server_cert=ca.issue_cert("localhost"), trust_ca=ca
    )
    big = b"\x5a" * MiB
    with dial(gw.port, "/over/wss") as ws:
        ws.send("text via wss")
        assert ws.recv(timeout=10) == "text via wss"
        ws.send(big)
        assert ws.recv(timeout=30) == big
    assert up.received == ["text via wss", big]
    assert paths(up) == ["/over/wss"]
    # the listener is plain tcp here
    assert up.requests[0].headers["X-Forwarded-Proto"] == "http"


def test_wss_upstream_with_untrusted_ca_is_502(tmp_path, ca, make_upstream, start_gateway):
    up, gw = _wss_gateway(
        tmp_path, make_upstream, start_gateway, server_cert=ca.issue_cert("localhost"), trust_ca=trustme.CA()
    )
    assert refused_status(gw.port, "/x") == 502
    assert up.requests == []


def test_wss_upstream_with_certificate_for_another_host_is_502(tmp_path, ca, make_upstream, start_gateway):
    up, gw = _wss_gateway(
        tmp_path, make_upstream, start_gateway, server_cert=ca.issue_cert("other.example"), trust_ca=ca
    )
    assert refused_status(gw.port, "/x") == 502
    assert up.requests == []


def test_wss_upstream_mtls_with_client_certificate(tmp_path, ca, make_upstream, start_gateway):
    peers: list[Any] = []

    def echo_recording_peer(up, ws):
        peers.append(ws.socket.getpeercert())
        for msg in ws:
            up.received.append(msg)
            ws.send(msg)

    up, gw = _wss_gateway(
        tmp_path,
        make_upstream,
        start_gateway,
        server_cert=ca.issue_cert("localhost"),
        trust_ca=ca,
        client_ca=ca,
        gw_cert=ca.issue_cert("gateway"),
        handler=echo_recording_peer,
    )
    echo_once(gw.port, "/mtls", "with a client certificate")
    assert paths(up) == ["/mtls"]
    assert len(peers) == 1
    sans = peers[0].get("subjectAltName", ())
    assert ("DNS", "gateway") in sans


def test_wss_upstream_mtls_without_client_certificate_is_502(tmp_path, ca, make_upstream, start_gateway):
    up, gw = _wss_gateway(
        tmp_path, make_upstream, start_gateway, server_cert=ca.issue_cert("localhost"), trust_ca=ca, client_ca=ca
    )
    assert refused_status(gw.port, "/x") == 502
    assert up.requests == []


# -- 3. routing through the daemon --------------------------------------------


@pytest.fixture
def routed(make_upstream, start_gateway):
    ups = {name: make_upstream() for name in ("chat", "rooms", "hosted", "blue", "default")}
    body = gateway_ini(
        upstreams={name: ([up.node], "") for name, up in ups.items()},
        routes={
            "chat": "path = /chat/**\nupstream = chat\nstrip_prefix = yes",
            "rooms": "path = /rooms/{room}\nupstream = rooms\nupstream_path = /r/{room}",
            # same path as "default": host and headers decide, then file order
            "hosted": "path = /app/**\nhost = *.example.com\nupstream = hosted",
            "blue": "path = /app/**\nheaders = X-Tenant=blue\nupstream = blue",
            "default": "path = /app/**\nupstream = default",
        },
    )
    return ups, start_gateway(body)


def test_route_strip_prefix_keeps_rest_and_query(routed):
    ups, gw = routed
    echo_once(gw.port, "/chat/a/b?x=1")
    echo_once(gw.port, "/chat")
    assert paths(ups["chat"]) == ["/a/b?x=1", "/"]
    assert all(up.requests == [] for name, up in ups.items() if name != "chat")


def test_route_upstream_path_template(routed):
    ups, gw = routed
    echo_once(gw.port, "/rooms/lobby")
    assert paths(ups["rooms"]) == ["/r/lobby"]
    assert all(up.requests == [] for name, up in ups.items() if name != "rooms")


def test_token_query_param_is_never_forwarded(routed):
    # docs/configuration.md: query_param (default access_token) is "never logged, never
    # forwarded"; "The query string is forwarded to the upstream, minus the
    # token parameter." There is no [auth] section in this config.
    ups, gw = routed
    echo_once(gw.port, "/rooms/lobby?access_token=SECRET&y=2")
    echo_once(gw.port, "/chat/c?y=3&access_token=SECRET")
    assert paths(ups["rooms"]) == ["/r/lobby?y=2"]
    assert paths(ups["chat"]) == ["/c?y=3"]
    assert "SECRET" not in gw.log()


def test_host_routing(routed):
    ups, gw = routed
    echo_once(gw.port, "/app/x", host="a.example.com")
    echo_once(gw.port, "/app/y", host="example.com")  # not a subdomain of example.com
    echo_once(gw.port, "/app/z")  # Host: 127.0.0.1:PORT
    assert paths(ups["hosted"]) == ["/app/x"]
    assert ups["hosted"].requests[0].headers["X-Forwarded-Host"] == f"a.example.com:{gw.port}"
    assert paths(ups["default"]) == ["/app/y", "/app/z"]
    assert ups["blue"].requests == []


def test_header_routing(routed):
    ups, gw = routed
    echo_once(gw.port, "/app/t", additional_headers={"X-Tenant": "blue"})
    echo_once(gw.port, "/app/u", additional_headers={"X-Tenant": "green"})
    assert paths(ups["blue"]) == ["/app/t"]
    # the routing header itself is an ordinary client header: forwarded
    assert ups["blue"].requests[0].headers["X-Tenant"] == "blue"
    assert paths(ups["default"]) == ["/app/u"]
    assert ups["hosted"].requests == []


@pytest.mark.parametrize("path", ["/nothing", "/rooms/lobby/extra", "/rooms", "/chatroom"])
def test_unmatched_is_404(routed, path):
    ups, gw = routed
    assert refused_status(gw.port, path) == 404
    assert all(up.requests == [] for up in ups.values())


# -- 4. forwarded headers -------------------------------------------------------

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"


@pytest.fixture
def header_gateway(make_upstream, start_gateway):
    plain, fwd = make_upstream(), make_upstream()
    body = gateway_ini(
        upstreams={"plain": ([plain.node], ""), "fwd": ([fwd.node], "")},
        routes={
            "plain": "path = /plain/**\nupstream = plain",
            "fwd": "path = /fwd/**\nupstream = fwd\nforward_auth = yes",
        },
    )
    return plain, fwd, start_gateway(body)


def test_identity_headers_added(header_gateway):
    plain, _, gw = header_gateway
    echo_once(gw.port, "/plain/a")
    h = plain.requests[0].headers
    assert h.get_all("X-Forwarded-For") == ["127.0.0.1"]
    assert h.get_all("X-Forwarded-Host") == [f"127.0.0.1:{gw.port}"]
    assert h.get_all("X-Forwarded-Proto") == ["http"]
    assert re.fullmatch(r"[0-9a-f]{32}", h["X-Request-ID"]), h["X-Request-ID"]
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", h["traceparent"]), h["traceparent"]


def test_client_request_id_and_trace_id_kept(header_gateway):
    plain, _, gw = header_gateway
    echo_once(
        gw.port,
        "/plain/a",
        additional_headers={"X-Request-ID": "req-42.abc", "traceparent": f"00-{TRACE_ID}-{CLIENT_PARENT}-01"},
    )
    echo_once(gw.port, "/plain/b", additional_headers={"X-Request-ID": "has spaces and ; semicolons"})
    first, second = (r.headers for r in plain.requests)
    assert first.get_all("X-Request-ID") == ["req-42.abc"]
    [tp] = first.get_all("traceparent")
    version, trace_id, parent, flags = tp.split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert re.fullmatch(r"[0-9a-f]{16}", parent) and parent != CLIENT_PARENT
    # an insane request id is replaced, not passed on
    [rid] = second.get_all("X-Request-ID")
    assert rid != "has spaces and ; semicolons"
    assert re.fullmatch(r"[A-Za-z0-9._:+=/-]{1,128}", rid)
    # a new trace when the client sent none
    assert second["traceparent"].split("-")[1] != TRACE_ID


CREDS = {"Authorization": "Bearer client-secret-token", "Cookie": "session=abc123; theme=dark"}


def test_authorization_and_cookie_not_forwarded_by_default(header_gateway):
    plain, _, gw = header_gateway
    echo_once(gw.port, "/plain/a", additional_headers={**CREDS, "X-Custom": "kept"})
    h = plain.requests[0].headers
    assert "Authorization" not in h
    assert "Cookie" not in h
    assert h["X-Custom"] == "kept"


def test_authorization_and_cookie_forwarded_with_forward_auth(header_gateway):
    _, fwd, gw = header_gateway
    echo_once(gw.port, "/fwd/a", additional_headers=CREDS)
    h = fwd.requests[0].headers
    assert h.get_all("Authorization") == [CREDS["Authorization"]]
    assert h.get_all("Cookie") == [CREDS["Cookie"]]


def test_client_x_forwarded_for_not_believed_without_trusted_proxies(header_gateway):
    plain, _, gw = header_gateway
    echo_once(
        gw.port,
        "/plain/a",
        additional_headers={"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"},
    )
    h = plain.requests[0].headers
    assert h.get_all("X-Forwarded-For") == ["127.0.0.1"]
    assert h.get_all("X-Forwarded-Proto") == ["http"]
    assert h.get_all("X-Forwarded-Host") == [f"127.0.0.1:{gw.port}"]


def test_client_x_forwarded_for_extended_from_trusted_proxy(make_upstream, start_gateway):
    up = make_upstream()
    gw = start_gateway(one_route_ini(up.node, gateway="trusted_proxies = 127.0.0.0/8"))
    echo_once(gw.port, "/a", additional_headers={"X-Forwarded-For": "6.6.6.6"})
    assert up.requests[0].headers.get_all("X-Forwarded-For") == ["6.6.6.6, 127.0.0.1"]


# -- 5. several nodes -------------------------------------------------------------


def test_round_robin_over_two_nodes(make_upstream, start_gateway):
    a, b = make_upstream(), make_upstream()
    gw = start_gateway(gateway_ini(upstreams={"pair": ([a.node, b.node], "")}, routes={"r": "path = /**\nupstream = pair"}))
    for i in range(10):
        echo_once(gw.port, f"/n{i}")
    assert len(a.requests) == 5
    assert len(b.requests) == 5
    # strictly alternating
    got = sorted([(int(p[2:]), "a") for p in paths(a)] + [(int(p[2:]), "b") for p in paths(b)])
    owners = [o for _, o in got]
    assert all(owners[i] != owners[i + 1] for i in range(9)), owners


def test_retry_goes_to_the_other_node_when_one_is_down(make_upstream, start_gateway):
    live = make_upstream()
    dead = f"ws://127.0.0.1:{free_port()}"
    gw = start_gateway(
        gateway_ini(
            upstreams={"pair": ([dead, live.node], "retries = 2\nbackoff_initial = 0.05\nbackoff_max = 0.2")},
            routes={"r": "path = /**\nupstream = pair"},
        )
    )
    for i in range(10):
        echo_once(gw.port, f"/n{i}")
    assert paths(live) == [f"/n{i}" for i in range(10)]


def test_all_nodes_down_is_502(start_gateway):
    dead1, dead2 = f"ws://127.0.0.1:{free_port()}", f"ws://127.0.0.1:{free_port()}"
    gw = start_gateway(
        gateway_ini(
            upstreams={"pair": ([dead1, dead2], "retries = 2\nbackoff_initial = 0.05\nbackoff_max = 0.2")},
            routes={"r": "path = /**\nupstream = pair"},
        )
    )
    for _ in range(2):
        assert refused_status(gw.port, "/x") == 502


def test_upstream_403_passed_through_and_not_retried(make_upstream, start_gateway):
    refused: list[str] = []
    accepted: list[str] = []

    def accept(connection, request):
        accepted.append(request.path)
        return None

    forbids = make_upstream(process_request=recording_refusal(HTTPStatus.FORBIDDEN, refused))
    other = make_upstream(process_request=accept)
    gw = start_gateway(
        gateway_ini(
            upstreams={"pair": ([forbids.node, other.node], "retries = 2\nbackoff_initial = 0.05\nbackoff_max = 0.2")},
            routes={"r": "path = /**\nupstream = pair"},
        )
    )
    # Round robin may start at either node: go until the forbidding node is
    # picked first, and check the other one saw nothing for that handshake.
    statuses = []
    for i in range(2):
        before = list(accepted)
        try:
            dial(gw.port, f"/try{i}").close()
            statuses.append(101)
        except InvalidStatus as e:
            statuses.append(e.response.status_code)
            assert accepted == before, "a 403 from the upstream was retried on the other node"
            break
    assert statuses[-1] == 403, statuses
    assert refused == [f"/try{len(statuses) - 1}"]
