# -*- test-case-name: tests.test_durable_relay_units -*-
"""
Protocol-unit tests of durable delivery's state machine
(L{wsgateway.durable.relay.DurableDelivery}, the hooks of a L{Relay}; STYLE
2.7, layer 2): in-memory transports, a L{task.Clock} and an in-memory queue
store whose writes complete when the test says so. No reactor, no sockets.

What is checked (docs/durable-delivery.md): confirm pacing (a ping per
CONFIRM_INTERVAL or per CONFIRM_BYTES, two pongs before the window lets a
message go), the window cap, holding on loss (the unconfirmed window and
what follows appended, the client not read while an append is in flight,
its pings answered by the gateway, 1014 when the stream cannot go on), the
reconnect loop's backoff, the flush of queued entries on a new leg (two
confirmations per batch, then ack, then live), and the closes while holding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from support.relay_harness import FakeTransport, c_frame, parse_frames, u_frame
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed

from wsgateway.durable.confirmations import CONFIRM_BYTES, CONFIRM_INTERVAL
from wsgateway.durable.entries import Entry, NewEntry, QueueFull
from wsgateway.durable.relay import CONFIRM_TIMEOUT, DurableDelivery
from wsgateway.durable.replay import CONN_HEADER, SEQ_HEADER, QueueLink
from wsgateway.relay.codec import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, encode_close
from wsgateway.relay.relay import Relay

# -- test doubles ----------------------------------------------------------------


@dataclass
class MemoryStore:
    """
    The queue store's calls that a durable relay makes, kept in memory. With
    ``manual`` the appends wait in ``pending_appends`` until the test fires
    them (a write in flight); otherwise every call answers at once.
    """

    manual: bool = False
    entries: list[Entry] = field(default_factory=list)
    acked: list[Any] = field(default_factory=list)
    attempts: list[Any] = field(default_factory=list)
    pending_appends: list[tuple[Deferred[list[int]], list[NewEntry]]] = field(default_factory=list)
    _next_id: int = 1

    def _store(self, new: list[NewEntry]) -> list[int]:
        ids = []
        for e in new:
            ids.append(self._next_id)
            self.entries.append(Entry(self._next_id, f"ulid{self._next_id}", e.route, e.conn_key, e.seq, e.binary,
                                      e.message, dict(e.claims), tuple(e.headers), e.trace_id, 0, 0.0, 0.0))
            self._next_id += 1
        return ids

    def append(self, new: list[NewEntry]) -> Deferred[list[int]]:
        if not self.manual:
            return succeed(self._store(new))
        d: Deferred[list[int]] = Deferred()
        self.pending_appends.append((d, new))
        return d

    def finish_appends(self) -> None:
        pending, self.pending_appends = self.pending_appends, []
        for d, new in pending:
            d.callback(self._store(new))

    def pending_for(self, key: str, limit: int) -> Deferred[list[Entry]]:
        return succeed([e for e in self.entries if e.conn_key == key][:limit])

    def ack(self, ids: list[Any]) -> Deferred[None]:
        self.acked += ids
        self.entries = [e for e in self.entries if e.id not in ids]
        return succeed(None)

    def attempt_failed(self, ids: list[Any]) -> Deferred[None]:
        self.attempts += ids
        return succeed(None)

    def messages(self) -> list[bytes]:
        return [e.message for e in self.entries]


class Legs:
    """The factory's side of a reconnect: each attempt waits for the test to open or fail it."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Deferred[None], dict[str, str]]] = []

    def __call__(self, relay: Any) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.attempts.append((d, relay.hooks.leg_headers()))
        return d

    def open(self, relay: Relay) -> FakeTransport:
        d, _ = self.attempts[-1]
        t = FakeTransport()
        relay.upstream_reconnected(t)
        d.callback(None)
        return t

    def fail(self) -> None:
        self.attempts[-1][0].errback(ConnectionRefusedError("no node"))


