"""
``[auth] jwks_url`` against a local HTTPS server (trustme certificate): keys
picked by kid, a rotation picked up on the first unknown kid, refetches
rate-limited, and an untrusted server refused.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from support.waiting import wait_for


class JwksServer:
    def __init__(self, ca: trustme.CA) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                owner.requests += 1
                body = json.dumps(owner.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/jwk-set+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(ctx)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def serve(self, *keys: tuple[str, rsa.RSAPrivateKey]) -> None:
        docs = []
        for kid, key in keys:
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            jwk.update(kid=kid, use="sig")
            docs.append(jwk)
        self.document = {"keys": docs}


@pytest.fixture
def jwks() -> Iterator[tuple[JwksServer, trustme.CA]]:
    ca = trustme.CA()
    server = JwksServer(ca)
    yield server, ca
    server.httpd.shutdown()


def token(key: rsa.RSAPrivateKey, kid: str) -> str:
    return jwt.encode({"sub": f"user-{kid}", "exp": int(time.time()) + 300}, key, algorithm="RS256",
                      headers={"kid": kid})


def status(gw: Any, tok: str) -> int:
    try:
        with connect(gw.url + "/x", additional_headers={"Authorization": f"Bearer {tok}"}, open_timeout=5) as ws:
            ws.send("hi")
            assert ws.recv(timeout=5) == "hi"
            return 101
    except InvalidStatus as e:
        return e.response.status_code


def ini(node: str, url: str, ca: str = "") -> str:
    return f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1
        allowed_origins = http://localhost

        [auth]
        algorithms = RS256
        jwks_url = {url}
        {ca}

        [log]
        level = info
        format = text

        [upstream:backend]
        nodes = {node}

        [route:main]
        path = /**
        upstream = backend
        """


def test_rotation_is_picked_up_on_an_unknown_kid(tmp_path: Path, jwks: Any, start_gateway: Any,
                                                 make_upstream: Any) -> None:
    server, ca = jwks
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    a, b = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    server.serve(("a", a))
    gw = start_gateway(ini(make_upstream().node, server.url, f"jwks_ca = {ca_file}"))
    assert wait_for(lambda: status(gw, token(a, "a")) == 101, timeout=10), gw.log()
    fetched = server.requests
    assert fetched == 1

    # the provider rotates: b replaces a
    server.serve(("b", b))
    assert status(gw, token(b, "b")) == 101
    assert server.requests == fetched + 1
    # a is gone from the new set, and the refetch it would cause is rate-limited
    assert status(gw, token(a, "a")) == 401
    assert status(gw, token(b, "zz")) == 401
    assert server.requests == fetched + 1
    assert "loaded 1 keys from" in gw.log()
    assert "refused tcp4:127.0.0.1" in gw.log() and "unknown key id" in gw.log()


def test_an_untrusted_jwks_server_is_not_believed(jwks: Any, start_gateway: Any, make_upstream: Any) -> None:
    server, _ca = jwks
    a = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server.serve(("a", a))
    # no jwks_ca: the system store does not know the trustme CA
    gw = start_gateway(ini(make_upstream().node, server.url))
    assert wait_for(lambda: "could not fetch the JWKS" in gw.log(), timeout=10), gw.log()
    assert status(gw, token(a, "a")) == 401
    assert server.requests == 0  # the TLS handshake failed before any request
