"""
What goes upstream in the handshake headers (docs/protocol.md#handshake-statuses), and the
checks that keep every name, value and request target the gateway writes
there to one line, whatever parser reads it (see wsgateway.handshake.headers).
"""

import unicodedata
from ipaddress import ip_network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgateway.handshake.headers import (
    HeaderInjection,
    check_header,
    check_request_head,
    check_resource,
    check_subprotocol,
    request_id,
    traceparent,
    upstream_headers,
)

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


# -- header injection (what the gateway writes into the upstream handshake) --------

# Everything str.splitlines() splits on, plus every other control but HTAB.
LINE_BREAKERS = ["\r", "\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
CONTROLS = [chr(c) for c in [*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F, *range(0x80, 0xA0)]]
FORBIDDEN_IN_VALUES = sorted(set(LINE_BREAKERS + CONTROLS)) + ["\ud800", "\udfff"]


def _splits(ch: str) -> bool:
    """Independent of the implementation: does str.splitlines() break at ch?"""
    return len(f"a{ch}b".splitlines()) != 1


def test_the_list_of_line_breakers_is_what_splitlines_does() -> None:
    assert sorted(c for c in map(chr, range(0x110000)) if _splits(c)) == sorted(LINE_BREAKERS)


@pytest.mark.parametrize("ch", FORBIDDEN_IN_VALUES, ids=lambda c: f"U+{ord(c):04X}")
def test_every_forbidden_character_is_refused_in_values(ch: str) -> None:
    for value in (ch, f"a{ch}", f"{ch}a", f"ok{ch}X-Forwarded-For: 6.6.6.6"):
        with pytest.raises(HeaderInjection) as e:
            check_header("X-App", value)
        assert ch not in str(e.value)  # the message never carries the text


@pytest.mark.parametrize(
    "ch", FORBIDDEN_IN_VALUES + list(' "(),/:;<=>?@[\\]{}\t') + ["é", "\u0131", "\u212a"],
    ids=lambda c: f"U+{ord(c):04X}",
)
def test_every_forbidden_character_is_refused_in_names(ch: str) -> None:
    for name in (ch, f"X-{ch}", f"{ch}X", f"X{ch}Forwarded-For"):
        with pytest.raises(HeaderInjection):
            check_header(name, "v")


def test_empty_name_is_refused() -> None:
    with pytest.raises(HeaderInjection):
        check_header("", "v")


def test_ordinary_values_pass() -> None:
    check_header("X-App", "")
    check_header("X-App", "a\tb with spaces, commas; and = signs")
    check_header("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0")
    check_header("X-User-Id", "José 中文")  # UTF-8 with no 0x85 byte
    check_header("X-Weird_Name.1~!#$%&'*+^`|", "v")


@pytest.mark.parametrize("ch", ["\u00c5", "\u0105", "\u0445", "\u4e05"], ids=lambda c: f"U+{ord(c):04X}")
def test_characters_whose_utf8_contains_nel_are_refused(ch: str) -> None:
    assert b"\x85" in ch.encode("utf-8")
    # a Latin-1 reader of our UTF-8 (as Autobahn's is) sees NEL, which
    # str.splitlines() ends a line at, whatever a given parser then does
    assert "\x85" in ch.encode("utf-8").decode("latin-1")
    assert len(f"X-A: {ch}X-Forwarded-For: 6.6.6.6".encode().decode("latin-1").splitlines()) == 2
    with pytest.raises(HeaderInjection):
        check_header("X-A", f"{ch}X-Forwarded-For: 6.6.6.6")


@pytest.mark.parametrize(
    "resource", ["/", "/chat/room?x=1&y=%20z", "/a/b/c;p=1", "/~user/%E2%82%AC", "/a#frag"]
)
def test_ordinary_resources_pass(resource: str) -> None:
    check_resource(resource)


@pytest.mark.parametrize(
    "resource",
    ["", "chat", "http://evil/", "/a b", "/a\tb", "/a\r\nX-Evil: 1", "/\x00", "/é", "/a\u2028"]
    + [f"/x{ch}y" for ch in FORBIDDEN_IN_VALUES],
)
def test_bad_resources_are_refused(resource: str) -> None:
    with pytest.raises(HeaderInjection):
        check_resource(resource)


def test_subprotocols_must_be_tokens() -> None:
    check_subprotocol("chat.v2")
    check_subprotocol("bearer.eyJhbGciOi-_x")
    for bad in ["", "a b", "a,b", "chat\r\nX: 1", "chat\x85", "é"]:
        with pytest.raises(HeaderInjection):
            check_subprotocol(bad)


def test_upstream_headers_refuse_a_bad_client_value() -> None:
    client = {**CLIENT, "x-app": "a\x0bX-User-Id: admin"}
    with pytest.raises(HeaderInjection):
        upstream_headers(client, peer_ip="127.0.0.5", secure=False)


def test_upstream_headers_refuse_a_bad_client_name() -> None:
    # a dotless i would become "X-User-Id" in canonical(): refused first
    for name in ["x-user-\u0131d", "x app", "x-app\x00"]:
        with pytest.raises(HeaderInjection):
            upstream_headers({**CLIENT, name: "v"}, peer_ip="127.0.0.5", secure=False)


def test_upstream_headers_refuse_a_bad_forwarded_for_from_a_trusted_proxy() -> None:
    client = {**CLIENT, "x-forwarded-for": "1.2.3.4\x1c6.6.6.6"}
    with pytest.raises(HeaderInjection):
        upstream_headers(
            client, peer_ip="127.0.0.5", secure=False, trusted_proxies=[ip_network("127.0.0.0/8")]
        )


def test_upstream_headers_refuse_a_bad_added_value_or_name() -> None:
    with pytest.raises(HeaderInjection):
        build(added={"X-User-Id": "alice\r\nX-User-Roles: admin"})
    with pytest.raises(HeaderInjection):
        build(added={"X-User-Id": "\u00c5sa"})
    with pytest.raises(HeaderInjection):
        build(added={"X-User Id": "alice"})


def test_a_bad_value_in_a_dropped_header_does_not_matter() -> None:
    # only what is written upstream is checked
    headers, _, _ = upstream_headers(
        {**CLIENT, "cookie": "a\x00b", "x-real-ip": "\x85"}, peer_ip="127.0.0.5", secure=False
    )
    assert "Cookie" not in headers


# -- the client's raw request head (our own, Autobahn's, parse) ----------------

GOOD_HEAD = (
    b"GET /chat?x=1 HTTP/1.1\r\n"
    b"Host: gw.example.com\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"X-Forwarded-For: 198.51.100.9\r\n"
    b"X-App: caf\xe9\ta\r\n"
    b"\r\n"
)


FORGED_HEAD = GOOD_HEAD.replace(b"X-App: caf\xe9\ta", b"X-App: a\x85X-Forwarded-For: 6.6.6.6")


def test_a_head_with_nel_inside_a_header_line_is_refused() -> None:
    # Why check_request_head exists (see wsgateway.handshake.headers): nginx passes 0x85
    # through inside X-App's value, and a parser that splits lines with
    # str.splitlines() sees a forged X-Forwarded-For there. The gateway refuses
    # the head whatever its own Autobahn does with it.
    assert len(FORGED_HEAD.decode("latin-1").splitlines()) == len(GOOD_HEAD.decode("latin-1").splitlines()) + 1
    with pytest.raises(HeaderInjection):
        check_request_head(FORGED_HEAD)


def test_what_autobahn_makes_of_a_nel_head_informational() -> None:
    # Not a requirement: Autobahn up to 26.10 split the line at NEL and joined
    # the forged copy to the real X-Forwarded-For; 26.11 parses CRLF only and
    # keeps NEL in the value, or refuses the head. Either way the gateway has
    # already refused it (above); this only records which behaviour is installed.
    from autobahn.websocket.protocol import parseHttpHeader

    try:
        _, headers, _ = parseHttpHeader(FORGED_HEAD)
    except ValueError:
        return  # a strict parser refusing it outright
    assert headers["x-forwarded-for"] in ("198.51.100.9, 6.6.6.6", "198.51.100.9")


def test_a_plain_head_passes() -> None:
    check_request_head(GOOD_HEAD)


@pytest.mark.parametrize(
    "byte", [bytes([b]) for b in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F, 0x85]],
    ids=lambda b: f"0x{b[0]:02x}",
)
def test_every_splitting_or_control_byte_is_refused_in_a_head(byte: bytes) -> None:
    with pytest.raises(HeaderInjection):
        check_request_head(GOOD_HEAD.replace(b"caf", b"c" + byte + b"f"))
    with pytest.raises(HeaderInjection):
        check_request_head(GOOD_HEAD.replace(b"/chat", b"/ch" + byte + b"at"))