@dataclass
class Harness:
    relay: Relay
    delivery: DurableDelivery
    client: FakeTransport
    upstream: FakeTransport | None
    clock: task.Clock
    store: MemoryStore
    legs: Legs
    done: list[Any]
    failures: list[str]

    def send(self, payload: bytes, opcode: int = OP_TEXT) -> bytes:
        data = c_frame(opcode, payload)
        self.relay.client_data(data)
        return data


def make(*, upstream: bool = True, manual: bool = False, write_buffer: int = 1 << 20, **kw: Any) -> Harness:
    clock = task.Clock()
    client = FakeTransport()
    up = FakeTransport() if upstream else None
    store = MemoryStore(manual=manual)
    legs = Legs()
    done: list[Any] = []
    failures: list[str] = []
    link = QueueLink(store=store, route="r", conn_key="c0ffee", headers=((":path", "/"),), retry_initial=0.1,
                     on_failure=failures.append)
    opts: dict[str, Any] = dict(clock=clock, max_message_size=1 << 20, write_buffer=write_buffer, idle_timeout=0,
                                ping_interval=0, ping_timeout=0, close_timeout=5.0, on_done=done.append)
    opts.update(kw)
    delivery = DurableDelivery(link, legs, clock=clock, write_buffer=write_buffer)
    relay = Relay(client, up, hooks=delivery, **opts)
    return Harness(relay, delivery, client, up, clock, store, legs, done, failures)


def pings(t: FakeTransport) -> list[bytes]:
    return [f.payload for f in parse_frames(t.value()) if f.opcode == OP_PING]


def data_payloads(t: FakeTransport) -> list[bytes]:
    return [f.payload for f in parse_frames(t.value()) if f.opcode in (OP_TEXT, OP_BINARY)]


def pong(relay: Relay, payload: bytes) -> None:
    relay.upstream_data(u_frame(OP_PONG, payload))


def confirm_twice(h: Harness, upstream: FakeTransport) -> None:
    """Answer the confirming pings the way an upstream does, two rounds."""
    for _ in range(2):
        p = pings(upstream)[-1]
        pong(h.relay, p)


# -- live: the window and confirm pacing ---------------------------------------------


def test_a_plain_message_is_relayed_and_kept_until_two_pongs() -> None:
    h = make()
    raw = h.send(b"m1")
    assert h.upstream is not None and h.upstream.value() == raw  # relayed as is, no ping yet
    window = h.delivery.confirms.window
    assert window is not None and bytes(window.buf) == raw
    h.clock.advance(CONFIRM_INTERVAL)
    [first] = pings(h.upstream)
    assert first.startswith(b"wsgq")
    pong(h.relay, first)
    # one round proves it read, not yet that the connection stayed up
    assert window.base_seq == 0 and bytes(window.buf).startswith(raw)
    h.clock.advance(CONFIRM_INTERVAL)
    second = pings(h.upstream)[-1]
    pong(h.relay, second)
    assert window.base_seq == 1 and not bytes(window.buf).startswith(raw)  # only our pings are left
    assert h.client.value() == b""  # confirming pongs never reach the client


def test_confirming_pings_are_paced_not_one_per_message() -> None:
    h = make()
    for i in range(50):
        h.send(b"m%d" % i)
    assert h.upstream is not None and pings(h.upstream) == []
    h.clock.advance(CONFIRM_INTERVAL)
    assert len(pings(h.upstream)) == 1


def test_a_window_of_confirm_bytes_pings_at_once() -> None:
    h = make()
    h.send(b"x" * CONFIRM_BYTES, OP_BINARY)
    assert h.upstream is not None and len(pings(h.upstream)) == 1  # no waiting for the interval


def test_the_window_cap_pauses_the_client_until_confirmed() -> None:
    h = make(write_buffer=1024)  # cap = 1 MiB at least
    for _ in range(17):
        h.send(b"y" * 65536, OP_BINARY)
    assert h.client.producerState == "paused"
    assert h.upstream is not None
    for _ in range(3):
        pong(h.relay, pings(h.upstream)[-1])
    assert h.client.producerState == "producing"


