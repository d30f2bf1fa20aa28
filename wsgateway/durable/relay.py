# -*- test-case-name: tests.integration.test_durable -*-
"""
Durable delivery on C{delivery = at_least_once} routes (docs/durable-delivery.md).

L{DurableDelivery} is the hooks (L{wsgateway.interfaces.RelayHooks}) of
the frame relay of such a route. While its upstream is open the relay
relays as any relay does, and keeps a copy of what it sent upstream (the
L{Window}, confirmations.py) until a ping sent behind it comes back as a pong:
the upstream's WebSocket stack answers a ping only after it has read every
frame before it. When the upstream is lost (no node reachable at the
handshake, a vanished connection, or a close with a code that means "gone"
such as 1001, 1011, 1012, 1013) the relay is I{holding}: the unconfirmed
messages of the window and every client message after them are appended to
the queue store, and the client is not read while an append is in flight.
The relay keeps trying to open a new upstream leg; when one opens it
delivers the connection's queued entries on it in order, each batch
confirmed by a ping and then acknowledged (removed), and once none is left
it relays live again. If the client leaves before that, its entries stay in
the store and the L{Deliverer} sends them on a replay connection. The
flush on a new leg is L{QueueFlush} (flush.py).

Guarantee: at least once. A message counts as taken by the upstream once
the upstream answered two pings sent behind it in turn (the second one
proves the connection stayed up for a round trip after the message was
read), or answered the close handshake that ends a replay connection; only
then does it leave the window or the store. What this cannot see: an
upstream WebSocket library that has read messages into its own queue (and
answered pings) and crashes before its application consumed them. An
upstream that needs more dedupes and acknowledges at the application level. Duplicates are possible
(the upstream may have read a message from the window before it vanished,
or a batch before its pong was lost) and are marked: every upstream
connection of such a route carries C{X-Wsgateway-Conn-Id} (the client
connection) and C{X-Wsgateway-Seq} (the sequence number of the first client
message it carries, then one more per message), so C{(conn id, seq)}
identifies each message and an upstream can drop one it has already seen.
A sequence number is skipped only when its entry was dead-lettered or purged.

Not queued: messages the upstream may have lost after it closed the
connection itself with another code (1000, 1008, 4xxx...): that is the
upstream's decision, relayed to the client as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.python.failure import Failure

from wsgateway import codes
from wsgateway.durable.appends import Appends
from wsgateway.durable.clientstream import MessageReader
from wsgateway.durable.confirmations import Confirmations, GatedReader, Recording
from wsgateway.durable.entries import QueueFull, QueueUnavailable
from wsgateway.durable.flush import CONFIRM_TIMEOUT, FLUSH_BATCH, QueueFlush
from wsgateway.durable.replay import CONN_HEADER, SEQ_HEADER, QueueLink
from wsgateway.interfaces import RelayControl, RelayTransport
from wsgateway.relay.codec import OP_CLOSE, OP_PONG, encode_close, encode_frame, parse_close
from wsgateway.relay.transport import lose

# CONFIRM_TIMEOUT and FLUSH_BATCH are flush.py's; the Deliverer takes them from here
__all__ = ["CONFIRM_TIMEOUT", "FLUSH_BATCH", "LOSS_CODES", "DurableDelivery"]

# Upstream close codes after which the messages it may not have read are
# queued and a new leg is sought: going away, internal error, restart, try
# again later, bad gateway.
LOSS_CODES = frozenset({1001, 1011, 1012, 1013, 1014})

# A refused append (QueueFull: [queue] max_bytes_per_connection or max_bytes): the client may try again once
# the queue has drained, so 1013, not 1011 (docs/configuration.md).
TRY_AGAIN_LATER = 1013

RETRY_MAX = 5.0  # seconds between attempts to reach the upstream again, at most


class DurableDelivery:
    """
    The L{wsgateway.interfaces.RelayHooks} of durable delivery: the window
    and its confirming pings while live; holding (queueing what the client
    sends) once the upstream is lost; the reconnect loop; the flush of the
    queued entries on a new leg; then live again. ``reconnect(relay)``
    opens a new leg with ``leg_headers()`` and hands it to
    ``relay.upstream_reconnected`` (handshake/server.py), or fails. The
    relay's ``upstream`` is None when no node was reachable at the handshake.
    """

    mirrors_held = False  # queued client frames are not copied to a mirror
    relay: RelayControl
    confirms: Confirmations  # the window, once attached to the relay
    flush: QueueFlush  # the queued entries on a new leg, once attached to the relay

    def __init__(self, link: QueueLink, reconnect: Callable[[Any], Deferred[None]], *, clock: IReactorTime,
                 write_buffer: int) -> None:
        self.link = link
        self._reconnect = reconnect
        self._reconnect_d: Deferred[None] | None = None
        self._clock = clock
        self._cap = max(4 * write_buffer, 1 << 20)
        self._upstream_full = False
        self.appends = Appends(link, clock, appended=self._appended, failed=self._append_failed)
        # the client's pings while holding, answered once what it sent before them is stored
        self._pongs: list[bytes] = []
        self._queue_failed = False
        self.reader: MessageReader | None = None
        self.leg_seq = 1
        self._upstream_going = False

    # -- wiring (RelayHooks) --------------------------------------------------------

    def attach(self, relay: RelayControl) -> None:
        self.relay = relay
        self.confirms = Confirmations(relay, self._clock, self._cap, self._maybe_resume)
        self.flush = QueueFlush(relay, self.link, self.appends, self.confirms, self._clock,
                                caught_up=self._caught_up, gap=self._renumber)

    def upstream_transport(self, transport: RelayTransport) -> RelayTransport:
        return Recording(transport, self.confirms.sent)

    def client_reader(self, client: RelayTransport) -> IPushProducer:
        return GatedReader(self.upstream_paused)

    def started(self) -> None:
        if self.relay.upstream is None:
            self.relay.upstream_gone(False)
            self._hold_from(MessageReader(1))
            self._clock.callLater(0, self._start_reconnect_loop)

    @property
    def left_queued(self) -> bool:
        """Entries of this connection may still be in the store (or on their way there)."""
        return bool(self.appends.in_flight) or self.queued > self.delivered

    @property
    def queued(self) -> int:
        return self.appends.queued

    @property
    def flushing(self) -> bool:
        """Queued entries are being delivered on a new leg."""
        return self.flush.flushing

    @property
    def delivered(self) -> int:
        """Queued entries delivered on this connection's legs (and acknowledged)."""
        return self.flush.delivered

    def leg_headers(self) -> dict[str, str]:
        return {CONN_HEADER: self.link.conn_key, SEQ_HEADER: str(self.leg_seq)}

    def upstream_paused(self, full: bool) -> None:
        """The upstream's write buffer went over (True) or under its mark."""
        self._upstream_full = full
        if full:
            self.relay.client.pauseProducing()
        else:
            self._maybe_resume()

    # -- the upstream's control frames ---------------------------------------------

    def upstream_control(self, opcode: int, payload: bytes) -> bool | None:
        relay = self.relay
        if opcode == OP_PONG and self.confirms.pong(payload):
            return False
        if opcode == OP_CLOSE and not relay.closed_to_upstream and not relay.close_from_upstream:
            code, _ = parse_close(payload)
            if code in LOSS_CODES and not relay.done:
                # The upstream is going away: answer its close and keep what it may not have read.
                relay.close_from_upstream = True
                self._upstream_going = True
                upstream = relay.upstream
                assert upstream is not None  # its close frame came on it
                if relay.c2u.in_frame and self.reader is None:
                    upstream.abortConnection()
                else:
                    upstream.write(encode_close(code, "", mask=True))
                    lose(upstream)
                return False
        return None

    # -- holding: queueing what the client sends ---------------------------------

    def _hold_from(self, reader: MessageReader) -> None:
        self.reader = reader
        self.confirms.restart(None)
        self.relay.holding = True

    def hold(self, out: bytes) -> None:
        if not self._queue_failed:
            self._read(out)

    def _read(self, out: bytes, answer_pings: bool = True) -> None:
        assert self.reader is not None
        relay = self.relay
        messages, pings = self.reader.feed(out)
        if answer_pings:
            # Nobody upstream answers them now: we do, after what came before
            # them is stored, so that a pong still means "all of it is in".
            self._pongs += pings
        if messages:
            relay.client.pauseProducing()  # not read while an append is in flight (module docstring)
            self.appends.add(messages)
        if self._pongs and not self.appends.in_flight:
            self._answer_pings()

    def _answer_pings(self) -> None:
        relay = self.relay
        pings, self._pongs = self._pongs, []
        for p in pings:
            if not (relay.closed_to_client or relay.client_lost):
                pong = relay.u2c.inject(encode_frame(OP_PONG, p, mask=False))
                if pong:
                    relay.client.write(pong)

    def _appended(self) -> None:
        if self._pongs and not self.appends.in_flight:
            self._answer_pings()
        self._maybe_resume()

    def _append_failed(self, f: Failure) -> None:
        self._queue_failed = True
        self._pongs.clear()  # what came before them was not stored
        if f.check(QueueFull):
            # the client's own doing (or a full queue), not the store failing: a warning, and no failure counted
            self.relay.log.warn("queue full: closing the client with 1013 ({why})", why=f.getErrorMessage())
            if not self.relay.done and not self.relay.client_lost:
                self.relay.client_violation(TRY_AGAIN_LATER, "queue full")
            return
        why = f.getErrorMessage() if f.check(QueueUnavailable) else repr(f.value)
        self.relay.log.error("queue unavailable: closing the client with 1011 ({why})", why=why)
        self.link.on_failure("append")
        if not self.relay.done and not self.relay.client_lost:
            self.relay.client_violation(codes.INTERNAL_ERROR, "queue unavailable")

    def _maybe_resume(self) -> None:
        if self.relay.client_lost or self._upstream_full or self.appends.in_flight:
            return
        if self.confirms.full:
            return
        self.relay.client.resumeProducing()

    # -- losing the upstream ------------------------------------------------------

    def upstream_connection_lost(self, vanished: bool) -> bool:
        relay = self.relay
        if relay.close_from_upstream and not self._upstream_going:
            # it ended the session itself, or answered our close (after reading
            # everything before it): nothing of the window is in doubt
            return False
        self._upstream_going = False
        self.confirms.cancel_timer()
        self.confirms.fail()
        batch = self.flush.take_unconfirmed()
        if batch:
            # delivered on this leg but not confirmed: one more attempt for them
            self.link.store.attempt_failed([e.id for e in batch]).addErrback(lambda f: None)
        if self.reader is None:
            window = self.confirms.window
            assert window is not None
            reader = MessageReader(window.base_seq + 1)
            self._hold_from(reader)
            # its pings were the upstream's to answer (or ours, the confirmations)
            self._read(bytes(window.buf), answer_pings=False)
        # nothing goes to the old leg any more, and its full buffer no longer holds the client back
        self._upstream_full = False
        relay.upstream_gone(vanished)
        self.flush.stop()
        if relay.u2c.in_frame or relay.u2c.in_message or relay.closed_to_client or relay.client_lost \
                or relay.closed_by is not None:
            # The client's stream cannot go on (a message from the upstream
            # was cut), or it is ending anyway: what it sent is queued, and
            # the connection ends as without durability.
            if relay.closed_to_client and relay.close_from_client:
                relay.finish_client()
            relay.give_up()  # 1014 to the client, unless it is closing already
            return True
        relay.log.info("upstream gone: queueing client messages")
        relay.client.resumeProducing()
        self._start_reconnect_loop()
        return True

    def awaits_upstream_close(self) -> bool:
        # Relay would drop the upstream right after its close frame; here
        # its close answer is awaited (bounded by the close timer): it
        # confirms what the window holds, which is queued otherwise.
        relay = self.relay
        window = self.confirms.window
        return self.reader is None and window is not None and bool(len(window)) \
            and not relay.upstream_lost and not relay.closed_to_upstream

    def _start_reconnect_loop(self) -> None:
        relay = self.relay
        if relay.done or relay.client_lost or relay.closed_to_client or self._reconnect_d is not None:
            return
        relay.reconnecting = True
        self._reconnect_d = Deferred.fromCoroutine(self._reconnect_loop())
        self._reconnect_d.addErrback(self._loop_failed)

    def _loop_failed(self, f: Failure) -> None:
        if not f.check(CancelledError):
            self.relay.log.failure("durable reconnect loop failed", f)

    async def _reconnect_loop(self) -> None:
        relay = self.relay
        delay = self.link.retry_initial
        while relay.reconnecting and not relay.done:
            try:
                # the leg announces its first seq: what is being appended now may be it
                await self.appends.settled()
                first = await self.link.store.pending_for(self.link.conn_key, 1)
                self.leg_seq = first[0].seq if first else self.reader.next_seq if self.reader else 1
                await self._reconnect(relay)
                return
            except CancelledError:
                return
            except Exception as e:
                if not relay.reconnecting or relay.done:
                    return
                relay.log.debug("upstream still unreachable: {error}", error=str(e))
                sleep: Deferred[None] = Deferred(lambda d: call.cancel())
                call = self._clock.callLater(delay, sleep.callback, None)
                await sleep
                delay = min(delay * 2, RETRY_MAX)

    def stop_reconnecting(self) -> None:
        # Unlike an in-memory reconnect, nothing held is dropped: it is in the store.
        self.relay.reconnecting = False
        d, self._reconnect_d = self._reconnect_d, None
        if d is not None:
            d.cancel()

    # -- a new leg: flush, then live ----------------------------------------------

    def upstream_reconnected(self) -> None:
        self._reconnect_d = None
        self.flush.start(self.leg_seq).addErrback(self._loop_failed)

    def _caught_up(self, next_seq: int) -> None:
        """The flush delivered every queued entry; the upstream counts the next message as C{next_seq}."""
        if self.reader is not None and self.reader.next_seq != next_seq:
            self._renumber()
            return
        self._go_live()

    def _renumber(self) -> None:
        """A gap in the seqs this leg carries: a new leg, whose X-Wsgateway-Seq says where it starts."""
        relay = self.relay
        relay.log.info("gap in queued sequence numbers: opening a new upstream leg")
        self.flush.stop()
        if relay.upstream is not None and not relay.upstream_lost:
            relay.upstream.write(encode_close(codes.GOING_AWAY, "renumbering", mask=True))
            self._upstream_going = True
            lose(relay.upstream)

    def _go_live(self) -> None:
        """Nothing of this client is queued any more: relay its stream again, from where the reader is."""
        reader, relay = self.reader, self.relay
        assert reader is not None
        rest = reader.rest()
        self.reader = None
        relay.holding = False
        self.flush.stop()
        relay.reconnecting = False
        self.confirms.restart(reader.next_seq - 1)
        if rest:
            assert relay.upstream is not None  # the flush ran on it
            relay.upstream.write(rest)  # kept in the window from here on
        relay.log.info("queue delivered: relaying live again")
        self._maybe_resume()

    # -- the gateway's and the client's closes while holding -------------------

    def closing_upstream(self) -> bool:
        if self.reader is None:
            return False
        self.stop_reconnecting()
        self._stop_flushing()
        return True

    def _stop_flushing(self) -> None:
        """End a flush leg (its unconfirmed batch stays queued for the replay)."""
        relay = self.relay
        self.flush.stop()
        if relay.upstream is not None and not relay.upstream_lost:
            relay.closed_to_upstream = True
            relay.upstream.write(encode_close(codes.GOING_AWAY, "client gone", mask=True))
            lose(relay.upstream)

    def maybe_done(self) -> None:
        relay = self.relay
        if relay.client_lost and relay.upstream_lost:
            self.confirms.cancel_timer()
        if not relay.done and relay.client_lost and not relay.upstream_lost and self.reader is not None:
            self._stop_flushing()
