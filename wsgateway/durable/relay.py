# -*- test-case-name: tests.test_durable -*-
"""
Durable delivery on C{delivery = at_least_once} routes (docs/durable-delivery.md).

A L{DurableRelay} is the frame relay of such a route. While its upstream
is open it relays as any relay does, and also keeps a copy of what it sent
upstream (the L{Window}) until a ping sent behind it comes back as a pong:
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
the store and the L{Deliverer} sends them on a replay connection.

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from wsgateway import codes
from wsgateway.durable.clientstream import Message, MessageReader, Window
from wsgateway.relay.frames import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, encode_close, encode_frame, parse_close
from wsgateway.durable.entries import Entry, NewEntry, QueueUnavailable
from wsgateway.relay.relay import CLIENT, Relay, lose
from wsgateway.durable.replay import CONN_HEADER, SEQ_HEADER, consecutive

# Upstream close codes after which the messages it may not have read are
# queued and a new leg is sought: going away, internal error, restart, try
# again later, bad gateway.
LOSS_CODES = frozenset({1001, 1011, 1012, 1013, 1014})

FLUSH_BATCH = 200
# Live messages are confirmed by a ping at most this often, or as soon as
# this much is unconfirmed: duplicates after a loss stay within about
# two intervals of traffic.
CONFIRM_INTERVAL = 0.1
CONFIRM_BYTES = 64 * 1024
RETRY_MAX = 5.0  # seconds between attempts to reach the upstream again, at most
CONFIRM_TIMEOUT = 10.0


# -- the relay ------------------------------------------------------------------


@dataclass
class QueueLink:
    """What a durable relay needs from the gateway: the store, identity to record, counters."""

    store: Any  # QueueStore or RedisQueueStore
    route: str
    conn_key: str
    headers: tuple[tuple[str, str], ...]  # identity for a replay connection (see stored_headers)
    claims: dict[str, Any] = field(default_factory=dict)
    trace_id: str | None = None
    on_delivered: Callable[[int], None] = lambda n: None
    on_failure: Callable[[str], None] = lambda what: None
    retry_initial: float = 0.1


class _Recording:
    """
    Every upstream transport of a durable relay, so that the relay's own
    mechanism (which compares ``relay.upstream`` with a leg's transport) sees
    one object throughout: writes also go to ``sent``, which keeps them in
    the window while the relay is live (client frames, and the gateway's own
    pings and closes, which the window's walk skips) and ignores them while
    it is holding (a flush leg's entries are in the store already).
    """

    __slots__ = ("transport", "_sent")

    def __init__(self, transport: Any, sent: Callable[[bytes], None]) -> None:
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
class _GatedReader:
    """The client as the upstream's producer, kept paused while the relay needs it to be."""

    __slots__ = ("_relay",)

    def __init__(self, relay: DurableRelay) -> None:
        self._relay = relay

    def pauseProducing(self) -> None:
        self._relay._upstream_full = True
        self._relay.client.pauseProducing()

    def resumeProducing(self) -> None:
        self._relay._upstream_full = False
        self._relay._maybe_resume()

    def stopProducing(self) -> None:
        pass


class DurableRelay(Relay):
    """
    A relay that queues what its upstream did not take (module docstring).
    ``upstream`` is None when no node was reachable at the handshake.
    ``reconnect(relay)`` opens a new leg with ``relay.leg_headers()`` and
    hands it to ``upstream_reconnected`` (proxy.py), or fails.
    """

    def __init__(self, client: Any, upstream: Any, *, link: QueueLink,
                 reconnect: Callable[[Relay], Deferred[None]], **kwargs: Any) -> None:
        self.link = link
        self._upstream_full = False
        self._appending = 0
        self._append_gen = 0
        self._queue_failed = False
        self._confirm_id = 0
        self._confirms: dict[bytes, tuple[int, Deferred[bool] | None]] = {}
        self._flush_batch: list[Any] = []
        self._settled: list[Deferred[None]] = []  # waiting for the appends in flight
        self._flush_d: Deferred[None] | None = None
        self.flushing = False
        self.queued = 0
        self.delivered = 0
        self.window: Window | None = Window(0)
        self._confirmed_mark = 0  # covered by the last pong; dropped from the window at the next one
        self._confirm_call: Any = None
        self.reader: MessageReader | None = None
        self.leg_seq = 1
        recording = _Recording(upstream, self._sent) if upstream is not None else None
        super().__init__(client, recording, reconnect=reconnect, **kwargs)
        self._cap = max(4 * self._write_buffer, 1 << 20)
        if upstream is None:
            self.upstream_lost = True
            self._hold_from(MessageReader(1))
            self._clock.callLater(0, self._start_reconnect_loop)

    @property
    def holding(self) -> bool:
        return self.reader is not None

    @property
    def left_queued(self) -> bool:
        """Entries of this connection may still be in the store (or on their way there)."""
        return bool(self._appending) or self.queued > self.delivered

    def _client_reader(self) -> Any:
        return _GatedReader(self)

    def leg_headers(self) -> dict[str, str]:
        return {CONN_HEADER: self.link.conn_key, SEQ_HEADER: str(self.leg_seq)}

    # -- data path -------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        if self.reader is None:
            super().client_data(data)  # what it writes upstream goes through _Recording
            return
        self.bytes_c2u += len(data)
        c2u = self.c2u
        active, frames = c2u.in_frame, c2u.data_frames
        out = c2u.feed(data)
        if active or c2u.data_frames != frames:
            self._last_activity = self._clock.seconds()
        if out and not self._queue_failed:
            self._read(out)
        if c2u.error is not None:
            self._client_violation(*c2u.error)

    def _sent(self, out: bytes) -> None:
        window = self.window
        if window is None:
            return
        window.add(out)
        if not self._confirms and self._confirm_call is None and not self.closed_to_upstream:
            self._pace_confirm(window)
        if len(window) > self._cap:
            # the upstream is not confirming as fast as the client sends
            self.client.pauseProducing()

    def _pace_confirm(self, window: Window) -> None:
        """
        A confirming ping now if the window holds CONFIRM_BYTES, else in
        CONFIRM_INTERVAL: one ping per message would double the frames a
        chatty client sends (bench scenario a: 0.43x the blind relay).
        """
        if len(window) >= CONFIRM_BYTES:
            self._send_confirm(window.total)
        else:
            self._confirm_call = self._clock.callLater(CONFIRM_INTERVAL, self._confirm_due)

    def _confirm_due(self) -> None:
        self._confirm_call = None
        window = self.window
        if window is not None and len(window) and not self._confirms and not self.done \
                and not self.upstream_lost and not self.closed_to_upstream:
            self._send_confirm(window.total)

    def _cancel_confirm_call(self) -> None:
        call, self._confirm_call = self._confirm_call, None
        if call is not None and call.active():
            call.cancel()

    def _send_confirm(self, mark: int, d: Deferred[bool] | None = None, direct: bool = False) -> None:
        self._confirm_id += 1
        payload = b"wsgq" + self._confirm_id.to_bytes(8, "big")
        self._confirms[payload] = (mark, d)
        frame = encode_frame(OP_PING, payload, mask=True)
        out = frame if direct else self.c2u.inject(frame)
        if out:
            self.upstream.write(out)

    def _from_upstream(self, opcode: int, payload: bytes) -> bool:
        if opcode == OP_PONG and payload in self._confirms:
            mark, d = self._confirms.pop(payload)
            if d is not None:
                d.callback(True)
            elif self.window is not None:
                # a second round: what the previous pong covered is confirmed now
                window = self.window
                window.confirm(self._confirmed_mark)
                self._confirmed_mark = mark
                if len(window) and not self.closed_to_upstream and not self.upstream_lost \
                        and self._confirm_call is None:
                    self._pace_confirm(window)
                self._maybe_resume()
            return False
        if opcode == OP_CLOSE and not self.closed_to_upstream and not self.close_from_upstream:
            code, _ = parse_close(payload)
            if code in LOSS_CODES and not self.done:
                # The upstream is going away: answer its close and keep what it may not have read.
                self.close_from_upstream = True
                self._upstream_going = True
                if self.c2u.in_frame and self.reader is None:
                    self.upstream.abortConnection()
                else:
                    self.upstream.write(encode_close(code, "", mask=True))
                    lose(self.upstream)
                return False
        return super()._from_upstream(opcode, payload)

    _upstream_going = False

    # -- holding: queueing what the client sends ---------------------------------

    def _hold_from(self, reader: MessageReader) -> None:
        self.reader = reader
        self.window = None

    def _read(self, out: bytes, answer_pings: bool = True) -> None:
        assert self.reader is not None
        messages, pings = self.reader.feed(out)
        for p in pings if answer_pings else ():
            # nobody upstream answers them now
            if not (self.closed_to_client or self.client_lost):
                pong = self.u2c.inject(encode_frame(OP_PONG, p, mask=False))
                if pong:
                    self.client.write(pong)
        if messages:
            self._append(messages)

    def _append(self, messages: Sequence[Message]) -> None:
        link = self.link
        now = self._clock.seconds()
        entries = [NewEntry(route=link.route, conn_key=link.conn_key, seq=m.seq, message=m.payload,
                            binary=m.binary, claims=link.claims, headers=link.headers, trace_id=link.trace_id,
                            first_seen=now) for m in messages]
        self._appending += 1
        self._append_gen += 1
        self.client.pauseProducing()
        d = link.store.append(entries)
        d.addCallbacks(self._appended, self._append_failed, callbackArgs=(len(entries),))

    def _appended(self, _ids: Any, n: int) -> None:
        self._appending -= 1
        self.queued += n
        self._maybe_resume()
        self._settle()

    def _append_failed(self, f: Failure) -> None:
        self._appending -= 1
        why = f.getErrorMessage() if f.check(QueueUnavailable) else repr(f.value)
        self.log.error("queue unavailable: closing the client with 1011 ({why})", why=why)
        self.link.on_failure("append")
        self._queue_failed = True
        if not self.done and not self.client_lost:
            self._client_violation(codes.INTERNAL_ERROR, "queue unavailable")
        self._settle()

    def _settle(self) -> None:
        """Fire what waits for the appends in flight, once there is none."""
        if not self._appending:
            settled, self._settled = self._settled, []
            for d in settled:
                d.callback(None)

    def _appends_settled(self) -> Deferred[None]:
        """Fires once no append is in flight."""
        if not self._appending:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._settled.append(d)
        return d

    def _maybe_resume(self) -> None:
        if self.client_lost or self._upstream_full or self._appending:
            return
        if self.window is not None and len(self.window) > self._cap:
            return
        self.client.resumeProducing()

    # -- losing the upstream ------------------------------------------------------

    def upstream_connection_lost(self) -> None:
        if self.upstream_lost:
            return
        vanished = not self.close_from_upstream and not self.closed_to_upstream
        if self.close_from_upstream and not self._upstream_going:
            # it ended the session itself, or answered our close (after reading
            # everything before it): nothing of the window is in doubt
            super().upstream_connection_lost()
            return
        self._upstream_going = False
        self._cancel_confirm_call()
        self._fail_confirms()
        batch, self._flush_batch = self._flush_batch, []
        if batch:
            # delivered on this leg but not confirmed: one more attempt for them
            self.link.store.attempt_failed([e.id for e in batch]).addErrback(lambda f: None)
        if self.reader is None:
            window = self.window
            assert window is not None
            reader = MessageReader(window.base_seq + 1)
            self._hold_from(reader)
            # its pings were the upstream's to answer (or ours, the confirmations)
            self._read(bytes(window.buf), answer_pings=False)
        # nothing goes to the old leg any more, and its full buffer no longer holds the client back
        self._upstream_full = False
        self.upstream_lost = True
        self.upstream_vanished = vanished
        self.upstream = None
        self.flushing = False
        if self.u2c.in_frame or self.u2c.in_message or self.closed_to_client or self.client_lost \
                or self.closed_by is not None:
            # The client's stream cannot go on (a message from the upstream
            # was cut), or it is ending anyway: what it sent is queued, and
            # the connection ends as without durability.
            if self.closed_to_client and self.close_from_client:
                self._finish_client()
            self._give_up()  # 1014 to the client, unless it is closing already
            return
        self.log.info("upstream gone: queueing client messages")
        self.client.resumeProducing()
        self._start_reconnect_loop()

    def client_connection_lost(self) -> None:
        if self.client_lost:
            return
        if self.reader is None and self.window is not None and len(self.window) \
                and not self.upstream_lost and not self.closed_to_upstream:
            # Relay would drop the upstream right after its close frame; here
            # its close answer is awaited (bounded by the close timer): it
            # confirms what the window holds, which is queued otherwise.
            self.client_lost = True
            if self.closed_by is None:
                self.closed_by = CLIENT
                self.close_code = 1006
            self._close_upstream(codes.GOING_AWAY, "client gone")
            self._maybe_done()
            return
        super().client_connection_lost()

    def _fail_confirms(self) -> None:
        confirms, self._confirms = self._confirms, {}
        for _, d in confirms.values():
            if d is not None:
                d.callback(False)

    def _start_reconnect_loop(self) -> None:
        if self.done or self.client_lost or self.closed_to_client or self._reconnect_d is not None:
            return
        self.reconnecting = True
        self._reconnect_d = Deferred.fromCoroutine(self._reconnect_loop())
        self._reconnect_d.addErrback(self._loop_failed)

    def _loop_failed(self, f: Failure) -> None:
        if not f.check(CancelledError):
            self.log.failure("durable reconnect loop failed", f)

    async def _reconnect_loop(self) -> None:
        delay = self.link.retry_initial
        while self.reconnecting and not self.done:
            try:
                # the leg announces its first seq: what is being appended now may be it
                await self._appends_settled()
                first = await self.link.store.pending_for(self.link.conn_key, 1)
                self.leg_seq = first[0].seq if first else self.reader.next_seq if self.reader else 1
                assert self._reconnect is not None
                await self._reconnect(self)
                return
            except CancelledError:
                return
            except Exception as e:
                if not self.reconnecting or self.done:
                    return
                self.log.debug("upstream still unreachable: {error}", error=str(e))
                sleep: Deferred[None] = Deferred(lambda d: call.cancel())
                call = self._clock.callLater(delay, sleep.callback, None)
                await sleep
                delay = min(delay * 2, RETRY_MAX)

    def _stop_reconnecting(self) -> None:
        # Relay's version also drops held bytes; here they are in the store.
        self.reconnecting = False
        d, self._reconnect_d = self._reconnect_d, None
        if d is not None:
            d.cancel()

    # -- a new leg: flush, then live ----------------------------------------------

    def upstream_reconnected(self, transport: Any) -> Any:
        leg = super().upstream_reconnected(_Recording(transport, self._sent))
        self._reconnect_d = None
        self._flush_d = Deferred.fromCoroutine(self._flush())
        self._flush_d.addErrback(self._loop_failed)
        return leg

    async def _flush(self) -> None:
        self.flushing = True
        store, key = self.link.store, self.link.conn_key
        next_seq = self.leg_seq  # what the upstream counts the next message as
        while self.flushing and not self.done and self.upstream is not None:
            busy, gen = self._appending, self._append_gen
            try:
                entries: list[Entry] = await store.pending_for(key, FLUSH_BATCH)
            except QueueUnavailable:
                self._flush_failed()
                return
            if not self.flushing or self.upstream is None:
                return
            if not entries:
                if not busy and not self._appending and gen == self._append_gen:
                    if self.reader is not None and self.reader.next_seq != next_seq:
                        self._renumber()
                        return
                    self._go_live()
                    return
                await self._appends_settled()
                continue
            if entries[0].seq != next_seq:
                # entries dead-lettered or purged meanwhile: the upstream would count wrong
                self._renumber()
                return
            entries = consecutive(entries)
            next_seq = entries[-1].seq + 1
            self._flush_batch = entries
            self.upstream.write(b"".join(
                encode_frame(OP_BINARY if e.binary else OP_TEXT, e.message, mask=True) for e in entries
            ))
            timer = self._clock.callLater(CONFIRM_TIMEOUT, self._confirm_timed_out)
            ok = True
            for _ in range(2):  # two rounds, as for live messages (module docstring)
                confirmed: Deferred[bool] = Deferred()
                self._send_confirm(0, confirmed, direct=True)
                ok = await confirmed
                if not ok:
                    break
            if timer.active():
                timer.cancel()
            if not ok or not self._flush_batch:
                return  # the leg was lost: its handler counted the attempt
            self._flush_batch = []
            try:
                await store.ack([e.id for e in entries])
            except QueueUnavailable:
                self._flush_failed()
                return
            self.delivered += len(entries)
            self.link.on_delivered(len(entries))

    def _renumber(self) -> None:
        """A gap in the seqs this leg carries: a new leg, whose X-Wsgateway-Seq says where it starts."""
        self.log.info("gap in queued sequence numbers: opening a new upstream leg")
        self.flushing = False
        if self.upstream is not None and not self.upstream_lost:
            self.upstream.write(encode_close(codes.GOING_AWAY, "renumbering", mask=True))
            self._upstream_going = True
            lose(self.upstream)

    def _confirm_timed_out(self) -> None:
        if self.upstream is not None and not self.upstream_lost:
            self.log.warn("upstream did not confirm delivered entries in time: dropping it")
            self.upstream.abortConnection()

    def _flush_failed(self) -> None:
        self.link.on_failure("read")
        self.log.error("queue unavailable while delivering: closing the client with 1011")
        self.flushing = False
        self.close(codes.INTERNAL_ERROR, "queue unavailable")

    def _go_live(self) -> None:
        """Nothing of this client is queued any more: relay its stream again, from where the reader is."""
        reader = self.reader
        assert reader is not None
        rest = reader.rest()
        self.reader = None
        self.flushing = False
        self.reconnecting = False
        self.window = Window(reader.next_seq - 1)
        self._confirmed_mark = 0
        if rest:
            self.upstream.write(rest)  # kept in the window from here on
        self.log.info("queue delivered: relaying live again")
        self._maybe_resume()

    # -- the gateway's and the client's closes while holding -------------------

    def _from_client(self, opcode: int, payload: bytes) -> bool:
        if self.reader is None or opcode != OP_CLOSE:
            return super()._from_client(opcode, payload)
        self.close_from_client = True
        self._note_close(CLIENT, payload)
        self._stop_reconnecting()
        self._stop_flushing()
        if self.closed_to_client:
            self._clock.callLater(0, self._finish_client)
        else:
            code, reason = parse_close(payload)
            self._close_client(code or codes.NORMAL, reason)
            self._clock.callLater(0, self._finish_client)
        return False

    def _stop_flushing(self) -> None:
        """End a flush leg (its unconfirmed batch stays queued for the replay)."""
        self.flushing = False
        if self.upstream is not None and not self.upstream_lost:
            self.closed_to_upstream = True
            self.upstream.write(encode_close(codes.GOING_AWAY, "client gone", mask=True))
            lose(self.upstream)

    def _close_upstream(self, code: int, reason: str) -> None:
        if self.reader is None:
            super()._close_upstream(code, reason)
            return
        self._stop_reconnecting()
        self._stop_flushing()

    def _ping(self) -> None:
        if self.reader is not None and not self.upstream_lost:
            # A flush leg has its own confirmations; the client's stream is not its stream.
            self.upstream_lost = True
            try:
                super()._ping()
            finally:
                self.upstream_lost = False
            return
        super()._ping()

    def _maybe_done(self) -> None:
        if self.client_lost and self.upstream_lost:
            self._cancel_confirm_call()
        if not self.done and self.client_lost and not self.upstream_lost and self.reader is not None:
            self._stop_flushing()
        super()._maybe_done()
