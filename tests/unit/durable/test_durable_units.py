"""
The pure parts of durable delivery (docs/durable-delivery.md), without sockets:
MessageReader (whole client messages out of the masked stream, and the raw
rest of an open one), Window.confirm (what a pong lets go), consecutive()
and replay_request() (what one replay connection carries and asks for), and
the Deliverer's pass over a real SQLiteQueueStore, with an injected clock
and a recording replay callable standing in for the replay connection.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater

from support.rawws import OP_BINARY, OP_CONT, OP_PING, OP_PONG, OP_TEXT, frame
from wsgateway.durable.delivery import Deliverer
from wsgateway.durable.clientstream import Message, MessageReader, Window
from wsgateway.durable.replay import CONN_HEADER, REPLAY_HEADER, SEQ_HEADER, consecutive, replay_request, stored_headers
from wsgateway.relay.codec import encode_frame
from wsgateway.durable.entries import Entry, NewEntry
from wsgateway.durable.sqlite import SQLiteQueueStore
from wsgateway.upstream.pool import UpstreamError, UpstreamRequest

T0 = 1_700_000_000.0


def feed_all(reader: MessageReader, chunks: list[bytes]) -> tuple[list[Message], list[bytes]]:
    messages: list[Message] = []
    pings: list[bytes] = []
    for c in chunks:
        m, p = reader.feed(c)
        messages += m
        pings += p
    return messages, pings


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# -- MessageReader -------------------------------------------------------------


def stream() -> tuple[bytes, list[tuple[bool, bytes]], list[bytes]]:
    """A masked client stream, the messages in it as (binary, payload), and its ping payloads."""
    parts = [
        frame(OP_TEXT, "héllo".encode()),
        frame(OP_BINARY, bytes(range(256))),
        frame(OP_TEXT, b"", fin=True),  # an empty message is a message
        # fragmented text with a ping between the fragments
        frame(OP_TEXT, b"frag-one,", fin=False),
        frame(OP_PING, b"are you there"),
        frame(OP_CONT, b"frag-two,", fin=False),
        frame(OP_CONT, b"frag-three", fin=True),
        frame(OP_PONG, b"unsolicited"),
        # fragmented binary: the flag comes from the first frame
        frame(OP_BINARY, b"\x00\x01", fin=False),
        frame(OP_CONT, b"\x02\x03", fin=True),
        frame(OP_PING, b""),
        frame(OP_TEXT, b"last"),
    ]
    messages = [
        (False, "héllo".encode()),
        (True, bytes(range(256))),
        (False, b""),
        (False, b"frag-one,frag-two,frag-three"),
        (True, b"\x00\x01\x02\x03"),
        (False, b"last"),
    ]
    return b"".join(parts), messages, [b"are you there", b""]


@pytest.mark.parametrize("size", [1, 3, 7, 64, 1 << 20], ids=lambda s: f"chunks-of-{s}")
def test_reader_gives_the_same_messages_whatever_the_chunking(size: int) -> None:
    data, expected, expected_pings = stream()
    reader = MessageReader(41)
    messages, pings = feed_all(reader, split(data, size))
    assert [(m.seq, m.binary, m.payload) for m in messages] == [
        (41 + i, binary, payload) for i, (binary, payload) in enumerate(expected)
    ]
    assert pings == expected_pings
    assert reader.next_seq == 41 + len(expected)
    assert reader.rest() == b""


def test_reader_reports_a_ping_between_fragments_without_completing_the_message() -> None:
    first = frame(OP_TEXT, b"abc", fin=False)
    ping = frame(OP_PING, b"p1")
    last = frame(OP_CONT, b"def")
    reader = MessageReader(1)
    assert reader.feed(first) == ([], [])
    assert reader.feed(ping) == ([], [b"p1"])
    # the ping is not part of the open message
    assert reader.rest() == first
    messages, pings = reader.feed(last)
    assert pings == [] and [(m.seq, m.binary, m.payload) for m in messages] == [(1, False, b"abcdef")]


def test_rest_is_the_raw_open_message_and_continues_the_stream() -> None:
    done = frame(OP_TEXT, b"complete")
    frag1 = frame(OP_BINARY, b"first half|", fin=False)
    ping = frame(OP_PING, b"between")
    frag2 = frame(OP_CONT, b"second half|", fin=False)
    frag3 = frame(OP_CONT, b"end")
    after = frame(OP_TEXT, b"next message")
    cut = 5  # inside frag3's header and mask
    head = done + frag1 + ping + frag2 + frag3[:cut]
    reader = MessageReader(7)
    messages, pings = reader.feed(head)
    assert [(m.seq, m.payload) for m in messages] == [(7, b"complete")]
    assert pings == [b"between"]
    rest = reader.rest()
    # exactly the open message's frames as received, then the incomplete frame: not the ping
    assert rest == frag1 + frag2 + frag3[:cut]
    assert reader.next_seq == 8

    # Written upstream, the rest followed by what the client sends next is a
    # valid stream again: the next reader (or upstream) sees whole messages.
    continued = MessageReader(reader.next_seq)
    messages, pings = continued.feed(rest + frag3[cut:] + after)
    assert pings == []
    assert [(m.seq, m.binary, m.payload) for m in messages] == [
        (8, True, b"first half|second half|end"),
        (9, False, b"next message"),
    ]
    assert continued.rest() == b""


def test_rest_of_a_frame_header_alone() -> None:
    reader = MessageReader(1)
    big = frame(OP_TEXT, b"x" * 70_000)
    assert reader.feed(big[:3]) == ([], [])
    assert reader.rest() == big[:3]
    assert reader.feed(big[3:20]) == ([], [])
    assert reader.rest() == big[:20]


@pytest.mark.parametrize("n", [125, 126, 65535, 65536, 70_001], ids=lambda n: f"{n}-bytes")
def test_reader_handles_16_and_64_bit_lengths(n: int) -> None:
    payload = os.urandom(n)
    data = frame(OP_BINARY, payload) + encode_frame(OP_TEXT, b"t" * n, mask=True)
    if n >= 0x10000:
        assert data[1] & 0x7F == 127  # 64-bit length
    elif n >= 126:
        assert data[1] & 0x7F == 126
    expected = [(3, True, payload), (4, False, b"t" * n)]
    for chunks in ([data], split(data, 1), split(data, 4093)):
        reader = MessageReader(3)
        messages, pings = feed_all(reader, chunks)
        assert [(m.seq, m.binary, m.payload) for m in messages] == expected
        assert pings == [] and reader.rest() == b""


def test_a_64_bit_length_fragment_in_an_open_message_is_kept_raw() -> None:
    payload = os.urandom(65536)
    frag = frame(OP_BINARY, payload, fin=False)
    reader = MessageReader(1)
    assert feed_all(reader, split(frag, 1000)) == ([], [])
    assert reader.rest() == frag
    messages, _ = reader.feed(frame(OP_CONT, b"!"))
    assert [m.payload for m in messages] == [payload + b"!"]


# -- Window.confirm ------------------------------------------------------------


def test_confirm_trims_whole_messages_before_the_mark() -> None:
    a = frame(OP_TEXT, b"a" * 10)
    b = frame(OP_BINARY, b"b" * 300)
    c = frame(OP_TEXT, b"c")
    w = Window(10, a + b + c)
    assert (w.base_seq, len(w), w.total) == (10, len(a + b + c), len(a + b + c))
    w.confirm(len(a + b))
    assert w.base_seq == 12 and bytes(w.buf) == c
    w.confirm(len(a + b + c))
    assert w.base_seq == 13 and len(w) == 0
    # a mark already behind the window changes nothing
    w.confirm(len(a))
    assert w.base_seq == 13 and len(w) == 0


def test_confirm_keeps_a_frame_the_mark_falls_inside() -> None:
    a = frame(OP_TEXT, b"a" * 20)
    b = frame(OP_TEXT, b"b" * 20)
    w = Window(0, a + b)
    w.confirm(len(a) + len(b) - 1)
    assert w.base_seq == 1 and bytes(w.buf) == b
    w.confirm(len(a) + 1)  # inside b's header
    assert w.base_seq == 1 and bytes(w.buf) == b
    w.confirm(len(a))
    assert w.base_seq == 1 and bytes(w.buf) == b


def test_confirm_never_cuts_inside_a_fragmented_message() -> None:
    whole = frame(OP_TEXT, b"whole")
    f1 = frame(OP_TEXT, b"f1", fin=False)
    ping = frame(OP_PING, b"p")
    f2 = frame(OP_CONT, b"f2", fin=False)
    f3 = frame(OP_CONT, b"f3")
    w = Window(5, whole + f1 + ping + f2)
    w.confirm(w.total)  # the fragmented message is still open: only `whole` goes
    assert w.base_seq == 6 and bytes(w.buf) == f1 + ping + f2
    w.add(f3)
    w.confirm(w.total - 1)  # f3 not wholly confirmed
    assert w.base_seq == 6 and bytes(w.buf) == f1 + ping + f2 + f3
    w.confirm(w.total)
    assert w.base_seq == 7 and len(w) == 0


def test_confirm_skips_control_frames_and_counts_only_messages() -> None:
    ping = frame(OP_PING, b"1")
    pong = frame(OP_PONG, b"2")
    a = frame(OP_TEXT, b"a")
    b = frame(OP_BINARY, b"b")
    w = Window(0)
    w.add(ping + a + pong)
    mark = w.total
    w.add(ping + b + ping)
    w.confirm(mark)
    assert w.base_seq == 1 and bytes(w.buf) == ping + b + ping
    # the control frames alone confirmed: they are dropped, but no message is counted
    w.confirm(mark + len(ping))
    assert w.base_seq == 1 and bytes(w.buf) == b + ping
    w.confirm(w.total)
    assert w.base_seq == 2 and len(w) == 0


def test_confirm_works_on_stream_offsets_as_the_window_grows() -> None:
    msgs = [frame(OP_TEXT, b"m%d" % i * (i * 1000 + 1)) for i in range(5)]  # up to 16-bit lengths
    big = frame(OP_BINARY, b"B" * 70_000)  # 64-bit length
    w = Window(100)
    marks = []
    for m in [*msgs, big]:
        w.add(m)
        marks.append(w.total)
    w.confirm(marks[1])
    assert w.base_seq == 102 and bytes(w.buf) == b"".join(msgs[2:]) + big
    w.confirm(marks[-1] - 1)
    assert w.base_seq == 105 and bytes(w.buf) == big
    w.confirm(marks[-1])
    assert w.base_seq == 106 and len(w) == 0 and w.total == marks[-1]


# -- consecutive() and replay_request() -----------------------------------------


def make_entry(seq: int, *, id: int | None = None, conn: str = "conn-1", headers: tuple[tuple[str, str], ...] = (),
               trace_id: str | None = None) -> Entry:
    return Entry(id=id if id is not None else seq, entry_id=f"E{seq:025d}", route="main", conn_key=conn, seq=seq,
                 binary=False, message=b"m%d" % seq, claims={}, headers=headers, trace_id=trace_id, attempts=0,
                 first_seen=T0, enqueued_at=T0)


def test_consecutive_is_the_leading_run_of_seqs() -> None:
    assert consecutive([]) == []
    one = make_entry(4)
    assert consecutive([one]) == [one]
    run = [make_entry(s) for s in (3, 4, 5, 7, 8)]
    assert [e.seq for e in consecutive(run)] == [3, 4, 5]
    assert [e.seq for e in consecutive(run[3:])] == [7, 8]
    # a repeated seq is not the next one
    assert [e.seq for e in consecutive([make_entry(1), make_entry(1, id=9)])] == [1]


def test_stored_headers_leave_out_credentials_and_the_gateways_own() -> None:
    stored = stored_headers(
        "/chat/room?x=1",
        {"X-User-Id": "alice", "AUTHORIZATION": "Bearer secret", "Cookie": "sid=secret", "cookie": "b=2",
         "X-Wsgateway-Seq": "9", "x-wsgateway-conn-id": "old", "X-Wsgateway-Replay": "1", "X-Roles": "a,b"},
        "v2.chat",
        "https://app.example",
    )
    assert stored == ((":path", "/chat/room?x=1"), (":subprotocol", "v2.chat"), (":origin", "https://app.example"),
                      ("X-User-Id", "alice"), ("X-Roles", "a,b"))
    assert "secret" not in repr(stored)
    assert stored_headers("/", {}, None, None) == ((":path", "/"),)


def test_replay_request_gives_the_request_fields_and_the_replay_headers() -> None:
    headers = stored_headers("/chat/room?x=1", {"X-User-Id": "alice", "Authorization": "Bearer secret"},
                             "v2.chat", "https://app.example")
    entries = [make_entry(s, conn="conn-42", headers=headers, trace_id="4bf92f3577b34da6a3ce929d0e0e4736")
               for s in (17, 18)]
    req = replay_request(entries, UpstreamRequest)
    assert isinstance(req, UpstreamRequest)
    assert req.resource == "/chat/room?x=1"
    assert req.protocols == ("v2.chat",)
    assert req.origin == "https://app.example"
    assert req.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert req.headers == {"X-User-Id": "alice", REPLAY_HEADER: "1", CONN_HEADER: "conn-42", SEQ_HEADER: "17"}
    assert "Authorization" not in req.headers and "Cookie" not in req.headers
    assert REPLAY_HEADER == "X-Wsgateway-Replay" and CONN_HEADER == "X-Wsgateway-Conn-Id"
    assert SEQ_HEADER == "X-Wsgateway-Seq"


def test_replay_request_without_path_protocol_or_origin() -> None:
    req = replay_request([make_entry(3, conn="c9")], UpstreamRequest)
    assert (req.resource, req.protocols, req.origin, req.trace_id) == ("/", (), None, "")
    assert req.headers == {REPLAY_HEADER: "1", CONN_HEADER: "c9", SEQ_HEADER: "3"}


# -- Deliverer over a real store ------------------------------------------------

MakeStore = Callable[..., Awaitable[SQLiteQueueStore]]


@pytest_twisted.async_yield_fixture
async def make_store(tmp_path: Path) -> AsyncIterator[MakeStore]:
    """make_store(**options) -> a started SQLiteQueueStore on tmp_path/q.sqlite, its clock at T0; stopped after."""
    made: list[SQLiteQueueStore] = []

    async def make(**options: Any) -> SQLiteQueueStore:
        clock = Clock()
        clock.advance(T0)
        store = SQLiteQueueStore(str(tmp_path / "q.sqlite"), reactor=reactor, clock=clock, **options)
        made.append(store)
        await store.start()
        return store

    yield make
    for s in made:
        await s.stop()


class FakeReplay:
    """The replay callable: records each call, answers with the next of ``answers`` (the last repeats)."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, str, list[int], list[bytes]]] = []

    def __call__(self, route: str, entries: list[Entry]) -> Deferred[bool]:
        self.calls.append((route, entries[0].conn_key, [e.seq for e in entries], [e.message for e in entries]))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            if isinstance(answer, UpstreamError):
                raise answer  # raised by the call itself, as proxy's replay does for a route gone
            return fail(answer)
        return succeed(answer)


