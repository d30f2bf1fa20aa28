"""
wsgateway.channels.broker, .fanout, .redisbroker, .presence and wsgateway.redis.link.

Pure parts (envelope, backoff, URL, in-process broker) without a reactor;
the Redis broker against a real ``redis-server`` (tests/redis_fixture.py),
two RedisBroker instances in this process standing for two gateway nodes.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from support.redis_server import RedisServer
from wsgateway.channels.broker import InProcessBroker, make_broker
from wsgateway.channels.envelope import MAGIC, EnvelopeError, Message, decode_message, encode_envelope
from wsgateway.channels.fanout import BrokerUnavailable
from wsgateway.channels.redisbroker import RedisBroker
from wsgateway.config.redis import RedisConfig
from wsgateway.redis.link import Backoff
from wsgateway.redis.target import RedisTarget, parse_url
from support.waiting import sleep, wait_for_async

PREFIX = "t"


class Inbox:
    """A subscriber that records what it gets."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.got: list[tuple[bytes, bool]] = []

    def deliver(self, payload: bytes, binary: bool) -> None:
        self.got.append((payload, binary))

    @property
    def payloads(self) -> list[bytes]:
        return [p for p, _ in self.got]

    def __repr__(self) -> str:
        return f"Inbox({self.name})"


class Observer:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def broker_published(self, channel: str, deliveries: int) -> None:
        self.events.append(("published", channel, deliveries))

    def broker_received(self, channel: str, deliveries: int, outside: bool) -> None:
        self.events.append(("received", channel, deliveries, outside))

    def broker_dropped(self, channel: str, reason: str) -> None:
        self.events.append(("dropped", channel, reason))

    def broker_state(self, up: bool) -> None:
        self.events.append(("state", up))

    def history_recovered(self, route: str, result: str) -> None:
        self.events.append(("recovered", route, result))

    def redis_state(self, shard: str, up: bool) -> None:
        self.events.append(("redis", shard, up))

    def redis_failover(self, shard: str) -> None:
        self.events.append(("failover", shard))


async def failure_of(d: Deferred[Any]) -> BrokerUnavailable:
    try:
        await d
    except BrokerUnavailable as e:
        return e
    raise AssertionError("it succeeded")




@pytest.fixture
def logged() -> Iterator[list[str]]:
    """The broker's log lines, formatted."""
    from twisted.logger import formatEvent

    lines: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").startswith(("wsgateway.channels.fanout", "wsgateway.channels.redisbroker")):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


@pytest_twisted.async_yield_fixture
async def brokers() -> AsyncIterator[Callable[..., RedisBroker]]:
    """brokers(url, node_id, **options) -> a started RedisBroker, fast timings; stopped after the test."""
    made: list[RedisBroker] = []

    def make(url: str, node_id: str, *, start: bool = True, **options: Any) -> RedisBroker:
        options.setdefault("reply_timeout", 1.0)
        options.setdefault("connect_timeout", 1.0)
        options.setdefault("backoff", Backoff(initial=0.05, maximum=0.3))
        options.setdefault("heartbeat", 0.5)
        b = RedisBroker(RedisConfig(url=url, prefix=PREFIX), node_id, reactor=reactor, **options)
        if start:
            b.startService()
        made.append(b)
        return b

    yield make
    for b in made:
        if b.running:
            await b.stopService()


def numsub(redis: RedisServer, channel: str) -> int:
    reply = redis.command("PUBSUB", "NUMSUB", f"{PREFIX}:ch:{channel}")
    assert isinstance(reply, list)
    return int(reply[1])


async def subscribed(redis: RedisServer, channel: str, count: int) -> None:
    await wait_for_async(lambda: numsub(redis, channel) == count, what=f"{count} Redis subscriptions to {channel}")


# -- the envelope (pure) ------------------------------------------------------


@given(payload=st.binary(max_size=2048), binary=st.booleans(), seq=st.integers(1, 2**64 - 1),
       node=st.text(max_size=40))
def test_envelope_round_trip(payload: bytes, binary: bool, seq: int, node: str) -> None:
    instance = random.randbytes(8)
    data = encode_envelope(instance, seq, node.encode(), payload, binary)
    assert data.startswith(MAGIC)
    assert decode_message(data) == Message(payload, binary, instance, node, seq)


