# -*- test-case-name: tests.integration.test_proxy -*-
"""
The access line: one info line per connection when it ends, for a proxied
connection (its relay) and for a broadcast one (its channel session)
(docs/logs.md#the-access-line).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from wsgateway.ops import logs

# The namespace the access line has always had: operators filter their log
# pipelines on it (docs/logs.md shows it), so it stays put when the code moves.
_log = Logger(namespace="wsgateway.handshake.server.GatewayServerFactory")


def relay_closed(info: Any, relay: Any, now: float) -> None:
    """``info`` is the connection's ConnInfo (relay/start.py), ``relay`` its finished Relay."""
    if not logs.SHOWS_INFO:
        return
    route = info.route
    _log.info(
        "closed {conn_id} route={route} upstream={upstream} node={node} peer={peer} trace_id={trace_id} "
        "code={code} closed_by={closed_by} duration={duration:.3f} messages_in={msgs_in} "
        "messages_out={msgs_out} bytes_in={bytes_in} bytes_out={bytes_out} mirror_dropped={mirror_dropped} "
        "compressed={compressed}",
        conn_id=info.conn_id,
        route=route.name if route else "",
        upstream=route.upstream if route else "",
        node=info.node.url if info.node else "",
        peer=info.peer,
        trace_id=info.trace_id,
        code=relay.close_code,
        closed_by=relay.closed_by,
        duration=now - relay.started,
        msgs_in=relay.messages_c2u,
        msgs_out=relay.messages_u2c,
        bytes_in=relay.bytes_c2u,
        bytes_out=relay.bytes_u2c,
        mirror_dropped=relay.mirror_dropped,
        compressed=relay.deflate,
    )


def channel_closed(proto: Any, session: Any, now: float) -> None:
    """``proto`` is the broadcast connection's server protocol, ``session`` its ChannelSession."""
    _log.info(
        "closed {conn_id} route={route} channel={channel} peer={peer} trace_id={trace_id} code={code} "
        "duration={duration:.3f} messages_in={msgs_in} messages_out={msgs_out} bytes_in={bytes_in} "
        "bytes_out={bytes_out} dropped={dropped} compressed={compressed}",
        conn_id=proto.conn_id,
        route=proto.route.name if proto.route else "",
        channel=proto.channel,
        peer=proto.peer,
        trace_id=proto.trace_id,
        code=proto.close_code,
        duration=now - proto.opened_at,
        msgs_in=session.messages_c2u,
        msgs_out=session.messages_u2c,
        bytes_in=session.bytes_c2u,
        bytes_out=session.bytes_u2c,
        dropped=session.outbox.dropped,
        # permessage-deflate negotiated (Autobahn's list of the extensions in use)
        compressed=bool(getattr(proto, "websocket_extensions_in_use", None)),
    )
