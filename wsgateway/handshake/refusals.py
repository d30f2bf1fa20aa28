# -*- test-case-name: tests.unit.handshake.test_proxy_units -*-
"""
What the client is answered when its handshake is refused: the status and
headers for each way the chain can fail (L{refusal_for}), and for the
malformed upgrades Autobahn itself refuses (L{autobahn_answer}). Pure: the
protocol (handshake/server.py) logs and sends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import CancelledError

from wsgateway import codes
from wsgateway.auth.identity import AuthFailed
from wsgateway.handshake.headers import HeaderInjection
from wsgateway.upstream.pool import UpstreamError

# RFC 6750 section 3: the scheme a 401 asks for
BEARER_CHALLENGE = 'Bearer realm="wsgateway"'

# Autobahn's refusal reasons quote request text (a duplicated bearer
# subprotocol, a resource with its query): never let it into a log line.
_QUOTED = re.compile(r'"[^"]*"|\'[^\']*\'')


class Refused(ConnectionDeny):
    """
    A refusal the chain raises with its ``reason`` (a ``codes.R_*`` token),
    when the status alone does not say it (three kinds of 400, two of 503).
    """

    def __init__(self, status: int, reason: str, why: str = "") -> None:
        super().__init__(status, codes.reason_phrase(status))
        self.refusal = reason
        self.why = why


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    deny: ConnectionDeny
    headers: list[tuple[str, str]] = field(default_factory=list)
    # the refusal line's reason token (codes.R_*) and, when there is one, a fixed phrase saying more
    reason: str = codes.R_BAD_REQUEST
    why: str = ""
    # not a refusal the chain meant: logged as a failure, answered 500
    unexpected: bool = False


# UpstreamError's detail when the upstream itself answered the upgrade (upstream/pool.py)
_ANSWERED = "upstream answered"


def refusal_for(e: BaseException) -> Refusal:
    """The answer to what the handshake chain raised; anything unforeseen fails closed, with a fixed text."""
    if isinstance(e, AuthFailed):
        headers = [("WWW-Authenticate", BEARER_CHALLENGE)] if e.status == codes.UNAUTHORIZED else []
        return Refusal(e.status, ConnectionDeny(e.status, codes.reason_phrase(e.status)), headers,
                       codes.refusal_reason(e.status), e.why)
    if isinstance(e, HeaderInjection):
        return Refusal(codes.BAD_REQUEST, ConnectionDeny(codes.BAD_REQUEST, "Bad Request"), reason=codes.R_BAD_HEADER,
                       why="control characters in the request")
    if isinstance(e, Refused):
        return Refusal(e.code, e, reason=e.refusal, why=e.why)
    if isinstance(e, ConnectionDeny):
        return Refusal(e.code, e, reason=codes.refusal_reason(e.code))
    if isinstance(e, UpstreamError):
        reason = codes.R_UPSTREAM_REFUSED if e.detail.startswith(_ANSWERED) else codes.refusal_reason(e.status)
        return Refusal(e.status, ConnectionDeny(e.status, codes.reason_phrase(e.status)), reason=reason, why=e.detail)
    if isinstance(e, CancelledError):
        return Refusal(codes.UNAVAILABLE, ConnectionDeny(codes.UNAVAILABLE, "Service Unavailable"),
                       reason=codes.R_CLIENT_GONE)
    return Refusal(codes.INTERNAL_SERVER_ERROR, ConnectionDeny(codes.INTERNAL_SERVER_ERROR, "Internal Server Error"),
                   reason=codes.R_INTERNAL, unexpected=True)


def safe_reason(reason: str) -> str:
    """Autobahn's reason text with anything it quotes from the request left out."""
    return _QUOTED.sub("…", reason)


def autobahn_answer(reason: str, code: int) -> tuple[int, list[tuple[str, str]], str, str]:
    """
    (status, headers, reason token, log-safe reason) for an upgrade
    Autobahn refused itself: a wrong version gets 426 with the version we
    speak, a plain HTTP request 426 with Upgrade, every other malformed
    upgrade 400.
    """
    headers: list[tuple[str, str]] = []
    if reason.startswith("WebSocket version") or "Sec-WebSocket-Version" in reason:
        code, headers, token = codes.UPGRADE_REQUIRED, [("Sec-WebSocket-Version", "13")], codes.R_BAD_VERSION
    elif code == codes.UPGRADE_REQUIRED:
        headers, token = [("Upgrade", "websocket"), ("Connection", "Upgrade")], codes.R_UPGRADE_REQUIRED
    else:
        code, token = codes.BAD_REQUEST, codes.R_BAD_REQUEST
    return code, headers, token, safe_reason(reason)