@given(payload=st.binary(max_size=512), binary=st.booleans(), offset=st.integers(1, 10**15),
       epoch=st.text("0123456789abcdef", min_size=1, max_size=24))
def test_positioned_envelope_round_trip(payload: bytes, binary: bool, offset: int, epoch: str) -> None:
    data = encode_envelope(b"12345678", 9, b"gw", payload, binary, (offset, epoch))
    assert decode_message(data) == Message(payload, binary, b"12345678", "gw", 9, offset, epoch)


def test_positioned_envelope_layout() -> None:
    """As the Redis script writes it (channels/redishistory.py): flag 0x02, then the offset and the epoch."""
    data = encode_envelope(b"12345678", 3, b"gw-1", b"hi", False, (17, "ab"))
    assert data == (b"\x00WG\x01\x02" + b"12345678" + (3).to_bytes(8, "big") + b"\x04gw-1" + b"\x0217" + b"\x02ab"
                    + b"hi")


def test_envelope_layout() -> None:
    data = encode_envelope(b"12345678", 3, b"gw-1", b"hi", True)
    assert data == b"\x00WG" + b"\x01" + b"\x01" + b"12345678" + (3).to_bytes(8, "big") + b"\x04" + b"gw-1" + b"hi"


def test_outside_messages_are_whole_payloads() -> None:
    assert decode_message(b'{"a": 1}') == Message(b'{"a": 1}', False)
    assert decode_message(b"007") == Message(b"007", False)
    assert decode_message("h\u00e9".encode()) == Message("h\u00e9".encode(), False)
    assert decode_message(b"") == Message(b"", False)
    assert decode_message(b"\xff\xfe\x00") == Message(b"\xff\xfe\x00", True)  # not UTF-8: binary
    assert decode_message(b"\x00W") == Message(b"\x00W", False)  # no full magic
    assert decode_message(b"x").outside


@pytest.mark.parametrize("data, problem", [
    (MAGIC, "truncated header"),
    (encode_envelope(b"12345678", 1, b"node", b"", False)[:-2], "truncated node id"),
    (MAGIC + b"\x02" + bytes(19), "unknown version 2"),
    (MAGIC + b"\x01\x04" + bytes(18), "unknown flags 0x4"),
    (encode_envelope(b"12345678", 1, b"node", b"", False, (17, "e1"))[:-2], "truncated position"),
    (encode_envelope(b"12345678", 1, b"n", b"", False, (17, "e1")).replace(b"\x0217", b"\x02x7"), "bad offset"),
])
def test_malformed_envelopes(data: bytes, problem: str) -> None:
    with pytest.raises(EnvelopeError, match=problem):
        decode_message(data)


def test_backoff_grows_is_capped_and_jittered() -> None:
    b = Backoff(initial=0.2, maximum=3.0, factor=2.0)
    rng = random.Random(7)
    for failures, base in [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6), (5, 3.0), (50, 3.0), (10**6, 3.0)]:
        delays = {b.delay(failures, rng) for _ in range(50)}
        assert all(base / 2 <= d <= base for d in delays)
        assert len(delays) > 1  # jittered


def test_parse_url() -> None:
    assert parse_url("redis://127.0.0.1:6380/2") == RedisTarget(host="127.0.0.1", port=6380, db=2)
    assert parse_url("redis://example") == RedisTarget(host="example", port=6379, db=None)
    t = parse_url("rediss://user:p%40ss@cache:6390/0")
    assert (t.tls, t.username, t.password, t.db) == (True, "user", "p@ss", 0)
    assert "p@ss" not in repr(t) and "p@ss" not in t.describe()
    assert t.describe() == "rediss://cache:6390/0"
    assert parse_url("unix:///run/redis.sock").path == "/run/redis.sock"
    with pytest.raises(ValueError):
        parse_url("http://x")


# -- the in-process broker (no reactor) ----------------------------------------


