"""origins.py: exact and wildcard Origin matching as browsers serialise Origins."""

from __future__ import annotations

import pytest

from wsgateway.handshake.origins import OriginPolicy, normalize

POLICY = OriginPolicy(["https://app.example.com", "https://*.example.org", "http://localhost:3000", "https://[::1]:8443"])


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example.com",
        "HTTPS://APP.EXAMPLE.COM",
        "https://app.example.com:443",
        "https://a.example.org",
        "https://a.b.example.org",
        "http://localhost:3000",
        "https://[::1]:8443",
        None,  # not a browser
    ],
)
def test_allowed(origin: str | None) -> None:
    assert POLICY.allows(origin)


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.com",
        "http://app.example.com",  # scheme matters
        "https://app.example.com:8443",  # port matters
        "https://app.example.com.evil.com",
        "https://evilexample.com",
        "https://example.org",  # the wildcard is for subdomains only
        "https://a.example.org:8443",
        "https://xexample.org",
        "null",
        "",
        "https://app.example.com/path",
        "https://user@app.example.com",
        "http://localhost:3001",
        "https://[::1]",
    ],
)
def test_refused(origin: str) -> None:
    assert not POLICY.allows(origin)


def test_unset_or_empty_allows_everything() -> None:
    assert OriginPolicy(None).allows("https://evil.com")
    assert OriginPolicy(()).allows("null")
    assert not OriginPolicy(None).configured


def test_normalize() -> None:
    assert normalize("http://h:80") == "http://h"
    assert normalize("https://h:443") == "https://h"
    assert normalize("https://h:80") == "https://h:80"
    assert normalize("https://[::1]x") is None
    assert normalize("https://h:port") is None
