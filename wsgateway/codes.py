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

# Why a handshake was refused: the ``reason`` of the refusal's log line and
# of wsgateway_handshakes_total (docs/logs.md#refused-handshakes). Short,
# stable tokens, a fixed set (a label value a peer cannot grow).
R_BAD_REQUEST = "bad_request"  # 400: a malformed upgrade, or a template value the request lacks
R_BAD_HEADER = "bad_header"  # 400: control characters or a bad token in the request head
R_BAD_PATH = "bad_path"  # 400: dot segments in the path
R_BAD_HOST = "bad_host"  # 400: no Host, or one that is not host[:port]
R_AUTH = "auth"  # 401: no, or bad, credentials
R_FORBIDDEN = "forbidden"  # 403: a role the route requires is missing
R_ORIGIN = "origin"  # 403: Origin not allowed
R_NO_ROUTE = "no_route"  # 404
R_UPGRADE_REQUIRED = "upgrade_required"  # 426: a plain HTTP request
R_BAD_VERSION = "bad_version"  # 426: a WebSocket version other than 13
R_PER_IP_LIMIT = "per_ip_limit"  # 429: [limits] max_connections_per_ip
R_HEADERS_TOO_LARGE = "headers_too_large"  # 431
R_INTERNAL = "internal_error"  # 500: an unexpected exception (logged with its traceback)
R_UPSTREAM_FAILED = "upstream_failed"  # 502: no attempt reached the upstream's 101
R_UPSTREAM_REFUSED = "upstream_refused"  # the upstream answered the upgrade with this status
R_UPSTREAM_UNAVAILABLE = "upstream_unavailable"  # 503: no node may take connections
R_UPSTREAM_TIMEOUT = "upstream_timeout"  # 504: the last attempt timed out
R_TOO_MANY_CONNECTIONS = "too_many_connections"  # 503: [limits] max_connections
R_BROKER_UNAVAILABLE = "broker_unavailable"  # 503: a broadcast route without a broker (Redis down)
R_CLIENT_GONE = "client_gone"  # the client left while its handshake waited (counted as 503, never sent)

REFUSAL_REASONS = frozenset({
    R_BAD_REQUEST, R_BAD_HEADER, R_BAD_PATH, R_BAD_HOST, R_AUTH, R_FORBIDDEN, R_ORIGIN, R_NO_ROUTE,
    R_UPGRADE_REQUIRED, R_BAD_VERSION, R_PER_IP_LIMIT, R_HEADERS_TOO_LARGE, R_INTERNAL, R_UPSTREAM_FAILED,
    R_UPSTREAM_REFUSED, R_UPSTREAM_UNAVAILABLE, R_UPSTREAM_TIMEOUT, R_TOO_MANY_CONNECTIONS, R_BROKER_UNAVAILABLE,
    R_CLIENT_GONE,
})

# The reason of a refusal whose raiser named none, by status.
_DEFAULT_REASONS = {
    BAD_REQUEST: R_BAD_REQUEST,
    UNAUTHORIZED: R_AUTH,
    FORBIDDEN: R_FORBIDDEN,
    NOT_FOUND: R_NO_ROUTE,
    UPGRADE_REQUIRED: R_UPGRADE_REQUIRED,
    TOO_MANY_REQUESTS: R_PER_IP_LIMIT,
    HEADERS_TOO_LARGE: R_HEADERS_TOO_LARGE,
    INTERNAL_SERVER_ERROR: R_INTERNAL,
    UPSTREAM_FAILED: R_UPSTREAM_FAILED,
    UNAVAILABLE: R_UPSTREAM_UNAVAILABLE,
    UPSTREAM_TIMEOUT: R_UPSTREAM_TIMEOUT,
}


def refusal_reason(status: int) -> str:
    """The ``reason`` for a refusal with ``status`` when nothing more precise is known."""
    return _DEFAULT_REASONS.get(status, R_BAD_REQUEST if 400 <= status < 500 else R_INTERNAL)


def reason_phrase(status: int) -> str:
    """The standard phrase for an HTTP status, used as the only reason text."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