def test_in_process_fanout_once_in_order_without_echo() -> None:
    broker = InProcessBroker("gw-1", clock=Clock())
    a, b, c, other = Inbox("a"), Inbox("b"), Inbox("c"), Inbox("other")
    for sub in (a, b, c):
        broker.subscribe("room", sub)
    broker.subscribe("room", a)  # twice: still once
    broker.subscribe("elsewhere", other)
    assert broker.ready
    for i in range(5):
        d = broker.publish("room", b"m%d" % i, False, origin=a)
        assert d.called
    broker.publish("room", b"\x00\xff", True)
    assert a.got == [(b"\x00\xff", True)]
    assert b.got == c.got == [(b"m%d" % i, False) for i in range(5)] + [(b"\x00\xff", True)]
    assert other.got == []
    assert broker.channels() == {"room": 3, "elsewhere": 1}
    broker.unsubscribe("room", b)
    broker.unsubscribe("room", b)  # not subscribed any more: nothing happens
    broker.publish("room", b"late", False)
    assert b.payloads[-1] == b"\x00\xff" and c.payloads[-1] == b"late"


def test_fanout_goes_on_past_a_failing_subscriber_and_one_leaving_mid_delivery() -> None:
    broker = InProcessBroker("gw-1", clock=Clock())
    last = Inbox("last")

    class Broken:
        def deliver(self, payload: bytes, binary: bool) -> None:
            raise RuntimeError("boom")

    class Leaver:
        def deliver(self, payload: bytes, binary: bool) -> None:
            broker.unsubscribe("room", last)  # e.g. a slow consumer closed as a side effect

    broker.subscribe("room", Broken())
    broker.subscribe("room", Leaver())
    broker.subscribe("room", last)
    observer = Observer()
    broker.observer = observer
    broker.publish("room", b"x", False)
    assert last.got == []
    assert observer.events == [("published", "room", 1)]  # only the leaver took it


def test_in_process_presence() -> None:
    clock = Clock()
    clock.advance(1000)
    broker = InProcessBroker("gw-1", clock=clock)
    broker.join("room", "c1", "alice")
    clock.advance(5)
    broker.join("room", "c2", None)
    broker.join("lobby", "c1", "alice")
    got: list[Any] = []
    broker.presence("room").addCallback(got.append)
    assert got == [[
        {"node": "gw-1", "conn_id": "c1", "user": "alice", "since": 1000.0},
        {"node": "gw-1", "conn_id": "c2", "user": None, "since": 1005.0},
    ]]
    broker.leave("room", "c1")
    broker.leave("room", "nobody")
    broker.presence("room").addCallback(got.append)
    assert [e["conn_id"] for e in got[-1]] == ["c2"]


def test_make_broker_picks_by_config() -> None:
    assert isinstance(make_broker(None, "gw", reactor=Clock()), InProcessBroker)
    b = make_broker(RedisConfig(url="redis://127.0.0.1:1/0"), "gw", reactor=reactor, heartbeat=1.0)
    assert isinstance(b, RedisBroker) and not b.ready and not b.running


# -- the Redis broker ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_nodes_exactly_once_in_order_no_echo(
    redis_server: RedisServer, brokers: Callable[..., RedisBroker]
) -> None:
    A, B = brokers(redis_server.url, "gw-a"), brokers(redis_server.url, "gw-b")
    await wait_for_async(lambda: A.ready and B.ready)
    a1, a2, b1 = Inbox("a1"), Inbox("a2"), Inbox("b1")
    A.subscribe("room", a1)
    A.subscribe("room", a2)
    B.subscribe("room", b1)
    await subscribed(redis_server, "room", 2)  # one Redis subscription per node
    sent: list[tuple[str, bytes]] = []
    for i in range(60):
        node, sender = [(A, a1), (A, a2), (B, b1)][i % 3]
        payload = b"%s-%d" % (sender.name.encode(), i)
        sent.append((sender.name, payload))
        await node.publish("room", payload, False, origin=sender)
    everyone = [a1, a2, b1]
    await wait_for_async(lambda: all(len(s.got) == 40 for s in everyone))
    await sleep(0.2)  # nothing more arrives: no duplicates, no echo from Redis
    for sub in everyone:
        assert sorted(sub.payloads) == sorted(p for name, p in sent if name != sub.name), sub  # once each, no echo
        for sender in everyone:  # each sender's messages in the order it sent them
            mine = [p for p in sub.payloads if p.startswith(sender.name.encode() + b"-")]
            assert mine == [p for name, p in sent if name == sender.name != sub.name]
        assert all(not binary for _, binary in sub.got)
    # a1 and a2 (same node) saw the messages of b1 and of each other in one node order:
    # the same interleaving of b1's messages with the local ones
    assert [p for p in a1.payloads if not p.startswith(b"a2-")] == [p for p in a2.payloads if not p.startswith(b"a1-")]


