"""
Issue 16 items 4 and 7 at the header level: only a Host that is
C{host[:port]} becomes X-Forwarded-Host, and no client header named
X-Wsgateway-* ever goes upstream (the gateway's own are set by the chain).
"""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from wsgateway.handshake.headers import upstream_headers

PROXY = [ip_network("10.0.0.0/8")]


def build(client: dict[str, str], peer_ip: str = "203.0.113.9") -> dict[str, str]:
    out, _, _ = upstream_headers(client, peer_ip=peer_ip, secure=False, trusted_proxies=PROXY)
    return out


@pytest.mark.parametrize(
    "name",
    ["x-wsgateway-conn-id", "x-wsgateway-seq", "x-wsgateway-replay", "x-wsgateway-anything", "X-WSGATEWAY-SEQ"],
)
def test_client_x_wsgateway_headers_are_dropped(name: str) -> None:
    out = build({"host": "gw.example", name.lower(): "forged", "x-wsgateway": "not the prefix", "x-app": "1"})
    assert not [k for k in out if k.lower().startswith("x-wsgateway-")]
    assert out["X-Wsgateway"] == "not the prefix"
    assert out["X-App"] == "1"


@pytest.mark.parametrize("host", ["a.example.com", "a.example.com:8443", "[::1]:80", "127.0.0.1"])
def test_a_valid_host_is_x_forwarded_host(host: str) -> None:
    assert build({"host": host})["X-Forwarded-Host"] == host


@pytest.mark.parametrize("host", ["evil.example, a.example.com", "evil.example/a.example.com", "a.example.com:99999"])
def test_a_malformed_host_is_never_x_forwarded_host(host: str) -> None:
    assert "X-Forwarded-Host" not in build({"host": host})


def test_a_trusted_proxys_forwarded_host_only_when_valid() -> None:
    assert build({"host": "gw.internal", "x-forwarded-host": "a.example.com"}, "10.0.0.1")["X-Forwarded-Host"] == \
        "a.example.com"
    bad = {"host": "gw.internal", "x-forwarded-host": "evil.example, a.example.com"}
    assert build(bad, "10.0.0.1")["X-Forwarded-Host"] == "gw.internal"
    # an untrusted peer's X-Forwarded-Host is never believed
    assert build({"host": "gw.internal", "x-forwarded-host": "a.example.com"})["X-Forwarded-Host"] == "gw.internal"
