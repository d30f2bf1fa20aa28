"""
TLS client listeners (``ssl:`` in ``[gateway] listen``, wsgateway/tls.py): real
``twistd`` gateways, real TLS with ``trustme`` certificates, the ``websockets``
library and raw ``ssl`` sockets as clients, loopback only.

Clients dial 127.0.0.1 and name ``localhost`` in the URL, so the TLS server
name is checked without any name lookup leaving loopback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from websockets.sync.client import ClientConnection, connect

from support.gateway import TWISTD, free_port, Gateway, proxy_ini, source_env
from support.waiting import wait_for
from support.tlsclient import drained

GATEWAY_LISTEN = "listen = tcp:{port}:interface=127.0.0.1"


# -- helpers ----------------------------------------------------------------


def write_files(folder: Path, cert: trustme.LeafCert, *, stem: str = "server") -> tuple[Path, Path]:
    """key and certificate (leaf first, then any intermediates: a "fullchain") as the gateway reads them."""
    key_path, cert_path = folder / f"{stem}.key.pem", folder / f"{stem}.cert.pem"
    replace(key_path, cert.private_key_pem.bytes())
    replace(cert_path, b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return key_path, cert_path


def replace(path: Path, data: bytes) -> None:
    """Write a file whole (a temporary file, then rename), the way the README tells operators to."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o600)  # a private key must be private to the gateway's user (docs/configuration.md)
    os.replace(tmp, path)


def ssl_listen(key: Path, cert: Path | None = None, extra: str = "") -> str:
    desc = f"ssl:{{port}}:interface=127.0.0.1:privateKey={key}"
    return f"listen = {desc}" + (f":certKey={cert}" if cert else "") + extra


def tls_ini(node: str, listen: str, *, fmt: str = "text") -> str:
    body = proxy_ini(node).replace(GATEWAY_LISTEN, listen)
    assert listen in body
    return body.replace("format = text", f"format = {fmt}")


def trusting(*cas: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()  # verifies the chain and the host name
    for ca in cas:
        ca.configure_trust(ctx)
    return ctx


def wss(port: int, ctx: ssl.SSLContext, path: str = "/", host: str = "localhost") -> ClientConnection:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return connect(f"wss://{host}:{port}{path}", sock=sock, ssl=drained(ctx), open_timeout=10, close_timeout=10,
                       compression=None)
    except BaseException:
        sock.close()
        raise


def echo(ws: ClientConnection, message: str | bytes) -> None:
    ws.send(message)
    assert ws.recv(timeout=10) == message


def handshake(port: int, version: ssl.TLSVersion) -> str:
    """A raw TLS handshake offering exactly ``version`` (no verification); the version agreed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl.TLSVersion.TLSv1/TLSv1_1 are deprecated
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = version
        if version < ssl.TLSVersion.TLSv1_3:
            # SECLEVEL=0: OpenSSL 3 refuses TLS < 1.2 at its default level even as a client
            ctx.set_ciphers("ALL:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return str(tls.version())


def lenient_server(cert: trustme.LeafCert) -> tuple[int, list[str], threading.Thread]:
    """A one-shot local TLS server that accepts TLS 1.0 and up: proves the test client can speak old TLS."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    cert.configure_cert(ctx)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    seen: list[str] = []

    def serve() -> None:
        with listener:
            listener.settimeout(10)
            conn, _ = listener.accept()
            with ctx.wrap_socket(conn, server_side=True) as tls:
                seen.append(str(tls.version()))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], seen, thread


def log_lines(gw: Gateway) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gw.log().splitlines() if line.startswith("{")]


def hup_and_wait(gw: Gateway, done: Callable[[str], bool]) -> None:
    before = len(gw.log())
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: done(gw.log()[before:]), timeout=10), gw.log()[before:]
    assert gw.proc.poll() is None, "SIGHUP killed the gateway"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


# -- serving wss:// ---------------------------------------------------------------


