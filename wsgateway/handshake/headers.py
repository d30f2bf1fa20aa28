# -*- test-case-name: tests.unit.handshake.test_headers -*-
"""
Which request headers go to the upstream, and the identity and tracing
headers the gateway adds (docs/protocol.md#handshake-statuses), and the checks that keep all of
it from splitting into extra lines on the way. Pure functions, no reactor.

Why the checks are this strict (Autobahn 26.10, as pinned):

- Autobahn's client writes the upstream handshake with plain string
  formatting (name, ": ", value, CRLF; "GET ", resource, " HTTP/1.1"),
  checking nothing, and sends it encoded as UTF-8
  (C{WebSocketClientProtocol._actuallyStartHandshake}).
- Autobahn's server (our client-facing side, and many upstreams) parses a
  request head with C{data.decode("iso-8859-1").splitlines()}
  (C{autobahn.websocket.protocol.parseHttpHeader}). C{str.splitlines} ends a
  line not only at CR and LF but also at VT, FF, FS, GS, RS (0x0b, 0x0c,
  0x1c-0x1e), NEL (0x85) and, for other decoders, U+2028/U+2029. Each piece
  with a colon becomes a header, and a repeated header is joined to the
  earlier one with ", ". So a byte 0x85 inside one header line, which nginx
  passes on untouched as part of a value, is a second header to Autobahn:
  a client behind a trusted proxy could append an X-Forwarded-For entry of
  its choosing. L{check_request_head} refuses such a head on our side.
- Going out, a value must not carry those characters either, and not as
  UTF-8 bytes: U+00C5 (A with ring) is C3 85 in UTF-8, and an Autobahn
  upstream reads the 85 as NEL. So a character whose UTF-8 form contains
  0x85 is refused like NEL itself. Lone surrogates are refused because
  the UTF-8 encoding of the request would fail half way through a
  handshake.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Network, IPv6Network, ip_address

from wsgateway.ids import random_hex
from wsgateway.routing.router import split_host

# RFC 7230 section 6.1 plus the legacy proxy ones; never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# The upstream leg has its own handshake: Autobahn writes these itself.
HANDSHAKE = frozenset(
    {
        "host",
        "origin",
        "user-agent",
        "content-length",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
        "pragma",
        "cache-control",
    }
)

CREDENTIALS = frozenset({"authorization", "cookie"})

# Headers through which the gateway tells the upstream who the client is. A
# client must never be able to set them: its own copies are dropped.
IDENTITY = frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-real-ip",
        "forwarded",
        "x-request-id",
        "traceparent",
    }
)

# Every header with this prefix is the gateway's to set (conn id, seq,
# replay, and any it adds later): upstreams deduplicate on them, so a
# client's copies are dropped on every route.
GATEWAY_PREFIX = "x-wsgateway-"

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+=/-]{1,128}\Z")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})\Z")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16

Network = IPv4Network | IPv6Network


class HeaderInjection(ValueError):
    """
    A name, value or request target the gateway would write into the
    upstream handshake could be read as more than what it is. The message
    names the position and code point, never the offending text.
    """


# RFC 7230 section 3.2.6 token: header names and subprotocols.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# In a value: C0 controls but HTAB, DEL, C1 controls (NEL among them), the
# Unicode line and paragraph separators, and lone surrogates.
_BAD_VALUE_CHAR = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# A request target: visible ASCII only (RFC 3986 wants anything else
# percent-encoded), which also rules out the space that ends it.
_RESOURCE = re.compile(r"/[\x21-\x7e]*\Z")


def _describe(text: str, pos: int) -> str:
    return f"U+{ord(text[pos]):04X} at position {pos}"


# The common value: HTAB and visible ASCII, which none of the checks below refuses.
_PLAIN_VALUE = re.compile(r"[\t\x20-\x7e]*\Z")


def _check_value(what: str, value: str) -> None:
    m = _BAD_VALUE_CHAR.search(value)
    if m is not None:
        raise HeaderInjection(f"{what}: forbidden character {_describe(value, m.start())}")
    if not value.isascii():
        for pos, ch in enumerate(value):
            if ch >= "\u0080" and b"\x85" in ch.encode("utf-8"):
                raise HeaderInjection(f"{what}: character {_describe(value, pos)} is NEL once sent as UTF-8")


def check_header(name: str, value: str) -> None:
    """
    Raise L{HeaderInjection} unless C{name: value} is safe to write as one
    header line: the name an RFC 7230 token, the value free of control
    characters (HTAB allowed) and of anything that C{str.splitlines} splits
    on, whether the upstream reads our UTF-8 as UTF-8 or as Latin-1.
    """
    if not _TOKEN.match(name):
        raise HeaderInjection("header name is not an RFC 7230 token")
    if _PLAIN_VALUE.match(value) is None:
        # the message is built only for a value that may fail: a handshake checks ~7 headers
        _check_value(f"header {name}", value)


def check_resource(resource: str) -> None:
    """
    Raise L{HeaderInjection} unless C{resource} (path and query for the
    upstream request line) is an origin-form target of visible ASCII.
    """
    if not _RESOURCE.match(resource):
        pos = next((i for i, c in enumerate(resource) if not "\x21" <= c <= "\x7e"), None)
        where = _describe(resource, pos) if pos is not None else "not starting with /"
        raise HeaderInjection(f"request target: {where}")


def check_subprotocol(protocol: str) -> None:
    """Raise L{HeaderInjection} unless C{protocol} is a token (RFC 6455 4.1)."""
    if not _TOKEN.match(protocol):
        raise HeaderInjection("subprotocol is not an RFC 7230 token")


# A raw request head: any byte str.splitlines() would split on (after
# Autobahn's Latin-1 decoding) other than a CRLF pair, and the other
# controls but HTAB. CR and LF are allowed only together.
_BAD_HEAD = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x85]|\r(?!\n)|(?<!\r)\n")
_HEAD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# A head that passes every check below, as one pattern: lines of allowed
# bytes (HTAB included) ended by CRLF, header lines "token:", a blank line.
_GOOD_HEAD = re.compile(
    rb"[^\x00-\x08\x0a-\x1f\x7f\x85]*\r\n"
    rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f\x85]*\r\n)*\r\n"
)


def check_request_head(raw: bytes) -> None:
    """
    Raise L{HeaderInjection} unless C{raw} (the client's request head as
    Autobahn received it, up to and including the blank line, i.e.
    C{protocol.http_request_data}) splits into the same lines for Autobahn
    as for an HTTP proxy in front of us: CRLF line ends only, no byte that
    C{str.splitlines} also splits on, every header line C{token ":" value}
    (no obs-fold continuation, no space before the colon: a proxy and
    Autobahn would disagree about both).
    """
    if _GOOD_HEAD.fullmatch(raw) is not None:
        return  # the common case, one regex pass; the checks below say what is wrong
    m = _BAD_HEAD.search(raw)
    if m is not None:
        raise HeaderInjection(f"request head: forbidden byte 0x{raw[m.start()]:02x} at {m.start()}")
    if not raw.endswith(b"\r\n\r\n"):
        raise HeaderInjection("request head: does not end with an empty line")
    lines = raw[:-4].split(b"\r\n")
    for n, line in enumerate(lines[1:], start=1):
        name, colon, _ = line.partition(b":")
        if not colon or not _HEAD_NAME.match(name):
            raise HeaderInjection(f"request head: line {n} is not a header field")


def request_id(client_value: str | None) -> str:
    """The client's X-Request-ID when it is sane, else a new random one."""
    if client_value and _REQUEST_ID.match(client_value):
        return client_value
    return random_hex(16)


