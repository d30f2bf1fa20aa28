# -*- test-case-name: tests.unit.relay.test_relay -*-
"""
How a relayed connection ends (docs/protocol.md#forwarding-and-close-codes):
each peer's close handshake passed through to the other, the gateway's own
closes (1001, 1002, 1008, 1009, 1014), the token's expiry, each transport's
loss, and the close timer that bounds all of them.

L{Closes} is a collaborator of L{wsgateway.relay.relay.Relay}. It works on
the relay's public state (the close flags, and the budgets that the relay's
data path reads on every read, so they stay the relay's attributes) and owns
only its timers and the losses waiting for a close frame to be written.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from wsgateway import codes
from wsgateway.interfaces import RelayControl
from wsgateway.relay.codec import encode_close, parse_close
from wsgateway.relay.transport import linger, lose

# who closed a connection first (Relay.closed_by, the access log's closed_by)
CLIENT = "client"
UPSTREAM = "upstream"
GATEWAY = "gateway"


class ClosingRelay(RelayControl, Protocol):
    """What L{Closes} uses of its relay besides what its hooks may use."""

    hooks: Any  # RelayHooks
    started: float
    close_code: int | None
    close_reason: str
    # Once a close is committed towards a peer, only this many more bytes
    # go to it (the rest of a frame in flight and the close itself); None
    # while the stream is open.
    budget_client: int | None
    budget_upstream: int | None

    def maybe_done(self) -> None: ...


class Closes:
    """The close handshake of one relayed connection, both ways, bounded by ``close_timeout``."""

    def __init__(self, relay: ClosingRelay, clock: IReactorTime, close_timeout: float,
                 close_at: float | None) -> None:
        self._relay = relay
        self._clock = clock
        self._timeout = close_timeout
        self._call: IDelayedCall | None = None
        self._lose_client_after = False
        self._linger_client = False  # with _lose_client_after: linger() rather than lose()
        self._violated = False
        self._lose_upstream_after = False
        self._expiry: IDelayedCall | None = None
        if close_at is not None:
            # already past: closed on the next turn, once the caller has
            # finished wiring this relay up
            self._expiry = clock.callLater(max(close_at - relay.started, 0.0), self.expired)

    # -- a peer's close, passed through ----------------------------------

    def from_client(self, payload: bytes) -> bool:
        """The client's close frame: whether it goes on upstream."""
        relay = self._relay
        relay.close_from_client = True
        self._note(CLIENT, payload)
        if relay.holding:
            # nobody upstream to pass it to: answer it ourselves (and end a leg that delivers held frames)
            relay.hooks.stop_reconnecting()
            self.to_upstream(codes.GOING_AWAY, "client gone")
            code, reason = parse_close(payload)
            self.to_client(code or codes.NORMAL, reason)
        if relay.closed_to_client:
            # the client's answer to a close sent to it: the client half is done
            self._clock.callLater(0, relay.finish_client)
        if relay.closed_to_upstream or relay.upstream_lost:
            return False
        relay.closed_to_upstream = True
        self._start_timer()
        return True

    def from_upstream(self, payload: bytes) -> bool:
        """The upstream's close frame (one its hooks left to the relay): whether it goes on to the client."""
        relay = self._relay
        relay.close_from_upstream = True
        self._note(UPSTREAM, payload)
        if relay.closed_to_client or relay.client_lost:
            return False
        relay.closed_to_client = True
        self._start_timer()
        if relay.close_from_client:
            # our forwarding of this close completes the client's handshake
            self._clock.callLater(0, relay.finish_client)
        return True

    def _note(self, who: str, payload: bytes) -> None:
        relay = self._relay
        if relay.closed_by is None:
            relay.closed_by = who
            code, reason = parse_close(payload)
            relay.close_code = code if code is not None else codes.NO_STATUS
            relay.close_reason = reason

    def _gateway_closes(self, code: int, reason: str) -> None:
        relay = self._relay
        if relay.closed_by is None:
            relay.closed_by = GATEWAY
            relay.close_code = code
            relay.close_reason = reason

    # -- the gateway's own closes ----------------------------------------

    def close(self, code: int, reason: str) -> None:
        self._gateway_closes(code, reason)
        self.to_client(code, reason)
        self.to_upstream(code, reason)

    def drain(self, code: int, reason: str) -> None:
        """
        The shutdown close (docs/operations.md#signals-and-lifecycle): 1001 to the client only. Its
        frames keep flowing upstream until its close answer, which is passed
        on upstream behind them: nothing the client sent before it saw our
        close is lost (``close`` would shut the upstream at once, dropping
        what is still on the wire from the client). The client's answer ends
        both legs as for a close it began; one that never answers is cut off
        by the close timer, and the upstream then gets 1001 all the same.
        """
        relay = self._relay
        if relay.done or relay.closed_by is not None:
            return  # already closing, for its own reasons
        self._gateway_closes(code, reason)
        if relay.reconnecting:
            # no upstream to pass anything to: what is held cannot be delivered
            relay.hooks.stop_reconnecting()
        self.to_client(code, reason)

    def to_client(self, code: int, reason: str) -> None:
        relay = self._relay
        if relay.closed_to_client or relay.client_lost:
            return
        relay.closed_to_client = True
        if relay.u2c.in_frame and relay.upstream_lost:
            # the frame being streamed to the client can never be completed
            relay.client.abortConnection()
            return
        out = relay.u2c.inject(encode_close(code, reason, mask=False))
        if out:
            relay.client.write(out)
            relay.budget_client = 0
        else:
            # the close waits behind a frame still streaming to the client
            relay.budget_client = relay.u2c.owed
        self._start_timer()

    def to_upstream(self, code: int, reason: str) -> None:
        relay = self._relay
        if relay.hooks.closing_upstream() or relay.closed_to_upstream or relay.upstream_lost:
            return
        relay.closed_to_upstream = True
        upstream = relay.upstream
        assert upstream is not None  # not upstream_lost, and the hooks did not end it: a leg is open
        if relay.c2u.in_frame and (relay.client_lost or relay.c2u.error is not None):
            # the rest of the frame will never come (the client is gone, or its
            # compressed message was refused in the middle of a frame)
            upstream.abortConnection()
            return
        out = relay.c2u.inject(encode_close(code, reason, mask=True))
        if out:
            upstream.write(out)
            relay.budget_upstream = 0
        else:
            relay.budget_upstream = relay.c2u.owed
        self._start_timer()

    # what is still owed to a peer once its close is committed (the relay's data path, while closing)

    def owed_to_client(self, out: bytes, budget: int) -> None:
        relay = self._relay
        chunk = out if len(out) <= budget else out[:budget]
        relay.client.write(chunk)
        relay.budget_client = budget - len(chunk)
        if relay.budget_client == 0 and self._lose_client_after:
            self._end_client()

    def owed_to_upstream(self, out: bytes, budget: int) -> None:
        relay = self._relay
        chunk = out if len(out) <= budget else out[:budget]
        upstream = relay.upstream
        assert upstream is not None  # called by the relay's data path on an open leg
        upstream.write(chunk)
        relay.budget_upstream = budget - len(chunk)
        if relay.budget_upstream == 0 and self._lose_upstream_after:
            lose(upstream)

    def client_violation(self, code: int, reason: str) -> None:
        if self._violated:
            # called again for each read that follows: they are discarded
            return
        self._violated = True
        self._relay.log.info("closing client: {code} {reason}", code=code, reason=reason)
        self._gateway_closes(code, reason)
        self.to_client(code, reason)
        # The client's stream is unusable now: fail it (RFC 6455 7.1.7) once
        # the close frame is out, rather than wait for an answer. A client
        # that broke a rule is often still sending (the rest of a big message,
        # a flood): closing the socket on its unread data would make the
        # kernel send a reset, which can overtake our close frame, so the
        # client would see 1006 and retry at once. Hence nginx's lingering
        # close, bounded by the close timer.
        if code in codes.RULE_BROKEN:
            self.linger_client()
        else:
            self.lose_client()
        self.to_upstream(codes.GOING_AWAY, "client closed")

    def upstream_violation(self, code: int, reason: str) -> None:
        self._relay.log.warn("upstream broke the protocol: {code} {reason}", code=code, reason=reason)
        self._gateway_closes(codes.BAD_GATEWAY, "bad gateway")
        self.to_upstream(code, reason)
        self.lose_upstream()
        self.to_client(codes.BAD_GATEWAY, "bad gateway")

    def expired(self) -> None:
        """
        The client's token has expired (docs/protocol.md#forwarding-and-close-codes): 1008 to the client,
        1001 upstream as when the gateway closes a client for a violation.
        Unlike a violation the client's stream is sound, so its close
        handshake is completed (bounded by close_timeout).
        """
        relay = self._relay
        self._expiry = None
        if relay.done or relay.closed_by is not None:
            return
        relay.log.info("token expired: closing the connection")
        self._gateway_closes(codes.POLICY_VIOLATION, codes.REASON_TOKEN_EXPIRED)
        if relay.reconnecting:
            # no new upstream for a client that is not allowed in any more
            relay.hooks.stop_reconnecting()
        self.to_client(codes.POLICY_VIOLATION, codes.REASON_TOKEN_EXPIRED)
        self.to_upstream(codes.GOING_AWAY, "client closed")

    def give_up(self) -> None:
        relay = self._relay
        self._upstream_lost_first()
        self.to_client(codes.BAD_GATEWAY, "upstream lost")
        relay.maybe_done()

    def _upstream_lost_first(self) -> None:
        relay = self._relay
        if relay.closed_by is None:
            relay.closed_by = UPSTREAM
            relay.close_code = codes.BAD_GATEWAY
            relay.close_reason = "upstream lost"

    # -- transport loss --------------------------------------------------

    def client_lost(self) -> None:
        relay = self._relay
        if relay.client_lost:
            return
        waits = relay.hooks.awaits_upstream_close()
        relay.client_lost = True
        if relay.closed_by is None:
            relay.closed_by = CLIENT
            relay.close_code = codes.ABNORMAL
        if not relay.closed_to_upstream and not relay.upstream_lost:
            self.to_upstream(codes.GOING_AWAY, "client gone")
        if not relay.upstream_lost and not waits:
            # FIN right after the close frame: nobody is left to wait for
            self.lose_upstream()
        relay.maybe_done()

    def upstream_lost(self) -> None:
        relay = self._relay
        if relay.upstream_lost:
            return
        vanished = not relay.close_from_upstream and not relay.closed_to_upstream
        if relay.hooks.upstream_connection_lost(vanished):
            return
        relay.upstream_lost = True
        relay.upstream_vanished = vanished
        if not relay.close_from_upstream:
            # no close frame from the upstream: it vanished (1006)
            self._upstream_lost_first()
            self.to_client(codes.BAD_GATEWAY, "upstream lost")
        if relay.closed_to_client and relay.close_from_client:
            relay.finish_client()
        relay.maybe_done()

    def lose_client(self) -> None:
        """loseConnection once what is owed to the client (its close) is written."""
        relay = self._relay
        if relay.client_lost:
            return
        if relay.budget_client:
            self._lose_client_after = True
        else:
            lose(relay.client)

    def linger_client(self) -> None:
        """
        Once what is owed to the client (its close) is written: our half of
        its connection closed, what it still sends read and discarded (the
        scanner has stopped), until it closes or the close timer aborts it.
        """
        relay = self._relay
        if relay.client_lost:
            return
        self._linger_client = True
        if relay.budget_client:
            self._lose_client_after = True
        else:
            self._end_client()

    def _end_client(self) -> None:
        relay = self._relay
        if not self._linger_client:
            lose(relay.client)
            return
        if relay.upstream is not None:
            # the upstream's full buffer must not stop the reads that keep the reset away
            relay.upstream.unregisterProducer()
        linger(relay.client)
        self._start_timer()

    def lose_upstream(self) -> None:
        relay = self._relay
        if relay.upstream_lost:
            return
        if relay.budget_upstream:
            self._lose_upstream_after = True
        else:
            assert relay.upstream is not None  # not upstream_lost: a leg is open
            lose(relay.upstream)

    # -- the close timer -------------------------------------------------

    def _start_timer(self) -> None:
        if self._call is None and self._timeout > 0:
            self._call = self._clock.callLater(self._timeout, self._timed_out)

    def _timed_out(self) -> None:
        relay = self._relay
        self._call = None
        if not relay.client_lost:
            relay.client.abortConnection()
        if relay.upstream_lost:
            return
        if not (relay.closed_to_upstream or relay.close_from_upstream or relay.c2u.in_frame):
            # a client that never answered drain()'s close: the upstream,
            # which has had no close yet, gets one rather than a dropped TCP
            self.to_upstream(codes.GOING_AWAY, "client gone")
            assert relay.upstream is not None  # not upstream_lost: a leg is open
            lose(relay.upstream)
        else:
            assert relay.upstream is not None  # not upstream_lost: a leg is open
            relay.upstream.abortConnection()

    def let_go(self, relay: ClosingRelay) -> None:
        """The relay is done and the timers stopped: from now on ``relay`` is a weak proxy of it (Relay.let_go)."""
        self._relay = relay

    def stop(self) -> None:
        """The connection is over: no timer of it may fire."""
        for call in (self._call, self._expiry):
            if call is not None and call.active():
                call.cancel()
        self._call = self._expiry = None
