# -*- test-case-name: tests.unit.durable.test_durable_relay_units -*-
"""
The flush of a durable relay (docs/durable-delivery.md): once a new upstream
leg is open, L{QueueFlush} delivers the connection's queued entries on it,
in order, a batch at a time; each batch is confirmed by two ping rounds
(as live messages are, relay.py) and only then acknowledged (removed from
the store). What to do when none is left, or when the seqs have a gap, is
the relay hooks' (L{wsgateway.durable.relay.DurableDelivery}).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from wsgateway import codes
from wsgateway.durable.appends import Appends
from wsgateway.durable.confirmations import Confirmations
from wsgateway.durable.entries import Entry, QueueUnavailable
from wsgateway.durable.replay import QueueLink, consecutive
from wsgateway.interfaces import RelayControl
from wsgateway.relay.codec import OP_BINARY, OP_TEXT, encode_frame

FLUSH_BATCH = 200
CONFIRM_TIMEOUT = 10.0


class QueueFlush:
    """
    The queued entries of C{link}'s connection, delivered on the relay's
    upstream leg. C{caught_up(next_seq)} is called once none is left and no
    append is in flight (C{next_seq}: what the upstream counts the next
    message as); C{gap()} when the next entry is not the seq the upstream
    expects (entries dead-lettered or purged meanwhile). C{delivered}
    counts the entries acknowledged, over every leg.
    """

    flushing = False
    delivered = 0

    def __init__(self, relay: RelayControl, link: QueueLink, appends: Appends, confirms: Confirmations,
                 clock: IReactorTime, *, caught_up: Callable[[int], None], gap: Callable[[], None]) -> None:
        self.relay = relay
        self.link = link
        self.appends = appends
        self.confirms = confirms
        self._clock = clock
        self._caught_up = caught_up
        self._gap = gap
        self._batch: list[Entry] = []  # delivered on this leg, not confirmed yet
        self._d: Deferred[None] | None = None

    def start(self, first_seq: int) -> Deferred[None]:
        """Flush on the leg that just opened, whose first message counts as C{first_seq}."""
        self._d = Deferred.fromCoroutine(self._flush(first_seq))
        return self._d

    def stop(self) -> None:
        """No more batches (what is not confirmed stays queued)."""
        self.flushing = False

    def take_unconfirmed(self) -> list[Entry]:
        """The leg is lost: the batch delivered on it and not confirmed, which the caller counts an attempt of."""
        batch, self._batch = self._batch, []
        return batch

    async def _flush(self, next_seq: int) -> None:
        relay = self.relay
        self.flushing = True
        store, key = self.link.store, self.link.conn_key
        while self.flushing and not relay.done and relay.upstream is not None:
            busy, gen = self.appends.in_flight, self.appends.begun
            try:
                entries: list[Entry] = await store.pending_for(key, FLUSH_BATCH)
            except QueueUnavailable:
                self._failed()
                return
            if not self.flushing or relay.upstream is None:
                return
            if not entries:
                if not busy and not self.appends.in_flight and gen == self.appends.begun:
                    self._caught_up(next_seq)
                    return
                await self.appends.settled()
                continue
            if entries[0].seq != next_seq:
                # entries dead-lettered or purged meanwhile: the upstream would count wrong
                self._gap()
                return
            entries = consecutive(entries)
            next_seq = entries[-1].seq + 1
            self._batch = entries
            relay.upstream.write(b"".join(
                encode_frame(OP_BINARY if e.binary else OP_TEXT, e.message, mask=True) for e in entries
            ))
            timer = self._clock.callLater(CONFIRM_TIMEOUT, self._confirm_timed_out)
            ok = True
            for _ in range(2):  # two rounds, as for live messages (relay.py's module docstring)
                ok = await self.confirms.round_trip()
                if not ok:
                    break
            if timer.active():
                timer.cancel()
            if not ok or not self._batch:
                return  # the leg was lost: its handler counted the attempt
            self._batch = []
            try:
                await store.ack([e.id for e in entries])
            except QueueUnavailable:
                self._failed()
                return
            self.delivered += len(entries)
            self.link.on_delivered(len(entries))

    def _confirm_timed_out(self) -> None:
        relay = self.relay
        if relay.upstream is not None and not relay.upstream_lost:
            relay.log.warn("upstream did not confirm delivered entries in time: dropping it")
            relay.upstream.abortConnection()

    def _failed(self) -> None:
        self.link.on_failure("read")
        self.relay.log.error("queue unavailable while delivering: closing the client with 1011")
        self.flushing = False
        self.relay.close(codes.INTERNAL_ERROR, "queue unavailable")
