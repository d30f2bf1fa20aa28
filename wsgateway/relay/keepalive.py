# -*- test-case-name: tests.unit.relay.test_relay -*-
"""
The gateway's own pings on each hop, and the idle timeout
(docs/protocol.md#forwarding-and-close-codes): a peer that does not answer a
ping in time is dropped, and so is one that stops in the middle of a frame
(it cannot answer, and nothing else would end it); a connection with no
data frame either way for ``idle_timeout`` is closed with 1001.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from wsgateway import codes
from wsgateway.ids import random_bytes
from wsgateway.interfaces import RelayControl
from wsgateway.relay.codec import OP_PING, encode_frame


class KeptRelay(RelayControl, Protocol):
    """What L{Keepalive} uses of its relay besides what its hooks may use."""

    bytes_c2u: int  # bytes read from the client so far
    bytes_u2c: int  # bytes read from the upstream so far


class Keepalive:
    """One relay's ping and idle timers; ``payload`` marks the pongs that answer its pings."""

    __slots__ = (
        "_clock",
        "_idle_call",
        "_idle_timeout",
        "_interval",
        "_ping_call",
        "_pong_call",
        "_relay",
        "_stall_call",
        "_stall_c",
        "_stall_u",
        "_timeout",
        "payload",
        "pong_from_client",
        "pong_from_upstream",
    )

    def __init__(self, relay: KeptRelay, clock: IReactorTime, *, ping_interval: float, ping_timeout: float,
                 idle_timeout: float) -> None:
        self._relay = relay
        self._clock = clock
        self.payload = b"wsgw" + random_bytes(4)
        self._interval = ping_interval
        self._timeout = ping_timeout
        self._ping_call: IDelayedCall | None = None
        self._pong_call: IDelayedCall | None = None
        self.pong_from_client = True
        self.pong_from_upstream = True
        self._idle_timeout = idle_timeout
        self._idle_call: IDelayedCall | None = None
        self._stall_call: IDelayedCall | None = None
        # per direction: the byte count at the last stall check, and the
        # latest time its last byte can have come (see _check_stalls)
        self._stall_c = (0, 0.0)
        self._stall_u = (0, 0.0)

    def start(self) -> None:
        if self._interval > 0:
            self._ping_call = self._clock.callLater(self._interval, self._ping)
            now = self._clock.seconds()
            self._stall_c = (self._relay.bytes_c2u, now)
            self._stall_u = (self._relay.bytes_u2c, now)
            self._stall_call = self._clock.callLater(self._interval + self._timeout, self._check_stalls)
        if self._idle_timeout > 0:
            self._idle_call = self._clock.callLater(self._idle_timeout, self._check_idle)

    def let_go(self, relay: KeptRelay) -> None:
        """The relay is done and these timers stopped: from now on ``relay`` is a weak proxy of it (Relay.let_go)."""
        self._relay = relay

    def stop(self) -> None:
        for call in (self._ping_call, self._pong_call, self._idle_call, self._stall_call):
            if call is not None and call.active():
                call.cancel()
        self._ping_call = self._pong_call = self._idle_call = self._stall_call = None

    def _check_stalls(self) -> None:
        """
        A peer in the middle of a frame cannot answer a ping (the pong check
        waits for it), so one that stops there would be kept for ever: no
        byte from it for ``ping_interval + ping_timeout`` while its frame is
        unfinished drops it, as a missing pong does.

        Nothing is timed per read for this: the relay already counts each
        direction's bytes and sets ``last_activity`` on every read that
        leaves a data frame unfinished. A direction whose count moved since
        the last check read its last byte at ``last_activity`` at the latest
        (that time covers both directions), so a peer is never judged early;
        the check runs again when that peer's window ends, and one that has
        read nothing since is dead then.
        """
        self._stall_call = None
        relay = self._relay
        if relay.done or relay.closed_by is not None:
            return  # closing: the close timer bounds it from here
        now = self._clock.seconds()
        window = self._interval + self._timeout
        next_check = now + window
        count, moved = self._stall_c
        if relay.bytes_c2u != count:
            count, moved = relay.bytes_c2u, min(relay.last_activity, now)
            self._stall_c = (count, moved)
        if relay.c2u.in_frame and not relay.client_lost:
            if now - moved >= window:
                relay.log.info("client stopped in the middle of a frame: dropping it")
                relay.client.abortConnection()
                return
            next_check = min(next_check, moved + window)
        count, moved = self._stall_u
        if relay.bytes_u2c != count:
            count, moved = relay.bytes_u2c, min(relay.last_activity, now)
            self._stall_u = (count, moved)
        if relay.u2c.in_frame and not relay.upstream_lost and relay.upstream is not None:
            if now - moved >= window:
                relay.log.warn("upstream stopped in the middle of a frame: dropping it")
                relay.upstream.abortConnection()
                return
            next_check = min(next_check, moved + window)
        self._stall_call = self._clock.callLater(max(next_check - now, 0.001), self._check_stalls)

    def _ping(self) -> None:
        self._ping_call = None
        relay = self._relay
        if relay.done or relay.closed_by is not None:
            return
        self.pong_from_client = self.pong_from_upstream = False
        out = relay.u2c.inject(encode_frame(OP_PING, self.payload, mask=False))
        if out:
            relay.client.write(out)
        # A leg that delivers held client frames (a durable flush) has its
        # own confirmations; the client's stream is not its stream.
        if not relay.upstream_lost and not relay.holding:
            out = relay.c2u.inject(encode_frame(OP_PING, self.payload, mask=True))
            if out:
                assert relay.upstream is not None  # not upstream_lost: a leg is open
                relay.upstream.write(out)
        else:
            self.pong_from_upstream = True
        self._pong_call = self._clock.callLater(self._timeout, self._check_pongs)

    def _check_pongs(self) -> None:
        self._pong_call = None
        relay = self._relay
        if relay.done:
            return
        # A peer is only judged once our ping has really gone out (it waits
        # behind a data frame in flight) and it could answer (a peer in the
        # middle of sending a frame cannot put a pong in it): a slow but
        # working peer moving a large message is not a dead one.
        waiting = False
        if not self.pong_from_client and not relay.client_lost:
            if relay.u2c.in_frame or relay.c2u.in_frame:
                waiting = True
            else:
                relay.log.info("client did not answer a ping in time: dropping it")
                relay.client.abortConnection()
        if not self.pong_from_upstream and not relay.upstream_lost:
            if relay.c2u.in_frame or relay.u2c.in_frame:
                waiting = True
            else:
                relay.log.warn("upstream did not answer a ping in time: dropping it")
                assert relay.upstream is not None  # not upstream_lost: a leg is open
                relay.upstream.abortConnection()
        if waiting:
            self._pong_call = self._clock.callLater(self._timeout, self._check_pongs)
            return
        if relay.closed_by is None:
            self._ping_call = self._clock.callLater(max(self._interval - self._timeout, 0.001), self._ping)

    def _check_idle(self) -> None:
        self._idle_call = None
        relay = self._relay
        if relay.done or relay.closed_by is not None:
            return
        left = relay.last_activity + self._idle_timeout - self._clock.seconds()
        if left <= 0:
            relay.close(codes.GOING_AWAY, "idle timeout")
            return
        self._idle_call = self._clock.callLater(left, self._check_idle)
