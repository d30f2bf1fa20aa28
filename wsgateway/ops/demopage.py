# -*- test-case-name: tests.unit.ops.test_dashboard -*-
"""
``GET /demo`` on the admin port (only with a ``[demo]`` section): a page
whose browser opens a WebSocket through the gateway to the demo ``/echo``
route, for trying the default config from a browser.
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


def demo_page(target: tuple[str, int] | None) -> Resource:
    """``target``: the (scheme, port) of the gateway listener the page connects to by default."""
    attrs = ""
    if target is not None:
        scheme, port = target
        attrs = f' data-scheme="{html.escape(scheme)}" data-port="{int(port)}"'
    # ws: and wss: to any host: ?url= may name another gateway
    return StaticPage("wsgateway demo", DEMO_STYLE, DEMO_SCRIPT, DEMO_BODY, "ws: wss:", attrs)


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