@pytest.mark.parametrize("layout", ["fullchain-in-certKey", "extraCertChain", "everything-in-privateKey"])
def test_wss_round_trip_through_an_ssl_listener(layout, tmp_path, ca, make_upstream, start_gateway):
    # An intermediate CA: the client trusts only the root, so the handshake
    # succeeds only if the gateway sends the chain it was given.
    leaf = ca.create_child_ca().issue_cert("localhost", "127.0.0.1")
    key, cert = write_files(tmp_path, leaf)
    if layout == "fullchain-in-certKey":
        listen = ssl_listen(key, cert)
    elif layout == "extraCertChain":
        chain = tmp_path / "chain.pem"
        replace(cert, leaf.cert_chain_pems[0].bytes())
        replace(chain, b"".join(blob.bytes() for blob in leaf.cert_chain_pems[1:]))
        listen = ssl_listen(key, cert, f":extraCertChain={chain}")
    else:
        replace(key, leaf.private_key_and_cert_chain_pem.bytes())
        listen = ssl_listen(key)
    up = make_upstream()
    gw = start_gateway(tls_ini(up.node, listen))
    with wss(gw.port, trusting(ca), "/room?x=1") as ws:
        assert ws.socket.version() in ("TLSv1.2", "TLSv1.3")
        echo(ws, "héllo over wss")
        echo(ws, bytes(range(256)) * 64)
    assert up.received == ["héllo over wss", bytes(range(256)) * 64]
    assert up.requests[0].path == "/room?x=1"
    assert up.requests[0].headers["X-Forwarded-Proto"] == "https"
    # the certificate is verified against the host name too
    with pytest.raises(ssl.SSLCertVerificationError):
        wss(gw.port, trusting(ca), host="other.example")
    assert len(up.requests) == 1


# -- TLS 1.2 is the minimum ------------------------------------------------------


@pytest.fixture
def tls_gateway(tmp_path, ca, make_upstream, start_gateway):
    key, cert = write_files(tmp_path, ca.issue_cert("localhost", "127.0.0.1"))
    up = make_upstream()
    return start_gateway(tls_ini(up.node, ssl_listen(key, cert)))


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["TLSv1.0", "TLSv1.1"])
def test_clients_offering_only_tls_1_0_or_1_1_are_refused(version, tls_gateway, ca):
    # Control: this very client completes a handshake at that version with a
    # server that allows it, so the refusal below is the gateway's doing.
    port, seen, thread = lenient_server(ca.issue_cert("localhost"))
    expected = {ssl.TLSVersion.TLSv1: "TLSv1", ssl.TLSVersion.TLSv1_1: "TLSv1.1"}[version]
    assert handshake(port, version) == expected
    thread.join(10)
    assert seen == [expected]

    with pytest.raises(ssl.SSLError):
        handshake(tls_gateway.port, version)
    assert tls_gateway.proc.poll() is None


def test_a_clean_close_over_tls_ends_the_connection_at_once(tls_gateway, ca):
    # Twisted's TLS transport holds its close_notify while a producer is
    # registered; the relay used to leave the other leg registered, so the
    # connection lasted until its 5 s close timer aborted it.
    with wss(tls_gateway.port, trusting(ca), "/closing") as ws:
        echo(ws, "bye")
    assert wait_for(lambda: "closed " in tls_gateway.log(), 10)
    line = next(line for line in tls_gateway.log().splitlines() if "closed " in line)
    assert "code=1000 closed_by=client" in line
    duration = float(line.split("duration=")[1].split()[0])
    assert duration < 4.0, line  # the close timer (5 s) did not have to fire