def test_the_upstream_pausing_the_client_is_kept_while_the_window_is_over_the_cap() -> None:
    h = make()
    assert h.upstream is not None
    h.upstream.producer.pauseProducing()  # its write buffer is full
    assert h.client.producerState == "paused"
    h.upstream.producer.resumeProducing()
    assert h.client.producerState == "producing"


def test_leg_headers_carry_the_connection_and_its_first_seq() -> None:
    h = make()
    assert h.delivery.leg_headers() == {CONN_HEADER: "c0ffee", SEQ_HEADER: "1"}


# -- holding: loss and append ----------------------------------------------------------


def test_a_vanished_upstream_queues_the_unconfirmed_window_and_what_follows() -> None:
    h = make()
    h.send(b"m1")
    h.send(b"m2")
    assert h.upstream is not None
    h.relay.upstream_leg.connectionLost(None)  # no close frame
    assert h.relay.holding and h.relay.reconnecting and h.relay.upstream_vanished
    assert h.store.messages() == [b"m1", b"m2"]
    h.send(b"m3")
    assert h.store.messages() == [b"m1", b"m2", b"m3"]
    assert [e.seq for e in h.store.entries] == [1, 2, 3]
    assert h.client.value() == b""  # the client sees nothing of it
    assert len(h.legs.attempts) == 1 and h.legs.attempts[0][1][SEQ_HEADER] == "1"


def test_confirmed_messages_are_not_queued_again() -> None:
    h = make()
    h.send(b"m1")
    assert h.upstream is not None
    h.clock.advance(CONFIRM_INTERVAL)
    pong(h.relay, pings(h.upstream)[-1])
    h.send(b"m2")
    h.clock.advance(CONFIRM_INTERVAL)
    pong(h.relay, pings(h.upstream)[-1])  # confirms m1 (the round before), not m2
    h.relay.upstream_connection_lost()
    assert h.store.messages() == [b"m2"] and h.store.entries[0].seq == 2


def test_the_client_is_not_read_while_an_append_is_in_flight() -> None:
    h = make(upstream=False, manual=True)
    h.send(b"m1")
    assert h.client.producerState == "paused"
    assert h.store.messages() == []  # not queued until the store says so
    assert h.delivery.left_queued  # in flight counts
    h.store.finish_appends()
    assert h.client.producerState == "producing"
    assert h.delivery.queued == 1 and h.store.messages() == [b"m1"]


def test_holding_answers_the_clients_pings() -> None:
    h = make(upstream=False)
    h.relay.client_data(c_frame(OP_PING, b"hi"))
    [f] = parse_frames(h.client.value())
    assert (f.opcode, f.payload, f.masked) == (OP_PONG, b"hi", False)


def test_holding_answers_a_ping_only_once_the_messages_before_it_are_stored() -> None:
    """A pong while holding means: what you sent before the ping is in the queue."""
    h = make(upstream=False, manual=True)
    h.relay.client_data(c_frame(OP_TEXT, b"m1") + c_frame(OP_PING, b"after m1"))
    assert h.client.value() == b""  # m1's write is in flight
    h.store.finish_appends()
    [f] = parse_frames(h.client.value())
    assert (f.opcode, f.payload) == (OP_PONG, b"after m1") and h.store.messages() == [b"m1"]


def test_pings_behind_a_refused_message_get_no_pong() -> None:
    h = make(upstream=False, manual=True)
    h.relay.client_data(c_frame(OP_TEXT, b"m1") + c_frame(OP_PING, b"after m1"))
    d, _ = h.store.pending_appends.pop()
    d.errback(QueueFull("this connection's share is used up", whole=False))
    assert [f.opcode for f in parse_frames(h.client.value())] == [OP_CLOSE]


