# -*- test-case-name: tests.integration.test_channels -*-
"""
Broadcast connections (``mode = broadcast``) from the handshake to their
end: the channel chosen at the handshake, the ChannelSession that joins it
once the 101 is out, and its end. Autobahn keeps these connections (pings,
close handshake); the broker feeds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from autobahn.websocket.types import ConnectionDeny
from twisted.logger import Logger

from wsgateway import codes
from wsgateway._compat.sendnow import send_at_once
from wsgateway.channels.deflate import acceptor, negotiated
from wsgateway.channels.outbox import ChannelSession
from wsgateway.config.limits import LimitsConfig
from wsgateway.config.routes import RouteConfig
from wsgateway.ops.stats import Connection
from wsgateway.routing.templates import TemplateError, query_params, render_template

_log = Logger(namespace="wsgateway.channels.sessions")

# the subprotocol of clients that want each message's channel, offset and epoch
JSON_SUBPROTOCOL = "wsgateway.json"


def open_channel(
    proto: Any,
    route: RouteConfig,
    match: Any,
    headers: Mapping[str, str],
    claims: Mapping[str, Any] | None,
    protocols: tuple[str, ...],
    limits: LimitsConfig,
    token_param: str | None,
    broker: Any,
) -> str | None:
    """The handshake of a broadcast route: its channel, and the subprotocol answered (a plain value, no upstream)."""
    if broker is None or route.channel is None:
        raise ConnectionDeny(codes.UNAVAILABLE, "Service Unavailable")
    query = query_params(proto.http_request_uri, drop=token_param)
    try:
        proto.channel = render_template(route.channel, captures=match.captures, claims=claims, query=query,
                                        headers=headers)
    except TemplateError:
        raise ConnectionDeny(codes.BAD_REQUEST, "Bad Request") from None
    if not broker.ready_for(proto.channel):  # Redis (the channel's shard) is down
        raise ConnectionDeny(codes.UNAVAILABLE, "Service Unavailable")
    proto.recover_from = recovery_request(query)
    # set before the 101 goes out: Autobahn starts its pings then
    proto.autoPingInterval = limits.ping_interval
    proto.autoPingTimeout = limits.ping_timeout
    proto.closeHandshakeTimeout = limits.close_timeout
    # A malformed frame gets a close frame with its code and reason (1002,
    # 1007, 1009), as on proxy routes, and Autobahn reads on until the
    # client's answer (bounded by close_timeout): not a TCP abort.
    proto.failByDrop = False
    proto.channel_config = (route, limits)
    # Autobahn asks this connection's own accept function once onConnect has
    # answered (succeedHandshake): the gateway is the endpoint, so it
    # negotiates permessage-deflate itself, whatever the factory's default
    proto.perMessageCompressionAccept = acceptor(route.compressed, limits.max_message_size)
    # the gateway is the endpoint here: it takes wsgateway.json when offered
    # (docs/protocol.md#channel-history-and-recovery), else the first
    # subprotocol offered (browsers fail a handshake whose offered
    # subprotocols get no answer)
    if JSON_SUBPROTOCOL in protocols:
        proto.json_envelope = True
        return JSON_SUBPROTOCOL
    proto.json_envelope = False
    return protocols[0] if protocols else None


# An offset a JavaScript number holds exactly, and Redis's Lua prints in full
_MAX_OFFSET = 10**15


def recovery_request(query: Mapping[str, str]) -> tuple[int, str | None] | None:
    """C{?since=OFFSET&epoch=EPOCH} -> (offset, epoch); None without C{since}; 400 when it is no offset."""
    since = query.get("since")
    if since is None:
        return None
    if not since.isascii() or not since.isdigit() or int(since) > _MAX_OFFSET:
        raise ConnectionDeny(codes.BAD_REQUEST, "Bad Request")
    return int(since), query.get("epoch") or None


def start_channel(proto: Any, live: Any) -> ChannelSession:
    """After the 101: the session that joins the channel, registered with ``live`` (LiveConnections)."""
    route, limits = proto.channel_config
    identity = proto.identity
    clock = live.clock
    deflate = negotiated(proto.websocket_extensions_in_use)
    session = ChannelSession(
        proto,
        live.broker,
        proto.channel or "",
        conn_id=proto.conn_id,
        user=identity.subject if identity is not None else None,
        client_publish=route.client_publish,
        slow_consumer=route.slow_consumer,
        queue_limit=limits.write_buffer,
        messages_per_second=limits.messages_per_second,
        clock=clock,
        window=deflate.window,
        max_size=proto.maxMessagePayloadSize,
        json=proto.json_envelope,
        recover_from=proto.recover_from,
        route=route.name,
    )
    proto.opened_at = clock.seconds()
    # one write per delivery: sent at once, like the relay's (sendnow.py)
    send_at_once(proto.transport)
    live.session_opened(session, Connection(
        conn_id=proto.conn_id, route=route.name, upstream="", node="", peer=proto.peer,
        trace_id=proto.trace_id, subject=identity.subject if identity is not None else None,
        started=proto.opened_at, relay=session, compressed=deflate.compressed,
    ))
    _log.debug("{conn_id} joined channel {channel} on route {route}", conn_id=proto.conn_id,
               channel=proto.channel, route=route.name, trace_id=proto.trace_id)
    return session
