"""
Log lines an operator reads (docs/logs.md), from real gateways: a port
already taken at start, a client's failed TLS handshake, admin requests,
and the level a reload reports after PUT /admin/log-level.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trustme

from support.gateway import TWISTD, free_port, proxy_ini, source_env
from support.waiting import wait_for

TOKEN = "log-lines-admin-token-0123456789"


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_port_already_in_use_gives_one_line_and_exit_1(fmt: str, tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        desc = f"tcp:{port}:interface=127.0.0.1"
        ini = tmp_path / "gw.ini"
        ini.write_text(proxy_ini("ws://127.0.0.1:9").replace("tcp:{port}:interface=127.0.0.1", desc)
                       .replace("format = text", f"format = {fmt}"))
        out = subprocess.run([TWISTD, "-n", "--pidfile=", "wsgateway", "--config", str(ini)], capture_output=True,
                             text=True, cwd=tmp_path, env=source_env(), timeout=60)
    assert out.returncode == 1, out.stdout
    log = out.stdout + out.stderr
    assert "Traceback" not in log, log
    expected = (f"cannot listen on {desc}: address already in use; stop what holds the port or change "
                "[gateway] listen")
    lines = [line for line in log.splitlines() if "cannot listen" in line]
    assert len(lines) == 1 and expected in lines[0], log
    if fmt == "json":
        events = json_lines(log)
        assert len(events) == len(log.splitlines()), log  # nothing but JSON objects
        assert [e["level"] for e in events if "cannot listen" in e["event"]] == ["critical"]
        assert not [e for e in events if e["level"] == "error"], log
    # nothing after it: the process ends there
    assert log.rstrip().splitlines()[-1] == lines[0]


def test_a_client_that_does_not_trust_the_certificate_is_logged_at_info(tmp_path: Path, make_upstream: Any,
                                                                        start_gateway: Any) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    key_path, cert_path = tmp_path / "server.key.pem", tmp_path / "server.cert.pem"
    key_path.write_bytes(cert.private_key_pem.bytes())
    key_path.chmod(0o600)
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    up = make_upstream()
    body = proxy_ini(up.node).replace("format = text", "format = json").replace(
        "listen = tcp:{port}:interface=127.0.0.1",
        f"listen = ssl:{{port}}:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}")
    gw = start_gateway(body)
    untrusting = ssl.create_default_context()  # the system's CAs only: trustme's CA is unknown to it
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        with pytest.raises(ssl.SSLCertVerificationError):
            untrusting.wrap_socket(sock, server_hostname="localhost")

    def tls_lines() -> list[dict[str, Any]]:
        return [e for e in json_lines(gw.log()) if "TLS error" in e["event"] or "SSL error" in e["event"]]

    assert wait_for(lambda: tls_lines(), 5), gw.log()
    time.sleep(0.2)
    lines = tls_lines()
    assert [e["level"] for e in lines] == ["info"], lines
    assert lines[0]["event"].startswith("client TLS error: "), lines
    assert "unknown ca" in lines[0]["event"], lines
    assert not [e for e in json_lines(gw.log()) if e["level"] == "error"], gw.log()


def admin_ini(node: str, admin: int, *, fmt: str = "text") -> str:
    return proxy_ini(node).replace("format = text", f"format = {fmt}") + f"""
        [admin]
        listen = tcp:{admin}:interface=127.0.0.1
        token = {TOKEN}
        """


def request(port: int, method: str, path: str, body: Any = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        r.read()
        return int(r.status)


def test_admin_requests_write_no_line_each_at_info(make_upstream: Any, start_gateway: Any) -> None:
    up = make_upstream()
    admin = free_port()
    gw = start_gateway(admin_ini(up.node, admin))
    assert wait_for(lambda: "admin listening on" in gw.log(), 5)
    time.sleep(0.3)
    before = len(gw.log().splitlines())
    for _ in range(5):
        assert request(admin, "GET", "/metrics") == 200
    assert request(admin, "GET", "/dashboard.json") == 200
    assert request(admin, "GET", "/admin/routes") == 200
    time.sleep(0.5)
    after = gw.log().splitlines()[before:]
    assert after == [], after
    # at debug, they are still there, at debug
    assert request(admin, "PUT", "/admin/log-level", {"level": "debug"}) == 200
    assert request(admin, "GET", "/metrics") == 200
    assert wait_for(lambda: '"GET /metrics HTTP/1.1" 200' in gw.log(), 5), gw.log()
    line = [ln for ln in gw.log().splitlines() if '"GET /metrics HTTP/1.1" 200' in ln][-1]
    assert "#debug]" in line, line


def test_a_reload_after_a_runtime_level_change_says_the_level_in_effect(make_upstream: Any,
                                                                       start_gateway: Any) -> None:
    up = make_upstream()
    admin = free_port()
    gw = start_gateway(admin_ini(up.node, admin, fmt="json"))
    assert request(admin, "PUT", "/admin/log-level", {"level": "debug"}) == 200
    before = len(gw.log())
    gw.proc.send_signal(__import__("signal").SIGHUP)
    assert wait_for(lambda: "reloaded " in gw.log()[before:], 10), gw.log()[before:]
    reloaded = [e for e in json_lines(gw.log()[before:]) if e["event"].startswith("reloaded ")]
    assert reloaded[0]["event"].endswith("; log level debug (set at runtime; the file says info)"), reloaded
    # and debug is still in effect: the reload did not reset it
    assert request(admin, "GET", "/metrics") == 200
    assert wait_for(lambda: any(e["level"] == "debug" for e in json_lines(gw.log()[before:])), 5)