def test_an_upstream_going_away_is_answered_and_its_window_queued() -> None:
    h = make()
    h.send(b"m1")
    assert h.upstream is not None
    h.relay.upstream_data(u_frame(OP_CLOSE, encode_close(1012, "restart", mask=False)[2:]))
    closes = [f for f in parse_frames(h.upstream.value()) if f.opcode == OP_CLOSE]
    assert [f.close[0] for f in closes] == [1012] and h.upstream.lose_calls == 1
    h.relay.upstream_connection_lost()
    assert h.store.messages() == [b"m1"] and h.relay.holding
    assert h.client.value() == b""


def test_an_upstream_that_ends_the_session_itself_queues_nothing() -> None:
    h = make()
    h.send(b"m1")
    h.relay.upstream_data(u_frame(OP_CLOSE, encode_close(1000, "bye", mask=False)[2:]))
    h.relay.upstream_connection_lost()
    assert h.store.messages() == [] and not h.relay.holding
    assert [f.close for f in parse_frames(h.client.value()) if f.opcode == OP_CLOSE] == [(1000, "bye")]


def test_loss_in_the_middle_of_an_upstream_message_queues_then_closes_the_client_1014() -> None:
    h = make()
    h.send(b"m1")
    h.relay.upstream_data(u_frame(OP_TEXT, b"part", fin=False))
    h.relay.upstream_connection_lost()
    assert h.store.messages() == [b"m1"]
    assert h.client.abort_calls == 1 or [f.close[0] for f in parse_frames(h.client.value())
                                         if f.opcode == OP_CLOSE] == [1014]
    assert not h.relay.reconnecting


def test_a_failed_append_closes_the_client_1011() -> None:
    h = make(upstream=False, manual=True)
    h.send(b"m1")
    d, _ = h.store.pending_appends.pop()
    d.errback(OSError("disk full"))
    closes = [f.close for f in parse_frames(h.client.value()) if f.opcode == OP_CLOSE]
    assert closes == [(1011, "queue unavailable")]


def test_an_append_refused_by_the_queue_bounds_closes_the_client_1013_queue_full() -> None:
    h = make(upstream=False, manual=True)
    h.send(b"m1")
    d, _ = h.store.pending_appends.pop()
    d.errback(QueueFull("connection c over max_bytes_per_connection", whole=False))
    closes = [f.close for f in parse_frames(h.client.value()) if f.opcode == OP_CLOSE]
    assert closes == [(1013, "queue full")]
    assert h.failures == []  # a client over its share is no failing store (wsgateway_queue_failures_total)


# -- reconnect loop, flush, live again ------------------------------------------------


def test_the_reconnect_loop_backs_off_until_a_leg_opens() -> None:
    h = make(upstream=False)
    assert h.legs.attempts == []  # on the next turn: the caller finishes wiring first
    h.clock.advance(0)
    assert len(h.legs.attempts) == 1
    h.legs.fail()
    assert len(h.legs.attempts) == 1
    h.clock.advance(0.1)
    assert len(h.legs.attempts) == 2
    h.legs.fail()
    h.clock.advance(0.1)
    assert len(h.legs.attempts) == 2  # doubled: 0.2 s
    h.clock.advance(0.1)
    assert len(h.legs.attempts) == 3


def test_a_new_leg_gets_the_queue_first_confirmed_twice_then_acked_then_live() -> None:
    h = make(upstream=False)
    h.send(b"q1")
    h.send(b"q2")
    h.clock.advance(0)
    assert h.legs.attempts[-1][1][SEQ_HEADER] == "1"
    leg = h.legs.open(h.relay)
    assert data_payloads(leg) == [b"q1", b"q2"] and h.delivery.flushing
    h.send(b"during")  # still holding: queued behind them
    assert h.store.messages() == [b"q1", b"q2", b"during"]
    pong(h.relay, pings(leg)[-1])
    assert h.store.acked == []
    pong(h.relay, pings(leg)[-1])
    # q1, q2 acked; "during" is the next batch on the same leg
    assert h.store.acked == [1, 2] and data_payloads(leg) == [b"q1", b"q2", b"during"]
    confirm_twice(h, leg)
    assert h.store.entries == [] and h.delivery.delivered == 3
    assert not h.relay.holding and not h.delivery.flushing and not h.relay.reconnecting
    raw = h.send(b"live")
    assert leg.value().endswith(raw)  # relayed as is again
    assert h.clock.getDelayedCalls() and not h.delivery.left_queued