async def until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    """Let the real reactor run (the store's thread answers through it) until ``predicate`` holds."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("condition not reached")
        await deferLater(reactor, 0.005, lambda: None)


class Passes:
    """Runs the deliverer's passes one at a time on its fake clock."""

    def __init__(self, deliverer: Deliverer, clock: Clock) -> None:
        self.deliverer = deliverer
        self.clock = clock

    async def run(self) -> None:
        if not self.deliverer.running:
            self.deliverer.start()
        else:
            self.clock.advance(self.deliverer.delay)
        # a pass is over when it has scheduled the next one
        await until(lambda: self.clock.getDelayedCalls())
        assert [c.getTime() for c in self.clock.getDelayedCalls()] == [self.clock.seconds() + self.deliverer.delay]

    async def stop(self) -> None:
        await self.deliverer.stop()
        assert self.clock.getDelayedCalls() == []


def deliverer(store: SQLiteQueueStore, replay: FakeReplay, live: set[str], delivered: list[int]) -> Passes:
    clock = Clock()
    clock.advance(T0)
    d = Deliverer(store, replay, clock=clock, live=lambda: set(live), interval=1.0, on_delivered=delivered.append)
    return Passes(d, clock)


def new(seq: int, conn: str = "c1", route: str = "chat") -> NewEntry:
    return NewEntry(route=route, conn_key=conn, seq=seq, message=b"%s-%d" % (conn.encode(), seq),
                    headers=stored_headers("/x", {"X-User-Id": "u"}, None, None))


