"""
The admin port's pages in a real browser: headless Chromium from Debian's
``chromium`` package (``make test`` installs it), driven by Playwright's
Python package with ``executable_path``, so Playwright downloads no browser.

The dashboard of a running gateway follows connections live without a
reload: its charts move as messages go through, its nodes show four states
in four colours, its actions (drain, close a connection, log level) go
through the admin API with the token the page was given; every name is
rendered as text. The default config's demo page round-trips a message over
wss:// through the gateway with Chromium's own WebSocket client.
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.web.test.requesthelper import DummyRequest
from websockets.exceptions import ConnectionClosed, InvalidStatus
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


TOKEN = "dashboard-test-token-0123456789"


def dashboard_ini(admin: int, up_node: str, spare_node: str, down_node: str, dead_node: str) -> str:
    return f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1
        node_id = gw-browser

        [admin]
        listen = tcp:{admin}:interface=127.0.0.1
        token = {TOKEN}

        [log]
        format = text

        [upstream:backend]
        nodes = {up_node}
        retries = 0
        health_check = tcp
        health_interval = 0.2

        [upstream:spare]
        nodes = {spare_node}
        retries = 0

        [upstream:flaky]
        nodes = {down_node}
        health_check = tcp
        health_interval = 0.2
        health_timeout = 0.5
        unhealthy_threshold = 1

        [upstream:dead]
        nodes = {dead_node}
        retries = 0

        [route:main]
        path = /**
        upstream = backend

        [route:side]
        path = /side
        upstream = spare

        [route:other]
        path = /other
        upstream = flaky

        [route:gone]
        path = /gone
        upstream = dead
        """


@pytest.fixture
def dashboard_gateway(make_upstream: Any, start_gateway: Any) -> dict[str, Any]:
    """A gateway whose four upstreams show the four node states: healthy, unchecked, unhealthy twice."""
    up, spare = make_upstream(), make_upstream()
    admin, down, dead = free_port(), free_port(), free_port()  # nothing listens on `down` and `dead`
    nodes = {"up": up.node, "spare": spare.node, "down": f"ws://127.0.0.1:{down}", "dead": f"ws://127.0.0.1:{dead}"}
    gw = start_gateway(dashboard_ini(admin, nodes["up"], nodes["spare"], nodes["down"], nodes["dead"]))
    return {"gw": gw, "admin": admin, "nodes": nodes}


def admin_get(admin: int, path: str, token: str | None = TOKEN) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{admin}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=5) as r:
        return json.loads(r.read())


def chart_path(page: Page, chart: str, series: str | None = None) -> Any:
    selector = f"#{chart} path" + (f'[data-series="{series}"]' if series else "")
    return page.locator(selector)


def peak(page: Page, chart: str, series: str | None = None) -> float:
    """The highest value a chart's series draws (its path's data-peak); of any series without one named."""
    peaks = [float(p or 0) for p in chart_path(page, chart, series).evaluate_all("ps => ps.map(p => p.dataset.peak)")]
    return max(peaks, default=0.0)


