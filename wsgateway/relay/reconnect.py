# -*- test-case-name: tests.unit.relay.test_relay -*-
"""
``on_upstream_close = reconnect`` (docs/configuration.md): when the upstream
goes away between messages, the client sees nothing of it; its frames are
held in memory (up to ``reconnect_buffer`` bytes) while a new upstream leg
is opened, and written to it first. A L{wsgateway.interfaces.RelayHooks}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from wsgateway.interfaces import RelayControl
from wsgateway.relay.codec import OP_CLOSE, encode_close, parse_close
from wsgateway.relay.hooks import NoHooks
from wsgateway.relay.transport import lose

# Upstream closes after which on_upstream_close = reconnect finds another
# leg: going away, service restart, try again later (and 1006, a vanished one).
RECONNECT_CODES = frozenset({1001, 1012, 1013})


class Reconnect(NoHooks):
    """
    ``reconnect(relay)`` opens a new leg and hands it to
    ``relay.upstream_reconnected`` (handshake/server.py), or fails.
    """

    relay: RelayControl

    def __init__(self, reconnect: Callable[[Any], Deferred[None]], buffer: int) -> None:
        self._reconnect = reconnect
        self._buffer = buffer
        self._reconnect_d: Deferred[None] | None = None
        self._held: list[bytes] = []
        self._held_size = 0

    def attach(self, relay: RelayControl) -> None:
        self.relay = relay

    def _can_reconnect(self) -> bool:
        # Only between messages both ways: a message half-relayed from the
        # old upstream cannot be finished by a new one, nor one half-sent to it.
        r = self.relay
        return (
            not r.reconnecting
            and r.closed_by is None
            and not (r.client_lost or r.closed_to_client or r.closed_to_upstream)
            and not (r.u2c.in_frame or r.u2c.in_message or r.c2u.in_frame or r.c2u.in_message)
        )

    def upstream_control(self, opcode: int, payload: bytes) -> bool | None:
        if opcode == OP_CLOSE:
            code, _ = parse_close(payload)
            if code in RECONNECT_CODES and self._can_reconnect():
                # the upstream is going away (restart, overload): complete its
                # close handshake and find another leg; the client sees nothing
                upstream = self.relay.upstream
                assert upstream is not None  # its close frame came on it
                upstream.write(encode_close(code, "", mask=True))
                lose(upstream)
                self._start(vanished=False)
                return False
        return None

    def upstream_connection_lost(self, vanished: bool) -> bool:
        if vanished and self._can_reconnect():
            self._start(vanished=True)
            return True
        return False

    def _start(self, *, vanished: bool) -> None:
        relay = self.relay
        relay.log.info("upstream gone ({how}): reconnecting", how="vanished" if vanished else "going away")
        relay.reconnecting = relay.holding = True
        relay.upstream_gone(vanished)  # nothing goes to the old leg any more
        # the old leg may have paused the client; the hold buffer has its own bound
        relay.client.resumeProducing()
        self._reconnect_d = d = self._reconnect(relay)
        d.addErrback(self._failed)

    def hold(self, out: bytes) -> None:
        self._held.append(out)
        self._held_size += len(out)
        if self._held_size > self._buffer:
            self.relay.log.info("reconnect buffer full: giving up on the upstream")
            self.stop_reconnecting()
            self.relay.give_up()

    def upstream_reconnected(self) -> None:
        self._reconnect_d = None
        self.relay.holding = False
        held, self._held, self._held_size = b"".join(self._held), [], 0
        if held:
            assert self.relay.upstream is not None  # relay.upstream_reconnected has just set it
            self.relay.upstream.write(held)

    def _failed(self, f: Failure) -> None:
        relay = self.relay
        if not relay.reconnecting:
            return  # cancelled: the client went away or closed first
        relay.log.info("reconnect failed: {error}", error=f.getErrorMessage())
        self._reconnect_d = None
        relay.reconnecting = relay.holding = False
        self._held, self._held_size = [], 0
        relay.give_up()
        return

    def stop_reconnecting(self) -> None:
        self.relay.reconnecting = self.relay.holding = False
        self._held, self._held_size = [], 0
        d, self._reconnect_d = self._reconnect_d, None
        if d is not None:
            d.cancel()
