"""
Forged, stale and misplaced credentials (docs/configuration.md [auth], docs/protocol.md).

The main gateway pins HS256 with issuer, audience and ``leeway = 0``; two
module-scoped gateways pin RS256, one with ``public_key_file`` and one with
``jwks_file``. Every refusal is checked for its exact status, for
``WWW-Authenticate: Bearer`` on 401, and for the upstream never having been
asked; every token goes into the ``sent`` registry, which the last test greps
the logs for.
"""

from __future__ import annotations

import base64
import json
import secrets
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from support.gateway import Gateway, spawn_gateway
from support.rawws import OP_CLOSE, frame, header
from support.waiting import wait_for

from .helpers import (
    Backend,
    Main,
    Secrets,
    claims,
    echo_ok,
    expect_close,
    handshake,
    hs256_by_hand,
    refused,
    say_goodbye,
    uid,
    unsigned_token,
)


def assert_401(port: int, backend: Backend, path: str, extra: list[tuple[str, str]]) -> None:
    line, headers = refused(port, path, extra)
    assert line == "HTTP/1.1 401 Unauthorized"
    challenges = header(headers, "WWW-Authenticate")
    assert len(challenges) == 1 and challenges[0].startswith("Bearer"), headers
    time.sleep(0.05)
    assert backend.paths_with(path) == [], "a refused client reached the upstream"


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


# -- the main gateway: HS256 ------------------------------------------------------

OTHER_SECRET = secrets.token_urlsafe(48)


def _tampered(main: Main) -> str:
    """A valid token whose payload is swapped for one granting admin, the signature kept."""
    good = jwt.encode(claims(), main.secret, algorithm="HS256")
    head, _, sig = good.split(".")
    body = base64.urlsafe_b64encode(json.dumps(claims(roles=["admin"])).encode()).rstrip(b"=").decode()
    return f"{head}.{body}.{sig}"


BAD_TOKENS: dict[str, Callable[[Main], str]] = {
    "expired": lambda m: jwt.encode(claims(iat=int(time.time()) - 120, exp=int(time.time()) - 60), m.secret),
    "expired-1s-ago": lambda m: jwt.encode(claims(exp=int(time.time()) - 1), m.secret),
    "other-secret": lambda m: jwt.encode(claims(), OTHER_SECRET),
    "alg-none": lambda m: unsigned_token({"alg": "none", "typ": "JWT"}, claims()),
    "alg-None": lambda m: unsigned_token({"alg": "None", "typ": "JWT"}, claims()),
    "alg-none-with-hs256-signature": lambda m: unsigned_token(
        {"alg": "none"}, claims(), jwt.encode(claims(), m.secret).split(".")[2].encode()
    ),
    "HS512-same-secret": lambda m: jwt.encode(claims(), m.secret, algorithm="HS512"),
    "wrong-issuer": lambda m: jwt.encode(claims(iss="https://evil.example"), m.secret),
    "wrong-audience": lambda m: jwt.encode(claims(aud="another-service"), m.secret),
    "nbf-in-the-future": lambda m: jwt.encode(claims(nbf=int(time.time()) + 60), m.secret),
    "no-exp": lambda m: jwt.encode(claims(exp=None), m.secret),
    "signature-stripped": lambda m: jwt.encode(claims(), m.secret).rsplit(".", 1)[0] + ".",
    "payload-tampered": _tampered,
    "garbage": lambda m: "not.a.jwt",
}


def test_no_token_is_401_with_bearer_challenge(main: Main, sent: Secrets) -> None:
    cookie = sent.add("session=" + secrets.token_urlsafe(16))
    assert_401(main.port, main.backend, "/auth/" + uid("none"), [("Cookie", cookie)])


@pytest.mark.parametrize("name", list(BAD_TOKENS))
def test_bad_token_is_401(main: Main, sent: Secrets, name: str) -> None:
    token = sent.add(BAD_TOKENS[name](main))
    assert_401(main.port, main.backend, "/auth/" + uid(name), bearer(token))


@pytest.mark.parametrize(
    "authorization",
    ["Basic YWxpY2U6c2VjcmV0LXBhc3N3b3Jk", "Bearer", "Bearer    ", "Token {token}", "{token}"],
    ids=["basic", "bearer-empty", "bearer-spaces", "other-scheme", "no-scheme"],
)
def test_authorization_that_is_not_a_bearer_token_is_401(main: Main, sent: Secrets, authorization: str) -> None:
    value = sent.add(authorization.format(token=main.token(sent)))
    assert_401(main.port, main.backend, "/auth/" + uid("scheme"), [("Authorization", value)])


