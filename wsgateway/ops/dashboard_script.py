# -*- test-case-name: tests.unit.ops.test_dashboard -*-
"""
The dashboard's script (L{wsgateway.ops.dashboard_page} puts it inline, its
CSP allowing it by hash). It polls ``dashboard.json`` every second, turns
the cumulative counters into rates (between two answers, by their
``time``), keeps 15 minutes of them in memory and draws them as SVG
charts; it fills the tables; and with the admin token (typed into the page,
kept in memory and sessionStorage, sent as ``Authorization: Bearer``, never
in a URL) it lists the open connections and calls the admin API: drain and
undrain a node, close a connection, set the log level. Every name, URL and
reason goes into the DOM as ``textContent``; the page fetches only its own
origin's ``dashboard.json`` and ``admin/*``.
"""

from __future__ import annotations

__all__ = ["DASHBOARD_SCRIPT"]

DASHBOARD_SCRIPT = r"""
"use strict";
const WINDOW = 900;           /* seconds of history drawn (15 minutes) */
const MAX_SAMPLES = 1200;     /* the history's bound, whatever the poll rate */
const MAX_CONNECTIONS = 200;  /* rows of the connections table */
const CONNECTIONS_EVERY = 3;  /* polls between two reads of the connections (a long list) */
const TOKEN_KEY = "wsgateway-admin-token";
const C2U = "client_to_upstream", U2C = "upstream_to_client";
const HEALTH = ["healthy", "unchecked", "unhealthy", "draining"];
const STATUSES = ["ready", "degraded", "draining", "unready"];
const SVG = "http://www.w3.org/2000/svg";
const CHARTS = [
  {id: "chart-connections", unit: "", series: (s) => [["connections", "open connections", s.connections]]},
  {id: "chart-messages", unit: "/s", series: (s) => [["c2u", "client \u2192 upstream", s.c2u],
                                                   ["u2c", "upstream \u2192 client", s.u2c]]},
  {id: "chart-refusals", unit: "/s", series: (s) => Object.entries(s.refusals).map(([k, v]) => [k, k, v])},
  {id: "chart-latency", unit: " ms", dots: true,
   series: (s) => Object.entries(s.latency).map(([k, v]) => [k, k, v])},
];
let token = sessionStorage.getItem(TOKEN_KEY) || "";
let prev = null;      /* the previous dashboard.json */
let history = [];     /* one sample of rates per answer */
let lastOk = null;
let polls = 0;
let tokenRefused = false;  /* until another token is given: no more reads with it */
const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  return e;
}
const cell = (text, cls) => el("td", cls, text);
function emptyRow(columns, text) {
  const tr = el("tr"), td = cell(text, "empty");
  td.colSpan = columns;
  tr.append(td);
  return tr;
}
function badge(state, known) {
  return el("span", "badge " + (known.includes(state) ? state : "unknown"), state);
}
function button(text, action, data) {
  const b = el("button", "action", text);
  b.type = "button";
  b.dataset.action = action;
  Object.assign(b.dataset, data);
  b.disabled = !token;
  return b;
}
function num(n, digits) {
  if (n === null || n === undefined || !isFinite(n)) return "\u2013";
  return n >= 1000 || digits === 0 ? Math.round(n).toLocaleString("en") : n.toFixed(digits === undefined ? 1 : digits);
}
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : Math.round(n)) + " " + units[i];
}
function duration(s) {
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  const sec = Math.floor(s % 60);
  return d ? d + "d " + h + "h" : h ? h + "h " + m + "m" : m ? m + "m" + (sec ? " " + sec + "s" : "") : sec + "s";
}
function rate(now, before, dt) {
  if (before === undefined || dt <= 0) return null;
  return now >= before ? (now - before) / dt : 0;  /* a worker restarted: its counts start over */
}
const refused = (handshakes) => Object.entries(handshakes || {}).reduce((n, [s, c]) => s === "101" ? n : n + c, 0);
const nodeKey = (name, url) => name + "\u0000" + url;

/* -- rates and the history ----------------------------------------------- */

function sample(data, old) {
  const dt = old ? data.time - old.time : 0;
  const sum = (f, d) => d.routes.reduce((n, r) => n + f(r), 0);
  const s = {t: data.time, connections: sum((r) => r.connections, data), c2u: null, u2c: null,
             refusals: {}, latency: {}};
  if (!old || dt <= 0) return s;
  s.c2u = rate(sum((r) => r.messages[C2U], data), sum((r) => r.messages[C2U], old), dt);
  s.u2c = rate(sum((r) => r.messages[U2C], data), sum((r) => r.messages[U2C], old), dt);
  /* by reason when the gateway says why it refused, else by status */
  const by = data.refusals.by_reason ? "by_reason" : "by_status";
  for (const [key, n] of Object.entries(data.refusals[by] || {})) {
    s.refusals[key] = rate(n, (old.refusals[by] || {})[key] || 0, dt);
  }
  for (const [name, up] of Object.entries(data.upstreams)) {
    const before = old.upstreams[name];
    const count = before ? up.connect.count - before.connect.count : 0;
    s.latency[name] = count > 0 ? (up.connect.seconds - before.connect.seconds) / count * 1000 : null;
  }
  return s;
}

function remember(s) {
  history.push(s);
  while (history.length > MAX_SAMPLES || (history.length && history[0].t < s.t - WINDOW)) history.shift();
}

/* -- charts -------------------------------------------------------------- */

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  return [1, 2, 5, 10].map((m) => m * p).find((m) => m >= v);
}

function drawChart(chart) {
  const root = $(chart.id), W = 560, H = 150, L = 48, R = 8, T = 8, B = 18;
  const now = history.length ? history[history.length - 1].t : 0;
  /* from the first sample (at least a minute) to 15 minutes */
  const span = Math.min(WINDOW, Math.max(60, history.length ? now - history[0].t : 0));
  const t0 = now - span;
  const names = new Map();
  let top = 0;
  for (const s of history) {
    for (const [key, label, v] of chart.series(s)) {
      if (!names.has(key)) names.set(key, label);
      if (v !== null && v > top) top = v;
    }
  }
  const ymax = niceMax(top);
  const x = (t) => L + (t - t0) / span * (W - L - R), y = (v) => T + (H - T - B) * (1 - v / ymax);
  const box = svg("svg", {viewBox: "0 0 " + W + " " + H, role: "img"});
  for (const v of [0, ymax / 2, ymax]) {
    box.append(svg("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid"}));
    const label = svg("text", {x: L - 4, y: y(v) + 4, class: "ylabel"});
    label.textContent = num(v, v < 10 && v % 1 ? 1 : 0);
    box.append(label);
  }
  for (const [text, t, anchor] of [["-" + duration(span), t0, "start"], ["now", now, "end"]]) {
    const label = svg("text", {x: x(t), y: H - 4, class: "xlabel", "text-anchor": anchor});
    label.textContent = text;
    box.append(label);
  }
  const legend = el("div", "legend");
  let index = 0;
  for (const [key, label] of [...names.entries()].sort((a, b) => String(a[0]).localeCompare(b[0]))) {
    let d = "", pen = "M", last = null, peak = 0;
    for (const s of history) {
      const found = chart.series(s).find((e) => e[0] === key);
      const v = found ? found[2] : null;
      if (v === null || s.t < t0) { pen = "M"; continue; }
      d += pen + x(s.t).toFixed(1) + " " + y(v).toFixed(1) + " ";
      pen = "L";
      /* sparse values (a connect now and then): each one a dot, a lone point draws no line */
      if (chart.dots) box.append(svg("circle", {cx: x(s.t), cy: y(v), r: 1.5, class: "dot s" + (index % 8)}));
      last = v;
      peak = Math.max(peak, v);
    }
    const path = svg("path", {d: d.trim() || "M0 0", class: "line s" + (index % 8)});
    path.dataset.series = key;
    path.dataset.last = last === null ? "" : String(last);
    path.dataset.peak = String(peak);
    box.append(path);
    const item = el("span", "item");
    item.dataset.series = key;
    item.append(el("span", "swatch s" + (index % 8)), el("span", "label", label),
                el("span", "value", last === null ? "\u2013" : num(last) + chart.unit));
    legend.append(item);
    index++;
  }
  if (!index) legend.append(el("span", "empty", "nothing yet"));
  root.replaceChildren(box, legend);
}

/* -- tables -------------------------------------------------------------- */

function renderRoutes(data, old, dt) {
  const before = new Map((old ? old.routes : []).map((r) => [r.name, r]));
  const rows = data.routes.map((r) => {
    const o = before.get(r.name), tr = el("tr");
    tr.dataset.route = r.name;
    const per = (f) => o ? rate(f(r), f(o), dt) : null;
    tr.append(
      cell(r.name, "name"), cell(r.host ? r.path + "  (host " + r.host + ")" : r.path, "path"),
      cell(r.mode, "mode"), cell(r.upstream === null ? "-" : r.upstream, "upstream"),
      cell(r.connections, "num connections"),
      cell(num(per((x) => x.messages[C2U])), "num rate-c2u"), cell(num(per((x) => x.messages[U2C])), "num rate-u2c"),
      cell(bytes(per((x) => x.bytes[C2U]) || 0) + "/s", "num brate-c2u"),
      cell(bytes(per((x) => x.bytes[U2C]) || 0) + "/s", "num brate-u2c"),
      cell(r.messages[C2U], "num c2u"), cell(r.messages[U2C], "num u2c"),
      cell(bytes(r.bytes[C2U]) + " / " + bytes(r.bytes[U2C]), "num bytes"),
      cell(refused(r.handshakes), "num refused"), cell(num(per((x) => refused(x.handshakes))), "num rate-refused"),
    );
    return tr;
  });
  $("routes").replaceChildren(...(rows.length ? rows : [emptyRow(14, "no routes")]));
}

function renderNodes(data, old, dt) {
  const before = new Map();
  for (const [name, up] of Object.entries(old ? old.upstreams : {})) {
    for (const n of up.nodes) before.set(nodeKey(name, n.url), n);
  }
  const rows = [];
  for (const [name, up] of Object.entries(data.upstreams)) {
    for (const node of up.nodes) {
      const o = before.get(nodeKey(name, node.url)), tr = el("tr");
      tr.dataset.upstream = name;
      tr.dataset.node = node.url;
      tr.dataset.health = node.health;
      const per = (f) => o ? rate(f(node), f(o), dt) : null;
      const state = cell("", "state");
      state.append(badge(node.health, HEALTH));
      if (node.state === "ejected") {
        state.append(el("span", "detail", "ejected, " + duration(node.ejected_for) + " left"));
      }
      const draining = node.health === "draining";
      const act = cell("", "actions");
      act.append(button(draining ? "undrain" : "drain", draining ? "undrain" : "drain",
                        {upstream: name, node: node.url}));
      tr.append(
        cell(name, "upstream"), cell(up.health_check === "none" ? "off" : up.health_check, "checks"),
        cell(node.url, "node"), state, cell(node.active, "num active"),
        cell(num(per((x) => x.messages[C2U])), "num rate-c2u"), cell(num(per((x) => x.messages[U2C])), "num rate-u2c"),
        cell(bytes((per((x) => x.bytes[C2U]) || 0) + (per((x) => x.bytes[U2C]) || 0)) + "/s", "num brate"),
        cell(node.failures, "num failures"), cell(node.last_failure === null ? "" : node.last_failure, "failure"), act,
      );
      rows.push(tr);
    }
  }
  $("nodes").replaceChildren(...(rows.length ? rows : [emptyRow(11, "no upstreams")]));
}

function renderConnections(list) {
  const rows = list.slice(0, MAX_CONNECTIONS).map((c) => {
    const tr = el("tr");
    tr.dataset.conn = c.conn_id;
    const act = cell("", "actions");
    act.append(button("close", "close", {conn: c.conn_id}));
    tr.append(cell(c.conn_id, "conn"), cell(c.route, "route"), cell(c.node || c.upstream || "-", "node"),
              cell(c.peer, "peer"), cell(c.subject === null ? "" : c.subject, "subject"),
              cell(duration(c.age), "num age"),
              cell(c.messages[C2U] + " / " + c.messages[U2C], "num messages"), act);
    return tr;
  });
  if (list.length > MAX_CONNECTIONS) rows.push(emptyRow(8, (list.length - MAX_CONNECTIONS) + " more not shown"));
  $("connections").replaceChildren(...(rows.length ? rows : [emptyRow(8, "no open connections")]));
}

function render(data) {
  const old = prev && prev.time < data.time ? prev : null, dt = old ? data.time - old.time : 0;
  $("status").replaceChildren(badge(data.status, STATUSES));
  $("status").dataset.status = data.status;
  $("node-id").textContent = data.node.id;
  $("version").textContent = data.node.version;
  $("uptime").textContent = duration(data.node.uptime);
  $("workers").textContent = data.node.workers;
  $("log-level").textContent = data.node.log_level;
  const shards = Object.entries(data.redis || {});
  $("redis-item").hidden = !shards.length;
  $("redis").replaceChildren(...shards.map(([name, state]) => {
    const b = badge(state, ["up", "down"]);
    b.textContent = name + " " + state;
    return b;
  }));
  if (!prev) $("level").value = data.node.log_level;
  remember(sample(data, old));
  CHARTS.forEach(drawChart);
  renderRoutes(data, old, dt);
  renderNodes(data, old, dt);
  prev = data;
}

/* -- the admin API ------------------------------------------------------- */

function say(text, bad) {
  const out = $("action-result");
  out.textContent = text;
  out.className = bad ? "bad" : "good";
}

async function admin(method, path, body) {
  const init = {method, cache: "no-store", signal: AbortSignal.timeout(5000),
                headers: {"Authorization": "Bearer " + token}};
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch("admin/" + path, init);
  let answer = null;
  try { answer = await response.json(); } catch (e) { answer = null; }
  if (response.status === 401) {
    tokenRefused = true;
    $("token-state").textContent = "token refused";
  }
  if (!response.ok) throw new Error((answer && answer.error) || "HTTP " + response.status);
  return answer;
}

function useToken(value) {
  token = value;
  tokenRefused = false;
  if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
  $("token").value = "";
  $("token-state").textContent = token ? "token set (this tab only)" : "no token: read-only";
  for (const b of document.querySelectorAll("button.action, #level-set")) b.disabled = !token;
  $("connections-section").hidden = !token;
  pollConnections();
}

async function act(target) {
  const d = target.dataset, seg = encodeURIComponent;
  try {
    if (d.action === "drain" || d.action === "undrain") {
      const a = await admin("POST", "upstreams/" + seg(d.upstream) + "/" + d.action, {node: d.node});
      say((a.draining ? "draining " : "back in service: ") + a.node + " (" + a.active + " open)");
    } else if (d.action === "close") {
      const a = await admin("POST", "connections/" + seg(d.conn) + "/close");
      say("closing connection " + a.conn_id + " (" + a.code + ")");
      setTimeout(pollConnections, 500);
    }
  } catch (e) { say(d.action + " failed: " + e.message, true); }
}

async function setLevel() {
  try {
    const a = await admin("PUT", "log-level", {level: $("level").value});
    say("log level set to " + a.level);
    $("log-level").textContent = a.level;
  } catch (e) { say("log level not set: " + e.message, true); }
}

async function pollConnections() {
  if (!token || tokenRefused) return;
  try { renderConnections(await admin("GET", "connections")); } catch (e) { say("connections: " + e.message, true); }
}

/* -- polling ------------------------------------------------------------- */

async function poll() {
  const updated = $("updated");
  try {
    const response = await fetch("dashboard.json", {cache: "no-store", signal: AbortSignal.timeout(3000)});
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
  if (++polls % CONNECTIONS_EVERY === 0) await pollConnections();
  setTimeout(poll, 1000);
}

for (const id of ["nodes", "connections"]) {
  $(id).addEventListener("click", (e) => {
    const b = e.target.closest("button.action");
    if (b && token) act(b);
  });
}
$("token-use").addEventListener("click", () => useToken($("token").value.trim()));
$("token-forget").addEventListener("click", () => useToken(""));
$("level-set").addEventListener("click", setLevel);
poll();
useToken(token);
"""