@pytest_twisted.ensureDeferred
async def test_deliverer_skips_live_connections_and_acks_what_the_replay_confirms(make_store: MakeStore) -> None:
    store = await make_store()
    await store.append([new(1, "c1"), new(1, "c2", route="orders"), new(2, "c1")])
    replay, live = FakeReplay(True), {"c1"}
    delivered: list[int] = []
    passes = deliverer(store, replay, live, delivered)
    await passes.run()
    # c1 is held by a live relay of this gateway: its relay delivers it
    assert replay.calls == [("orders", "c2", [1], [b"c2-1"])]
    assert [(e.conn_key, e.seq, e.attempts) for e in await store.pending()] == [("c1", 1, 0), ("c1", 2, 0)]
    assert passes.deliverer.delivered == 1 and delivered == [1]

    live.clear()  # the client left
    await passes.run()
    assert replay.calls[1:] == [("chat", "c1", [1, 2], [b"c1-1", b"c1-2"])]
    assert await store.pending() == []
    assert passes.deliverer.delivered == 3 and delivered == [1, 2]
    assert passes.deliverer.failed_attempts == 0
    await passes.stop()


@pytest_twisted.ensureDeferred
async def test_deliverer_sends_a_run_per_replay_connection_in_seq_order(make_store: MakeStore) -> None:
    store = await make_store()
    # appended out of order, with a gap (seq 3 was purged or dead-lettered)
    await store.append([new(4), new(1), new(2), new(5)])
    replay = FakeReplay(True)
    delivered: list[int] = []
    passes = deliverer(store, replay, set(), delivered)
    await passes.run()
    assert [(c[2], c[3]) for c in replay.calls] == [([1, 2], [b"c1-1", b"c1-2"]), ([4, 5], [b"c1-4", b"c1-5"])]
    assert await store.pending() == [] and delivered == [2, 2]
    await passes.stop()


