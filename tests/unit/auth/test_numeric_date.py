"""
exp, nbf and iat are NumericDates (RFC 7519 section 2: a JSON number) or the
token is refused with 401 (issue 16 item 6): a numeric string was accepted,
and the close on expiry, scheduled only for a number, never came.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest

from wsgateway.auth.identity import AuthFailed
from wsgateway.auth.verifier import TokenVerifier
from wsgateway.config.auth import AuthConfig

SECRET = "s" * 32
VERIFIER = TokenVerifier(AuthConfig(algorithms=("HS256",), secret=SECRET, leeway=0))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(claims: dict[str, Any]) -> str:
    """HS256 over the claims' JSON as written here (NaN, huge ints and all: PyJWT's encoder would refuse some)."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims, allow_nan=True).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def later() -> int:
    return int(time.time()) + 300


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": str(later())},
        {"exp": f"{later()}.0"},
        {"exp": True},
        {"exp": [later()]},
        {"exp": {"t": later()}},
        {"exp": float("inf")},
        {"exp": float("nan")},
        {"exp": 10**400},
        {"exp": later(), "nbf": "0"},
        {"exp": later(), "nbf": False},
        {"exp": later(), "nbf": None},
        {"exp": later(), "iat": "0"},
        {"exp": later(), "iat": True},
        {"exp": later(), "iat": float("-inf")},
    ],
    # fixed ids: ids made from the values would hold the time of collection,
    # and pytest-xdist refuses workers that collected different ids
    ids=["exp-string", "exp-decimal-string", "exp-true", "exp-list", "exp-object", "exp-inf", "exp-nan",
         "exp-huge", "nbf-string", "nbf-false", "nbf-null", "iat-string", "iat-true", "iat-minus-inf"],
)
def test_a_time_claim_that_is_not_a_number_is_401(claims: dict[str, Any]) -> None:
    with pytest.raises(AuthFailed) as info:
        VERIFIER.verify(signed({"sub": "alice", **claims}))
    assert info.value.status == 401


def test_numbers_are_numeric_dates_and_exp_is_always_the_expiry() -> None:
    exp = later()
    now = int(time.time())
    identity = VERIFIER.verify(jwt.encode({"sub": "a", "exp": exp, "nbf": now - 1, "iat": float(now)}, SECRET))
    assert identity.expires == float(exp)
    identity = VERIFIER.verify(signed({"sub": "a", "exp": exp + 0.5}))
    assert identity.expires == exp + 0.5
