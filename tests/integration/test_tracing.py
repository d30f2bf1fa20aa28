"""
Trace context through the gateway: the client's trace-id kept and carried
upstream, trace_id on every log line about a connection, and an
OpenTelemetry span per connection when an exporter is configured.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from support.gateway import proxy_ini
from support.waiting import wait_for

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
CLIENT_TP = f"00-{TRACE}-{PARENT}-01"


def events(gw: Any) -> list[dict[str, Any]]:
    out = []
    for line in gw.log().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_trace_id_is_kept_sent_upstream_and_on_every_line_of_the_connection(start_gateway: Any,
                                                                           make_upstream: Any) -> None:
    up = make_upstream()
    gw = start_gateway(proxy_ini(up.node, limits="messages_per_second = 2", routes="""
        [route:closed]
        path = /closed/**
        upstream = backend
        allowed_origins = https://only.example
        """).replace("format = text", "format = json"))
    with connect(gw.url + "/a", additional_headers={"traceparent": CLIENT_TP}) as ws:
        for i in range(10):  # burst 4: the rate limit closes it, and the relay logs why
            try:
                ws.send(f"m{i}")
            except ConnectionClosed:
                break
        try:
            while True:
                ws.recv(timeout=5)
        except ConnectionClosed as e:
            assert e.rcvd is not None and e.rcvd.code == 1008
    sent = up.requests[0].headers
    version, trace, parent, flags = sent["traceparent"].split("-")
    assert (version, trace, flags) == ("00", TRACE, "01")
    assert parent != PARENT  # the gateway is a hop of its own
    assert re.fullmatch(r"[0-9a-f]{32}", sent["X-Request-ID"])
    # a refusal carries the trace too
    try:
        connect(gw.url + "/closed/x", origin="https://evil.example", additional_headers={"traceparent": CLIENT_TP})
    except InvalidStatus as e:
        assert e.response.status_code == 403
    assert wait_for(lambda: any("closed" in e["event"] and e.get("trace_id") == TRACE for e in events(gw)))
    about = [e for e in events(gw) if e.get("trace_id") == TRACE]
    texts = [e["event"] for e in about]
    assert any("rate limit" in t or "closing client: 1008" in t for t in texts), texts
    assert any(t.startswith("closed ") for t in texts), texts
    assert any("refused" in t and "403" in t for t in texts), texts
    conn_ids = {e["conn_id"] for e in about}
    assert len(conn_ids) == 2  # the proxied connection and the refused one


def test_a_new_trace_when_the_client_sends_none_or_garbage(start_gateway: Any, make_upstream: Any) -> None:
    up = make_upstream()
    gw = start_gateway(proxy_ini(up.node))
    for header in ({}, {"traceparent": "00-" + "0" * 32 + "-" + PARENT + "-01"}, {"traceparent": "garbage"}):
        with connect(gw.url + "/", additional_headers=header) as ws:
            ws.send("x")
            ws.recv(timeout=5)
    traces = [r.headers["traceparent"].split("-")[1] for r in up.requests]
    assert len(set(traces)) == 3 and "0" * 32 not in traces


def test_a_span_per_connection_with_the_console_exporter(start_gateway: Any, make_upstream: Any) -> None:
    up = make_upstream()
    gw = start_gateway(proxy_ini(up.node), env={"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "gw-test"})
    with connect(gw.url + "/span", additional_headers={"traceparent": CLIENT_TP}) as ws:
        ws.send("x")
        ws.recv(timeout=5)
    ours = up.requests[0].headers["traceparent"].split("-")[2]
    assert gw.stop() == 0  # the batch is flushed at shutdown
    log = gw.log()
    assert "exporting a span per connection (console)" in log
    assert f'"trace_id": "0x{TRACE}"' in log
    assert f'"span_id": "0x{ours}"' in log  # the parent-id the upstream saw is the span's id
    assert f'"parent_id": "0x{PARENT}"' in log  # the client's span is its parent
    assert '"name": "websocket main"' in log
    assert '"service.name": "gw-test"' in log


def test_without_the_sdk_tracing_is_propagation_only(start_gateway: Any, make_upstream: Any) -> None:
    up = make_upstream()
    # an exporter that does not exist: warned about, and the gateway works
    gw = start_gateway(proxy_ini(up.node), env={"OTEL_TRACES_EXPORTER": "zipkin-nope"})
    with connect(gw.url + "/", additional_headers={"traceparent": CLIENT_TP}) as ws:
        ws.send("x")
        assert ws.recv(timeout=5) == "x"
    assert "is not supported (console, otlp)" in gw.log()
    assert os.environ.get("OTEL_TRACES_EXPORTER") is None
