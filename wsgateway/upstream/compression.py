# -*- test-case-name: tests.unit.upstream.test_compression -*-
"""
permessage-deflate negotiation on proxy routes (RFC 7692 section 7;
docs/protocol.md#compression), pure.

With ``compression = passthrough`` the client's permessage-deflate offers
(and only those: other extensions are dropped) go to the upstream in the
upgrade request; the upstream's answer must accept one of them as RFC 7692
allows (else the upstream leg fails and the client gets 502), and is what
the client gets back, plus ``client_no_context_takeover``.

That one addition is why a compressed proxied connection costs the gateway
no memory while idle: the gateway inflates each client message only to
count its size against ``max_message_size`` (relay/inflate.py), and with
no context carried between messages it needs no inflater between them.
RFC 7692 7.1.1.1 lets a server add it to any accepted offer, and a client
that resets its context still produces messages any receiver can inflate,
so it never changes what the upstream agreed to receive. The price is the
client's compression ratio on messages that repeat earlier ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

NAME = "permessage-deflate"

# zlib cannot deflate with an 8-bit window (it writes 9); RFC 7692 allows 8-15.
_BITS = range(8, 16)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_SERVER_NCT, _CLIENT_NCT = "server_no_context_takeover", "client_no_context_takeover"
_SERVER_BITS, _CLIENT_BITS = "server_max_window_bits", "client_max_window_bits"


class BadExtensions(ValueError):
    """A Sec-WebSocket-Extensions value that does not parse, or a parameter RFC 7692 does not allow."""


@dataclass(frozen=True)
class Deflate:
    """
    One permessage-deflate parameter set, an offer or an answer. A window
    size of None is absent; ``client_max_window_bits = 0`` is an offer's
    value-less "I can take a smaller window" (answers always give a value).
    """

    server_no_context_takeover: bool = False
    client_no_context_takeover: bool = False
    server_max_window_bits: int | None = None
    client_max_window_bits: int | None = None

    def header(self) -> str:
        """As a Sec-WebSocket-Extensions element."""
        parts = [NAME]
        if self.server_no_context_takeover:
            parts.append(_SERVER_NCT)
        if self.client_no_context_takeover:
            parts.append(_CLIENT_NCT)
        if self.server_max_window_bits is not None:
            parts.append(f"{_SERVER_BITS}={self.server_max_window_bits}")
        if self.client_max_window_bits is not None:
            parts.append(_CLIENT_BITS if self.client_max_window_bits == 0 else
                         f"{_CLIENT_BITS}={self.client_max_window_bits}")
        return "; ".join(parts)


def _split(text: str, sep: str) -> list[str]:
    """``text`` split on ``sep`` outside double quotes."""
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if quoted:
        raise BadExtensions("unbalanced quotes")
    out.append("".join(cur))
    return out


def parse_extensions(value: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """RFC 6455 9.1's extension list: [(name, [(param, value or None)])], names lowercased."""
    out = []
    for element in _split(value, ","):
        if not element.strip():
            continue  # RFC 7230's #rule allows empty elements
        name, *params = (p.strip() for p in _split(element, ";"))
        if not _TOKEN.match(name):
            raise BadExtensions("bad extension name")
        parsed: list[tuple[str, str | None]] = []
        for p in params:
            key, eq, val = p.partition("=")
            key = key.strip()
            if not _TOKEN.match(key):
                raise BadExtensions("bad extension parameter")
            if eq:
                val = val.strip()
                if len(val) >= 2 and val[0] == val[-1] == '"':
                    val = val[1:-1]
                if not _TOKEN.match(val):
                    raise BadExtensions("bad extension parameter value")
                parsed.append((key.lower(), val))
            else:
                parsed.append((key.lower(), None))
        out.append((name.lower(), parsed))
    return out


def _bits(key: str, value: str | None) -> int:
    if value is None or not value.isdigit() or int(value) not in _BITS:
        raise BadExtensions(f"{key} must be 8-15")
    return int(value)


def _deflate(params: list[tuple[str, str | None]], *, offer: bool) -> Deflate:
    seen: dict[str, Any] = {}
    for key, value in params:
        if key in seen:
            raise BadExtensions(f"{key} twice")
        if key in (_SERVER_NCT, _CLIENT_NCT):
            if value is not None:
                raise BadExtensions(f"{key} takes no value")
            seen[key] = True
        elif key == _SERVER_BITS:
            seen[key] = _bits(key, value)
        elif key == _CLIENT_BITS:
            seen[key] = 0 if value is None and offer else _bits(key, value)
        else:
            raise BadExtensions(f"unknown parameter {key}")
    return Deflate(
        server_no_context_takeover=seen.get(_SERVER_NCT, False),
        client_no_context_takeover=seen.get(_CLIENT_NCT, False),
        server_max_window_bits=seen.get(_SERVER_BITS),
        client_max_window_bits=seen.get(_CLIENT_BITS),
    )


def offers_in(value: str | None) -> tuple[Deflate, ...]:
    """
    The valid permessage-deflate offers of a client's Sec-WebSocket-Extensions,
    in its order of preference. An offer RFC 7692 does not allow is dropped
    (a server declines it); a header that does not parse offers nothing.
    """
    if not value:
        return ()
    try:
        extensions = parse_extensions(value)
    except BadExtensions:
        return ()
    offers = []
    for name, params in extensions:
        if name == NAME:
            try:
                offers.append(_deflate(params, offer=True))
            except BadExtensions:
                continue
    return tuple(offers)


def offers_header(offers: tuple[Deflate, ...]) -> str:
    return ", ".join(o.header() for o in offers)


def answer_in(value: str) -> Deflate:
    """An upstream's answer: exactly one permessage-deflate element, or L{BadExtensions}."""
    extensions = parse_extensions(value)
    if len(extensions) != 1 or extensions[0][0] != NAME:
        raise BadExtensions("not one permessage-deflate answer")
    return _deflate(extensions[0][1], offer=False)


def accepts(offer: Deflate, answer: Deflate) -> bool:
    """Whether ``answer`` is a response RFC 7692 allows to ``offer``."""
    if offer.server_no_context_takeover and not answer.server_no_context_takeover:
        return False
    if offer.server_max_window_bits is not None:
        # accepted only with a value at most the offered one (7.1.2.1)
        if answer.server_max_window_bits is None or answer.server_max_window_bits > offer.server_max_window_bits:
            return False
    if answer.client_max_window_bits is not None:
        # only if the client said it could take one (7.1.2.2), and at most its value
        if offer.client_max_window_bits is None:
            return False
        if offer.client_max_window_bits and answer.client_max_window_bits > offer.client_max_window_bits:
            return False
    return True


def accepted(offers: tuple[Deflate, ...], answer: Deflate) -> bool:
    return any(accepts(o, answer) for o in offers)


def for_client(answer: Deflate) -> str:
    """What the client is answered: the upstream's answer, without context carried between client messages."""
    return replace(answer, client_no_context_takeover=True).header()


def from_autobahn(response: Any) -> Deflate:
    """Autobahn's parsed answer (PerMessageDeflateResponse: 0 for an absent window size) as a L{Deflate}."""
    return Deflate(
        server_no_context_takeover=bool(response.server_no_context_takeover),
        client_no_context_takeover=bool(response.client_no_context_takeover),
        server_max_window_bits=response.server_max_window_bits or None,
        client_max_window_bits=response.client_max_window_bits or None,
    )
