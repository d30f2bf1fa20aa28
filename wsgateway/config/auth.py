# -*- test-case-name: tests.unit.config.test_config -*-
"""
The [auth] section: JWT algorithms and their keys (secret, public key, JWKS file or URL),
API keys, issuer/audience, where tokens are taken from, and the claims forwarded upstream.

Key files are opened and checked here, so a missing or wrong key is a config error that
names the file; a secret's value never appears in an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from wsgateway.auth.keys import load_api_keys
from wsgateway.config.files import FileRefused, read_bounded
from wsgateway.config.reader import Reader, Section
from wsgateway.config.values import (
    TOKEN,
    Bad,
    Value,
    duration,
    header_name,
    list_of,
    optional,
    text,
    unique,
    word,
)

__all__ = ["ASYMMETRIC_ALGORITHMS", "HMAC_ALGORITHMS", "AuthConfig", "read_auth"]


@dataclass(frozen=True)
class AuthConfig:
    algorithms: tuple[str, ...] = ("HS256",)  # () = no JWTs, API keys only
    secret: str | None = None
    public_key_file: str | None = None
    jwks_file: str | None = None
    jwks_url: str | None = None
    jwks_refresh: float = 300.0
    jwks_ca: str | None = None
    api_keys_file: str | None = None
    api_key_header: str = "X-API-Key"
    issuer: str | None = None
    audience: str | None = None
    leeway: float = 30.0
    query_param: str = "access_token"  # "" = tokens are not taken from the query
    subprotocol_prefix: str = "bearer."  # "" = tokens are not taken from subprotocols
    forward_claims: tuple[tuple[str, str], ...] = (("sub", "X-User-Id"), ("roles", "X-User-Roles"))


HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
# RFC 7518 section 3.2: an HMAC key at least as long as the hash output.
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
# Headers the gateway sets or strips itself; a claim must not be forwarded as one.
_RESERVED_HEADERS = frozenset(("host", "connection", "upgrade", "keep-alive", "te", "trailer", "transfer-encoding",
                               "content-length", "proxy-authorization", "proxy-connection", "authorization",
                               "cookie", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                               "x-request-id", "traceparent", "tracestate", "x-wsgateway-replay"))


def _algorithm(v: Value) -> str:
    if v.text.lower() == "none":
        raise Bad("'none' is never accepted")
    known = HMAC_ALGORITHMS + ASYMMETRIC_ALGORITHMS
    if v.text in known:
        return v.text
    upper = {a.upper(): a for a in known}
    hint = f" (did you mean '{upper[v.text.upper()]}'?)" if v.text.upper() in upper else ""
    raise Bad(f"unknown algorithm {v.shown()}{hint}; known: {' '.join(known)}")


def _key_family(algorithm: str) -> str:
    return {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "EdDSA"}[algorithm[:2]]


def _https(v: Value) -> str:
    try:
        parts = urlsplit(v.text)
        ok = parts.scheme == "https" and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok:
        raise Bad("must be an https:// URL")
    return v.text


def _forward_claim(v: Value) -> tuple[str, str]:
    claim, sep, header = v.text.rpartition("=")  # header names never hold '=', claim names (URLs) may
    if not sep or not claim or not TOKEN.fullmatch(header):
        raise Bad(f"{v.shown()} is not claim=Header-Name")
    # X-Wsgateway-*: the gateway's own (Conn-Id, Seq, Replay, ...), which upstreams trust
    if header.lower() in _RESERVED_HEADERS or header.lower().startswith(("sec-websocket-", "proxy-", "x-wsgateway-")):
        raise Bad(f"header {header!r} is set by the gateway itself or hop-by-hop: pick another name")
    return claim, header


def read_auth(reader: Reader, sec: Section) -> AuthConfig:
    d = AuthConfig()
    no_algorithms: tuple[str, ...] = ()  # not d.algorithms: _check_jwt_keys applies that default
    algorithms = tuple(dict.fromkeys(sec.get("algorithms", list_of(_algorithm), no_algorithms)))
    secret = sec.get("secret", optional(text), d.secret)
    public_key_file = sec.get("public_key_file", optional(reader.readable), d.public_key_file)
    jwks_file = sec.get("jwks_file", optional(reader.readable), d.jwks_file)
    jwks_url = sec.get("jwks_url", optional(_https), d.jwks_url)
    jwks_ca = sec.get("jwks_ca", optional(reader.pem("certificates")), d.jwks_ca)
    api_keys_file = sec.get("api_keys_file", optional(reader.private), d.api_keys_file)
    sources = [k for k, val in (("public_key_file", public_key_file), ("jwks_file", jwks_file),
                                ("jwks_url", jwks_url)) if val]
    # Cross-checks only on values that parsed, so one mistake is not reported three times.
    if sec.ok("algorithms", "secret", "public_key_file", "jwks_file", "jwks_url", "api_keys_file"):
        algorithms = _check_jwt_keys(sec, algorithms, secret, sources)
        if not algorithms and not api_keys_file and not secret and not sources:
            sec.error(None, "nothing to authenticate with: set secret, public_key_file, jwks_file, jwks_url "
                            "or api_keys_file")
        if public_key_file and sec.ok("public_key_file", "algorithms"):
            _check_public_key(sec, public_key_file, algorithms)
        if jwks_file and sec.ok("jwks_file"):
            _check_jwks(sec, jwks_file)
        if api_keys_file and sec.ok("api_keys_file"):
            try:
                load_api_keys(api_keys_file)
            except (ValueError, OSError) as e:
                sec.error("api_keys_file", f"{os.path.basename(api_keys_file)!r} {e}")
    if jwks_ca and not jwks_url and sec.ok("jwks_url"):
        sec.error("jwks_ca", "set, but jwks_url is not")
    return AuthConfig(
        algorithms=algorithms,
        secret=secret,
        public_key_file=public_key_file,
        jwks_file=jwks_file,
        jwks_url=jwks_url,
        jwks_refresh=sec.get("jwks_refresh", duration(positive=True), d.jwks_refresh),
        jwks_ca=jwks_ca,
        api_keys_file=api_keys_file,
        api_key_header=sec.get("api_key_header", header_name, d.api_key_header),
        issuer=sec.get("issuer", optional(text), d.issuer),
        audience=sec.get("audience", optional(text), d.audience),
        leeway=sec.get("leeway", duration(), d.leeway),
        query_param=sec.get("query_param", lambda v: word(v) if v.text else "", d.query_param),
        subprotocol_prefix=sec.get("subprotocol_prefix", lambda v: header_name(v) if v.text else "",
                                   d.subprotocol_prefix),
        forward_claims=sec.get("forward_claims", unique(list_of(_forward_claim), "header", 1), d.forward_claims),
    )


def _check_jwt_keys(sec: Section, algorithms: tuple[str, ...], secret: str | None,
                    sources: list[str]) -> tuple[str, ...]:
    """The algorithms/key rules of [auth]; returns the algorithms with the default applied."""
    if not sec.has("algorithms"):
        # the documented default HS256 goes with a secret; asymmetric keys need an explicit list;
        # neither: no JWTs at all, API keys only.
        if secret is not None:
            algorithms = AuthConfig().algorithms
        elif sources:
            sec.error(sources[0], "needs an explicit 'algorithms' list, e.g. algorithms = RS256")
            return algorithms
    hmac = [a for a in algorithms if a in HMAC_ALGORITHMS]
    asym = [a for a in algorithms if a not in HMAC_ALGORITHMS]
    if hmac and asym:
        sec.error("algorithms", f"{hmac[0]} and {asym[0]} cannot be mixed: an HMAC secret must never "
                                "verify an asymmetric token")
    elif hmac:
        need = max(_HMAC_MIN_BYTES[a] for a in hmac)
        if secret is None:
            sec.error("algorithms", f"{hmac[0]} needs 'secret'")
        elif len(secret.encode()) < need:
            sec.error("secret", f"too short for {hmac[-1]}: use at least {need} bytes (RFC 7518 section 3.2)")
        for k in sources:
            sec.error(k, "set, but only HS* algorithms are listed: a key file is for asymmetric algorithms")
    elif asym:
        if not sources:
            sec.error("algorithms", f"{asym[0]} needs one of public_key_file, jwks_file, jwks_url")
        elif len(sources) > 1:
            sec.error(sources[1], f"set only one of public_key_file, jwks_file, jwks_url ({sources[0]} is set too)")
        if secret is not None:
            sec.error("secret", "set, but no HS* algorithm is listed")
    else:  # "algorithms =" : JWTs switched off
        for k in (["secret"] if secret is not None else []) + sources:
            sec.error(k, "set, but algorithms is empty (no JWTs accepted)")
    return algorithms


def _check_public_key(sec: Section, path: str, algorithms: Sequence[str]) -> None:
    try:
        data = read_bounded(path)
    except (FileRefused, OSError) as e:  # changed since reader.readable looked at it
        sec.error("public_key_file", str(e))
        return
    key: Any
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = x509.load_pem_x509_certificate(data).public_key()
        except ValueError:
            sec.error("public_key_file", f"{os.path.basename(path)!r} is not a PEM public key or certificate")
            return
    family = ("RSA" if isinstance(key, rsa.RSAPublicKey) else "EC" if isinstance(key, ec.EllipticCurvePublicKey)
              else "EdDSA" if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)) else "other")
    for a in algorithms:
        if a in HMAC_ALGORITHMS:
            continue
        if _key_family(a) != family:
            sec.error("public_key_file", f"holds a {family} key, which cannot verify {a}")
        elif a in _EC_CURVES and key.curve.name != _EC_CURVES[a]:
            sec.error("public_key_file", f"holds a {key.curve.name} key, but {a} needs {_EC_CURVES[a]}")


def _check_jwks(sec: Section, path: str) -> None:
    try:
        data = read_bounded(path)
    except (FileRefused, OSError) as e:  # changed since reader.readable looked at it
        sec.error("jwks_file", str(e))
        return
    try:
        doc = json.loads(data)
    except ValueError as e:
        sec.error("jwks_file", f"{os.path.basename(path)!r} is not JSON: {e}")
        return
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list) or not keys or not all(isinstance(k, dict) and "kty" in k for k in keys):
        sec.error("jwks_file", f"{os.path.basename(path)!r} is not a JWKS document "
                               "(an object with a non-empty \"keys\" list of JWKs)")
