# -*- test-case-name: tests.unit.relay.test_relay -*-
"""
The route's mirror (docs/configuration.md ``mirror``): a copy of the
client's frames, from a message boundary on, written to an upstream leg of
its own whose answers are discarded. It is never a consumer of the client:
a mirror that cannot keep up is cut off, it never slows the client down.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from wsgateway.interfaces import RelayControl, RelayTransport
from wsgateway.relay.transport import Overflow, take


class MirroredRelay(RelayControl, Protocol):
    """What L{Mirror} uses of its relay besides what its hooks may use."""

    mirror: Mirror | None  # the mirror copies are written to; None once it is cut off or lost


class Mirror:
    """The mirror leg of one relayed connection, from its attach to its loss."""

    __slots__ = ("_on_done", "_relay", "dropped_at", "ready", "transport")

    def __init__(self, relay: MirroredRelay, transport: RelayTransport, write_buffer: int,
                 on_done: Callable[[], None]) -> None:
        self._relay = relay
        self.transport = transport
        self._on_done: Callable[[], None] | None = on_done
        c2u = relay.c2u
        self.ready = not (c2u.in_frame or c2u.in_message)
        self.dropped_at: int | None = None  # client message count when a slow mirror was cut off
        take(transport, write_buffer)
        # Its buffer over the mark means the mirror is too slow: cut it off
        # rather than hold copies or slow the client (never a backpressure source).
        transport.registerProducer(Overflow(self._overflow), True)

    def copy(self, out: bytes) -> None:
        if self.ready:
            if out:
                self.transport.write(out)
        elif not (self._relay.c2u.in_frame or self._relay.c2u.in_message):
            # the next read starts a new message: copies can begin there
            self.ready = True

    def _overflow(self) -> None:
        relay = self._relay
        if relay.mirror is not self:
            return
        self.dropped_at = relay.c2u.messages
        relay.log.info("mirror too slow: no more copies for this connection")
        relay.mirror = None
        self.transport.abortConnection()

    def lost(self) -> None:
        done, self._on_done = self._on_done, None
        if done is not None:
            done()

    @property
    def dropped(self) -> int:
        """Client messages the mirror did not get a copy of, once it was cut off."""
        return 0 if self.dropped_at is None else self._relay.c2u.messages - self.dropped_at
