# -*- test-case-name: tests.unit.ops.test_dashboard -*-
"""
The dashboard page at ``/`` of the admin port: one self-contained HTML
document, its style and markup here, its script in
L{wsgateway.ops.dashboard_script}. No CDN, no font, no library: the charts
are SVG the script draws itself. The page carries no data in its HTML
(names are hostile input: the script inserts them as text), and its CSP
(L{wsgateway.ops.pages}) allows only its own inline style and script, by
hash, and requests to its own origin, which are all it makes
(``dashboard.json`` and ``admin/*``).
"""

from __future__ import annotations

from twisted.web.resource import Resource

from wsgateway.ops.dashboard_script import DASHBOARD_SCRIPT
from wsgateway.ops.logs import LEVELS
from wsgateway.ops.pages import StaticPage

__all__ = ["DASHBOARD_BODY", "DASHBOARD_STYLE", "dashboard_page"]

DASHBOARD_STYLE = """
body { font: 13px/1.4 system-ui, sans-serif; margin: 1em 1.5em; color: #222; background: #f6f7f9; }
h1 { font-size: 1.3em; margin: 0; display: inline-block; }
h2 { font-size: 1.05em; margin: 1.2em 0 .4em; }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: .4em 1.2em; }
header dl { display: flex; gap: 1em; margin: 0; }
header dt { color: #666; display: inline; }
header dd { display: inline; margin: 0 0 0 .3em; font-weight: 600; }
#admin { margin: .8em 0; padding: .5em .8em; background: #fff; border: 1px solid #ddd; display: flex;
         flex-wrap: wrap; gap: .5em 1em; align-items: center; }
input, select, button { font: inherit; padding: .15em .5em; }
button[disabled] { opacity: .45; }
#action-result.good { color: #135f13; }
#action-result.bad, #token-state { color: #8a1010; }
.charts { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: .8em; }
figure { margin: 0; padding: .4em .6em; background: #fff; border: 1px solid #ddd; }
figcaption { font-weight: 600; }
figure svg { width: 100%; height: auto; display: block; }
.grid { stroke: #e3e3e3; stroke-width: 1; }
.ylabel { font-size: 10px; fill: #666; text-anchor: end; }
.xlabel { font-size: 10px; fill: #666; }
.line { fill: none; stroke-width: 1.6; stroke-linejoin: round; }
.dot { fill: none; stroke-width: 2; }
#chart-messages .s1 { stroke-dasharray: 6 3; }
.legend { display: flex; flex-wrap: wrap; gap: .2em 1em; font-size: .9em; }
.legend .value { margin-left: .3em; font-variant-numeric: tabular-nums; color: #555; }
.swatch { display: inline-block; width: .8em; height: .8em; margin-right: .3em; border-radius: 2px; }
.s0 { stroke: #1f77b4; background: #1f77b4; } .s1 { stroke: #d62728; background: #d62728; }
.s2 { stroke: #2ca02c; background: #2ca02c; } .s3 { stroke: #ff7f0e; background: #ff7f0e; }
.s4 { stroke: #9467bd; background: #9467bd; } .s5 { stroke: #8c564b; background: #8c564b; }
.s6 { stroke: #e377c2; background: #e377c2; } .s7 { stroke: #7f7f7f; background: #7f7f7f; }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid #ddd; padding: .2em .5em; text-align: left; vertical-align: top; }
th { background: #eee; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.empty { color: #777; font-style: italic; }
td.failure { max-width: 28em; overflow-wrap: anywhere; color: #8a1010; }
.detail { margin-left: .4em; color: #666; font-size: .9em; }
.badge { display: inline-block; padding: .05em .6em; border-radius: .8em; font-weight: bold; }
.ready, .healthy, .up { background: #d4f5d4; color: #135f13; }
.unchecked { background: #e2e8f0; color: #334155; }
.degraded, .draining { background: #fff1c2; color: #6b4d00; }
.unready, .unhealthy, .unknown, .down { background: #fbd3d3; color: #8a1010; }
#updated { color: #555; font-size: .9em; }
#updated.stale { color: #8a1010; font-weight: bold; }
"""

_LEVEL_OPTIONS = "".join(f'<option value="{name}">{name}</option>' for name in LEVELS)

DASHBOARD_BODY = f"""<header>
<h1>wsgateway <span id="status"></span></h1>
<dl><div><dt>node</dt><dd id="node-id"></dd></div><div><dt>version</dt><dd id="version"></dd></div>
<div><dt>uptime</dt><dd id="uptime"></dd></div><div><dt>workers</dt><dd id="workers"></dd></div>
<div><dt>log level</dt><dd id="log-level"></dd></div><div id="redis-item" hidden><dt>redis</dt><dd id="redis"></dd></div></dl>
<span id="updated">loading&hellip;</span>
</header>
<section id="admin" aria-label="admin actions">
<label>admin token <input id="token" type="password" autocomplete="off" spellcheck="false"></label>
<button id="token-use" type="button">use token</button><button id="token-forget" type="button">forget</button>
<span id="token-state"></span>
<label>log level <select id="level">{_LEVEL_OPTIONS}</select></label><button id="level-set" type="button">set</button>
<span id="action-result" role="status"></span>
</section>
<div class="charts">
<figure><figcaption>open connections</figcaption><div id="chart-connections"></div></figure>
<figure><figcaption>messages per second</figcaption><div id="chart-messages"></div></figure>
<figure><figcaption>handshakes refused per second</figcaption><div id="chart-refusals"></div></figure>
<figure><figcaption>upstream connect latency (average, ms)</figcaption><div id="chart-latency"></div></figure>
</div>
<h2>Routes</h2>
<table>
<thead><tr><th>route</th><th>path</th><th>mode</th><th>upstream</th><th>open</th>
<th>msg/s &uarr;</th><th>msg/s &darr;</th><th>bytes/s &uarr;</th><th>bytes/s &darr;</th>
<th>messages &uarr;</th><th>messages &darr;</th><th>bytes &uarr; / &darr;</th>
<th>refused</th><th>refused/s</th></tr></thead>
<tbody id="routes"></tbody>
</table>
<p class="note">&uarr; client to upstream, &darr; upstream to client; rates over the last second.</p>
<h2>Upstream nodes</h2>
<table>
<thead><tr><th>upstream</th><th>checks</th><th>node</th><th>state</th><th>open</th><th>msg/s &uarr;</th>
<th>msg/s &darr;</th><th>bytes/s</th><th>failing</th><th>last failure</th><th></th></tr></thead>
<tbody id="nodes"></tbody>
</table>
<section id="connections-section" hidden>
<h2>Open connections</h2>
<table>
<thead><tr><th>id</th><th>route</th><th>node</th><th>peer</th><th>subject</th><th>age</th>
<th>messages &uarr; / &darr;</th>
<th></th></tr></thead>
<tbody id="connections"></tbody>
</table>
</section>
"""


def dashboard_page() -> Resource:
    # 'self': dashboard.json and admin/*, the only requests the page makes (it opens no WebSocket)
    return StaticPage("wsgateway", DASHBOARD_STYLE, DASHBOARD_SCRIPT, DASHBOARD_BODY, "'self'")
