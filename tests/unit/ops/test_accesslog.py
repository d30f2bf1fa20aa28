"""
wsgateway/ops/accesslog.py: the refused handshakes' lines (one each, rate
limited per reason, warn for the gateway's and upstreams' failures) and the
access lines' JSON fields, named as in the text (docs/logs.md).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from wsgateway import codes
from wsgateway.ops import accesslog, logs

NAMESPACE = "wsgateway.handshake.server.GatewayServerFactory"


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == NAMESPACE:
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    level = logs.LEVEL
    logs.set_level("info")
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observer)
        logs.set_level(level)


def proto(route: str | None = "chat") -> Any:
    return SimpleNamespace(peer="tcp4:192.0.2.7:53122", route=SimpleNamespace(name=route) if route else None,
                           trace_id="ab" * 16, conn_id="c0ffee000001")


def json_line(event: dict[str, Any]) -> dict[str, Any]:
    out = io.StringIO()
    logs.JSONLinesObserver(out, "gw-1")(event)
    parsed: dict[str, Any] = json.loads(out.getvalue())
    return parsed


def test_a_refusal_is_one_info_line_with_its_reason_and_fields(events: list[dict[str, Any]]) -> None:
    accesslog.RefusalLines().refused(proto(), 401, codes.R_AUTH, "token expired", 10.0)
    assert len(events) == 1
    event = events[0]
    assert event["log_level"] == LogLevel.info
    assert formatEvent(event) == (
        f"refused tcp4:192.0.2.7:53122 with 401 route=chat reason=auth trace_id={'ab' * 16} suppressed=0: "
        "token expired"
    )
    line = json_line(event)
    assert {k: line[k] for k in ("route", "status", "reason", "detail", "suppressed", "conn_id", "trace_id",
                                 "peer")} == {
        "route": "chat", "status": 401, "reason": "auth", "detail": "token expired", "suppressed": 0,
        "conn_id": "c0ffee000001", "trace_id": "ab" * 16, "peer": "tcp4:192.0.2.7:53122",
    }


def test_gateway_and_upstream_failures_are_warnings_a_client_that_left_is_not(events: list[dict[str, Any]]) -> None:
    lines = accesslog.RefusalLines()
    lines.refused(proto(), 502, codes.R_UPSTREAM_FAILED, "timed out", 1.0)
    lines.refused(proto(None), 503, codes.R_TOO_MANY_CONNECTIONS, "", 1.0)
    lines.refused(proto(), 503, codes.R_CLIENT_GONE, "", 1.0)
    assert [e["log_level"] for e in events] == [LogLevel.warn, LogLevel.warn, LogLevel.info]
    assert "route=- reason=too_many_connections" in formatEvent(events[1])
    assert "detail" not in json_line(events[1])  # no phrase, no field


def test_a_flood_is_rate_limited_per_reason_and_the_next_line_counts_the_rest(events: list[dict[str, Any]]) -> None:
    lines = accesslog.RefusalLines()
    burst = int(accesslog.REFUSAL_BURST)
    for _ in range(burst + 1000):  # all at one instant
        lines.refused(proto(None), 404, codes.R_NO_ROUTE, "", 50.0)
    assert len(events) == burst
    # another reason has a budget of its own: the flood does not hide it
    lines.refused(proto(), 401, codes.R_AUTH, "no credentials", 50.0)
    assert len(events) == burst + 1 and events[-1]["reason"] == "auth"
    # a second later the bucket holds REFUSAL_RATE lines again; the first one says what was left out
    for _ in range(100):
        lines.refused(proto(None), 404, codes.R_NO_ROUTE, "", 51.0)
    flood = [e for e in events if e["reason"] == "no_route"]
    assert len(flood) == burst + int(accesslog.REFUSAL_RATE)
    assert flood[burst]["suppressed"] == 1000
    assert [e["suppressed"] for e in flood[burst + 1:]] == [0] * (int(accesslog.REFUSAL_RATE) - 1)
    assert all(e["suppressed"] == 0 for e in flood[:burst])


def test_no_info_line_is_built_above_info(events: list[dict[str, Any]]) -> None:
    logs.set_level("warn")
    lines = accesslog.RefusalLines()
    lines.refused(proto(), 404, codes.R_NO_ROUTE, "", 1.0)
    lines.refused(proto(), 504, codes.R_UPSTREAM_TIMEOUT, "upstream handshake timed out", 1.0)
    assert [e["reason"] for e in events] == ["upstream_timeout"]


def test_access_lines_use_the_same_field_names_in_json_as_in_text(events: list[dict[str, Any]]) -> None:
    info = SimpleNamespace(conn_id="c0ffee000002", route=SimpleNamespace(name="chat", upstream="demo"),
                           node=SimpleNamespace(url="ws://127.0.0.1:8081"), peer="tcp4:192.0.2.7:1",
                           trace_id="cd" * 16)
    relay = SimpleNamespace(close_code=1000, closed_by="client", started=10.0, messages_c2u=12, messages_u2c=40,
                            bytes_c2u=1410, bytes_u2c=5120, mirror_dropped=3, deflate=False)
    accesslog.relay_closed(info, relay, 12.5)
    text = formatEvent(events[-1])
    line = json_line(events[-1])
    for name, value in (("messages_in", 12), ("messages_out", 40), ("bytes_in", 1410), ("bytes_out", 5120),
                        ("mirror_dropped", 3)):
        assert f" {name}={value} " in text + " "
        assert line[name] == value
    assert "msgs_in" not in line and "msgs_out" not in line
