# -*- test-case-name: tests.security.test_auth, tests.unit.auth.test_auth -*-
"""
Who the client is: credentials taken from the upgrade request, checked
against the ``[auth]`` keys (JWTs with PyJWT, API keys by their SHA-256),
and turned into an ``Identity`` that routing, role checks and the forwarded
claim headers use. Reactor-free except for ``Authenticator`` awaiting a JWKS
refresh, which it gets injected.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jwt

from wsgateway import codes
from wsgateway.auth.credentials import Credentials, credentials, roles_of
from wsgateway.auth.identity import AuthFailed, Identity, UnknownKey
from wsgateway.auth.keys import ApiKey, KeySet

if TYPE_CHECKING:
    from jwt.types import Options  # only a type: never imported at run time

    from wsgateway.config.auth import AuthConfig


def api_key_identity(keys: Mapping[str, ApiKey], presented: str) -> Identity:
    # Looked up by digest: the file holds no key, and the dict lookup leaks
    # nothing useful about a SHA-256 preimage through its timing.
    entry = keys.get(hashlib.sha256(presented.encode("utf-8", "surrogateescape")).hexdigest())
    if entry is None:
        raise AuthFailed(codes.UNAUTHORIZED, "unknown API key")
    claims = {"sub": entry.identity, "roles": sorted(entry.roles)}
    return Identity(entry.identity, claims, entry.roles, None, "api_key")


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
        self._options: Options = {
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
                options=self._options,
            )
        except Exception as e:
            # Any failure to verify is a refusal, never a crash or an accept.
            raise AuthFailed(codes.UNAUTHORIZED, _why(e)) from None
        times = {name: _numeric_date(claims, name) for name in _TIME_CLAIMS}
        sub = claims.get("sub")
        return Identity(
            subject=sub if isinstance(sub, str) else None,
            claims=claims,
            roles=roles_of(claims),
            expires=times["exp"],
            kind="jwt",
        )


# RFC 7519 4.1.4-4.1.6: each a NumericDate when present
_TIME_CLAIMS = ("exp", "nbf", "iat")


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """
    The claim as seconds, or AuthFailed unless it is a NumericDate: a JSON
    number. PyJWT compares int(value), which also takes a string of digits
    and true/false, so a token with "exp": "9999999999" passed its checks
    while the expiry close, scheduled only for a number, never came.
    """
    if name not in claims:
        return None
    value = claims[name]
    # bool is an int subclass; NaN and Infinity are what Python's json reads for those words
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AuthFailed(codes.UNAUTHORIZED, f"{name} is not a NumericDate")
    try:
        seconds = float(value)
    except OverflowError:
        raise AuthFailed(codes.UNAUTHORIZED, f"{name} is not a NumericDate") from None
    if not math.isfinite(seconds):
        raise AuthFailed(codes.UNAUTHORIZED, f"{name} is not a NumericDate")
    return seconds


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
