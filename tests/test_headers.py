"""What goes upstream in the handshake headers (SPEC section 2)."""

from ipaddress import ip_network

from wsgateway.headers import request_id, traceparent, upstream_headers

CLIENT = {
    "host": "gw.example.com:8080",
    "upgrade": "websocket",
    "connection": "Upgrade, X-Secret-Hop",
    "x-secret-hop": "dropped because Connection lists it",
    "sec-websocket-key": "abc",
    "sec-websocket-version": "13",
    "sec-websocket-protocol": "chat",
    "sec-websocket-extensions": "permessage-deflate",
    "authorization": "Bearer token",
    "cookie": "session=1",
    "keep-alive": "timeout=5",
    "te": "trailers",
    "x-forwarded-for": "6.6.6.6",
    "x-forwarded-host": "evil.example",
    "x-forwarded-proto": "https",
    "x-real-ip": "6.6.6.6",
    "x-user-id": "admin",
    "x-wsgateway-replay": "1",
    "x-app": "kept",
    "user-agent": "test-agent",
}


def build(**kw):
    defaults = dict(peer_ip="127.0.0.5", secure=False, extra_identity=frozenset({"x-user-id"}))
    defaults.update(kw)
    return upstream_headers(CLIENT, **defaults)


def test_hop_by_hop_credentials_and_spoofed_identity_are_dropped():
    headers, _, _ = build()
    lower = {k.lower(): v for k, v in headers.items()}
    for name in [
        "upgrade", "connection", "x-secret-hop", "sec-websocket-key", "sec-websocket-extensions",
        "authorization", "cookie", "keep-alive", "te", "x-real-ip", "x-user-id", "x-wsgateway-replay", "host",
    ]:
        assert name not in lower, name
    assert lower["x-app"] == "kept"


def test_gateway_sets_forwarded_headers_from_the_socket():
    headers, rid, trace_id = build()
    assert headers["X-Forwarded-For"] == "127.0.0.5"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == "gw.example.com:8080"
    assert headers["X-Request-ID"] == rid and len(rid) == 32
    assert headers["Traceparent"].split("-")[1] == trace_id


def test_secure_listener_says_https():
    headers, _, _ = build(secure=True)
    assert headers["X-Forwarded-Proto"] == "https"


def test_trusted_proxy_chain_is_extended_not_replaced():
    headers, _, _ = build(trusted_proxies=[ip_network("127.0.0.0/8")])
    assert headers["X-Forwarded-For"] == "6.6.6.6, 127.0.0.5"
    assert headers["X-Forwarded-Host"] == "evil.example"
    assert headers["X-Forwarded-Proto"] == "https"


def test_forward_auth_keeps_credentials():
    headers, _, _ = build(forward_auth=True)
    assert headers["Authorization"] == "Bearer token"
    assert headers["Cookie"] == "session=1"


def test_added_identity_headers_win():
    headers, _, _ = build(added={"X-User-Id": "alice"})
    assert headers["X-User-Id"] == "alice"


def test_request_id_kept_when_sane_else_generated():
    assert request_id("abc-123") == "abc-123"
    for bad in ["", "a b", "x" * 129, "new\nline", None]:
        rid = request_id(bad)
        assert rid != bad and len(rid) == 32


def test_traceparent_keeps_valid_trace_id_with_new_parent():
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    out, trace_id = traceparent(incoming)
    version, tid, parent, flags = out.split("-")
    assert (version, tid, flags) == ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01")
    assert trace_id == tid
    assert parent != "00f067aa0ba902b7" and len(parent) == 16


def test_invalid_traceparent_is_replaced():
    for bad in [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "garbage",
    ]:
        out, trace_id = traceparent(bad)
        assert trace_id not in bad
        assert len(out.split("-")[1]) == 32