def test_valid_token_in_header_is_accepted_and_not_forwarded(main: Main, sent: Secrets) -> None:
    token = main.token(sent)
    path = "/auth/" + uid("hdr")
    line, _, sock, reader = handshake(main.port, path, bearer(token))
    assert line == "HTTP/1.1 101 Switching Protocols"
    echo_ok(sock, reader)
    say_goodbye(sock, reader)
    h = main.backend.get(path).request.headers
    assert h.get_all("X-User-Id") == ["alice"]
    assert "Authorization" not in h
    assert token not in str(list(h.raw_items()))


def test_token_in_query_is_accepted_stripped_and_never_logged(main: Main, sent: Secrets) -> None:
    token = main.token(sent)
    marker = uid("query")
    path = f"/auth/{marker}"
    logged_before = len(main.gw.log())
    line, _, sock, reader = handshake(main.port, f"{path}?room=1&access_token={token}&b=2")
    assert line == "HTTP/1.1 101 Switching Protocols"
    echo_ok(sock, reader)
    say_goodbye(sock, reader)
    seen = main.backend.get(path)
    assert seen.request.path == f"{path}?room=1&b=2"
    assert seen.request.headers.get_all("X-User-Id") == ["alice"]
    assert token not in str(list(seen.request.headers.raw_items()))
    # the connection's own lines (debug level: handshake, open, close) are in
    assert wait_for(lambda: '"route": "auth"' in main.gw.log()[logged_before:]), "the connection was not logged"
    assert token not in main.gw.log()
    assert token.split(".")[2] not in main.gw.log()


def test_token_as_subprotocol_is_taken_out_of_the_offer(main: Main, sent: Secrets) -> None:
    token = main.token(sent)
    path = "/auth/" + uid("subproto")
    line, headers, sock, reader = handshake(main.port, path, [("Sec-WebSocket-Protocol", f"bearer.{token}, chat")])
    assert line == "HTTP/1.1 101 Switching Protocols"
    assert header(headers, "Sec-WebSocket-Protocol") == ["chat"]
    echo_ok(sock, reader)
    say_goodbye(sock, reader)
    h = main.backend.get(path).request.headers
    assert h.get_all("Sec-WebSocket-Protocol") == ["chat"]
    assert h.get_all("X-User-Id") == ["alice"]
    assert token not in main.gw.log()


def test_client_cannot_spoof_the_identity_headers(main: Main, sent: Secrets) -> None:
    token = main.token(sent, sub="alice", roles=["user"])
    path = "/auth/" + uid("spoof")
    spoofed = [("X-User-Id", "admin"), ("X-User-Roles", "admin"), ("x-user-id", "root")]
    line, _, sock, reader = handshake(main.port, path, bearer(token) + spoofed)
    assert line == "HTTP/1.1 101 Switching Protocols"
    say_goodbye(sock, reader)
    h = main.backend.get(path).request.headers
    assert h.get_all("X-User-Id") == ["alice"]
    assert h.get_all("X-User-Roles") == ["user"]


@pytest.mark.parametrize(
    "grant, status",
    [
        ({"roles": ["admin"]}, 101),
        ({"roles": ["reader", "admin"]}, 101),
        ({"scope": "read admin"}, 101),
        ({"roles": ["user"]}, 403),
        ({"scope": "read:admin administrator"}, 403),  # no prefix or substring matching
        ({"roles": ["ADMIN"]}, 403),  # role names are exact
        ({}, 403),
    ],
    ids=["roles", "roles-list", "scope", "other-role", "scope-lookalikes", "case", "no-roles"],
)
def test_roles_route(main: Main, sent: Secrets, grant: dict[str, Any], status: int) -> None:
    token = main.token(sent, **grant)
    path = "/admin/" + uid("roles")
    line, _, sock, reader = handshake(main.port, path, bearer(token))
    with sock:
        assert line.split(" ")[1] == str(status), line
        if status == 101:
            echo_ok(sock, reader)
    time.sleep(0.05)
    assert (main.backend.paths_with(path) != []) == (status == 101)


def test_roles_route_without_token_is_401(main: Main) -> None:
    assert_401(main.port, main.backend, "/admin/" + uid("anon"), [])


