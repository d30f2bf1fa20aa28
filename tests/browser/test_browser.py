"""
The admin port's pages in a real browser: headless Chromium from Debian's
``chromium`` package (``make test`` installs it), driven by Playwright's
Python package with ``executable_path``, so Playwright downloads no browser.

The dashboard of a running gateway follows connections live without a
reload; the default config's demo page round-trips a message over wss://
through the gateway with Chromium's own WebSocket client.
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import json
import os
import re
import shutil
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.web.test.requesthelper import DummyRequest
from websockets.sync.client import connect

from support.gateway import default_config, free_port
from support.waiting import wait_for
from wsgateway.ops.dashboard import dashboard_page

try:
    from playwright.sync_api import Browser, Page, Playwright, Route, expect, sync_playwright
except ImportError:  # pragma: no cover - the message is the point
    pytest.fail("the browser tests need Playwright: pip install '.[test]' (make test does)", pytrace=False)

CHROMIUM = os.environ.get("WSGW_CHROMIUM", "/usr/bin/chromium")
WAIT_MS = 5000  # the dashboard polls every second


def chromium_args(*extra: str) -> list[str]:
    # Root in a container: no sandbox. The rest keeps Chromium from calling
    # home (this machine has no network; each attempt would be refused).
    return [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", *extra,
    ]


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        found = shutil.which("chromium")
        pytest.fail(
            f"no Chromium at {CHROMIUM}{f' (but there is {found}: set WSGW_CHROMIUM)' if found else ''}: "
            "the browser tests need Debian's chromium package; `make test` installs it "
            "(or: apt-get install chromium)",
            pytrace=False,
        )
    with sync_playwright() as p:
        yield p


@pytest.fixture
def launch(playwright: Playwright) -> Iterator[Callable[..., Browser]]:
    """launch(*chromium_flags) -> a headless Chromium, closed after the test."""
    browsers: list[Browser] = []

    def start(*extra: str) -> Browser:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=chromium_args(*extra))
        browsers.append(browser)
        return browser

    yield start
    for browser in browsers:
        browser.close()


def csp_violations(page: Page) -> list[str]:
    """Console messages about the Content-Security-Policy, collected from now on."""
    seen: list[str] = []
    page.on("console", lambda m: seen.append(m.text) if "Content Security Policy" in m.text else None)
    return seen


def dashboard_ini(admin: int, up_node: str, down_node: str) -> str:
    return f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1

        [admin]
        listen = tcp:{admin}:interface=127.0.0.1

        [log]
        format = text

        [upstream:backend]
        nodes = {up_node}
        retries = 0

        [upstream:flaky]
        nodes = {down_node}
        health_check = tcp
        health_interval = 0.2
        health_timeout = 0.5
        unhealthy_threshold = 1

        [route:main]
        path = /**
        upstream = backend

        [route:other]
        path = /other
        upstream = flaky
        """


def test_dashboard_shows_routes_node_states_and_live_connection_counts(make_upstream, start_gateway, launch):
    up = make_upstream()
    admin, down = free_port(), free_port()  # nothing listens on `down`
    down_node = f"ws://127.0.0.1:{down}"
    gw = start_gateway(dashboard_ini(admin, up.node, down_node))
    page = launch().new_page()
    violations = csp_violations(page)
    page.goto(f"http://127.0.0.1:{admin}/")

    main = page.locator('tr[data-route="main"]')
    expect(main.locator("td.name")).to_have_text("main", timeout=WAIT_MS)
    expect(main.locator("td.path")).to_have_text("/**")
    expect(main.locator("td.upstream")).to_have_text("backend")
    expect(page.locator('tr[data-route="other"] td.upstream')).to_have_text("flaky")
    expect(page.locator(f'tr[data-node="{up.node}"] td.state')).to_have_text("healthy")
    flaky = page.locator(f'tr[data-node="{down_node}"]')
    expect(flaky.locator("td.state")).to_have_text("unhealthy", timeout=WAIT_MS)
    expect(flaky.locator("td.failure")).to_contain_text("tcp: ")
    expect(page.locator("#status")).to_have_text("unready")  # [upstream:flaky] has no node to use

    count = main.locator("td.connections")
    expect(count).to_have_text("0")
    page.evaluate("window.stillTheSamePage = true")
    with connect(f"{gw.url}/live") as ws:
        ws.send("counted")
        assert ws.recv(timeout=5) == "counted"
        expect(count).to_have_text("1", timeout=WAIT_MS)
        expect(main.locator("td.c2u")).to_have_text("1", timeout=WAIT_MS)
        expect(main.locator("td.u2c")).to_have_text("1", timeout=WAIT_MS)
    expect(count).to_have_text("0", timeout=WAIT_MS)
    expect(main.locator("td.c2u")).to_have_text("1")  # closed connections stay in the totals
    assert page.evaluate("window.stillTheSamePage") is True, "the page was reloaded instead of updated"
    assert violations == []


