# -*- test-case-name: tests.security.test_auth, tests.unit.auth.test_auth -*-
"""
What an upgrade request presents (a bearer token from the header, the
subprotocol or the query string; an API key), role checks, and the claim
headers sent upstream. Pure.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote

from wsgateway import codes
from wsgateway.auth.identity import AuthFailed, Identity

if TYPE_CHECKING:
    from wsgateway.config.auth import AuthConfig

# printable ASCII but "%": what claim headers carry unencoded
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request presented. ``protocols`` is what may be offered upstream."""

    token: str | None = None
    source: str | None = None  # "header" | "query" | "subprotocol"
    api_key: str | None = None
    protocols: tuple[str, ...] = field(default=())


def extract_token(
    headers: Mapping[str, str], query: str, protocols: Sequence[str], cfg: AuthConfig
) -> tuple[str | None, str | None, tuple[str, ...]]:
    """
    The bearer token of a request, where it came from, and the subprotocols
    left to offer upstream. Every ``subprotocol_prefix`` entry is removed
    from that list whether or not it is the one used: a browser's token must
    never reach the backend. ``headers`` has lower-case names.
    """
    prefix = cfg.subprotocol_prefix
    remaining = tuple(p for p in protocols if not (prefix and p.startswith(prefix)))
    scheme, _, value = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), "header", remaining
    if prefix:
        for p in protocols:
            if p.startswith(prefix) and len(p) > len(prefix):
                return p[len(prefix):], "subprotocol", remaining
    if cfg.query_param and query:
        for name, val in parse_qsl(query, keep_blank_values=True):
            if name == cfg.query_param and val:
                return val, "query", remaining
    return None, None, remaining


def credentials(headers: Mapping[str, str], query: str, protocols: Sequence[str], cfg: AuthConfig,
                api_keys: bool) -> Credentials:
    token, source, remaining = extract_token(headers, query, protocols, cfg)
    api_key = headers.get(cfg.api_key_header.lower()) if api_keys else None
    return Credentials(token, source, api_key.strip() if api_key else None, remaining)


def roles_of(claims: Mapping[str, Any]) -> frozenset[str]:
    """``roles`` (a list or a space-separated string) together with the OAuth 2.0 ``scope``."""
    out: set[str] = set()
    for name in ("roles", "scope"):
        value = claims.get(name)
        if isinstance(value, str):
            out.update(value.split())
        elif isinstance(value, list):
            out.update(v for v in value if isinstance(v, str))
    return frozenset(out)


def check_roles(identity: Identity | None, required: Iterable[str]) -> None:
    """Any one of ``required`` will do; none required admits everyone, anonymous included."""
    needed = tuple(required)
    if not needed:
        return
    if identity is None:
        raise AuthFailed(codes.UNAUTHORIZED, "no credentials for a route with roles")
    if identity.roles.isdisjoint(needed):
        raise AuthFailed(codes.FORBIDDEN, "missing role")


def claim_headers(identity: Identity | None, forward: Iterable[tuple[str, str]]) -> dict[str, str]:
    """
    The ``forward_claims`` headers for the upstream. Lists are joined with
    commas, objects sent as compact JSON; a claim the token lacks sends no
    header (the client's own copy is dropped regardless). Values are
    percent-encoded UTF-8 beyond printable ASCII (and ``%`` itself), so
    "Åsa" travels as ``%C3%85sa``: raw UTF-8 could hold the byte 0x85,
    which an upstream's parser may take for a line break.
    """
    out: dict[str, str] = {}
    if identity is None:
        return out
    for claim, header in forward:
        value = identity.claims.get(claim)
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (str, int, float)):
            text = str(value)
        elif isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
            text = ",".join(str(v) for v in value)
        else:
            text = json.dumps(value, separators=(",", ":"), sort_keys=True)
        out[header] = quote(text, safe=_HEADER_SAFE)
    return out
