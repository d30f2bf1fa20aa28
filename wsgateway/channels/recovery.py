# -*- test-case-name: tests.unit.channels.test_history -*-
"""
A reconnecting client's recovery (docs/protocol.md#channel-history-and-recovery):
live first, then history, merged by offset.

The connection is subscribed to its channel before history is read (with
Redis: once the SUBSCRIBE is confirmed, L{Broker.subscribed}), so every
message published after the read reaches it live. Until the read answers,
L{RecoveryGate} holds those live messages; then the client gets the
C{recovered} frame, the kept messages after its offset, and the held ones
after the newest offset the read saw: nothing published meanwhile is missed,
nothing is sent twice, and offsets only go up. Everything goes through the
connection's outbox, so the recovery burst meets the route's
C{slow_consumer} policy like live traffic; the held messages are bounded
by the same C{write_buffer}.

Pure: nothing here imports Twisted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from wsgateway.channels.deflate import PreparedMessage, json_text
from wsgateway.channels.history import Position, Recovery

__all__ = ["RecoveryGate", "kept_messages", "recovered_frame"]


class RecoveryGate:
    """
    Live messages held while a recovery read is in flight. Over C{limit}
    bytes, the route's policy: C{drop_oldest} drops the oldest held ones
    (counted through C{on_drop}), C{close} calls C{on_overflow} (a 1008
    "slow consumer" close) and holds nothing more.
    """

    __slots__ = ("held", "bytes", "limit", "policy", "on_drop", "on_overflow", "overflowed")

    def __init__(self, *, limit: int, policy: str, on_drop: Callable[[int], None],
                 on_overflow: Callable[[], None]) -> None:
        self.held: deque[PreparedMessage] = deque()
        self.bytes = 0
        self.limit = limit
        self.policy = policy
        self.on_drop = on_drop
        self.on_overflow = on_overflow
        self.overflowed = False

    def hold(self, message: PreparedMessage) -> None:
        if self.overflowed:
            return
        self.held.append(message)
        self.bytes += len(message.payload)
        if self.bytes <= self.limit:
            return
        if self.policy == "drop_oldest":
            n = 0
            while self.bytes > self.limit and len(self.held) > 1:
                self.bytes -= len(self.held.popleft().payload)
                n += 1
            self.on_drop(n)
        else:
            self.overflowed = True
            self.on_drop(len(self.held))
            self.held.clear()
            self.bytes = 0
            self.on_overflow()

    def release(self, top: int) -> list[PreparedMessage]:
        """The held messages to send after a recovery that read up to offset C{top}: the newer ones only."""
        out = [m for m in self.held if m.offset is None or m.offset > top]
        self.held.clear()
        self.bytes = 0
        return out


def recovered_frame(recovery: Recovery) -> PreparedMessage:
    """The C{recovered} frame: a JSON text message for every client, whatever its subprotocol."""
    return PreparedMessage(json_text(recovery.frame()), False, recovery.channel)


def kept_messages(recovery: Recovery) -> list[PreparedMessage]:
    """The kept messages to send, as prepared messages with their positions."""
    return [
        PreparedMessage(kept.payload, kept.binary, recovery.channel, Position(kept.offset, recovery.epoch))
        for kept in recovery.messages
    ]
