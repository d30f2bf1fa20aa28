"""
wsgateway/handshake/refusals.py: the status, headers and reason token of
each way a handshake is refused (the reasons are docs/metrics.md's list).
"""

from __future__ import annotations

import pytest
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import CancelledError

from wsgateway import codes
from wsgateway.auth.identity import AuthFailed
from wsgateway.handshake.headers import HeaderInjection
from wsgateway.handshake.refusals import Refused, autobahn_answer, refusal_for
from wsgateway.upstream.pool import UpstreamError


@pytest.mark.parametrize(("raised", "status", "reason", "why"), [
    (AuthFailed(401, "token expired"), 401, "auth", "token expired"),
    (AuthFailed(403, "missing role"), 403, "forbidden", "missing role"),
    (Refused(403, codes.R_ORIGIN, "origin not allowed"), 403, "origin", "origin not allowed"),
    (Refused(404, codes.R_NO_ROUTE), 404, "no_route", ""),
    (Refused(400, codes.R_BAD_HOST), 400, "bad_host", ""),
    (HeaderInjection("request head: forbidden byte 0x00 at 3"), 400, "bad_header",
     "control characters in the request"),
    (ConnectionDeny(400, "Bad Request"), 400, "bad_request", ""),  # e.g. a template value the request lacks
    (UpstreamError(502, "ConnectionRefusedError: refused"), 502, "upstream_failed", "ConnectionRefusedError: refused"),
    (UpstreamError(503, "no healthy node"), 503, "upstream_unavailable", "no healthy node"),
    (UpstreamError(504, "upstream handshake timed out"), 504, "upstream_timeout", "upstream handshake timed out"),
    (UpstreamError(503, "upstream answered 503"), 503, "upstream_refused", "upstream answered 503"),
    (UpstreamError(401, "upstream answered 401"), 401, "upstream_refused", "upstream answered 401"),
    (CancelledError(), 503, "client_gone", ""),
    (KeyError("a bug"), 500, "internal_error", ""),
])
def test_each_refusal_has_its_status_and_reason(raised: BaseException, status: int, reason: str, why: str) -> None:
    r = refusal_for(raised)
    assert (r.status, r.deny.code, r.reason, r.why) == (status, status, reason, why)
    assert r.reason in codes.REFUSAL_REASONS
    assert r.deny.reason == codes.reason_phrase(status)  # a fixed phrase, never the exception's text
    assert r.unexpected == (reason == "internal_error")


def test_a_401_asks_for_a_bearer_token() -> None:
    assert refusal_for(AuthFailed(401, "no credentials")).headers == [("WWW-Authenticate", 'Bearer realm="wsgateway"')]
    assert refusal_for(AuthFailed(403, "missing role")).headers == []


def test_autobahns_own_refusals() -> None:
    assert autobahn_answer("WebSocket version 8 not supported", 400) == (
        426, [("Sec-WebSocket-Version", "13")], "bad_version", "WebSocket version 8 not supported")
    assert autobahn_answer("HTTP Upgrade header missing", 426)[::2] == (426, "upgrade_required")
    status, _, reason, said = autobahn_answer('invalid resource "/x?access_token=abc"', 400)
    assert (status, reason) == (400, "bad_request") and "abc" not in said


def test_every_status_has_a_default_reason() -> None:
    for status in (400, 401, 403, 404, 426, 429, 431, 500, 502, 503, 504, 418, 599):
        assert codes.refusal_reason(status) in codes.REFUSAL_REASONS