def test_tls_1_2_and_1_3_are_accepted(tls_gateway):
    assert handshake(tls_gateway.port, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert handshake(tls_gateway.port, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"


def test_clients_offering_alpn_get_http_1_1(tls_gateway):
    # Browsers and curl offer ALPN; with no protocol configured, Twisted failed
    # every such handshake with an "internal error" alert (tests/test_browser.py
    # caught it: Chromium's wss:// never connected).
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", tls_gateway.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"
    assert "SSL error" not in tls_gateway.log()


# -- SIGHUP: new certificates for new connections ---------------------------------


def test_sighup_serves_a_new_certificate_and_keeps_open_connections(tmp_path, ca, make_upstream, start_gateway):
    key, cert = write_files(tmp_path, ca.issue_cert("localhost"))
    up = make_upstream()
    gw = start_gateway(tls_ini(up.node, ssl_listen(key, cert)))
    new_ca = trustme.CA()
    with pytest.raises(ssl.SSLCertVerificationError):
        wss(gw.port, trusting(new_ca))  # not yet

    with wss(gw.port, trusting(ca), "/before") as old:
        echo(old, "before the reload")
        write_files(tmp_path, new_ca.issue_cert("localhost"))  # the same two paths
        hup_and_wait(gw, lambda log: "reloaded, now serving" in log)
        # the connection opened with the old certificate carries on
        echo(old, "after the reload")
        echo(old, b"\x00\x01" * 1000)
        # new connections get the new certificate
        with wss(gw.port, trusting(new_ca), "/after") as new:
            echo(new, "new certificate")
        with pytest.raises(ssl.SSLCertVerificationError):
            wss(gw.port, trusting(ca))
        echo(old, "still there")
    assert [r.path for r in up.requests] == ["/before", "/after"]
    # a second SIGHUP with nothing changed is harmless too
    hup_and_wait(gw, lambda log: "reloaded, unchanged" in log)
    assert gw.stop() == 0


@pytest.mark.parametrize("damage", ["garbled key", "missing certificate", "key of another certificate"])
def test_sighup_with_a_bad_file_keeps_the_old_certificate(damage, tmp_path, ca, make_upstream, start_gateway):
    key, cert = write_files(tmp_path, ca.issue_cert("localhost"))
    up = make_upstream()
    gw = start_gateway(tls_ini(up.node, ssl_listen(key, cert), fmt="json"))
    with wss(gw.port, trusting(ca)) as old:
        echo(old, "before")
        if damage == "garbled key":
            replace(key, b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
            named, problem = key, "no valid unencrypted PEM private key"
        elif damage == "missing certificate":
            cert.unlink()
            named, problem = cert, "No such file or directory"
        else:
            replace(key, trustme.CA().issue_cert("localhost").private_key_pem.bytes())
            named, problem = key, "does not match"
        hup_and_wait(gw, lambda log: "TLS reload" in log and "failed" in log)
        echo(old, "after")
    (error,) = [e for e in log_lines(gw) if e["event"].startswith("TLS reload")]
    assert error["level"] == "error"
    assert str(named) in error["event"] and problem in error["event"]
    assert "still serving the previous certificate" in error["event"]
    assert "SIGHUP again" in error["event"]
    assert "Traceback" not in gw.log()
    # still the old certificate for new connections
    with wss(gw.port, trusting(ca)) as ws:
        echo(ws, "old certificate still served")


def test_sighup_without_an_ssl_listener_does_not_stop_the_gateway(make_upstream, start_gateway):
    up = make_upstream()
    gw = start_gateway(proxy_ini(up.node))
    # the INI is re-read (tests/test_reload.py), with no certificate to reload
    hup_and_wait(gw, lambda log: "reloaded " in log and "TLS" not in log)
    with connect(f"{gw.url}/x", open_timeout=10) as ws:
        echo(ws, "alive")
    assert gw.stop() == 0


# -- config errors ----------------------------------------------------------------


@pytest.mark.parametrize("problem", ["missing certificate", "garbled certificate", "encrypted key",
                                     "key of another certificate", "sslmethod"])
def test_bad_tls_files_stop_twistd_before_it_listens(problem, tmp_path, ca):
    key, cert = write_files(tmp_path, ca.issue_cert("localhost"))
    extra = ""
    if problem == "missing certificate":
        cert.unlink()
        expected = f"certKey {cert}: cannot read: No such file or directory"
    elif problem == "garbled certificate":
        cert.write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
        expected = f"certKey {cert}: no valid PEM certificate in it"
    elif problem == "encrypted key":
        private = serialization.load_pem_private_key(key.read_bytes(), None)
        key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.BestAvailableEncryption(b"pass")))
        expected = f"privateKey {key}: the key is encrypted"
    elif problem == "key of another certificate":
        replace(key, trustme.CA().issue_cert("localhost").private_key_pem.bytes())
        expected = f"privateKey {key}: does not match the (first) certificate in certKey {cert}"
    else:
        extra = ":sslmethod=TLSv1_METHOD"
        expected = "sslmethod= is not supported"
    port = free_port()
    listen = f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}{extra}"
    ini = tmp_path / "gw.ini"
    ini.write_text(tls_ini("ws://127.0.0.1:9", f"listen = {listen}").replace("\n        ", "\n"))
    out = subprocess.run([TWISTD, "-n", "--pidfile=", "wsgateway", "--config", str(ini)], capture_output=True,
                         text=True, cwd=tmp_path, env=source_env(), timeout=60)
    assert out.returncode == 1
    (line,) = [line for line in out.stderr.splitlines() if line.startswith(f"{ini}: ")]
    assert line.startswith(f"{ini}: [gateway] listen: invalid endpoint {listen!r}: "), line
    assert expected in line, line
    assert "Traceback" not in out.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# -- the development certificate ----------------------------------------------------


def selfsigned(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wsgateway.dev.selfsigned", str(folder)], capture_output=True,
                          text=True, env=source_env(), timeout=60)


def test_selfsigned_certificate_serves_wss_for_localhost_and_127_0_0_1(tmp_path, make_upstream, start_gateway):
    folder = tmp_path / "tls"
    assert selfsigned(folder).returncode == 0
    up = make_upstream()
    gw = start_gateway(tls_ini(up.node, ssl_listen(folder / "key.pem", folder / "cert.pem")))
    ctx = ssl.create_default_context(cafile=str(folder / "cert.pem"))
    for host in ("localhost", "127.0.0.1"):
        with wss(gw.port, ctx, host=host) as ws:
            echo(ws, f"dev certificate via {host}")


# -- the listen syntax ----------------------------------------------------------------
