# -*- test-case-name: tests.unit.ops.test_dashboard -*-
"""
``GET /demo`` on the admin port (only with a ``[demo]`` section): a page
whose browser opens a WebSocket through the gateway to the demo ``/echo``
route, for trying the default config from a browser. Its "channel history"
panel subscribes to the broadcast route ``/feed/demo`` of
etc/development.ini with the ``wsgateway.json`` subprotocol, publishes from
a second socket, and shows a cut subscriber coming back with ``?since=``
(docs/protocol.md#channel-history-and-recovery).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

from twisted.web.resource import Resource

from wsgateway.ops.pages import StaticPage

__all__ = ["demo_page", "demo_target"]


DEMO_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 50em; }
input { font: inherit; padding: .2em .4em; }
#url { width: 30em; }
#message { width: 24em; }
#publish-message { width: 16em; }
.log { font-family: ui-monospace, monospace; list-style: none; padding: .5em; border: 1px solid #ddd;
       min-height: 10em; background: #fff; }
.log .sent { color: #1a4f9c; }
.log .received, .log .live { color: #135f13; }
.log .recovered { color: #7a4a00; }
.log .status { font-weight: bold; }
.log .event { color: #666; }
.log .error { color: #8a1010; }
h2 { font-size: 1.2em; margin-top: 1.5em; }
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

# The "channel history" panel: a subscriber that is cut and restored with
# ?since=&epoch=, and a publisher on its own socket (the sender of a broadcast
# message never gets it back). Messages up to the recovered frame's offset
# came from history: they are marked so.
HISTORY_SCRIPT = r"""
(() => {
  const hlog = document.getElementById("history-log");
  const state = document.getElementById("history-state");
  const lastOffset = document.getElementById("last-offset");
  const lastEpoch = document.getElementById("last-epoch");
  const publishBox = document.getElementById("publish-message");
  const publishButton = document.getElementById("publish");
  const cutButton = document.getElementById("cut");
  const restoreButton = document.getElementById("restore");
  let feed = "";
  let sub = null;
  let pub = null;
  let cut = false;
  let last = null;  // the newest {offset, epoch} seen
  let historyTop = 0;  // offsets up to this one came from history, after a recovered frame

  function note(kind, text) {
    const li = document.createElement("li");
    li.className = kind;
    li.textContent = text;
    hlog.append(li);
  }

  function feedUrl() {
    const base = defaultUrl();  // the echo URL's scheme, host and port
    if (!base) return "";
    try {
      const u = new URL(base);
      u.pathname = "/feed/demo";
      u.search = "";
      u.hash = "";
      return u.href;
    } catch (e) {
      return "";
    }
  }

  function isOpen(socket) { return socket !== null && socket.readyState === WebSocket.OPEN; }

  function buttons() {
    publishButton.disabled = !isOpen(pub);
    cutButton.disabled = !isOpen(sub);
    restoreButton.disabled = sub !== null && sub.readyState !== WebSocket.CLOSED;
  }

  function open(url, who, protocols) {
    try {
      return protocols ? new WebSocket(url, protocols) : new WebSocket(url);
    } catch (e) {
      note("error", who + ": cannot connect: " + e.message);
      return null;
    }
  }

  function seen(offset, epoch) {
    last = { offset: offset, epoch: epoch };
    lastOffset.textContent = String(offset);
    lastEpoch.textContent = epoch;
  }

  function frame(text) {
    let m;
    try {
      m = JSON.parse(text);
    } catch (e) {
      note("error", "not a JSON frame: " + text);
      return;
    }
    if ("recovered" in m) {
      note("status", "recovered: " + m.recovered + ", offset " + m.offset + (m.epoch ? ", epoch " + m.epoch : ""));
      if (m.recovered) {
        historyTop = m.offset;
      } else {
        note("event", "history cannot fill the gap: a real client reloads its state now");
        if (m.epoch) seen(m.offset, m.epoch);
      }
      return;
    }
    const data = typeof m.data === "string" ? m.data : "[" + atob(m.data_b64 || "").length + " bytes]";
    if (typeof m.offset !== "number") {
      note("live", "no offset: " + data);
      return;
    }
    const fromHistory = m.offset <= historyTop;
    note(fromHistory ? "recovered" : "live", "offset " + m.offset + ": " + data + (fromHistory ? " (recovered)" : ""));
    seen(m.offset, m.epoch);
  }

  function subscribe(resume) {
    const url = new URL(feed);
    if (resume && last) {
      url.searchParams.set("since", String(last.offset));
      url.searchParams.set("epoch", last.epoch);
    }
    const socket = open(url.href, "subscriber", ["wsgateway.json"]);
    if (!socket) return;
    sub = socket;
    cut = false;
    historyTop = 0;
    state.textContent = "connecting";
    note("event", "subscriber connecting to " + url.href);
    socket.onopen = () => {
      state.textContent = "connected";
      note("event", "subscriber connected, subprotocol " + (socket.protocol || "none"));
      buttons();
    };
    socket.onmessage = (m) => {
      if (sub === socket && typeof m.data === "string") frame(m.data);
    };
    socket.onerror = () => note("error", "subscriber: WebSocket error (see the browser console)");
    socket.onclose = (e) => {
      if (sub !== socket) return;
      state.textContent = cut ? "cut" : "closed: " + e.code;
      note("event", "subscriber closed: " + e.code + (e.reason ? " " + e.reason : ""));
      buttons();
    };
    buttons();
  }

  function publisher() {
    const socket = open(feed, "publisher");
    if (!socket) return;
    pub = socket;
    socket.onopen = () => { note("event", "publisher connected"); buttons(); };
    socket.onerror = () => note("error", "publisher: WebSocket error (see the browser console)");
    socket.onclose = (e) => {
      if (pub !== socket) return;
      note("event", "publisher closed: " + e.code + (e.reason ? " " + e.reason : ""));
      buttons();
    };
    buttons();
  }

  document.getElementById("publish-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (!isOpen(pub)) return;
    pub.send(publishBox.value);
    note("sent", "published: " + publishBox.value);
    publishBox.value = "";
    publishBox.focus();
  });
  cutButton.addEventListener("click", () => {
    if (!isOpen(sub)) return;
    cut = true;
    sub.close(1000, "network cut from the page");
    state.textContent = "cut";
    buttons();
  });
  restoreButton.addEventListener("click", () => {
    if (sub !== null && sub.readyState !== WebSocket.CLOSED) return;
    if (!last) note("event", "no offset seen yet: reconnecting without since=");
    if (pub === null || pub.readyState === WebSocket.CLOSED) publisher();
    subscribe(true);
  });

  feed = feedUrl();
  if (!feed) {
    state.textContent = "no gateway address: open the page with ?url=";
    return;
  }
  publisher();
  subscribe(false);
})();
"""

DEMO_BODY = """<h1>wsgateway demo</h1>
<p>Your browser's own WebSocket client, through the gateway to the demo echo backend.
Another URL: <code>?url=wss://HOST:PORT/PATH</code>.</p>
<form id="connect"><input id="url" aria-label="WebSocket URL"> <button>connect</button></form>
<form id="send-form"><input id="message" aria-label="message" autocomplete="off" autofocus>
<button id="send" disabled>send</button></form>
<ul id="log" class="log"></ul>
<h2>Channel history</h2>
<p>Two more WebSockets, on the broadcast route <code>/feed/demo</code>, whose channel keeps a history:
a subscriber offering the <code>wsgateway.json</code> subprotocol, which gets each message with its offset
and epoch, and a publisher (a sender never gets its own message back). Cut the subscriber's network,
publish, then restore: it reconnects with <code>?since=OFFSET&amp;epoch=EPOCH</code> and gets what it missed.</p>
<p>Subscriber: <strong id="history-state">not connected</strong>.
Last offset seen: <strong id="last-offset">none</strong>, epoch <strong id="last-epoch">none</strong>.</p>
<form id="publish-form"><input id="publish-message" aria-label="message to publish" autocomplete="off">
<button id="publish" disabled>publish</button>
<button id="cut" type="button" disabled>cut the network</button>
<button id="restore" type="button" disabled>restore</button></form>
<ul id="history-log" class="log"></ul>
"""


def demo_page(target: tuple[str, int] | None) -> Resource:
    """``target``: the (scheme, port) of the gateway listener the page connects to by default."""
    attrs = ""
    if target is not None:
        scheme, port = target
        attrs = f' data-scheme="{html.escape(scheme)}" data-port="{int(port)}"'
    # ws: and wss: to any host: ?url= may name another gateway
    return StaticPage("wsgateway demo", DEMO_STYLE, DEMO_SCRIPT + HISTORY_SCRIPT, DEMO_BODY, "ws: wss:", attrs)


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
