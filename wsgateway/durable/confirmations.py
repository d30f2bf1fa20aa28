# -*- test-case-name: tests.unit.durable.test_durable_relay_units -*-
"""
Durable delivery while its upstream leg is live (docs/durable-delivery.md):
what went upstream is kept in a L{Window} until the upstream has answered
two pings sent behind it (L{Confirmations}); every write to the leg goes
through L{Recording}, which keeps it there; L{GatedReader} is the client as
the leg's producer, which durable delivery may keep paused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from zope.interface import implementer

from wsgateway.durable.clientstream import Window
from wsgateway.interfaces import RelayControl, RelayTransport
from wsgateway.relay.codec import OP_PING, encode_frame

# Live messages are confirmed by a ping at most this often, or as soon as
# this much is unconfirmed: duplicates after a loss stay within about
# two intervals of traffic.
CONFIRM_INTERVAL = 0.1
CONFIRM_BYTES = 64 * 1024


class Recording:
    """
    Every upstream transport of a durable relay, so that the relay's own
    mechanism (which compares ``relay.upstream`` with a leg's transport) sees
    one object throughout: writes also go to ``sent``, which keeps them in
    the window while the relay is live (client frames, and the gateway's own
    pings and closes, which the window's walk skips) and ignores them while
    it is holding (a flush leg's entries are in the store already).
    """

    __slots__ = ("_sent", "transport")

    def __init__(self, transport: RelayTransport, sent: Callable[[bytes], None]) -> None:
        object.__setattr__(self, "transport", transport)
        object.__setattr__(self, "_sent", sent)

    def write(self, data: bytes) -> None:
        self.transport.write(data)
        self._sent(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.transport, name, value)  # relay.set_write_buffer sets bufferSize


@implementer(IPushProducer)
class GatedReader:
    """The client as the upstream's producer, kept paused while durable delivery needs it to be."""

    __slots__ = ("_paused",)

    def __init__(self, paused: Callable[[bool], None]) -> None:
        self._paused = paused  # told True when the upstream's write buffer is full, False when it is not

    def pauseProducing(self) -> None:
        self._paused(True)

    def resumeProducing(self) -> None:
        self._paused(False)

    def stopProducing(self) -> None:
        pass


class Confirmations:
    """
    The window of a live durable relay and the pings that confirm it; also
    the confirmations of a flush leg's batches (``round_trip``). ``cap``:
    over that many unconfirmed bytes the client is paused; ``confirmed`` is
    called after each pong that confirmed some (the client may resume).
    """

    def __init__(self, relay: RelayControl, clock: IReactorTime, cap: int, confirmed: Callable[[], None]) -> None:
        self._relay = relay
        self._clock = clock
        self._cap = cap
        self._confirmed = confirmed
        self.window: Window | None = Window(0)  # None while holding: what the client sends is queued instead
        self._mark = 0  # covered by the last pong; dropped from the window at the next one
        self._call: IDelayedCall | None = None
        self._id = 0
        self._pending: dict[bytes, tuple[int, Deferred[bool] | None]] = {}

    @property
    def full(self) -> bool:
        """More is unconfirmed than the client may have in flight."""
        return self.window is not None and len(self.window) > self._cap

    def restart(self, base_seq: int | None) -> None:
        """Live again from client message ``base_seq`` on, or holding (None): nothing kept from before."""
        self.window = None if base_seq is None else Window(base_seq)
        self._mark = 0

    def sent(self, out: bytes) -> None:
        """Written to the upstream leg (``Recording``): kept until confirmed."""
        window = self.window
        if window is None:
            return
        window.add(out)
        if not self._pending and self._call is None and not self._relay.closed_to_upstream:
            self._pace(window)
        if len(window) > self._cap:
            # the upstream is not confirming as fast as the client sends
            self._relay.client.pauseProducing()

    def _pace(self, window: Window) -> None:
        """
        A confirming ping now if the window holds CONFIRM_BYTES, else in
        CONFIRM_INTERVAL: one ping per message would double the frames a
        chatty client sends (bench scenario a: 0.43x the blind relay).
        """
        if len(window) >= CONFIRM_BYTES:
            self._ping(window.total)
        else:
            self._call = self._clock.callLater(CONFIRM_INTERVAL, self._due)

    def _due(self) -> None:
        self._call = None
        window, relay = self.window, self._relay
        if window is not None and len(window) and not self._pending and not relay.done \
                and not relay.upstream_lost and not relay.closed_to_upstream:
            self._ping(window.total)

    def cancel_timer(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _ping(self, mark: int, d: Deferred[bool] | None = None, direct: bool = False) -> None:
        self._id += 1
        payload = b"wsgq" + self._id.to_bytes(8, "big")
        self._pending[payload] = (mark, d)
        frame = encode_frame(OP_PING, payload, mask=True)
        out = frame if direct else self._relay.c2u.inject(frame)
        if out:
            upstream = self._relay.upstream
            assert upstream is not None  # pings go only on an open leg
            upstream.write(out)

    def round_trip(self) -> Deferred[bool]:
        """A ping straight to the upstream (between whole frames): True on its pong, False if the leg is lost first."""
        d: Deferred[bool] = Deferred()
        self._ping(0, d, direct=True)
        return d

    def pong(self, payload: bytes) -> bool:
        """A pong from the upstream: True if it answered one of these pings (it goes no further)."""
        if payload not in self._pending:
            return False
        relay = self._relay
        mark, d = self._pending.pop(payload)
        if d is not None:
            d.callback(True)
        elif self.window is not None:
            # a second round: what the previous pong covered is confirmed now
            window = self.window
            window.confirm(self._mark)
            self._mark = mark
            if len(window) and not relay.closed_to_upstream and not relay.upstream_lost and self._call is None:
                self._pace(window)
            self._confirmed()
        return True

    def fail(self) -> None:
        """The leg is lost: no ping of it will be answered."""
        pending, self._pending = self._pending, {}
        for _, d in pending.values():
            if d is not None:
                d.callback(False)
