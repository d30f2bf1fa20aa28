"""
[auth] through a real gateway: API keys, optional routes, route-level
origins, claim headers, and secrets kept out of a debug-level log.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from support.gateway import proxy_ini
from support.waiting import wait_for

SECRET = "k" * 32
API_KEY = "svc-key-3f9a0c1d2e"


def mint(**claims: Any) -> str:
    return jwt.encode({"sub": "alice", "exp": int(time.time()) + 300, **claims}, SECRET, algorithm="HS256")


@pytest.fixture
def gateway(tmp_path: Path, start_gateway: Any, make_upstream: Any) -> tuple[Any, Any]:
    keys = tmp_path / "api-keys"
    keys.write_text(f"{hashlib.sha256(API_KEY.encode()).hexdigest()} billing-service writer\n")
    keys.chmod(0o600)  # API keys are secrets: private to the gateway's user (docs/configuration.md)
    up = make_upstream()
    gw = start_gateway(f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1
        allowed_origins = https://app.example.com

        [auth]
        secret = {SECRET}
        api_keys_file = {keys}
        forward_claims = sub=X-User-Id roles=X-User-Roles tenant=X-Tenant

        [log]
        level = debug
        format = json

        [upstream:backend]
        nodes = {up.node}

        [route:open]
        path = /open/**
        upstream = backend
        auth = optional
        allowed_origins = https://*.partner.example

        [route:writers]
        path = /write/**
        upstream = backend
        roles = writer

        [route:main]
        path = /**
        upstream = backend
        """)
    return gw, up


def status(url: str, **kwargs: Any) -> int:
    try:
        with connect(url, open_timeout=5, **kwargs) as ws:
            ws.send("ping")
            assert ws.recv(timeout=5) == "ping"
            return 101
    except InvalidStatus as e:
        return e.response.status_code


def test_api_key_identity_roles_and_claim_headers(gateway: tuple[Any, Any]) -> None:
    gw, up = gateway
    assert status(gw.url + "/write/x", additional_headers={"X-API-Key": API_KEY, "X-User-Id": "root"}) == 101
    seen = up.requests[-1].headers
    assert seen["X-User-Id"] == "billing-service"
    assert seen["X-User-Roles"] == "writer"
    assert "X-API-Key" not in seen  # a credential is never forwarded
    assert status(gw.url + "/write/x", additional_headers={"X-API-Key": "wrong"}) == 401
    # a key in the query string is not a key
    assert status(gw.url + f"/write/x?X-API-Key={API_KEY}") == 401


def test_roles_and_claims_from_a_token(gateway: tuple[Any, Any]) -> None:
    gw, up = gateway
    assert status(gw.url + "/write/x", additional_headers={"Authorization": f"Bearer {mint(scope='read')}"}) == 403
    tok = mint(scope="read writer", tenant="t-9")
    assert status(gw.url + "/write/x", additional_headers={"Authorization": f"Bearer {tok}", "X-Tenant": "t-1"}) == 101
    seen = up.requests[-1].headers
    assert (seen["X-User-Id"], seen["X-Tenant"]) == ("alice", "t-9")
    assert "Authorization" not in seen


def test_required_and_optional_routes(gateway: tuple[Any, Any]) -> None:
    gw, up = gateway
    with pytest.raises(InvalidStatus) as info:
        connect(gw.url + "/x", open_timeout=5)
    assert info.value.response.status_code == 401
    assert info.value.response.headers["WWW-Authenticate"].startswith("Bearer")
    assert status(gw.url + "/open/x", additional_headers={"X-User-Id": "root"}) == 101
    assert "X-User-Id" not in up.requests[-1].headers  # anonymous: the spoofed copy is dropped, none added
    assert status(gw.url + "/open/x", additional_headers={"Authorization": "Bearer junk"}) == 401


def test_route_origins_override_the_gateways(gateway: tuple[Any, Any]) -> None:
    gw, _up = gateway
    tok = {"Authorization": f"Bearer {mint()}"}
    assert status(gw.url + "/x", origin="https://app.example.com", additional_headers=tok) == 101
    assert status(gw.url + "/x", origin="https://evil.example.com", additional_headers=tok) == 403
    assert status(gw.url + "/open/x", origin="https://a.partner.example") == 101
    assert status(gw.url + "/open/x", origin="https://app.example.com") == 403


def test_a_debug_log_holds_no_credential(gateway: tuple[Any, Any]) -> None:
    gw, up = gateway
    tok = mint()
    assert status(gw.url + f"/x?access_token={tok}&a=1") == 101
    assert up.requests[-1].path == "/x?a=1"
    assert status(gw.url + "/x", additional_headers={"Authorization": f"Bearer {tok}", "Cookie": "sid=c00k1e"}) == 101
    assert status(gw.url + "/x", subprotocols=["bearer." + tok, "chat"]) == 101
    assert status(gw.url + "/write/x", additional_headers={"X-API-Key": API_KEY}) == 101
    gw.stop()
    log = gw.log()
    assert '"closed' in log or "closed" in log
    for secret in (tok, tok.split(".")[2], SECRET, API_KEY, "c00k1e"):
        assert secret not in log


def test_no_origin_list_is_warned_about_at_start(gateway: tuple[Any, Any], start_gateway: Any,
                                                 make_upstream: Any) -> None:
    listed, _up = gateway
    unlisted = start_gateway(proxy_ini(make_upstream().node))
    assert wait_for(lambda: "allowed_origins is not set" in unlisted.log())
    assert "cross-site WebSocket hijacking" in unlisted.log()
    assert "allowed_origins is not set" not in listed.log()
