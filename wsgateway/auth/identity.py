# -*- test-case-name: tests.security.test_auth, tests.unit.auth.test_auth -*-
"""
Who a client turned out to be (L{Identity}), and the two ways a check of its
credentials fails. Pure; shared by the key loaders, the verifier and the
handshake.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


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