def test_spoofed_roles_header_does_not_grant_a_role(main: Main, sent: Secrets) -> None:
    token = main.token(sent, roles=["user"])
    line, _ = refused(main.port, "/admin/" + uid("spoof-role"), bearer(token) + [("X-User-Roles", "admin")])
    assert line == "HTTP/1.1 403 Forbidden"


def test_api_key_in_its_header_is_accepted_and_not_forwarded(main: Main) -> None:
    path = "/admin/" + uid("apikey")
    line, _, sock, reader = handshake(main.port, path, [("X-API-Key", main.api_key)])
    assert line == "HTTP/1.1 101 Switching Protocols"
    echo_ok(sock, reader)
    say_goodbye(sock, reader)
    h = main.backend.get(path).request.headers
    assert h.get_all("X-User-Id") == ["svc-robot"]
    assert "X-API-Key" not in h


def test_api_key_is_never_taken_from_the_query_string(main: Main) -> None:
    path = "/auth/" + uid("apikey-query")
    line, headers = refused(main.port, f"{path}?access_token={main.api_key}&api_key={main.api_key}")
    assert line == "HTTP/1.1 401 Unauthorized"
    assert main.backend.paths_with(path) == []


def test_unknown_api_key_is_401(main: Main, sent: Secrets) -> None:
    key = sent.add("sk_" + secrets.token_urlsafe(24))
    assert_401(main.port, main.backend, "/auth/" + uid("apikey-bad"), [("X-API-Key", key)])


def test_connection_is_closed_1008_when_the_token_expires(main: Main, sent: Secrets) -> None:
    """exp about 2-3 s ahead, leeway 0: open, echo, then the gateway's own close at exp."""
    exp = int(time.time()) + 3
    token = main.token(sent, exp=exp)
    path = "/auth/" + uid("expiring")
    line, _, sock, reader = handshake(main.port, path, bearer(token))
    assert line == "HTTP/1.1 101 Switching Protocols"
    with sock:
        echo_ok(sock, reader)
        # at exp, not before: tests/unit/relay/test_relay.py::test_close_at_closes_1008_token_expired_at_that_time_and_not_before
        before, close = expect_close(reader, timeout=exp - time.time() + 3)
        assert before == []
        assert close == (1008, "token expired")
        sock.sendall(frame(OP_CLOSE, (1008).to_bytes(2, "big")))  # the client's half of the close handshake
        reader.wait_eof(3)
    seen = main.backend.get(path)
    assert seen.ended.wait(3), "the upstream connection outlived the token"
    assert seen.received == ["ok"]


# -- RS256: public_key_file and jwks_file ----------------------------------------------


