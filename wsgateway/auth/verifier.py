# -*- test-case-name: tests.test_auth -*-
"""
Who the client is: credentials taken from the upgrade request, checked
against the ``[auth]`` keys (JWTs with PyJWT, API keys by their SHA-256),
and turned into an ``Identity`` that routing, role checks and the forwarded
claim headers use. Reactor-free except for ``Authenticator`` awaiting a JWKS
refresh, which it gets injected.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from wsgateway import codes

if TYPE_CHECKING:
    # config.py imports this module to check api_keys_file at load time
    from wsgateway.config.loader import AuthConfig

# Key types a JWKS may hold for each asymmetric algorithm family. A
# symmetric ("oct") key never comes from a key set: it would let anyone who
# can read the public JWKS forge tokens.
_KTY_FOR_ALG = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


# printable ASCII but "%": what claim headers carry unencoded
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


class AuthFailed(Exception):
    """
    The handshake is refused with ``status`` (401 or 403). ``why`` is one of
    our own fixed phrases for the log: never the token, never PyJWT's text
    (which may quote claim values).
    """

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


class UnknownKey(Exception):
    """The token names a ``kid`` the key set does not hold (yet)."""


@dataclass(frozen=True, slots=True)
class Identity:
    subject: str | None
    claims: Mapping[str, Any]
    roles: frozenset[str]
    expires: float | None  # the token's exp (unix seconds); None for API keys
    kind: str  # "jwt" | "api_key"


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


# -- API keys -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiKey:
    identity: str
    roles: frozenset[str]


def parse_api_keys(text: str) -> dict[str, ApiKey]:
    """
    ``api_keys_file``: one key per line, ``SHA256-HEX IDENTITY [ROLE ...]``;
    ``#`` starts a comment. Raises ValueError naming the line (never
    quoting it: a pasted raw key must not end up in an error message).
    """
    keys: dict[str, ApiKey] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        digest = parts[0].lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"line {n}: the first field must be the key's SHA-256 as 64 hex digits "
                             "(e.g. printf %s KEY | sha256sum), never the key itself")
        if len(parts) < 2:
            raise ValueError(f"line {n}: an identity must follow the hash")
        if digest in keys:
            raise ValueError(f"line {n}: this hash appears twice")
        keys[digest] = ApiKey(parts[1], frozenset(parts[2:]))
    return keys


def load_api_keys(path: str) -> dict[str, ApiKey]:
    with open(path, encoding="utf-8") as f:
        return parse_api_keys(f.read())


def api_key_identity(keys: Mapping[str, ApiKey], presented: str) -> Identity:
    # Looked up by digest: the file holds no key, and the dict lookup leaks
    # nothing useful about a SHA-256 preimage through its timing.
    entry = keys.get(hashlib.sha256(presented.encode("utf-8", "surrogateescape")).hexdigest())
    if entry is None:
        raise AuthFailed(codes.UNAUTHORIZED, "unknown API key")
    claims = {"sub": entry.identity, "roles": sorted(entry.roles)}
    return Identity(entry.identity, claims, entry.roles, None, "api_key")


# -- JWT keys -------------------------------------------------------------


def load_public_key(path: str) -> Any:
    """A PEM public key, or the public key of a PEM certificate."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return serialization.load_pem_public_key(data)
    except ValueError:
        return x509.load_pem_x509_certificate(data).public_key()


class KeySet:
    """
    JWKs by ``kid``, as a JWKS document lists them. Each is bound to one
    algorithm when used, so a token's ``alg`` header can only pick among the
    pinned algorithms that fit the key's type.
    """

    def __init__(self, document: Mapping[str, Any]) -> None:
        keys = document.get("keys")
        if not isinstance(keys, list):
            raise ValueError('not a JWKS document: no "keys" list')
        self._by_kid: dict[str | None, dict[str, Any]] = {}
        for jwk in keys:
            if not isinstance(jwk, dict) or jwk.get("kty") not in ("RSA", "EC", "OKP"):
                continue
            if jwk.get("use", "sig") != "sig":
                continue
            kid = jwk.get("kid")
            self._by_kid[kid if isinstance(kid, str) else None] = jwk
        self._bound: dict[tuple[str | None, str], jwt.PyJWK] = {}

    def __len__(self) -> int:
        return len(self._by_kid)

    @property
    def kids(self) -> list[str]:
        return sorted(k for k in self._by_kid if k is not None)

    def key_for(self, kid: str | None, alg: str) -> jwt.PyJWK:
        jwk = self._by_kid.get(kid)
        if jwk is None and kid is None and len(self._by_kid) == 1:
            # a single-key set needs no kid
            jwk = next(iter(self._by_kid.values()))
        if jwk is None:
            raise UnknownKey(kid)
        bound = self._bound.get((kid, alg))
        if bound is None:
            if jwk.get("alg") not in (None, alg) or _KTY_FOR_ALG.get(alg[:2]) != jwk["kty"]:
                raise AuthFailed(codes.UNAUTHORIZED, "algorithm does not fit the key")
            try:
                bound = jwt.PyJWK(jwk, algorithm=alg)
            except jwt.PyJWTError:
                raise AuthFailed(codes.UNAUTHORIZED, "unusable key in the key set") from None
            self._bound[(kid, alg)] = bound
        return bound


