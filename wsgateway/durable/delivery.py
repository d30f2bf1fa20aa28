# -*- test-case-name: tests.integration.test_durable -*-
"""
Delivery of queued entries whose client has gone (docs/durable-delivery.md), and the
service that owns the queue store on a gateway with C{at_least_once}
routes. Entries of clients still connected are their relay's to deliver
(durable.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgateway.backoff import exponential
from wsgateway.durable.relay import CONFIRM_TIMEOUT, FLUSH_BATCH, DurableDelivery
from wsgateway.durable.replay import consecutive, replay_request
from wsgateway.relay.transport import Leg
from wsgateway.durable.entries import Entry, QueueUnavailable

RECOVERY = 2.0
PAGE = 100  # connections read per pass
MAX_INTERVAL = 8.0


class Deliverer:
    """
    Sends the entries of clients that are gone on replay connections: a
    pass every C{interval} seconds (or at once on C{kick}) walks the
    connections with entries, oldest first, skipping those a live relay of
    this gateway is holding (it delivers them itself), at most
    C{concurrency} at a time. C{replay(route, entries)} (the service's) opens a
    connection, sends the entries, ends with a close handshake and fires
    True when the upstream answered the close; only then are they acked.
    It fires False when the connection was lost before that (one more
    attempt for those entries), and fails when no node could be reached
    (no attempt counted: an outage only ages entries towards retention).
    Every C{expire_interval} a pass also moves entries past retention to
    the dead letters.
    """

    log = Logger()

    def __init__(
        self,
        store: Any,
        replay: Callable[[str, list[Entry]], Deferred[bool]],
        *,
        clock: IReactorTime,
        live: Callable[[], set[str]],
        interval: float = 1.0,
        concurrency: int = 4,
        on_delivered: Callable[[int], None] = lambda n: None,
        on_pass: Callable[[], Any] | None = None,
    ) -> None:
        self.store = store
        self._replay = replay
        self._clock = clock
        self._live = live
        self.interval = interval
        # Until the next pass: interval after a pass that delivered, doubling
        # up to max_interval while passes deliver nothing (an outage: each
        # pass reads the queue's connections, which costs the store a scan).
        self.delay = interval
        self.max_interval = max(interval, MAX_INTERVAL)
        self._idle_passes = 0  # in a row, delivering nothing
        self.concurrency = concurrency
        self._on_delivered = on_delivered
        self._on_pass = on_pass
        self._busy: set[str] = set()
        self._unreachable: set[str] = set()  # routes, during one pass
        self._full_page = False
        self._call: Any = None
        self._pass: Deferred[None] | None = None
        self._again = False
        self.running = False
        self.delivered = 0
        self.failed_attempts = 0
        self.expire_interval = 60.0
        self._expired_at = float("-inf")

    def start(self) -> None:
        self.running = True
        self.kick()

    def stop(self) -> Deferred[None]:
        self.running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._pass is None:
            return succeed(None)
        # A replay in flight may wait on a slow upstream for seconds: shutdown
        # does not. Its entries stay queued (a replay after the restart; the
        # upstream may see some twice, as at least once allows).
        done: Deferred[None] = Deferred()
        self._pass.addBoth(lambda _: done.callback(None))
        self._pass.cancel()
        return done

    def kick(self, *, reset: bool = True) -> None:
        """
        Run a pass now (after it, passes go on every interval). ``reset``:
        also end the backoff; the timed passes themselves keep it.
        """
        if not self.running:
            return
        if reset:
            self._idle_passes = 0
            self.delay = self.interval
        if self._pass is not None:
            self._again = True
            return
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._pass = Deferred.fromCoroutine(self._run())
        self._pass.addErrback(self._pass_failed)
        self._pass.addBoth(self._pass_done)

    def _pass_failed(self, f: Failure) -> None:
        if not f.check(CancelledError):
            self.log.failure("replay pass failed", f)

    def _pass_done(self, _: object) -> None:
        self._pass = None
        if not self.running:
            return
        if self._again:
            self._again = False
            self._call = self._clock.callLater(0, self.kick)
        else:
            self._call = self._clock.callLater(self.delay, self.kick, reset=False)

    async def _run(self) -> None:
        before = self.delivered
        await self._one_pass()
        if self.delivered > before:
            self._idle_passes = 0
            self.delay = self.interval
            if self._full_page:
                self._again = True  # a backlog: go on at once
        else:
            self._idle_passes += 1
            self.delay = exponential(self._idle_passes, initial=self.interval, maximum=self.max_interval)

    async def _one_pass(self) -> None:
        now = self._clock.seconds()
        try:
            if now - self._expired_at >= self.expire_interval:
                self._expired_at = now
                gone = await self.store.expire()
                if gone:
                    self.log.warn("{n} queued entries passed their retention: moved to the dead letters", n=len(gone))
            keys = await self.store.conn_keys(PAGE)
            self._full_page = len(keys) == PAGE
        except QueueUnavailable:
            return
        if self._on_pass is not None:
            await self._on_pass()
        live = self._live()
        todo = [(r, k) for r, k in keys if k not in live and k not in self._busy]
        self._unreachable = set()
        while todo and self.running:
            # a route whose upstream could not be reached is not tried again this pass
            todo = [(r, k) for r, k in todo if r not in self._unreachable]
            batch, todo = todo[: self.concurrency], todo[self.concurrency :]
            results = await DeferredList([Deferred.fromCoroutine(self._one(r, k)) for r, k in batch],
                                         consumeErrors=True)
            for ok, result in results:
                if not ok and isinstance(result, Failure) and not result.check(CancelledError):
                    self.log.failure("replay of queued entries failed", result)

    async def _one(self, route: str, key: str) -> None:
        self._busy.add(key)
        try:
            while self.running:
                entries = await self.store.pending_for(key, FLUSH_BATCH)
                if not entries or key in self._live():
                    return
                run = consecutive(entries)
                try:
                    ok = await self._replay(route, run)
                except Exception as e:
                    # not reached at all: no attempt is counted, only retention runs
                    self.log.debug("replay of {conn_key} not possible now: {error}", conn_key=key, error=str(e))
                    self._unreachable.add(route)
                    return
                if not ok:
                    self.failed_attempts += 1
                    await self.store.attempt_failed([e.id for e in run])
                    return
                await self.store.ack([e.id for e in run])
                self.delivered += len(run)
                self._on_delivered(len(run))
                self.log.info("replayed {n} entries of {conn_key} on route {route}", n=len(run), conn_key=key,
                              route=route)
        except QueueUnavailable as e:
            self.log.warn("queue unavailable during replay: {error}", error=str(e))
        finally:
            self._busy.discard(key)


class DeliveryService(MultiService):
    """
    The queue store (a child service: opened first, closed last, after the
    drain has let every relay append what it held) and the L{Deliverer}.
    C{live} maps the conn_key of every durable relay of this process to its hooks.
    """

    log = Logger()

    def __init__(
        self,
        store: Any,
        *,
        clock: IReactorTime,
        metrics: Any = None,
        replay: Callable[[str, list[Entry]], Deferred[bool]] | None = None,
    ) -> None:
        """
        ``replay(route, entries)`` makes the replay connections (the service's,
        over the upstreams of its current config); without it nothing is replayed.
        """
        super().__init__()
        self.store = store
        store.setServiceParent(self)
        self.clock = clock
        self.metrics = metrics
        self.live: dict[str, DurableDelivery] = {}
        self.failures = 0
        self.deliverer: Deliverer | None = None
        if replay is not None:
            self.deliverer = Deliverer(self.store, replay, clock=self.clock, live=lambda: set(self.live),
                                       on_delivered=self.delivered, on_pass=self._refresh_depth)

    def track(self, conn_key: str, delivery: DurableDelivery) -> None:
        """A live relay of this process delivers ``conn_key``'s entries itself: the Deliverer skips them."""
        self.live[conn_key] = delivery

    def untrack(self, conn_key: str, delivery: Any) -> None:
        """The relay holding ``conn_key`` ended: what it left queued is the Deliverer's to replay now."""
        if self.live.get(conn_key) is not delivery:
            return
        if self.live.pop(conn_key).left_queued and self.deliverer is not None:
            self.deliverer.kick()  # rather than wait out a backed-off pass

    @property
    def available(self) -> bool:
        """
        False for C{RECOVERY} seconds after an append failed: new clients of
        the route then get 502 rather than a promise the disk cannot keep.
        After that real appends try again (a full disk may have room by then).
        """
        failed_at = getattr(self.store, "append_failed_at", None)
        return failed_at is None or self.clock.seconds() - failed_at >= RECOVERY

    def delivered(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.queue_delivered_count(n)

    def failed(self, operation: str) -> None:
        self.failures += 1
        if self.metrics is not None:
            self.metrics.queue_failed(operation)

    async def _refresh_depth(self) -> None:
        try:
            depth = await self.store.depth()
        except QueueUnavailable:
            return
        if self.metrics is not None:
            self.metrics.set_queue_depth(int(sum(r["depth"] for r in depth.values())))
            size = getattr(self.store, "stored_bytes", None)
            if size is not None:
                self.metrics.set_queue_bytes(size)

    def startService(self) -> None:
        super().startService()
        if self.deliverer is not None:
            self.deliverer.start()

    def stopService(self) -> Deferred[None]:
        d = self.deliverer.stop() if self.deliverer is not None else succeed(None)
        d.addBoth(lambda _: super(DeliveryService, self).stopService())
        return d


async def replay_connection(upstream: Any, entries: list[Entry], *, clock: IReactorTime, request_type: Any,
                 timeout: float = CONFIRM_TIMEOUT) -> bool:
    """
    One replay connection (docs/durable-delivery.md): ``entries`` (one client's, seqs
    in a row) sent to a node of ``upstream`` with the original identity
    headers and C{X-Wsgateway-Replay: 1}, then a close handshake. True when
    the upstream answered our close, which it does only after reading every
    message before it. What the upstream sends on it goes nowhere (its client
    is gone). Raises UpstreamError when no node could be reached.
    """
    node, leg = await upstream.connect(replay_request(entries, request_type))
    lost: Deferred[None] = Deferred()

    def gone() -> None:
        if not lost.called:
            lost.callback(None)

    # Autobahn keeps the replay leg: the few messages do not need the frame relay.
    leg.sink = Leg(leg._dataReceived, gone)
    pending = leg.take_pending()
    if pending:
        leg._dataReceived(pending)
    try:
        if not leg.lost:
            for e in entries:
                leg.sendMessage(e.message, isBinary=e.binary)
            leg.sendClose(1000)
        else:
            gone()
        timer = clock.callLater(timeout, leg.transport.abortConnection)
        await lost
        if timer.active():
            timer.cancel()
    finally:
        upstream.release(node, vanished=leg.remoteCloseCode is None)
    return leg.remoteCloseCode is not None