def traceparent(client_value: str | None) -> tuple[str, str]:
    """
    A W3C traceparent for the upstream hop and its trace-id.

    A valid incoming trace-id is kept so the gateway joins the caller's trace;
    the parent-id is always new, because the gateway is a hop of its own.
    """
    if client_value:
        m = _TRACEPARENT.match(client_value.strip().lower())
        if m is not None:
            version, trace_id, span, flags = m.groups()
            if version != "ff" and trace_id != _ZERO_TRACE and span != _ZERO_SPAN:
                return f"00-{trace_id}-{random_hex(8)}-{flags}", trace_id
    trace_id = random_hex(16)
    return f"00-{trace_id}-{random_hex(8)}-01", trace_id


def peer_is_trusted(peer_ip: str, trusted: Iterable[Network]) -> bool:
    if not trusted:
        return False  # the usual case: no parse of the peer address at all
    try:
        addr = ip_address(peer_ip)
    except ValueError:
        return False
    return any(addr in net for net in trusted)


_CANONICAL: dict[str, str] = {}
_CANONICAL_MAX = 512  # names clients choose are unbounded: the cache is not


def canonical(name: str) -> str:
    """x-forwarded-for -> X-Forwarded-For (Autobahn hands us lower-case names)."""
    out = _CANONICAL.get(name)
    if out is None:
        out = "-".join(part.capitalize() for part in name.split("-"))
        if len(_CANONICAL) < _CANONICAL_MAX:
            _CANONICAL[name] = out
    return out