def drawn_points(d: str) -> list[tuple[float, float]]:
    """The points of an SVG path's "M x y L x y ..." data."""
    numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", d)]
    return list(zip(numbers[0::2], numbers[1::2]))


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG whose image data decompresses (a readable file), and not one flat colour."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    idat, at = b"", 8
    for _ in range(100_000):  # chunk by chunk: length, type, data, CRC
        if at >= len(data):
            break
        (length,) = struct.unpack(">I", data[at:at + 4])
        if data[at + 4:at + 8] == b"IDAT":
            idat += data[at + 8:at + 8 + length]
        at += 12 + length
    pixels = zlib.decompress(idat)
    assert len(set(pixels[: len(pixels) // 2])) > 16, "a blank screenshot"
    return width, height


def test_dashboard_charts_move_with_traffic_and_node_states_have_four_colours(dashboard_gateway, launch, tmp_path):
    gw, admin, nodes = dashboard_gateway["gw"], dashboard_gateway["admin"], dashboard_gateway["nodes"]
    page = launch().new_page(viewport={"width": 1400, "height": 1000})
    violations = csp_violations(page)
    page.goto(f"http://127.0.0.1:{admin}/")

    expect(page.locator("#node-id")).to_have_text("gw-browser", timeout=WAIT_MS)
    expect(page.locator("#workers")).to_have_text("1")
    expect(page.locator("#version")).not_to_be_empty()
    expect(page.locator("#log-level")).to_have_text("info")
    expect(page.locator("#level")).to_have_value("info")  # the level in effect, ready to change
    expect(page.locator("#uptime")).to_have_text(re.compile(r"^\d+(s|m|m \d+s)$"))
    main = page.locator('tr[data-route="main"]')
    expect(main.locator("td.name")).to_have_text("main")
    expect(main.locator("td.upstream")).to_have_text("backend")

    def state(node: str) -> Any:
        return page.locator(f'tr[data-node="{node}"] td.state .badge')

    expect(state(nodes["up"])).to_have_text("healthy", timeout=WAIT_MS)  # passes its tcp checks
    expect(state(nodes["spare"])).to_have_text("unchecked")  # no checks, never failed
    expect(state(nodes["down"])).to_have_text("unhealthy", timeout=WAIT_MS)  # fails its checks
    expect(page.locator(f'tr[data-node="{nodes["down"]}"] td.failure')).to_contain_text("tcp: ")
    expect(state(nodes["dead"])).to_have_text("unchecked")

    # a node without checks that refuses every connection: never "healthy", whatever /readyz says
    for _ in range(2):
        with pytest.raises(InvalidStatus) as refused:
            connect(f"{gw.url}/gone", open_timeout=5).close()
        assert refused.value.response.status_code == 502
    expect(state(nodes["dead"])).to_have_text("unhealthy", timeout=WAIT_MS)
    # what /readyz says of it (the same builder): hence the page's own colour
    assert admin_get(admin, "/admin/upstreams")["dead"]["nodes"][0]["state"] == "healthy"
    expect(page.locator('tr[data-route="gone"] td.refused')).to_have_text("2", timeout=WAIT_MS)
    assert wait_for(lambda: peak(page, "chart-refusals") > 0, 5), "no refusal drawn"

    # messages go through: the messages chart's line leaves the baseline, the counts follow
    messages = chart_path(page, "chart-messages", "c2u")
    before = messages.get_attribute("d")
    count = main.locator("td.connections")
    expect(count).to_have_text("0")
    page.evaluate("window.stillTheSamePage = true")
    with connect(f"{gw.url}/live") as ws:
        for i in range(40):
            ws.send(f"m{i}")
            assert ws.recv(timeout=5) == f"m{i}"
        expect(count).to_have_text("1", timeout=WAIT_MS)
        expect(main.locator("td.c2u")).to_have_text("40", timeout=WAIT_MS)
        expect(main.locator("td.u2c")).to_have_text("40")
        assert wait_for(lambda: peak(page, "chart-messages", "c2u") >= 1, 5), "no message rate drawn"
        assert wait_for(lambda: peak(page, "chart-connections") >= 1, 5)
    expect(count).to_have_text("0", timeout=WAIT_MS)
    expect(main.locator("td.c2u")).to_have_text("40")  # closed connections stay in the totals
    after = messages.get_attribute("d")
    assert after != before
    baseline = max(y for _, y in drawn_points(before))
    assert min(y for _, y in drawn_points(after)) < baseline, "the line never left zero"
    assert peak(page, "chart-messages", "u2c") >= 1
    assert wait_for(lambda: peak(page, "chart-latency", "backend") > 0, 5), "no connect latency drawn"
    expect(page.locator('tr[data-node="%s"] td.rate-c2u' % nodes["up"])).not_to_have_text("\u2013")
    assert page.evaluate("window.stillTheSamePage") is True, "the page was reloaded instead of updated"

    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot))
    assert png_size(shot) == (1400, 1000)
    assert violations == []


def test_dashboard_actions_drain_close_and_log_level_through_the_admin_api(dashboard_gateway, launch):
    gw, admin, nodes = dashboard_gateway["gw"], dashboard_gateway["admin"], dashboard_gateway["nodes"]
    page = launch().new_page()
    violations = csp_violations(page)
    urls: list[str] = []
    authorized: list[str] = []
    page.on("request", lambda r: (urls.append(r.url),
                                  authorized.append(r.url) if r.headers.get("authorization") else None))
    page.goto(f"http://127.0.0.1:{admin}/")
    spare = page.locator(f'tr[data-node="{nodes["spare"]}"]')
    expect(spare.locator("button.action")).to_be_disabled(timeout=WAIT_MS)  # no token: read-only
    with contextlib.ExitStack() as stack:
        ws = stack.enter_context(connect(f"{gw.url}/side"))  # to close, listed once the page has the token
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        actions_with_a_connection_open(page, gw, admin, nodes, ws)
    assert violations == []
    # the token went in a header, never in a URL
    assert authorized and all("/admin/" in u for u in authorized)
    assert not any(TOKEN in u for u in urls)
    assert TOKEN not in page.url
    # what the page fetches, all its CSP's connect-src 'self' allows: its own origin's dashboard.json and admin/*
    assert all(u.startswith(f"http://127.0.0.1:{admin}/") for u in urls), urls
    paths = {urllib.parse.urlsplit(u).path for u in urls}
    assert {p for p in paths if not p.startswith("/admin/")} == {"/", "/dashboard.json"}


def actions_with_a_connection_open(page: Page, gw: Any, admin: int, nodes: dict[str, str], ws: Any) -> None:
    """A wrong token, then the right one; drain and undrain a node, close ``ws``, set the log level."""
    spare = page.locator(f'tr[data-node="{nodes["spare"]}"]')
    page.locator("#token").fill("not-the-token")
    page.locator("#token-use").click()
    spare.locator("button.action").click()
    expect(page.locator("#action-result")).to_contain_text("a valid admin bearer token is required", timeout=WAIT_MS)
    expect(page.locator("#token-state")).to_have_text("token refused")
    page.locator("#token").fill(TOKEN)
    page.locator("#token-use").click()
    expect(page.locator("#token")).to_have_value("")  # kept in the page's memory, not in the field

    # drain, then undrain, the spare node
    expect(spare.locator("button.action")).to_have_text("drain")
    spare.locator("button.action").click()
    expect(spare.locator("td.state .badge")).to_have_text("draining", timeout=WAIT_MS)
    assert admin_get(admin, "/admin/upstreams")["spare"]["nodes"][0]["state"] == "draining"
    # the four states, in four colours
    shown = {}
    for node, health in (("up", "healthy"), ("dead", "unchecked"), ("down", "unhealthy"), ("spare", "draining")):
        badge = page.locator(f'tr[data-node="{nodes[node]}"] td.state .badge')
        expect(badge).to_have_text(health, timeout=WAIT_MS)
        shown[health] = badge.evaluate("b => getComputedStyle(b).backgroundColor")
    assert len(set(shown.values())) == 4, shown
    spare.locator("button.action").click()
    expect(spare.locator("td.state .badge")).to_have_text("unchecked", timeout=WAIT_MS)
    assert admin_get(admin, "/admin/upstreams")["spare"]["nodes"][0]["state"] == "healthy"

    # close the open connection
    (conn,) = admin_get(admin, "/admin/connections")
    row = page.locator(f'#connections tr[data-conn="{conn["conn_id"]}"]')
    expect(row.locator("td.route")).to_have_text("side", timeout=WAIT_MS)
    row.locator("button.action").click()
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert closed.value.rcvd.reason == "closed by the gateway's operator"
    expect(row).to_have_count(0, timeout=WAIT_MS)
    expect(page.locator("#action-result")).to_contain_text(f"closing connection {conn['conn_id']}")

    # the log level
    page.locator("#level").select_option("debug")
    page.locator("#level-set").click()
    expect(page.locator("#action-result")).to_have_text("log level set to debug", timeout=WAIT_MS)
    assert admin_get(admin, "/dashboard.json", None)["node"]["log_level"] == "debug"
    assert wait_for(lambda: "log level set to debug through the admin API" in gw.log(), 5)
    expect(page.locator("#log-level")).to_have_text("debug", timeout=WAIT_MS)


def test_dashboard_of_a_gateway_with_workers_merges_them_and_closes_a_connection_in_its_worker(
        make_upstream, start_gateway, launch):
    up = make_upstream()
    admin, dead = free_port(), free_port()
    gw = start_gateway(f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1
        node_id = gw-workers
        workers = 2

        [admin]
        listen = tcp:{admin}:interface=127.0.0.1
        token = {TOKEN}

        [log]
        format = text

        [upstream:backend]
        nodes = {up.node}
        retries = 0

        [upstream:dead]
        nodes = ws://127.0.0.1:{dead}
        retries = 0

        [route:main]
        path = /**
        upstream = backend

        [route:gone]
        path = /gone
        upstream = dead
        """)
    assert wait_for(lambda: len(admin_get(admin, "/dashboard.json", None).get("workers", [])) == 2, 20)
    page = launch().new_page()
    violations = csp_violations(page)
    page.goto(f"http://127.0.0.1:{admin}/")
    expect(page.locator("#node-id")).to_have_text("gw-workers", timeout=WAIT_MS)
    expect(page.locator("#workers")).to_have_text("2")
    dead_node = page.locator(f'tr[data-node="ws://127.0.0.1:{dead}"] td.state .badge')
    expect(dead_node).to_have_text("unchecked")
    with pytest.raises(InvalidStatus):
        connect(f"{gw.url}/gone", open_timeout=5).close()
    # the worker that refused it says unhealthy, the other unchecked: the worst shows
    expect(dead_node).to_have_text("unhealthy", timeout=WAIT_MS)
    with connect(f"{gw.url}/w") as ws:
        page.locator("#token").fill(TOKEN)
        page.locator("#token-use").click()  # the connections are read at once
        for i in range(20):
            ws.send(f"m{i}")
            assert ws.recv(timeout=5) == f"m{i}"
        expect(page.locator('tr[data-route="main"] td.c2u')).to_have_text("20", timeout=WAIT_MS)
        assert wait_for(lambda: peak(page, "chart-messages", "c2u") >= 1, 5), "no message rate drawn"
        row = page.locator("#connections tr[data-conn]")
        expect(row).to_have_count(1, timeout=WAIT_MS)
        row.locator("button.action").click()
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert peak(page, "chart-latency", "backend") > 0
    assert violations == []


def hostile_dashboard(evil: str) -> dict[str, Any]:
    zero = {"client_to_upstream": 0, "upstream_to_client": 0}
    return {
        "status": "ready", "time": 1000.0,
        "node": {"id": evil, "version": evil, "workers": 1, "started": 0, "uptime": 5, "log_level": evil},
        "routes": [{"name": evil, "path": "/" + evil, "host": None, "mode": "proxy", "upstream": evil,
                    "auth": "none", "connections": 0, "messages": zero, "bytes": zero, "handshakes": {evil: 1}}],
        "refusals": {"by_status": {evil: 1}, "by_reason": {evil: 1}},
        "upstreams": {evil: {"ready": True, "balance": "round_robin", "health_check": evil,
                             "connect": {"count": 0, "seconds": 0}, "nodes": [
            {"url": "ws://x/" + evil, "active": 0, "state": evil, "health": evil, "last_failure": evil,
             "ejected_for": 0, "ejections": 0, "failures": 0, "messages": zero, "bytes": zero}]}},
    }


def test_dashboard_renders_hostile_names_as_text(launch):
    """Route names, node URLs, failure reasons and connections reach the page as text, never as markup."""
    request = DummyRequest([b""])
    html = dashboard_page().render(request)
    headers = {k.decode(): v[0].decode() for k, v in request.responseHeaders.getAllRawHeaders()}
    evil = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    conn = {"conn_id": evil + "/..", "route": evil, "upstream": evil, "node": evil, "peer": evil, "trace_id": evil,
            "subject": evil, "age": 1.5, "messages": {"client_to_upstream": 1, "upstream_to_client": 2},
            "bytes": {"client_to_upstream": 1, "upstream_to_client": 2}}
    closes: list[str] = []

    def serve(route: Route) -> None:
        url = route.request.url
        if url.endswith("/dashboard.json"):
            route.fulfill(status=200, content_type="application/json", body=json.dumps(hostile_dashboard(evil)))
        elif url.endswith("/admin/connections"):
            route.fulfill(status=200, content_type="application/json", body=json.dumps([conn]))
        elif "/admin/connections/" in url:
            closes.append(url)
            route.fulfill(status=200, content_type="application/json",
                          body=json.dumps({"conn_id": conn["conn_id"], "closing": True, "code": 1001}))
        else:
            route.fulfill(status=200, headers=headers, body=html)

    page = launch().new_page()
    violations = csp_violations(page)
    page.route("http://dashboard.test/**", serve)
    page.goto("http://dashboard.test/")
    row = page.locator("#routes tr")
    expect(row.locator("td.name")).to_have_text(evil, timeout=WAIT_MS)
    expect(row.locator("td.upstream")).to_have_text(evil)
    expect(page.locator("#node-id")).to_have_text(evil)
    node = page.locator("#nodes tr")
    expect(node.locator("td.node")).to_have_text("ws://x/" + evil)
    expect(node.locator("td.state .badge")).to_have_text(evil)
    expect(node.locator("td.failure")).to_have_text(evil)
    page.locator("#token").fill("t")
    page.locator("#token-use").click()
    conn_row = page.locator("#connections tr")
    expect(conn_row.locator("td.subject")).to_have_text(evil, timeout=WAIT_MS)
    expect(conn_row.locator("td.conn")).to_have_text(evil + "/..")
    conn_row.locator("button.action").click()
    expect(page.locator("#action-result")).to_contain_text("closing connection " + evil, timeout=WAIT_MS)
    # the id is one path segment, whatever it holds
    assert closes == [f"http://dashboard.test/admin/connections/{urllib.parse.quote(evil + '/..', safe='')}/close"]
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
