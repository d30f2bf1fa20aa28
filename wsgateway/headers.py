# -*- test-case-name: tests.test_headers -*-
"""
Which request headers go to the upstream, and the identity and tracing
headers the gateway adds (SPEC section 2). Pure functions, no reactor.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Network, IPv6Network, ip_address

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
        "x-wsgateway-replay",
    }
)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+=/-]{1,128}\Z")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})\Z")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16

Network = IPv4Network | IPv6Network


def request_id(client_value: str | None) -> str:
    """The client's X-Request-ID when it is sane, else a new random one."""
    if client_value and _REQUEST_ID.match(client_value):
        return client_value
    return os.urandom(16).hex()


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
                return f"00-{trace_id}-{os.urandom(8).hex()}-{flags}", trace_id
    trace_id = os.urandom(16).hex()
    return f"00-{trace_id}-{os.urandom(8).hex()}-01", trace_id


def peer_is_trusted(peer_ip: str, trusted: Iterable[Network]) -> bool:
    try:
        addr = ip_address(peer_ip)
    except ValueError:
        return False
    return any(addr in net for net in trusted)


def canonical(name: str) -> str:
    """x-forwarded-for -> X-Forwarded-For (Autobahn hands us lower-case names)."""
    return "-".join(part.capitalize() for part in name.split("-"))


def upstream_headers(
    client: Mapping[str, str],
    *,
    peer_ip: str,
    secure: bool,
    trusted_proxies: Iterable[Network] = (),
    forward_auth: bool = False,
    extra_identity: frozenset[str] = frozenset(),
    added: Mapping[str, str] | None = None,
) -> tuple[dict[str, str], str, str]:
    """
    Build the header set for the upstream handshake.

    ``client`` has lower-case names (Autobahn's parse). ``extra_identity`` holds
    further lower-case names the gateway owns (the forward_claims headers);
    ``added`` the values the gateway sets for them. Returns the headers, the
    request id and the trace id.
    """
    connection_listed = {
        token.strip().lower() for token in client.get("connection", "").split(",") if token.strip()
    }
    out: dict[str, str] = {}
    for name, value in client.items():
        if (
            name in HOP_BY_HOP
            or name in HANDSHAKE
            or name in IDENTITY
            or name in extra_identity
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
    host = (client.get("x-forwarded-host") if trusted else None) or client.get("host")
    if host:
        out["X-Forwarded-Host"] = host
    rid = request_id(client.get("x-request-id"))
    out["X-Request-ID"] = rid
    tp, trace_id = traceparent(client.get("traceparent"))
    out["Traceparent"] = tp
    if added:
        out.update(added)
    return out, rid, trace_id