@pytest_twisted.ensureDeferred
async def test_a_lost_replay_connection_counts_one_attempt(make_store: MakeStore) -> None:
    store = await make_store()
    await store.append([new(1), new(2)])
    replay = FakeReplay(False, True)
    delivered: list[int] = []
    passes = deliverer(store, replay, set(), delivered)
    await passes.run()
    # one try per pass after a failure, not a loop within the pass
    assert [c[2] for c in replay.calls] == [[1, 2]]
    assert [(e.seq, e.attempts) for e in await store.pending()] == [(1, 1), (2, 1)]
    assert passes.deliverer.failed_attempts == 1 and passes.deliverer.delivered == 0 and delivered == []
    await passes.run()
    assert [c[2] for c in replay.calls] == [[1, 2], [1, 2]]
    assert await store.pending() == [] and delivered == [2]
    await passes.stop()


@pytest.mark.parametrize("error", [UpstreamError(502, "refused"), ConnectionRefusedError("refused")],
                         ids=["raised", "failed-deferred"])
@pytest_twisted.ensureDeferred
async def test_an_unreachable_upstream_counts_no_attempt(make_store: MakeStore, error: Exception) -> None:
    store = await make_store()
    await store.append([new(1), new(2), new(1, "c2")])
    replay = FakeReplay(error)
    delivered: list[int] = []
    passes = deliverer(store, replay, set(), delivered)
    for _ in range(3):
        await passes.run()
    # every pass tries each connection again; nothing is counted against the entries
    assert [c[1] for c in replay.calls] == ["c1", "c2"] * 3
    assert [(e.conn_key, e.seq, e.attempts) for e in await store.pending()] == [("c1", 1, 0), ("c1", 2, 0),
                                                                              ("c2", 1, 0)]
    assert passes.deliverer.failed_attempts == 0 and delivered == []
    assert await store.dead_letters() == []
    # passes that deliver nothing come less and less often, up to max_interval
    assert passes.deliverer.delay == 8.0
    await passes.stop()


