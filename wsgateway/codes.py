# -*- test-case-name: tests.integration.test_proxy -*-
"""
Close codes and handshake statuses the gateway itself produces, in one place.

Every refusal the client sees carries one of these fixed reasons, never text
derived from an exception or from the request (Autobahn would otherwise send
``500 <exception text>`` or echo header values back in the status line).
"""

from http import HTTPStatus

# WebSocket close codes (RFC 6455 section 7.4.1, plus 1014 from the IANA registry)
NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
POLICY_VIOLATION = 1008
INVALID_PAYLOAD = 1007
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013
BAD_GATEWAY = 1014
# Never sent in a close frame (RFC 6455 7.4.1): what a close is recorded as
# when it carried no code (1005), or when no close frame came at all (1006).
NO_STATUS = 1005
ABNORMAL = 1006

# The closes of a client that broke a rule: the gateway reads and discards
# what it still sends, for up to [limits] close_timeout, so the close frame
# reaches it rather than a TCP reset (docs/protocol.md#forwarding-and-close-codes).
RULE_BROKEN = frozenset((PROTOCOL_ERROR, INVALID_PAYLOAD, POLICY_VIOLATION, MESSAGE_TOO_BIG, TRY_AGAIN_LATER))

# Fixed reasons of the gateway's policy closes (1008, docs/protocol.md#forwarding-and-close-codes)
REASON_RATE_LIMIT = "rate limit exceeded"
REASON_TOKEN_EXPIRED = "token expired"

# Handshake statuses (docs/protocol.md#handshake-statuses)
BAD_REQUEST = 400
UNAUTHORIZED = 401
FORBIDDEN = 403
NOT_FOUND = 404
UPGRADE_REQUIRED = 426
TOO_MANY_REQUESTS = 429
HEADERS_TOO_LARGE = 431
INTERNAL_SERVER_ERROR = 500
UPSTREAM_FAILED = 502
UNAVAILABLE = 503
UPSTREAM_TIMEOUT = 504

# The request line plus headers may not exceed this (docs/protocol.md#handshake-statuses: 431).
MAX_REQUEST_HEAD = 16 * 1024


def reason_phrase(status: int) -> str:
    """The standard phrase for an HTTP status, used as the only reason text."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
