# -*- test-case-name: tests.unit.ops.test_dashboard -*-
"""
The admin port's pages for people (docs/admin-api.md):

- ``GET /``: the dashboard, one self-contained HTML page (inline CSS and JS,
  nothing fetched from elsewhere) that polls ``GET /dashboard.json`` every
  second and redraws its tables in place: routes with live connection and
  message counts, every upstream node's state, the gateway's status;
- ``GET /dashboard.json``: that data, token-free like ``/readyz`` (the same
  readiness, route and upstream builders of ``wsgateway.ops.admin``);
- ``GET /demo`` (only with a ``[demo]`` section): a page whose browser opens
  a WebSocket through the gateway to the demo ``/echo`` route, for trying
  the default config from a browser.

The pages carry no data in their HTML: the scripts build the DOM with
``textContent``, so a route name or a failure reason is always text. Each
page's Content-Security-Policy allows exactly its own inline script and
style, by SHA-256 hash, and nothing else but the connections it needs.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from collections.abc import Sequence
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from wsgateway.ops.admin import GatewayView, readiness, routes_view
from wsgateway.ops.jsonapi import JSONResource

# -- the dashboard ------------------------------------------------------------

DASHBOARD_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.3em; margin: 0 0 .5em; }
h2 { font-size: 1.1em; margin: 1.5em 0 .4em; }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.empty { color: #777; font-style: italic; }
.badge { display: inline-block; padding: .1em .6em; border-radius: .8em; font-weight: bold; }
.ready, .healthy { background: #d4f5d4; color: #135f13; }
.degraded, .draining, .ejected { background: #fff1c2; color: #6b4d00; }
.unready, .unhealthy, .unknown { background: #fbd3d3; color: #8a1010; }
#updated { color: #555; margin-left: 1em; font-size: .65em; font-weight: normal; }
#updated.stale { color: #8a1010; font-weight: bold; }
"""

DASHBOARD_SCRIPT = r"""
"use strict";
const STATES = ["healthy", "unhealthy", "ejected", "draining"];
const STATUSES = ["ready", "degraded", "draining", "unready"];
let lastOk = null;

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  return td;
}

function emptyRow(columns, text) {
  const tr = document.createElement("tr");
  const td = cell(text, "empty");
  td.colSpan = columns;
  tr.append(td);
  return tr;
}

function stateBadge(state, known) {
  const span = document.createElement("span");
  span.textContent = String(state);
  span.className = "badge " + (known.includes(state) ? state : "unknown");
  return span;
}

function renderRoutes(routes) {
  const rows = routes.map((r) => {
    const tr = document.createElement("tr");
    tr.dataset.route = r.name;
    tr.append(
      cell(r.name, "name"),
      cell(r.host ? r.path + "  (host " + r.host + ")" : r.path, "path"),
      cell(r.mode, "mode"),
      cell(r.upstream === null ? "-" : r.upstream, "upstream"),
      cell(r.connections, "num connections"),
      cell(r.messages.client_to_upstream, "num c2u"),
      cell(r.messages.upstream_to_client, "num u2c"),
    );
    return tr;
  });
  document.getElementById("routes").replaceChildren(...(rows.length ? rows : [emptyRow(7, "no routes")]));
}

function renderUpstreams(upstreams) {
  const rows = [];
  for (const [name, up] of Object.entries(upstreams)) {
    for (const node of up.nodes) {
      const tr = document.createElement("tr");
      tr.dataset.upstream = name;
      tr.dataset.node = node.url;
      const state = cell("", "state");
      state.append(stateBadge(node.state, STATES));
      tr.append(
        cell(name, "upstream"),
        cell(up.balance, "balance"),
        cell(node.url, "node"),
        state,
        cell(node.active, "num active"),
        cell(node.last_failure === null ? "" : node.last_failure, "failure"),
      );
      rows.push(tr);
    }
  }
  document.getElementById("upstreams").replaceChildren(...(rows.length ? rows : [emptyRow(6, "no upstreams")]));
}

function render(data) {
  const status = document.getElementById("status");
  status.replaceChildren(stateBadge(data.status, STATUSES));
  status.dataset.status = data.status;
  renderRoutes(data.routes);
  renderUpstreams(data.upstreams);
}

async function poll() {
  const updated = document.getElementById("updated");
  try {
    const response = await fetch("dashboard.json", { cache: "no-store", signal: AbortSignal.timeout(3000) });
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    lastOk = new Date();
    updated.textContent = "updated " + lastOk.toLocaleTimeString();
    updated.className = "";
  } catch (e) {
    const since = lastOk ? " since " + lastOk.toLocaleTimeString() : "";
    updated.textContent = "no answer from the admin port" + since + " (" + e.message + ")";
    updated.className = "stale";
  }
  setTimeout(poll, 1000);
}

poll();
"""