def load_jwks_file(path: str) -> KeySet:
    with open(path, encoding="utf-8") as f:
        return KeySet(json.load(f))


# PyJWT's exceptions, mapped to fixed phrases for the log.
_WHY: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.MissingRequiredClaimError, "required claim missing"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.DecodeError, "malformed token"),
)


class TokenVerifier:
    """
    Checks a JWT against ``[auth]``: the header's ``alg`` must be one of the
    pinned ``algorithms`` (so ``none`` never is), the key comes from the one
    configured source, and ``exp`` is required — a token that never expires
    cannot be revoked by waiting.
    """

    def __init__(self, cfg: AuthConfig, keys: KeySet | None = None, public_key: Any = None) -> None:
        self.cfg = cfg
        self.algorithms = tuple(cfg.algorithms)
        self.keys = keys
        self._static: Any = None
        if any(a.startswith("HS") for a in self.algorithms):
            self._static = (cfg.secret or "").encode()
        elif public_key is not None:
            self._static = public_key
        self._options: dict[str, Any] = {
            "require": ["exp"],
            "verify_aud": cfg.audience is not None,
            "verify_iss": cfg.issuer is not None,
        }

    def verify(self, token: str) -> Identity:
        if not self.algorithms:
            raise AuthFailed(codes.UNAUTHORIZED, "JWTs are not accepted here")
        if self._static is not None:
            # one key for every pinned algorithm: PyJWT checks the header's alg
            # against the list itself (the header is parsed once, not twice)
            return self._decode(token, self._static, self.algorithms)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthFailed(codes.UNAUTHORIZED, "malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise AuthFailed(codes.UNAUTHORIZED, "algorithm not allowed")
        key: Any
        if self.keys is not None:
            kid = header.get("kid")
            key = self.keys.key_for(kid if isinstance(kid, str) else None, alg)  # may raise UnknownKey
        else:
            # a jwks_url whose first fetch has not landed: the Authenticator's
            # refetch is the way out
            raise UnknownKey(header.get("kid"))
        return self._decode(token, key, (alg,))

    def _decode(self, token: str, key: Any, algorithms: Sequence[str]) -> Identity:
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=list(algorithms),
                audience=self.cfg.audience,
                issuer=self.cfg.issuer,
                leeway=self.cfg.leeway,
                options=self._options,  # type: ignore[arg-type]
            )
        except Exception as e:
            # Any failure to verify is a refusal, never a crash or an accept.
            raise AuthFailed(codes.UNAUTHORIZED, _why(e)) from None
        sub = claims.get("sub")
        exp = claims.get("exp")
        return Identity(
            subject=sub if isinstance(sub, str) else None,
            claims=claims,
            roles=roles_of(claims),
            expires=float(exp) if isinstance(exp, (int, float)) else None,
            kind="jwt",
        )


def _why(e: Exception) -> str:
    for kind, why in _WHY:
        if isinstance(e, kind):
            return why
    return "invalid token"


class Authenticator:
    """
    The handshake's view of ``[auth]``: credentials in, Identity (or None
    for an anonymous client on an ``optional`` route) out. ``refresh_keys``
    is the JWKS fetcher's rate-limited refetch, awaited once when a token
    names a ``kid`` the cached set lacks (the provider has rotated its keys).
    """

    def __init__(
        self,
        cfg: AuthConfig,
        verifier: TokenVerifier,
        api_keys: Mapping[str, ApiKey] | None = None,
        refresh_keys: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.verifier = verifier
        self.api_keys = api_keys
        self.refresh_keys = refresh_keys
        # the API key header is a credential too: never forwarded upstream
        self.credential_headers = frozenset([cfg.api_key_header.lower()] if api_keys is not None else [])

    def credentials(self, headers: Mapping[str, str], query: str, protocols: Sequence[str]) -> Credentials:
        return credentials(headers, query, protocols, self.cfg, self.api_keys is not None)

    async def identify(self, creds: Credentials, mode: str) -> Identity | None:
        """``mode`` is the route's ``auth``; a bad credential is refused even on ``optional``."""
        if mode == "none":
            return None
        if creds.api_key is not None and self.api_keys is not None:
            return api_key_identity(self.api_keys, creds.api_key)
        if creds.token is None:
            if mode == "required":
                raise AuthFailed(codes.UNAUTHORIZED, "no credentials")
            return None
        try:
            return self.verifier.verify(creds.token)
        except UnknownKey:
            if self.refresh_keys is None or not await self.refresh_keys():
                raise AuthFailed(codes.UNAUTHORIZED, "unknown key id") from None
        try:
            return self.verifier.verify(creds.token)
        except UnknownKey:
            raise AuthFailed(codes.UNAUTHORIZED, "unknown key id") from None