def test_a_batch_not_confirmed_in_time_drops_the_leg_and_counts_an_attempt() -> None:
    h = make(upstream=False)
    h.send(b"q1")
    h.clock.advance(0)
    leg = h.legs.open(h.relay)
    h.clock.advance(CONFIRM_TIMEOUT)
    assert leg.abort_calls == 1
    h.relay.upstream_connection_lost()
    assert h.store.attempts == [1] and h.store.messages() == [b"q1"]
    assert h.relay.reconnecting  # and looking for another leg


def test_the_flush_leg_does_not_get_the_keepalive_ping() -> None:
    h = make(upstream=False, ping_interval=10, ping_timeout=5)
    h.send(b"q1")
    h.clock.advance(0)
    leg = h.legs.open(h.relay)
    before = pings(leg)
    h.clock.advance(10)
    assert pings(leg) == before  # only the flush's own confirmations go there
    assert [f.opcode for f in parse_frames(h.client.value())] == [OP_PING]


# -- closes while holding -----------------------------------------------------------------


def test_a_client_close_while_holding_is_answered_by_the_gateway() -> None:
    h = make(upstream=False)
    h.clock.advance(0)
    h.relay.client_data(c_frame(OP_CLOSE, encode_close(1000, "bye", mask=False)[2:]))
    assert [f.close for f in parse_frames(h.client.value()) if f.opcode == OP_CLOSE] == [(1000, "bye")]
    assert not h.relay.reconnecting
    h.clock.advance(0)
    assert h.client.lose_calls == 1
    h.relay.client_connection_lost()
    assert h.done == [h.relay] and h.clock.getDelayedCalls() == []


def test_a_client_close_during_a_flush_ends_the_flush_leg_with_1001() -> None:
    h = make(upstream=False)
    h.send(b"q1")
    h.clock.advance(0)
    leg = h.legs.open(h.relay)
    h.relay.client_data(c_frame(OP_CLOSE, encode_close(1000, "", mask=False)[2:]))
    assert [f.close for f in parse_frames(leg.value()) if f.opcode == OP_CLOSE] == [(1001, "client gone")]
    assert not h.delivery.flushing and h.store.messages() == [b"q1"]  # left for the replay


def test_the_client_leaving_with_an_unconfirmed_window_waits_for_the_upstream_close() -> None:
    h = make()
    h.send(b"m1")
    assert h.upstream is not None
    h.relay.client_connection_lost()
    assert [f.close for f in parse_frames(h.upstream.value()) if f.opcode == OP_CLOSE] == [(1001, "client gone")]
    assert h.upstream.lose_calls == 0  # its answer confirms the window
    h.relay.upstream_data(u_frame(OP_CLOSE, encode_close(1001, "", mask=False)[2:]))
    h.relay.upstream_connection_lost()
    assert h.store.messages() == [] and h.done == [h.relay]


def test_the_client_leaving_with_no_answer_queues_the_window_for_replay() -> None:
    h = make()
    h.send(b"m1")
    assert h.upstream is not None
    h.relay.client_connection_lost()
    h.clock.advance(5.0)  # the close timer
    assert h.upstream.abort_calls == 1
    h.relay.upstream_connection_lost()
    assert h.store.messages() == [b"m1"] and h.delivery.left_queued
    assert h.done == [h.relay] and h.clock.getDelayedCalls() == []