@pytest_twisted.ensureDeferred
async def test_payloads_cross_nodes_byte_for_byte(
    redis_server: RedisServer, brokers: Callable[..., RedisBroker]
) -> None:
    A, B = brokers(redis_server.url, "gw-a"), brokers(redis_server.url, "gw-b")
    inbox = Inbox()
    B.subscribe("bin", inbox)
    await wait_for_async(lambda: A.ready and B.ready)
    await subscribed(redis_server, "bin", 1)
    payloads = [
        (b"", False), (b"", True), (b"123", False), (b"-1.5", False), (bytes(range(256)), True),
        (MAGIC + b"\x01not ours", True), (b"\r\n$5\r\n*1\r\n", True), ("caf\u00e9 \U0001F600".encode(), False),
        (random.randbytes(300_000), True),
    ]
    for payload, binary in payloads:
        await A.publish("bin", payload, binary)
    await wait_for_async(lambda: len(inbox.got) == len(payloads))
    assert inbox.got == payloads


@pytest_twisted.ensureDeferred
async def test_a_backend_publishing_to_redis_directly(
    redis_server: RedisServer, brokers: Callable[..., RedisBroker], logged: list[str]
) -> None:
    observer = Observer()
    A = brokers(redis_server.url, "gw-a", observer=observer)
    inbox = Inbox()
    A.subscribe("user:42", inbox)
    await wait_for_async(lambda: A.ready)
    await subscribed(redis_server, "user:42", 1)
    key = f"{PREFIX}:ch:user:42"
    assert redis_server.command("PUBLISH", key, b'{"hello": 1}') == 1
    redis_server.command("PUBLISH", key, b"42")
    redis_server.command("PUBLISH", key, b"\xff\x00binary")
    redis_server.command("PUBLISH", key, MAGIC + b"\x07garbage")  # looks like an envelope: dropped
    redis_server.command("PUBLISH", key, b"last")
    await wait_for_async(lambda: len(inbox.got) == 4)
    assert inbox.got == [(b'{"hello": 1}', False), (b"42", False), (b"\xff\x00binary", True), (b"last", False)]
    assert ("received", "user:42", 1, True) in observer.events
    assert ("dropped", "user:42", "malformed") in observer.events
    assert [line for line in logged if "malformed" in line] == [
        "dropped a malformed message on channel user:42 (truncated header); 1 so far"
    ]


@pytest_twisted.ensureDeferred
async def test_one_redis_subscription_per_channel_per_node(
    redis_server: RedisServer, brokers: Callable[..., RedisBroker]
) -> None:
    observer = Observer()
    A = brokers(redis_server.url, "gw-a", observer=observer)
    B = brokers(redis_server.url, "gw-b")
    subs = [Inbox(str(i)) for i in range(5)]
    for s in subs:
        A.subscribe("room", s)
    await wait_for_async(lambda: A.ready and B.ready)
    await subscribed(redis_server, "room", 1)
    await B.publish("room", b"one", False)
    await wait_for_async(lambda: all(s.got for s in subs))
    assert [e for e in observer.events if e[0] == "received"] == [("received", "room", 5, False)]  # fanned out once
    for s in subs[:-1]:
        A.unsubscribe("room", s)
    assert numsub(redis_server, "room") == 1
    A.unsubscribe("room", subs[-1])
    await subscribed(redis_server, "room", 0)
    A.subscribe("room", subs[0])
    await subscribed(redis_server, "room", 1)
    assert A.channels() == {"room": 1}


