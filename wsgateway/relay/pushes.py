# -*- test-case-name: tests.unit.relay.test_relay -*-
"""
Pushes: the messages of a proxy route's ``subscribe`` channels
(docs/configuration.md), sent to the client between the upstream's
messages, never inside one: a data frame may not interleave with another
message's fragments (RFC 6455 5.4). The channel side of it (the bounded
queue, the ``slow_consumer`` policy) is ``wsgateway.channels.outbox``.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from twisted.internet.interfaces import IPushProducer

from wsgateway.interfaces import RelayControl, RelayTransport
from wsgateway.relay.codec import OP_BINARY, OP_TEXT, encode_frame
from wsgateway.relay.transport import Both, Reader


class PushedRelay(RelayControl, Protocol):
    """What L{Pushes} uses of its relay besides what its hooks may use."""

    # frames waiting for the end of an upstream message; the relay's data
    # path looks at it after every upstream read, so it is the relay's
    pushes_waiting: deque[bytes] | None


class Pushes:
    """The pushes of one relayed connection, and the outbox that hears when the client's socket is full."""

    __slots__ = ("_relay", "count", "outbox")

    def __init__(self, relay: PushedRelay) -> None:
        self._relay = relay
        self.count = 0  # messages pushed: the client's messages_u2c counts them
        self.outbox: IPushProducer | None = None

    def let_go(self, relay: PushedRelay) -> None:
        """The relay is done and its outbox released: from now on ``relay`` is a weak proxy of it (Relay.let_go)."""
        self._relay = relay

    def push(self, payload: bytes, binary: bool) -> None:
        """A message from a channel this client is subscribed to."""
        relay = self._relay
        if relay.done or relay.closed_to_client or relay.client_lost:
            return
        self.count += 1
        frame = encode_frame(OP_BINARY if binary else OP_TEXT, payload, mask=False)
        u2c = relay.u2c
        if relay.pushes_waiting or u2c.in_frame or u2c.in_message:
            if relay.pushes_waiting is None:
                relay.pushes_waiting = deque()
            relay.pushes_waiting.append(frame)
            return
        out = u2c.inject(frame)
        if out:
            relay.client.write(out)

    def flush(self) -> None:
        """The upstream's message ended: what waited for it goes out now."""
        relay = self._relay
        waiting = relay.pushes_waiting
        u2c = relay.u2c
        while waiting and not (u2c.in_frame or u2c.in_message) and not relay.closed_to_client:
            out = u2c.inject(waiting.popleft())
            if out:
                relay.client.write(out)

    def attach(self, outbox: IPushProducer) -> None:
        """Let ``outbox`` (channels.outbox.Outbox) hear when the client's socket is full."""
        self.outbox = outbox
        relay = self._relay
        client = relay.client
        client.unregisterProducer()
        # While the upstream leg is being reconnected there is none to pause:
        # the outbox alone, until upstream_reconnected registers both.
        upstream = relay.upstream
        client.registerProducer(outbox if upstream is None else self.producer(upstream), True)

    def producer(self, upstream: RelayTransport) -> Reader | Both:
        """The client transport's producer: ``upstream``, and the outbox once there is one."""
        reader = Reader(upstream)
        return reader if self.outbox is None else Both(reader, self.outbox)

    def slow_consumer(self, code: int, reason: str) -> None:
        """The push queue overflowed (slow_consumer = close): as for a client that broke a rule."""
        relay = self._relay
        if not relay.done and relay.closed_by is None:
            relay.client_violation(code, reason)
