# -*- test-case-name: tests.security.test_auth, tests.unit.auth.test_auth -*-
"""
Loading the ``[auth]`` keys: the API-key file (SHA-256 digests, never keys),
PEM public keys and JWKS documents. Pure: config validation calls these at
load time, so a bad file is a config error naming it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from wsgateway import codes
from wsgateway.auth.identity import AuthFailed, UnknownKey
from wsgateway.config.files import read_bounded

# Key types a JWKS may hold for each asymmetric algorithm family. A
# symmetric ("oct") key never comes from a key set: it would let anyone who
# can read the public JWKS forge tokens.
_KTY_FOR_ALG = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


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
    """The keys of C{path}: a private regular file of at most 1 MiB (else FileRefused, a ValueError)."""
    return parse_api_keys(read_bounded(path, private=True).decode("utf-8"))


# -- JWT keys -------------------------------------------------------------


def load_public_key(path: str) -> Any:
    """A PEM public key, or the public key of a PEM certificate."""
    data = read_bounded(path)
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
    return KeySet(json.loads(read_bounded(path)))