@pytest_twisted.ensureDeferred
async def test_max_attempts_moves_entries_to_the_dead_letters(make_store: MakeStore) -> None:
    store = await make_store(max_attempts=2)
    await store.append([new(1), new(2), new(1, "c2")])
    replay = FakeReplay(False)
    delivered: list[int] = []
    passes = deliverer(store, replay, set(), delivered)
    await passes.run()
    assert [(e.conn_key, e.attempts) for e in await store.pending()] == [("c1", 1), ("c1", 1), ("c2", 1)]
    await passes.run()
    assert await store.pending() == []
    dead = await store.dead_letters()
    assert sorted((d.entry.conn_key, d.entry.seq, d.entry.attempts, d.reason) for d in dead) == [
        ("c1", 1, 2, "max_attempts"), ("c1", 2, 2, "max_attempts"), ("c2", 1, 2, "max_attempts")]
    assert passes.deliverer.failed_attempts == 4 and delivered == []
    assert (await store.depth())["chat"] == {"depth": 0, "oldest_age": 0.0, "dead": 3}
    # nothing left to try
    await passes.run()
    assert len(replay.calls) == 4
    await passes.stop()


@pytest_twisted.ensureDeferred
async def test_stopping_does_not_wait_for_a_replay_in_flight(make_store: MakeStore) -> None:
    store = await make_store()
    await store.append([new(1), new(2)])
    hanging: list[Deferred[bool]] = []

    def replay(route: str, entries: list[Any]) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        hanging.append(d)
        return d

    clock = Clock()
    clock.advance(T0)
    d = Deliverer(store, replay, clock=clock, live=set, interval=1.0)
    d.start()
    await until(lambda: hanging)
    await d.stop()  # fires although the replay never answered
    assert hanging[0].called  # it was cancelled
    assert [e.seq for e in await store.pending()] == [1, 2]  # still queued, for the next start
    assert clock.getDelayedCalls() == []
