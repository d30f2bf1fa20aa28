# -*- test-case-name: tests.integration.test_proxy -*-
"""
The access lines: one info line per connection when it ends, for a proxied
connection (its relay) and for a broadcast one (its channel session)
(docs/logs.md#the-access-line), and one per refused handshake, rate-limited
per reason (docs/logs.md#refused-handshakes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from wsgateway import codes
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
        "code={code} closed_by={closed_by} duration={duration:.3f} messages_in={messages_in} "
        "messages_out={messages_out} bytes_in={bytes_in} bytes_out={bytes_out} mirror_dropped={mirror_dropped} "
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
        messages_in=relay.messages_c2u,
        messages_out=relay.messages_u2c,
        bytes_in=relay.bytes_c2u,
        bytes_out=relay.bytes_u2c,
        mirror_dropped=relay.mirror_dropped,
        compressed=relay.deflate,
    )


def channel_closed(proto: Any, session: Any, now: float) -> None:
    """``proto`` is the broadcast connection's server protocol, ``session`` its ChannelSession."""
    _log.info(
        "closed {conn_id} route={route} channel={channel} peer={peer} trace_id={trace_id} code={code} "
        "duration={duration:.3f} messages_in={messages_in} messages_out={messages_out} bytes_in={bytes_in} "
        "bytes_out={bytes_out} dropped={dropped} compressed={compressed}",
        conn_id=proto.conn_id,
        route=proto.route.name if proto.route else "",
        channel=proto.channel,
        peer=proto.peer,
        trace_id=proto.trace_id,
        code=proto.close_code,
        duration=now - proto.opened_at,
        messages_in=session.messages_c2u,
        messages_out=session.messages_u2c,
        bytes_in=session.bytes_c2u,
        bytes_out=session.bytes_u2c,
        dropped=session.outbox.dropped,
        # permessage-deflate negotiated (Autobahn's list of the extensions in use)
        compressed=bool(getattr(proto, "websocket_extensions_in_use", None)),
    )


# Refusal lines: per reason, at most REFUSAL_BURST at once and REFUSAL_RATE a
# second after that. A flood of refused handshakes (a scanner, a client
# retrying with a bad token) would otherwise write a line each, at info; the
# lines not written are counted, in wsgateway_handshakes_total exactly and in
# the next line's ``suppressed``.
REFUSAL_RATE = 5.0
REFUSAL_BURST = 50.0


@dataclass(slots=True)
class _Budget:
    tokens: float
    last: float
    suppressed: int = 0


class RefusalLines:
    """
    The refused handshakes' lines of one process (LiveConnections holds
    it): info, or warn for a status >= 500 (the gateway or an upstream could
    not serve, an operator's matter), each reason with a token bucket of its
    own, so a flood of one kind of refusal never hides another.
    """

    __slots__ = ("_budgets",)

    def __init__(self) -> None:
        self._budgets: dict[str, _Budget] = {}  # a fixed set of reasons (codes.REFUSAL_REASONS)

    def refused(self, proto: Any, status: int, reason: str, why: str, now: float) -> None:
        """``proto`` (the client's protocol) was refused with ``status`` for ``reason`` at ``now``."""
        warn = status >= 500 and reason != codes.R_CLIENT_GONE  # a client that left is its own matter
        if not warn and not logs.SHOWS_INFO:
            return
        budget = self._budgets.get(reason)
        if budget is None:
            budget = self._budgets[reason] = _Budget(REFUSAL_BURST, now)
        tokens = budget.tokens + max(0.0, now - budget.last) * REFUSAL_RATE
        budget.last = now
        if tokens < 1.0:
            budget.tokens = tokens
            budget.suppressed += 1
            return
        budget.tokens = min(tokens, REFUSAL_BURST) - 1.0
        suppressed, budget.suppressed = budget.suppressed, 0
        route = proto.route
        fmt = "refused {peer} with {status} route={route} reason={reason} trace_id={trace_id} suppressed={suppressed}"
        fields: dict[str, Any] = {"detail": why} if why else {}
        (_log.warn if warn else _log.info)(
            fmt + ": {detail}" if why else fmt,
            peer=proto.peer,
            status=status,
            route=route.name if route else "-",
            reason=reason,
            trace_id=proto.trace_id,
            suppressed=suppressed,
            conn_id=proto.conn_id,
            **fields,
        )