def test_dashboard_renders_hostile_names_as_text(launch):
    """Route names, node URLs and failure reasons reach the page as text, never as markup."""
    request = DummyRequest([b""])
    html = dashboard_page().render(request)
    headers = {k.decode(): v[0].decode() for k, v in request.responseHeaders.getAllRawHeaders()}
    evil = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    data = {
        "status": "ready",
        "routes": [{"name": evil, "path": "/" + evil, "host": None, "mode": "proxy", "upstream": evil,
                    "auth": "none", "connections": 0,
                    "messages": {"client_to_upstream": 0, "upstream_to_client": 0},
                    "bytes": {"client_to_upstream": 0, "upstream_to_client": 0}}],
        "upstreams": {evil: {"ready": True, "balance": "round_robin", "nodes": [
            {"url": "ws://x/" + evil, "active": 0, "state": evil, "last_failure": evil,
             "ejected_for": 0, "ejections": 0}]}},
    }

    def serve(route: Route) -> None:
        if route.request.url.endswith("/dashboard.json"):
            route.fulfill(status=200, content_type="application/json", body=json.dumps(data))
        else:
            route.fulfill(status=200, headers=headers, body=html)

    page = launch().new_page()
    violations = csp_violations(page)
    page.route("http://dashboard.test/**", serve)
    page.goto("http://dashboard.test/")
    row = page.locator("#routes tr")
    expect(row.locator("td.name")).to_have_text(evil, timeout=WAIT_MS)
    expect(row.locator("td.upstream")).to_have_text(evil)
    node = page.locator("#upstreams tr")
    expect(node.locator("td.node")).to_have_text("ws://x/" + evil)
    expect(node.locator("td.state")).to_have_text(evil)
    expect(node.locator("td.failure")).to_have_text(evil)
    assert page.locator("img").count() == 0
    assert page.locator("body script").count() == 1  # the page's own
    assert page.evaluate("window.pwned") is None
    assert violations == []


def spki_sha256(cert_pem: Path) -> str:
    """Base64 SHA-256 of the certificate's SubjectPublicKeyInfo, as Chromium's SPKI allow-list wants it."""
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def test_default_config_demo_page_round_trips_over_wss_through_the_gateway(tmp_path, start_gateway, launch):
    config, port, tls_port = default_config(tmp_path)
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(config)
    admin = int(re.fullmatch(r"tcp:(\d+):.*", ini["admin"]["listen"].strip())[1])
    tls_dir = tmp_path / "var" / "tls"
    # start_gateway writes the INI into tmp_path itself: point it at var/tls/ directly
    start_gateway(config.read_text().replace("../var/tls/", f"{tls_dir}/"), port=port)

    # trust exactly the gateway's self-signed certificate, not every bad one
    browser = launch(f"--ignore-certificate-errors-spki-list={spki_sha256(tls_dir / 'cert.pem')}")
    page = browser.new_page()
    violations = csp_violations(page)
    page.goto(f"http://127.0.0.1:{admin}/demo")
    log = page.locator("#log")
    expect(log.locator(".event").first).to_have_text(f"connecting to wss://127.0.0.1:{tls_port}/echo")
    expect(log).to_contain_text("connected", timeout=WAIT_MS)

    def echo_connections() -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/dashboard.json", timeout=5) as r:
            routes = json.loads(r.read())["routes"]
        return next(r["connections"] for r in routes if r["name"] == "echo")

    assert wait_for(lambda: echo_connections() == 1), "the page's WebSocket does not go through the gateway"
    page.locator("#message").fill("hello from Chromium")
    page.locator("#send").click()
    expect(log.locator(".sent")).to_have_text("> hello from Chromium")
    expect(log.locator(".received")).to_have_text("< hello from Chromium", timeout=WAIT_MS)
    expect(log.locator(".error")).to_have_count(0)
    assert violations == []


def test_chromium_talks_compressed_through_the_gateway_to_a_compressing_upstream(make_upstream, start_gateway,
                                                                                  launch):
    """docs/protocol.md#compression: Chromium's own permessage-deflate, passed through both legs."""
    up = make_upstream(compression="deflate")
    gw = start_gateway(f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1

        [log]
        format = text

        [upstream:backend]
        nodes = {up.node}
        retries = 0

        [route:main]
        path = /**
        upstream = backend
        """)
    page = launch().new_page()
    result = page.evaluate("""async (url) => {
        const ws = new WebSocket(url);
        await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = () => fail(new Error("no connection")); });
        const text = JSON.stringify(Array.from({length: 400}, (_, i) => ({id: i, kind: "quote", price: 100 + i % 9})));
        const echoed = new Promise(ok => { ws.onmessage = e => ok(e.data); });
        ws.send(text);
        const got = await echoed;
        const extensions = ws.extensions;
        ws.close(1000);
        return {extensions, same: got === text, size: text.length};
    }""", f"{gw.url}/browser")
    assert result["same"] is True
    # the client leg: what the gateway answered Chromium (the upstream's answer, plus client_no_context_takeover)
    assert "permessage-deflate" in result["extensions"] and "client_no_context_takeover" in result["extensions"]
    # the upstream leg: Chromium's offer reached the upstream, which accepted it
    assert "permessage-deflate" in up.requests[0].headers.get("Sec-WebSocket-Extensions", "")
    closed = re.compile(r"closed \S+ route=main .* bytes_in=(\d+) bytes_out=(\d+) .* compressed=True")
    assert wait_for(lambda: closed.search(gw.log()), 10)
    found = closed.search(gw.log())
    assert found is not None
    # the wire byte counters saw compressed frames: a fraction of the text each way
    assert int(found.group(1)) < result["size"] / 3 and int(found.group(2)) < result["size"] / 3