@pytest_twisted.ensureDeferred
async def test_starting_without_redis_does_not_wait_and_fails_fast(
    tmp_path: Any, brokers: Callable[..., RedisBroker], logged: list[str]
) -> None:
    redis = RedisServer(tmp_path / "later")  # not started yet
    observer = Observer()
    A = brokers(redis.url, "gw-a", observer=observer)  # startService returns at once
    assert A.running and not A.ready
    inbox = Inbox()
    A.subscribe("room", inbox)
    d = A.publish("room", b"x", False)
    assert d.called  # refused at once, nothing buffered
    assert (await failure_of(d)).reason == "redis_down"
    assert inbox.got == []  # not even delivered locally
    assert (await failure_of(A.presence("room"))).reason == "redis_down"
    await A.join("room", "c1", "alice")  # kept in memory meanwhile
    await sleep(1.0)  # several attempts (backoff capped at 0.3 s)
    [down] = [line for line in logged if line.startswith("redis")]  # once, not once per attempt
    assert down.startswith(f"redis down: redis://127.0.0.1:{redis.port}/0 (") and "refused" in down
    redis.start()
    try:
        await wait_for_async(lambda: A.ready, timeout=3.0)
        await subscribed(redis, "room", 1)  # the channel asked for while down
        B = brokers(redis.url, "gw-b")
        await wait_for_async(lambda: B.ready)
        await B.publish("room", b"hello", False)
        await wait_for_async(lambda: inbox.got == [(b"hello", False)])
        assert [e["conn_id"] for e in await B.presence("room")] == ["c1"]
        # A's outage, then B's first connection
        assert [line.split(":")[0] for line in logged if line.startswith("redis")] == [
            "redis down", "redis back", "redis up"
        ]
        assert [e for e in observer.events if e[0] in ("state", "dropped")] == [
            ("dropped", "room", "redis_down"), ("state", False), ("state", True)
        ]
    finally:
        redis.kill()


@pytest_twisted.ensureDeferred
async def test_redis_killed_and_restarted(
    redis_server: RedisServer, brokers: Callable[..., RedisBroker], logged: list[str]
) -> None:
    A, B = brokers(redis_server.url, "gw-a"), brokers(redis_server.url, "gw-b")
    a, b = Inbox("a"), Inbox("b")
    A.subscribe("room", a)
    B.subscribe("room", b)
    await A.join("room", "ca", "alice")
    await wait_for_async(lambda: A.ready and B.ready)
    await subscribed(redis_server, "room", 2)
    await A.publish("room", b"before", False, origin=a)
    await wait_for_async(lambda: b.got == [(b"before", False)])

    redis_server.kill()
    await wait_for_async(lambda: not A.ready and not B.ready, timeout=2.0)
    assert (await failure_of(A.publish("room", b"lost", False, origin=a))).reason == "redis_down"
    await sleep(0.8)  # a few retries: still one "redis down" per broker
    redis_server.start()  # same port, empty (persistence off)
    await wait_for_async(lambda: A.ready and B.ready, timeout=3.0)
    await subscribed(redis_server, "room", 2)  # every channel subscribed again
    await A.publish("room", b"after", False, origin=a)
    await B.publish("room", b"reply", False, origin=b)
    await wait_for_async(lambda: b.payloads == [b"before", b"after"] and a.payloads == [b"reply"])
    assert [e["conn_id"] for e in await B.presence("room")] == ["ca"]  # rewritten on reconnect
    states = [line.split(":")[0] for line in logged if line.startswith("redis")]
    assert states == ["redis up", "redis up", "redis down", "redis down", "redis back", "redis back"]


@pytest_twisted.ensureDeferred
async def test_presence_across_nodes_and_a_graceful_stop(
    redis_server: RedisServer, brokers: Callable[..., RedisBroker]
) -> None:
    A, B = brokers(redis_server.url, "gw-a"), brokers(redis_server.url, "gw-b")
    await wait_for_async(lambda: A.ready and B.ready)
    await A.join("room", "a1", "alice")
    await A.join("room", "a2", None)
    await B.join("room", "b1", "bob")
    await B.join("lobby", "b1", "bob")
    for broker in (A, B):
        entries = await broker.presence("room")
        assert [(e["node"], e["conn_id"], e["user"]) for e in entries] == [
            ("gw-a", "a1", "alice"), ("gw-a", "a2", None), ("gw-b", "b1", "bob")
        ]
        assert all(abs(e["since"] - reactor.seconds()) < 5 for e in entries)
    await A.leave("room", "a1")
    assert [e["conn_id"] for e in await B.presence("room")] == ["a2", "b1"]
    await A.leave("room", "a2")  # A's last one there: its hash goes
    assert [e["conn_id"] for e in await B.presence("room")] == ["b1"]
    assert await A.presence("nobody-here") == []
    await B.stopService()  # removes its entries at once
    assert await A.presence("room") == []
    assert await A.presence("lobby") == []
    assert redis_server.command("KEYS", f"{PREFIX}:presence*") == []