def upstream_headers(
    client: Mapping[str, str],
    *,
    peer_ip: str,
    secure: bool,
    trusted_proxies: Iterable[Network] = (),
    forward_auth: bool = False,
    extra_identity: frozenset[str] = frozenset(),
    added: Mapping[str, str] | None = None,
    trace: tuple[str, str] | None = None,
) -> tuple[dict[str, str], str, str]:
    """
    Build the header set for the upstream handshake.

    ``client`` has lower-case names (Autobahn's parse). ``extra_identity`` holds
    further lower-case names the gateway owns (the forward_claims headers);
    ``added`` the values the gateway sets for them; ``trace`` the
    (traceparent, trace-id) pair already made for this connection by
    ``traceparent()``, else one is made here. Returns the headers, the
    request id and the trace id.

    Raises L{HeaderInjection} when a header that would be written (a
    client's one passed on, or one in ``added``) is not a token name with a
    safe value (L{check_header}): the handshake is refused (400), never
    passed on repaired.
    """
    connection_listed = {
        token.strip().lower() for token in client.get("connection", "").split(",") if token.strip()
    }
    out: dict[str, str] = {}
    for name, value in client.items():
        # Before any comparison or canonical(): str case mapping outside
        # ASCII could otherwise make a new name out of an odd one.
        if not _TOKEN.match(name):
            raise HeaderInjection("client header name is not an RFC 7230 token")
        if (
            name in HOP_BY_HOP
            or name in HANDSHAKE
            or name in IDENTITY
            or name in extra_identity
            or name.startswith(GATEWAY_PREFIX)
            or name in connection_listed
            or (name in CREDENTIALS and not forward_auth)
        ):
            continue
        out[canonical(name)] = value

    trusted = peer_is_trusted(peer_ip, trusted_proxies)
    forwarded_for = client.get("x-forwarded-for") if trusted else None
    out["X-Forwarded-For"] = f"{forwarded_for}, {peer_ip}" if forwarded_for else peer_ip
    proto = client.get("x-forwarded-proto") if trusted else None
    out["X-Forwarded-Proto"] = proto or ("https" if secure else "http")
    # Only a value that is host[:port] is passed on: a list or a path in it
    # is how host-header poisoning reaches an upstream that builds URLs.
    forwarded_host = client.get("x-forwarded-host") if trusted else None
    if forwarded_host is None or split_host(forwarded_host) is None:
        forwarded_host = client.get("host")
    if forwarded_host is not None and split_host(forwarded_host) is not None:
        out["X-Forwarded-Host"] = forwarded_host.strip()
    rid = request_id(client.get("x-request-id"))
    out["X-Request-ID"] = rid
    tp, trace_id = trace or traceparent(client.get("traceparent"))
    out["Traceparent"] = tp
    if added:
        out.update(added)
    for name, value in out.items():
        check_header(name, value)
    return out, rid, trace_id
