# -*- test-case-name: tests.test_broadcast -*-
"""
The client side of channels: what a broker delivers to one connection, with
a bounded outbound queue so a slow subscriber never holds back the others.

``Outbox`` is the policy (reactor-free): messages go straight to the socket
while it keeps up; once Twisted says the socket's buffer is full
(``pauseProducing``), they wait in a queue of at most ``limit`` bytes, and
when that overflows the route's ``slow_consumer`` policy applies: ``close``
(1008 "slow consumer") or ``drop_oldest``. Either way it is counted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from wsgateway import closecodes

SLOW_CONSUMER = "slow consumer"


@implementer(IPushProducer)
class Outbox:
    """
    Registered as the streaming producer of the client transport, which is
    how it learns that the socket is full; ``send`` writes one whole
    message, ``close`` ends the connection with a policy close.
    """

    __slots__ = ("_send", "_close", "limit", "policy", "queue", "queued", "paused", "dropped", "closed", "on_drop")

    def __init__(
        self,
        send: Callable[[bytes, bool], None],
        close: Callable[[int, str], None],
        *,
        limit: int,
        policy: str,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        self._send = send
        self._close = close
        self.limit = limit
        self.policy = policy
        self.queue: deque[tuple[bytes, bool]] = deque()
        self.queued = 0
        self.paused = False
        self.dropped = 0
        self.closed = False
        self.on_drop = on_drop

    def deliver(self, payload: bytes, binary: bool) -> None:
        if self.closed:
            return
        if not self.paused and not self.queue:
            self._send(payload, binary)
            return
        self.queue.append((payload, binary))
        self.queued += len(payload)
        if self.queued <= self.limit:
            return
        if self.policy == "drop_oldest":
            n = 0
            while self.queued > self.limit and len(self.queue) > 1:
                old, _ = self.queue.popleft()
                self.queued -= len(old)
                n += 1
            self.dropped += n
            if self.on_drop is not None:
                self.on_drop(n)
        else:
            self.closed = True
            self.dropped += len(self.queue)
            if self.on_drop is not None:
                self.on_drop(len(self.queue))
            self.queue.clear()
            self.queued = 0
            self._close(closecodes.POLICY_VIOLATION, SLOW_CONSUMER)

    # IPushProducer: the transport's signals about its own buffer

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while self.queue and not self.paused and not self.closed:
            payload, binary = self.queue.popleft()
            self.queued -= len(payload)
            self._send(payload, binary)  # may pause us again at once

    def stopProducing(self) -> None:
        self.closed = True
        self.queue.clear()
        self.queued = 0


class Subscription:
    """One connection's membership of channels on a broker."""

    __slots__ = ("broker", "outbox", "channels")

    def __init__(self, broker: Any, outbox: Outbox, channels: tuple[str, ...]) -> None:
        self.broker = broker
        self.outbox = outbox
        self.channels = channels
        for channel in channels:
            broker.subscribe(channel, self)

    def deliver(self, payload: bytes, binary: bool) -> None:
        self.outbox.deliver(payload, binary)

    def cancel(self) -> None:
        for channel in self.channels:
            self.broker.unsubscribe(channel, self)
        self.channels = ()
