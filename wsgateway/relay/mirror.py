# -*- test-case-name: tests.unit.relay.test_edges -*-
"""
The route's mirror (docs/configuration.md ``mirror``): a copy of the
client's frames, from its first byte, written to an upstream leg of its own
whose answers are discarded. Its connect begins alongside the primary's
(relay/start.py, L{wsgateway.relay.start.MirrorLeg}); until it opens, the
copies are held, at most ``write_buffer`` bytes, so the mirror sees each
session from its first message (typically a subscribe or hello). It is
never a consumer of the client: a mirror that cannot keep up, or that takes
too long to open, is cut off; it never slows the client down.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from wsgateway.interfaces import RelayControl, RelayTransport
from wsgateway.relay.transport import Overflow, lose, take


class MirroredRelay(RelayControl, Protocol):
    """What L{Mirror} uses of its relay besides what its hooks may use."""

    mirror: Mirror | None  # the mirror copies are written to; None once it is cut off or lost


class Mirror:
    """The mirror of one relayed connection, from the relay's start to the loss of its leg."""

    __slots__ = ("_base", "_held", "_held_size", "_limit", "_on_done", "_relay", "dropped_at", "ended",
                 "transport")

    def __init__(self, relay: MirroredRelay, write_buffer: int) -> None:
        self._relay = relay
        self._limit = write_buffer
        self.transport: RelayTransport | None = None  # once its leg is open
        self._on_done: Callable[[], None] | None = None
        # copies waiting for the leg to open; None once it has (or never will)
        self._held: list[bytes] | None = []
        self._held_size = 0
        self._base = relay.c2u.messages  # client messages before the mirror's first copy
        self.dropped_at: int | None = None  # client message count when a slow mirror was cut off
        self.ended = False  # the relay is done: nothing more will come to copy

    def copy(self, out: bytes) -> None:
        if not out:
            return
        transport = self.transport
        if transport is not None:
            transport.write(out)
            return
        held = self._held
        if held is None:
            return
        held.append(out)
        self._held_size += len(out)
        if self._held_size > self._limit:
            self._cut_off(self._base, "mirror not open in time: no copies for this connection")

    def opened(self, transport: RelayTransport, on_done: Callable[[], None]) -> bool:
        """
        Its leg is open: what was held goes first. False (the caller closes
        the leg) when it was cut off or failed meanwhile.
        """
        held = self._held
        if held is None or self._relay.mirror is not self:
            return False
        self._held = None
        self.transport = transport
        self._on_done = on_done
        take(transport, self._limit)
        # Its buffer over the mark means the mirror is too slow: cut it off
        # rather than hold copies or slow the client (never a backpressure source).
        transport.registerProducer(Overflow(self._overflow), True)
        if held:
            transport.write(b"".join(held))
        if self.ended and self._relay.mirror is self:
            # a short session, over before the mirror opened: it still gets all of it
            lose(transport)
        return True

    def failed(self) -> None:
        """Its leg could not be opened: the held copies go."""
        self._held = None
        if self._relay.mirror is self:
            self._relay.mirror = None

    def finish(self) -> None:
        """The relay is done: it had the client's close too, if there was one; no waiting for it."""
        self.ended = True
        if self.transport is not None:
            lose(self.transport)

    def _cut_off(self, mirrored: int, why: str) -> None:
        relay = self._relay
        if relay.mirror is not self:
            return
        self.dropped_at = mirrored
        self._held = None
        relay.log.info(why)
        relay.mirror = None
        if self.transport is not None:
            self.transport.abortConnection()

    def _overflow(self) -> None:
        self._cut_off(self._relay.c2u.messages, "mirror too slow: no more copies for this connection")

    def lost(self) -> None:
        done, self._on_done = self._on_done, None
        if done is not None:
            done()

    @property
    def dropped(self) -> int:
        """Client messages the mirror did not get a copy of, once it was cut off."""
        return 0 if self.dropped_at is None else self._relay.c2u.messages - self.dropped_at