@pytest.mark.parametrize(
    "bad",
    [
        GOOD_HEAD.replace(b"caf", b"c\rX-Forwarded-For: 6.6.6.6\r\nf"),  # bare CR
        GOOD_HEAD.replace(b"caf", b"c\nX-Forwarded-For: 6.6.6.6\r\nf"),  # bare LF
        GOOD_HEAD.replace(b"X-App:", b"X-App :"),  # space before the colon
        GOOD_HEAD.replace(b"X-App: caf", b"X-App: c\r\n X-Forwarded-For: 6.6.6.6\r\nY: caf"),  # obs-fold
        GOOD_HEAD.replace(b"X-App: caf", b"X-App: c\r\n\r\nX-Forwarded-For: 6.6.6.6\r\nY: caf"),  # early end
        GOOD_HEAD.replace(b"X-App: caf", b"no colon here\r\nY: caf"),
        GOOD_HEAD[:-2],  # not ended by an empty line
    ],
)
def test_heads_a_proxy_and_autobahn_would_read_differently_are_refused(bad: bytes) -> None:
    with pytest.raises(HeaderInjection):
        check_request_head(bad)


# -- properties ------------------------------------------------------------------


def _safe_char(ch: str) -> bool:
    return not _splits(ch) and (unicodedata.category(ch) != "Cc" or ch == "\t")