@pytest_twisted.ensureDeferred
async def test_a_crashed_nodes_presence_expires(
    redis_server: RedisServer, brokers: Callable[..., RedisBroker]
) -> None:
    A = brokers(redis_server.url, "gw-a", heartbeat=0.2)
    B = brokers(redis_server.url, "gw-b", heartbeat=0.2)  # TTL 0.6 s
    await wait_for_async(lambda: A.ready and B.ready)
    await A.join("room", "a1", "alice")
    await B.join("room", "b1", "bob")
    await sleep(1.0)  # well past one TTL: the heartbeats keep both alive
    assert [e["conn_id"] for e in await A.presence("room")] == ["a1", "b1"]
    B._beat.stop()  # B "crashes": no more heartbeats, no cleanup
    started = reactor.seconds()
    while [e["conn_id"] for e in await A.presence("room")] != ["a1"]:
        assert reactor.seconds() - started < 1.5, "B's entries outlived 3 heartbeats (0.6 s) by far"
        await sleep(0.05)
    # B's hash key is pruned from the index by the read that found it gone
    a_only = [f"{PREFIX}:presence-node:{A.instance.hex()}:room".encode()]
    await wait_for_async(lambda: redis_server.command("SMEMBERS", f"{PREFIX}:presence:room") == a_only)


@pytest_twisted.ensureDeferred
async def test_a_hung_redis_bounds_pending_publishes(
    redis_server: RedisServer, brokers: Callable[..., RedisBroker]
) -> None:
    observer = Observer()
    A = brokers(redis_server.url, "gw-a", max_pending=3, reply_timeout=0.5, observer=observer)
    a = Inbox()
    A.subscribe("room", a)
    await wait_for_async(lambda: A.ready)
    redis_server.pause()  # keeps the sockets open, answers nothing
    try:
        pending = [A.publish("room", b"%d" % i, False) for i in range(3)]
        refused = A.publish("room", b"one too many", False)
        assert refused.called and (await failure_of(refused)).reason == "backlog"
        assert a.payloads == [b"0", b"1", b"2"]  # the accepted ones were delivered here at once
        for d in pending:  # replyTimeout: failed, not queued forever
            assert (await failure_of(d)).reason == "redis_error"
        await wait_for_async(lambda: not A.ready, timeout=1.0)  # txredisapi aborts a connection that timed out
    finally:
        redis_server.resume()
    await wait_for_async(lambda: A.ready, timeout=3.0)
    await A.publish("room", b"again", False)
    reasons = [e[2] for e in observer.events if e[0] == "dropped"]
    assert reasons == ["backlog", "redis_error", "redis_error", "redis_error"]


@pytest_twisted.ensureDeferred
async def test_a_refused_password_is_logged_once_and_never_shown(
    redis_server: RedisServer, brokers: Callable[..., RedisBroker], logged: list[str]
) -> None:
    redis_server.command("CONFIG", "SET", "requirepass", "s3cret-pw")
    port = redis_server.port
    A = brokers(f"redis://127.0.0.1:{port}/0", "gw-a")  # no password
    await sleep(0.8)  # several attempts
    assert not A.ready
    [refused] = [line for line in logged if line.startswith("redis redis://")]  # once, for both connections
    assert refused == f"redis redis://127.0.0.1:{port}/0: Redis error: could not set dbid=0: NOAUTH Authentication required."
    assert len([line for line in logged if line.startswith("redis down")]) == 1
    B = brokers(f"redis://:s3cret-pw@127.0.0.1:{port}/0", "gw-b")
    await wait_for_async(lambda: B.ready)
    await B.join("room", "b1")
    assert [e["conn_id"] for e in await B.presence("room")] == ["b1"]
    assert not any("s3cret" in line for line in logged)
