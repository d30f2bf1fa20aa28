"""
/metrics as Prometheus itself reads it: ``promtool check metrics`` (Debian's
``prometheus`` package, installed by ``make sysdeps``) on the real pages of a
single process and of a parent of two workers, after traffic that moves every
family (accepted, refused, closed connections); and OpenMetrics when the
scraper asks for it (docs/metrics.md). promtool missing is a failure, not a skip.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import urllib.request
from typing import Any

from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from websockets.sync.client import connect

from support.gateway import free_port, proxy_ini
from support.metrics_text import get, parse
from support.waiting import wait_for

PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;"
                     "q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2")  # what Prometheus 2.x sends


def promtool() -> str:
    found = shutil.which("promtool")
    assert found is not None, "promtool is missing: run `make sysdeps` (Debian package prometheus)"
    return found


def fetch(admin: int, accept: str | None = None) -> tuple[str, str]:
    """(content type, body) of the admin port's /metrics."""
    req = urllib.request.Request(f"http://127.0.0.1:{admin}/metrics", headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.headers["Content-Type"], r.read().decode()


def check(page: str) -> None:
    """promtool's verdict on a text page: no error, no lint problem."""
    done = subprocess.run([promtool(), "check", "metrics"], input=page.encode(), capture_output=True, timeout=30)
    said = (done.stdout + done.stderr).decode()
    assert done.returncode == 0 and not said.strip(), said


def traffic(port: int) -> None:
    """One echo (a 101, then a close), and one upgrade refused for its Host (the chain's 400, before any route)."""
    with connect(f"ws://127.0.0.1:{port}/room", open_timeout=5, ping_interval=None) as ws:
        ws.send("x")
        assert ws.recv(timeout=5) == "x"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /room HTTP/1.1\r\nHost: bad host\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 400 ")


def test_a_single_process_page_passes_promtool_and_speaks_openmetrics(make_upstream: Any,
                                                                      start_gateway: Any) -> None:
    up = make_upstream()
    admin = free_port()
    gw = start_gateway(proxy_ini(up.node).replace(
        "[log]", f"[admin]\n        listen = tcp:{admin}:interface=127.0.0.1\n        token = promtool-test-token\n\n"
                 "        [log]"))
    traffic(gw.port)
    assert wait_for(lambda: get(parse(fetch(admin)[1]), "wsgateway_connection_duration_seconds_count",
                                route="main") == 1)
    kind, page = fetch(admin)
    assert kind.startswith("text/plain; version=0.0.4")
    check(page)
    m = parse(page)
    assert get(m, "wsgateway_handshakes_total", route="(none)", status="400", reason="bad_host") == 1
    assert get(m, "process_open_fds") > 0  # one process: no worker label
    # what Prometheus asks for: OpenMetrics, the same samples
    kind, page = fetch(admin, PROMETHEUS_ACCEPT)
    assert kind.startswith("application/openmetrics-text; version=1.0.0")
    assert page.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(page)}
    assert families["wsgateway_handshakes"].type == "counter"
    assert families["wsgateway_connection_duration_seconds"].type == "histogram"
    assert families["wsgateway_upstream_connections_active"].type == "gauge"
    refused = [s for s in families["wsgateway_handshakes"].samples if s.labels.get("reason") == "bad_host"]
    assert [s.value for s in refused] == [1]


def test_a_workers_parent_page_passes_promtool(make_upstream: Any, start_gateway: Any) -> None:
    up = make_upstream()
    admin = free_port()
    ini = proxy_ini(up.node).replace(
        "listen = tcp:{port}:interface=127.0.0.1",
        "listen = tcp:{port}:interface=127.0.0.1\n        workers = 2\n\n"
        f"        [admin]\n        listen = tcp:{admin}:interface=127.0.0.1\n        token = promtool-test-token",
    )
    gw = start_gateway(ini)

    def running() -> bool:
        """Both workers answer the parent's scrapes (running is not enough: a new one may not listen yet)."""
        try:
            m = parse(fetch(admin)[1])
        except OSError:
            return False
        return {dict(k[1]).get("worker") for k in m if k[0] == "process_max_fds"} == {"1", "2", "parent"}

    assert wait_for(running, 20)
    traffic(gw.port)
    assert wait_for(lambda: get(parse(fetch(admin)[1]), "wsgateway_connection_duration_seconds_count",
                                route="main") == 1)
    kind, page = fetch(admin)
    assert kind.startswith("text/plain; version=0.0.4")
    check(page)
    m = parse(page)
    assert get(m, "wsgateway_handshakes_total", route="(none)", status="400", reason="bad_host") == 1
    kind, page = fetch(admin, PROMETHEUS_ACCEPT)
    assert kind.startswith("application/openmetrics-text; version=1.0.0") and page.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(page)}
    assert families["wsgateway_connection_duration_seconds"].type == "histogram"
    assert {dict(k[1]).get("worker") for k in m if k[0] == "process_max_fds"} == {"1", "2", "parent"}