@given(st.text())
def test_a_value_either_raises_or_cannot_split(value: str) -> None:
    try:
        check_header("X-App", value)
    except HeaderInjection:
        return
    assert all(_safe_char(ch) for ch in value)
    # nor as the bytes we send, read by a Latin-1 parser (Autobahn's); C1
    # bytes do occur there (U+00C0 is C3 80) but only NEL among them splits
    assert not any(_splits(ch) for ch in value.encode("utf-8").decode("latin-1"))


@given(st.text(alphabet=st.characters(codec="latin-1")))
def test_a_latin1_value_either_raises_or_cannot_split(value: str) -> None:
    # what Autobahn's server hands us: every code point 0-255 is likely here
    try:
        check_header("X-App", value)
    except HeaderInjection:
        return
    assert all(_safe_char(ch) for ch in value)
    assert not any(_splits(ch) for ch in value.encode("utf-8").decode("latin-1"))


@given(st.text())
def test_a_name_either_raises_or_is_a_token(name: str) -> None:
    try:
        check_header(name, "v")
    except HeaderInjection:
        return
    assert name and all(ch.isascii() and (ch.isalnum() or ch in "!#$%&'*+-.^_`|~") for ch in name)


@given(st.text())
def test_a_resource_either_raises_or_is_visible_ascii(resource: str) -> None:
    try:
        check_resource(resource)
    except HeaderInjection:
        return
    assert resource.startswith("/") and all("!" <= ch <= "~" for ch in resource)


def _lines_crlf(head: bytes) -> list[bytes]:
    """The lines of a head for a strict HTTP/1.1 reader (a proxy such as nginx): CRLF only."""
    return head[:-4].split(b"\r\n")


def _lines_splitlines(head: bytes) -> list[bytes]:
    """The lines for a lenient reader: Latin-1 and str.splitlines() (Autobahn up to 26.10)."""
    return [line.encode("latin-1") for line in head[:-4].decode("latin-1").splitlines()]


@given(st.binary(max_size=40))
def test_a_head_either_raises_or_every_reader_sees_exactly_its_lines(value: bytes) -> None:
    # implementation-independent: a strict and a lenient reader agree on every
    # line of a head the gateway accepts (so no parser can be fooled by it)
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + value + b"\r\nX-B: 1\r\n\r\n"
    try:
        check_request_head(head)
    except HeaderInjection:
        return
    expected = [b"GET / HTTP/1.1", b"Host: x", b"X-A: " + value, b"X-B: 1"]
    assert _lines_crlf(head) == expected
    assert _lines_splitlines(head) == expected