DASHBOARD_BODY = """<h1>wsgateway <span id="status"></span><span id="updated">loading&hellip;</span></h1>
<h2>Routes</h2>
<table>
<thead><tr><th>route</th><th>path</th><th>mode</th><th>upstream</th><th>connections</th>
<th>messages client&rarr;upstream</th><th>messages upstream&rarr;client</th></tr></thead>
<tbody id="routes"></tbody>
</table>
<h2>Upstreams</h2>
<table>
<thead><tr><th>upstream</th><th>balance</th><th>node</th><th>state</th><th>active</th><th>last failure</th></tr></thead>
<tbody id="upstreams"></tbody>
</table>
"""

# -- the demo page ------------------------------------------------------------

DEMO_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 50em; }
input { font: inherit; padding: .2em .4em; }
#url { width: 30em; }
#message { width: 24em; }
#log { font-family: ui-monospace, monospace; list-style: none; padding: .5em; border: 1px solid #ddd;
       min-height: 10em; background: #fff; }
#log .sent { color: #1a4f9c; }
#log .received { color: #135f13; }
#log .event { color: #666; }
#log .error { color: #8a1010; }
"""

DEMO_SCRIPT = r"""
"use strict";
const log = document.getElementById("log");
const urlBox = document.getElementById("url");
const sendButton = document.getElementById("send");
const messageBox = document.getElementById("message");
let ws = null;

function line(kind, text) {
  const li = document.createElement("li");
  li.className = kind;
  li.textContent = text;
  log.append(li);
}

function defaultUrl() {
  const given = new URLSearchParams(location.search).get("url");
  if (given) return given;
  const b = document.body.dataset;
  return b.port ? b.scheme + "://" + location.hostname + ":" + b.port + "/echo" : "";
}

function connect() {
  if (ws) ws.close();
  sendButton.disabled = true;
  let socket;
  try {
    socket = new WebSocket(urlBox.value);
  } catch (e) {
    line("error", "cannot connect: " + e.message);
    return;
  }
  ws = socket;
  socket.binaryType = "arraybuffer";
  line("event", "connecting to " + urlBox.value);
  socket.onopen = () => { line("event", "connected"); sendButton.disabled = false; };
  socket.onmessage = (m) => {
    line("received", typeof m.data === "string" ? "< " + m.data : "< [" + m.data.byteLength + " bytes]");
  };
  socket.onerror = () => {
    line("error", "WebSocket error (see the browser console)");
    if (socket.url.startsWith("wss:")) {
      // browsers never ask about a WebSocket's certificate: accept it on a page first
      const page = new URL(socket.url);
      page.protocol = "https:";
      line("event", "a self-signed certificate? Open " + page.origin + "/ once, accept it, then connect again");
    }
  };
  socket.onclose = (e) => {
    line("event", "closed: " + e.code + (e.reason ? " " + e.reason : ""));
    if (ws === socket) sendButton.disabled = true;
  };
}