@dataclass
class RsGateway:
    gw: Gateway
    backend: Backend
    key: rsa.RSAPrivateKey
    public_pem: bytes


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _rs_ini(backend: Backend, key_line: str) -> str:
    return textwrap.dedent(
        f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1
        drain_grace = 0
        shutdown_timeout = 1

        [limits]
        ping_interval = 0

        [auth]
        algorithms = RS256
        {key_line}

        [log]
        level = debug
        format = json

        [upstream:backend]
        nodes = {backend.node()}
        connect_timeout = 2
        retries = 0

        [route:rs]
        path = /rs/**
        upstream = backend
        """
    )


def _rs_gateway(tmp: Path, sent: Secrets, key_line: Callable[[Path, rsa.RSAPrivateKey], str], name: str
                ) -> Iterator[RsGateway]:
    key = _rsa()
    backend = Backend()
    gw = sent.watch(spawn_gateway(tmp, _rs_ini(backend, key_line(tmp, key)), name=name))
    yield RsGateway(gw, backend, key, _pem(key))
    gw.stop()
    backend.stop()


@pytest.fixture(scope="module")
def rs_pem(tmp_path_factory: pytest.TempPathFactory, sent: Secrets) -> Iterator[RsGateway]:
    def key_line(tmp: Path, key: rsa.RSAPrivateKey) -> str:
        (tmp / "rs256.pub.pem").write_bytes(_pem(key))
        return f"public_key_file = {tmp / 'rs256.pub.pem'}"

    yield from _rs_gateway(tmp_path_factory.mktemp("rs-pem"), sent, key_line, "rs-pem")


@pytest.fixture(scope="module")
def rs_jwks(tmp_path_factory: pytest.TempPathFactory, sent: Secrets) -> Iterator[RsGateway]:
    def key_line(tmp: Path, key: rsa.RSAPrivateKey) -> str:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        jwk.update(kid="k1", alg="RS256", use="sig")
        (tmp / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
        return f"jwks_file = {tmp / 'jwks.json'}"

    yield from _rs_gateway(tmp_path_factory.mktemp("rs-jwks"), sent, key_line, "rs-jwks")


def _rs_claims() -> dict[str, Any]:
    return claims(iss=None, aud=None, sub="rita")


def _rs_token(sent: Secrets, key: rsa.RSAPrivateKey, kid: str | None = None, **extra_header: Any) -> str:
    headers = {**({"kid": kid} if kid else {}), **extra_header}
    return sent.add(jwt.encode(_rs_claims(), key, algorithm="RS256", headers=headers or None))


def _accepted(rs: RsGateway, token: str) -> None:
    path = "/rs/" + uid("ok")
    line, _, sock, reader = handshake(rs.gw.port, path, bearer(token))
    assert line == "HTTP/1.1 101 Switching Protocols"
    echo_ok(sock, reader)
    say_goodbye(sock, reader)
    assert rs.backend.get(path).request.headers.get_all("X-User-Id") == ["rita"]


def test_rs256_public_key_file_accepts_a_valid_token(rs_pem: RsGateway, sent: Secrets) -> None:
    """The control case: the refusals below are about the token, not a broken gateway."""
    _accepted(rs_pem, _rs_token(sent, rs_pem.key))


def test_rs256_algorithm_confusion_with_public_key_as_hmac_secret_is_401(rs_pem: RsGateway, sent: Secrets) -> None:
    for pem in (rs_pem.public_pem, rs_pem.public_pem.strip()):
        token = sent.add(hs256_by_hand(pem, _rs_claims()))
        assert_401(rs_pem.gw.port, rs_pem.backend, "/rs/" + uid("confusion"), bearer(token))


def test_rs256_alg_none_is_401(rs_pem: RsGateway, sent: Secrets) -> None:
    token = sent.add(unsigned_token({"alg": "none", "typ": "JWT"}, _rs_claims()))
    assert_401(rs_pem.gw.port, rs_pem.backend, "/rs/" + uid("none"), bearer(token))


def test_rs256_signed_by_another_key_is_401(rs_pem: RsGateway, sent: Secrets) -> None:
    assert_401(rs_pem.gw.port, rs_pem.backend, "/rs/" + uid("otherkey"), bearer(_rs_token(sent, _rsa())))


def test_jwks_accepts_a_token_with_a_known_kid(rs_jwks: RsGateway, sent: Secrets) -> None:
    _accepted(rs_jwks, _rs_token(sent, rs_jwks.key, kid="k1"))


def test_jwks_unknown_kid_is_401(rs_jwks: RsGateway, sent: Secrets) -> None:
    token = _rs_token(sent, _rsa(), kid="k2")
    assert_401(rs_jwks.gw.port, rs_jwks.backend, "/rs/" + uid("kid"), bearer(token))


def test_jwks_known_kid_signed_by_another_key_is_401(rs_jwks: RsGateway, sent: Secrets) -> None:
    token = _rs_token(sent, _rsa(), kid="k1")
    assert_401(rs_jwks.gw.port, rs_jwks.backend, "/rs/" + uid("kid-forged"), bearer(token))


def test_jwks_key_embedded_in_the_token_header_is_not_trusted(rs_jwks: RsGateway, sent: Secrets) -> None:
    """The attacker ships its own public key (``jwk``) and a key URL (``jku``): neither may be used."""
    attacker = _rsa()
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(attacker.public_key()))
    for kid in ("k1", "attacker", None):
        token = _rs_token(sent, attacker, kid=kid, jwk=jwk, jku="https://127.0.0.1:1/jwks.json")
        assert_401(rs_jwks.gw.port, rs_jwks.backend, "/rs/" + uid("jwk"), bearer(token))


def test_jwks_algorithm_confusion_is_401(rs_jwks: RsGateway, sent: Secrets) -> None:
    token = sent.add(hs256_by_hand(rs_jwks.public_pem, _rs_claims(), {"kid": "k1"}))
    assert_401(rs_jwks.gw.port, rs_jwks.backend, "/rs/" + uid("confusion"), bearer(token))
