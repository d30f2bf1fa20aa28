# -*- test-case-name: tests.unit.ops.test_dashboard -*-
"""
The admin port's pages for people (docs/admin-api.md):

- ``GET /``: the dashboard, one self-contained HTML page (inline CSS and JS,
  nothing fetched from elsewhere) that polls ``GET /dashboard.json`` every
  second and redraws its tables in place: routes with live connection and
  message counts, every upstream node's state, the gateway's status;
- ``GET /dashboard.json``: that data, token-free like ``/readyz`` (the same
  readiness, route and upstream builders of ``wsgateway.ops.admin``);
- ``GET /demo``: L{wsgateway.ops.demopage}.

The pages carry no data in their HTML: the scripts build the DOM with
``textContent``, so a route name or a failure reason is always text
(their CSP: L{wsgateway.ops.pages}).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from wsgateway.ops.admin import GatewayView, readiness, routes_view
from wsgateway.ops.demopage import demo_page, demo_target
from wsgateway.ops.jsonapi import JSONResource
from wsgateway.ops.pages import StaticPage

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

def dashboard_page() -> Resource:
    # 'self' covers dashboard.json only: the page opens no WebSocket
    return StaticPage("wsgateway", DASHBOARD_STYLE, DASHBOARD_SCRIPT, DASHBOARD_BODY, "'self'")


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