document.getElementById("connect").addEventListener("submit", (e) => { e.preventDefault(); connect(); });
document.getElementById("send-form").addEventListener("submit", (e) => {
  e.preventDefault();
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  ws.send(messageBox.value);
  line("sent", "> " + messageBox.value);
  messageBox.value = "";
  messageBox.focus();
});
urlBox.value = defaultUrl();
if (urlBox.value) connect();
"""

DEMO_BODY = """<h1>wsgateway demo</h1>
<p>Your browser's own WebSocket client, through the gateway to the demo echo backend.
Another URL: <code>?url=wss://HOST:PORT/PATH</code>.</p>
<form id="connect"><input id="url" aria-label="WebSocket URL"> <button>connect</button></form>
<form id="send-form"><input id="message" aria-label="message" autocomplete="off" autofocus>
<button id="send" disabled>send</button></form>
<ul id="log"></ul>
"""


def _sha256(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


class _Page(Resource):
    """A static page whose inline style and script are the only ones its CSP allows."""

    isLeaf = True

    def __init__(self, title: str, style: str, script: str, body: str, connect_src: str, body_attrs: str = "") -> None:
        super().__init__()
        self._html = (
            "<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n"
            f"<style>{style}</style>\n"
            f"</head><body{body_attrs}>\n{body}"
            f"<script>{script}</script>\n"
            "</body></html>\n"
        ).encode("utf-8")
        self.csp = (
            f"default-src 'none'; script-src {_sha256(script)}; style-src {_sha256(style)}; "
            f"connect-src {connect_src}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        ).encode("ascii")

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", self.csp)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"cache-control", b"no-store")
        return self._html


def dashboard_page() -> Resource:
    # 'self' covers dashboard.json only: the page opens no WebSocket
    return _Page("wsgateway", DASHBOARD_STYLE, DASHBOARD_SCRIPT, DASHBOARD_BODY, "'self'")


def demo_page(target: tuple[str, int] | None) -> Resource:
    """``target``: the (scheme, port) of the gateway listener the page connects to by default."""
    attrs = ""
    if target is not None:
        scheme, port = target
        attrs = f' data-scheme="{html.escape(scheme)}" data-port="{int(port)}"'
    # ws: and wss: to any host: ?url= may name another gateway
    return _Page("wsgateway demo", DEMO_STYLE, DEMO_SCRIPT, DEMO_BODY, "ws: wss:", attrs)


def demo_target(listen: Sequence[str]) -> tuple[str, int] | None:
    """
    The gateway listener the demo page connects to: the first ``ssl:`` one
    (wss://), else the first ``tcp:`` one (ws://); None without a fixed port.
    """
    found: dict[str, int] = {}
    for desc in listen:
        parts = re.split(r"(?<!\\):", desc)
        kind = parts[0].lower()
        if kind not in ("ssl", "tcp", "tcp6") or len(parts) < 2:
            continue
        keyed = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        port = keyed.get("port", parts[1] if "=" not in parts[1] else "")
        if port.isdigit() and int(port) > 0:
            found.setdefault("wss" if kind == "ssl" else "ws", int(port))
    for scheme in ("wss", "ws"):
        if scheme in found:
            return scheme, found[scheme]
    return None


class DashboardJSON(JSONResource):
    """What the dashboard shows: the gateway's status, its routes and upstreams."""

    def __init__(self, view: GatewayView) -> None:
        super().__init__()
        self.view = view

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"x-content-type-options", b"nosniff")
        return self.answer(request, 200, dashboard_view(self.view))


def dashboard_view(view: GatewayView) -> dict[str, Any]:
    status, upstreams = readiness(view)
    return {"status": status, "routes": routes_view(view), "upstreams": upstreams}


def resources(view: GatewayView, demo_listen: Sequence[str] | None = None) -> dict[bytes, Resource]:
    """
    What service.py mounts on the admin port (``admin_site``'s ``extra``):
    the dashboard at ``/`` and its JSON; ``/demo`` too when ``demo_listen``
    (the gateway's listen strings) is given.
    """
    out: dict[bytes, Resource] = {b"": dashboard_page(), b"dashboard.json": DashboardJSON(view)}
    if demo_listen is not None:
        out[b"demo"] = demo_page(demo_target(demo_listen))
    return out
