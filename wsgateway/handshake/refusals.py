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


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    deny: ConnectionDeny
    headers: list[tuple[str, str]] = field(default_factory=list)
    # the info line it deserves: "auth" (with the route and why), "injection", or none
    log: str | None = None
    why: str = ""
    # not a refusal the chain meant: logged as a failure, answered 500
    unexpected: bool = False


def refusal_for(e: BaseException) -> Refusal:
    """The answer to what the handshake chain raised; anything unforeseen fails closed, with a fixed text."""
    if isinstance(e, AuthFailed):
        headers = [("WWW-Authenticate", BEARER_CHALLENGE)] if e.status == codes.UNAUTHORIZED else []
        return Refusal(e.status, ConnectionDeny(e.status, codes.reason_phrase(e.status)), headers, "auth", e.why)
    if isinstance(e, HeaderInjection):
        return Refusal(codes.BAD_REQUEST, ConnectionDeny(codes.BAD_REQUEST, "Bad Request"), log="injection")
    if isinstance(e, ConnectionDeny):
        return Refusal(e.code, e)
    if isinstance(e, UpstreamError):
        return Refusal(e.status, ConnectionDeny(e.status, codes.reason_phrase(e.status)))
    if isinstance(e, CancelledError):
        return Refusal(codes.UNAVAILABLE, ConnectionDeny(codes.UNAVAILABLE, "Service Unavailable"))
    return Refusal(codes.INTERNAL_SERVER_ERROR, ConnectionDeny(codes.INTERNAL_SERVER_ERROR, "Internal Server Error"),
                   unexpected=True)


def safe_reason(reason: str) -> str:
    """Autobahn's reason text with anything it quotes from the request left out."""
    return _QUOTED.sub("…", reason)


def autobahn_answer(reason: str, code: int) -> tuple[int, list[tuple[str, str]], str]:
    """
    (status, headers, log-safe reason) for an upgrade Autobahn refused
    itself: a wrong version gets 426 with the version we speak, a plain
    HTTP request 426 with Upgrade, every other malformed upgrade 400.
    """
    headers: list[tuple[str, str]] = []
    if reason.startswith("WebSocket version") or "Sec-WebSocket-Version" in reason:
        code, headers = codes.UPGRADE_REQUIRED, [("Sec-WebSocket-Version", "13")]
    elif code == codes.UPGRADE_REQUIRED:
        headers = [("Upgrade", "websocket"), ("Connection", "Upgrade")]
    else:
        code = codes.BAD_REQUEST
    return code, headers, safe_reason(reason)
