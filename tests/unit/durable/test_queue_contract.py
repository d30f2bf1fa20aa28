"""
The QueueStore contract (wsgateway.interfaces.QueueStore), run against each
store, as Twisted's reactor mixins run one suite against each reactor: the
``store_kind`` fixture gives a fresh SQLite file or a fresh redis-server
(tests/support/redis_server.py) per test; the Redis half is in the
integration tier (its parameter carries the marker). Exact fields, order, group commit, ack,
attempts and dead letters (injected clock), retention, depth, replay,
purge, stop. What only one store does (SQLite files and crash safety;
Redis keys, scripts, failures and nodes) is in tests/unit/durable/test_queue_store.py
and tests/integration/test_queue_redis.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock

from support.queue_stores import T0, Started, entry, redis_store, sqlite_store
from support.redis_server import running_redis
from wsgateway.durable.entries import Entry, NewEntry, QueueFull, QueueUnavailable, new_ulid
from wsgateway.interfaces import QueueStore


@dataclass
class StoreKind:
    name: str
    new: Callable[..., Any]  # new(clock=None, **options) -> a store, not started
    backend: str  # what /admin/queue reports
    foreign_ids: list[Any]  # ids this store never hands out
    replay_keeps_id: bool  # replay_dead keeps Entry.id (SQLite) or gives a new one (Redis)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.integration)])
def store_kind(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreKind]:
    if request.param == "sqlite":
        yield StoreKind("sqlite", lambda clock=None, **o: sqlite_store(tmp_path / "q.sqlite", clock, **o),
                        "QueueStore", [10**9], True)
    else:
        with running_redis(tmp_path / "redis") as server:
            yield StoreKind("redis", lambda clock=None, **o: redis_store(server.url, "gw-a", clock, **o),
                            "RedisQueueStore", ["chat/1-1", "nonsense"], False)


MakeStore = Callable[..., Awaitable[Any]]


@pytest_twisted.async_yield_fixture
async def make_store(store_kind: StoreKind) -> AsyncIterator[MakeStore]:
    """make_store(clock=Clock at T0, **options) -> a started store of the kind; stopped after."""
    started = Started()

    async def make(clock: Clock | None = None, **options: Any) -> Any:
        return await started.start(store_kind.new(clock, **options))

    yield make
    await started.stop_all()


def seqs(entries: list[Entry]) -> list[tuple[str, int]]:
    return [(e.conn_key, e.seq) for e in entries]


def _members(protocol: type) -> set[str]:
    return {n for n in vars(protocol) if not n.startswith("_")} | set(getattr(protocol, "__annotations__", {}))


def test_each_store_has_what_the_interface_names(store_kind: StoreKind) -> None:
    store = store_kind.new()
    missing = {n for n in _members(QueueStore) if not hasattr(store, n)}
    assert not missing
    assert store.backend == store_kind.backend  # docs/admin-api.md


@pytest_twisted.ensureDeferred
async def test_append_then_pending_gives_exact_fields_in_order(make_store: MakeStore) -> None:
    store = await make_store()
    blob = bytes(range(256)) * 3 + b"\x00\xff\x00\r\n$5\r\n"
    first = NewEntry(
        route="telemetry",
        conn_key="conn-7",
        seq=0,
        message=blob,
        binary=True,
        claims={"sub": "alice", "roles": ["a", "b"], "n": 1, "x": "caf\u00e9"},
        headers=(("X-User", "alice"), ("X-Roles", "a,b"), ("X-User", "dup")),
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        first_seen=T0 - 5,
    )
    text = NewEntry(route="telemetry", conn_key="conn-7", seq=1, message="h\u00e9llo".encode())
    numeric = NewEntry(route="telemetry", conn_key="conn-7", seq=2, message=b"007", trace_id="")
    empty = NewEntry(route="telemetry", conn_key="conn-7", seq=3, message=b"", binary=True)
    ids = await store.append([first, text, numeric, empty])
    assert len(ids) == 4 and len(set(ids)) == 4
    got = await store.pending()
    assert [e.id for e in got] == ids
    a, b, c, d = got
    assert a.route == "telemetry" and a.conn_key == "conn-7" and a.seq == 0
    assert a.message == blob and isinstance(a.message, bytes) and a.binary is True
    assert a.claims == {"sub": "alice", "roles": ["a", "b"], "n": 1, "x": "caf\u00e9"}
    assert a.headers == (("X-User", "alice"), ("X-Roles", "a,b"), ("X-User", "dup"))
    assert a.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert a.attempts == 0 and a.first_seen == T0 - 5 and a.enqueued_at == T0
    assert len(a.entry_id) == 26 and len({e.entry_id for e in got}) == 4
    assert b.message.decode() == "h\u00e9llo" and b.binary is False and b.claims == {} and b.headers == ()
    assert b.trace_id is None and b.first_seen == T0
    assert c.message == b"007" and c.trace_id == ""  # not turned into 7, "" is not None
    assert d.message == b"" and d.binary is True


@pytest_twisted.ensureDeferred
async def test_pending_orders_by_append_and_each_connection_by_seq(make_store: MakeStore) -> None:
    store = await make_store()
    # c1's seq 1 is appended before its seq 0 (a retry path); c2 interleaves; routes are separate.
    await store.append([entry(1, conn="c1"), entry(0, conn="c2")])
    await store.append([entry(0, conn="c1"), entry(1, conn="c2"), entry(0, conn="c3", route="other")])
    await store.append([entry(2, conn="c2")])
    assert seqs(await store.pending()) == [("c1", 0), ("c2", 0), ("c1", 1), ("c2", 1), ("c3", 0), ("c2", 2)]
    assert seqs(await store.pending(route="chat", limit=3)) == [("c1", 0), ("c2", 0), ("c1", 1)]
    assert [e.route for e in await store.pending(route="other")] == ["other"]
    assert await store.pending(route="nothing") == []


@pytest_twisted.ensureDeferred
async def test_pending_for_and_conn_keys_walk_connections_oldest_first(make_store: MakeStore) -> None:
    store = await make_store()
    ids = await store.append([entry(2, conn="b"), entry(1, conn="a", route="orders"), entry(1, conn="b"),
                              entry(2, conn="a", route="orders")])
    assert await store.conn_keys() == [("chat", "b"), ("orders", "a")]
    assert seqs(await store.pending_for("b")) == [("b", 1), ("b", 2)]
    assert [e.seq for e in await store.pending_for("a", limit=1)] == [1]
    assert await store.pending_for("nobody") == []
    assert await store.conn_keys(limit=1) == [("chat", "b")]
    await store.ack([ids[0], ids[2]])  # b is done: a comes first, and b is gone
    assert await store.conn_keys() == [("orders", "a")]


@pytest_twisted.ensureDeferred
async def test_many_appends_in_one_reactor_turn_share_one_write(make_store: MakeStore) -> None:
    store = await make_store()
    ds = [store.append([entry(i)]) for i in range(1000)]
    ids = await gatherResults(ds)
    assert store.transactions == 1 and store.appended == 1000
    flat = [i for chunk in ids for i in chunk]
    assert len(set(flat)) == 1000
    assert [e.seq for e in await store.pending(limit=2000)] == list(range(1000))


@pytest_twisted.ensureDeferred
async def test_ack_removes_only_the_given_entries(make_store: MakeStore, store_kind: StoreKind) -> None:
    store = await make_store()
    ids = await store.append([entry(i) for i in range(5)])
    assert await store.ack([ids[0], ids[2], ids[2]]) == 2
    assert await store.ack([ids[0], *store_kind.foreign_ids]) == 0
    assert [e.id for e in await store.pending()] == [ids[1], ids[3], ids[4]]


@pytest_twisted.ensureDeferred
async def test_attempts_then_dead_letter_after_max_attempts(make_store: MakeStore) -> None:
    store = await make_store(max_attempts=3)
    a, b = await store.append([entry(0), entry(1)])
    assert await store.attempt_failed([a, b]) == []
    assert await store.attempt_failed([a]) == []
    assert [(e.id, e.attempts) for e in await store.pending()] == [(a, 2), (b, 1)]
    assert await store.attempt_failed([a]) == [a]
    assert [e.id for e in await store.pending()] == [b]
    dead = await store.dead_letters()
    assert [(d.entry.id, d.reason, d.entry.attempts, d.entry.message) for d in dead] == [(a, "max_attempts", 3, b"m0")]
    assert dead[0].dead_at == T0 and dead[0].entry.enqueued_at == T0 and dead[0].entry.conn_key == "c1"
    assert await store.attempt_failed([a]) == []  # not an entry any more


@pytest_twisted.ensureDeferred
async def test_retention_dead_letters_on_attempt_and_on_expire(make_store: MakeStore) -> None:
    clock = Clock()
    clock.advance(T0)
    store = await make_store(clock=clock, retention=60, max_attempts=100)
    a, b = await store.append([entry(0), entry(1)])
    clock.advance(30)
    c = (await store.append([entry(2)]))[0]
    clock.advance(31)  # a and b are 61 s old, c 31 s
    assert await store.attempt_failed([a, c]) == [a]
    assert await store.expire() == [b]
    assert [e.id for e in await store.pending()] == [c]
    assert [(d.entry.id, d.reason) for d in await store.dead_letters()] == [(a, "retention"), (b, "retention")]
    assert await store.expire(now=T0 + 91) == [c]


@pytest_twisted.ensureDeferred
async def test_depth_per_route_with_oldest_age(make_store: MakeStore) -> None:
    clock = Clock()
    clock.advance(T0)
    store = await make_store(clock=clock, max_attempts=1)
    await store.append([entry(0, route="chat"), entry(0, route="telemetry", conn="t")])
    clock.advance(10)
    ids = await store.append([entry(1, route="chat"), entry(2, route="chat")])
    clock.advance(5)
    await store.attempt_failed([ids[1]])
    assert await store.depth() == {
        "chat": {"depth": 2, "oldest_age": 15.0, "dead": 1},
        "telemetry": {"depth": 1, "oldest_age": 15.0, "dead": 0},
    }
    await store.purge("telemetry")
    assert (await store.depth()).keys() == {"chat"}


@pytest_twisted.ensureDeferred
async def test_replay_dead_puts_entries_back_with_their_entry_ids(make_store: MakeStore,
                                                                  store_kind: StoreKind) -> None:
    clock = Clock()
    clock.advance(T0)
    store = await make_store(clock=clock, max_attempts=1)
    ids = await store.append([entry(i) for i in range(4)])
    before = {e.id: e for e in await store.pending()}
    await store.attempt_failed(ids)
    assert await store.pending() == []
    clock.advance(100)
    assert await store.replay_dead([ids[1], ids[1]]) == 1
    got = await store.pending()
    assert len(got) == 1
    e = got[0]
    assert (e.id == ids[1]) is store_kind.replay_keeps_id  # Redis: a new stream entry...
    assert e.entry_id == before[ids[1]].entry_id and e.first_seen == T0  # ...of the same message
    assert e.attempts == 0 and e.enqueued_at == T0 + 100 and e.message == b"m1"
    assert await store.replay_dead([ids[1]]) == 0  # not a dead letter any more
    assert await store.replay_dead() == 3
    assert [e.seq for e in await store.pending()] == [0, 1, 2, 3]
    assert await store.dead_letters() == []
    assert await store.conn_keys() == [("chat", "c1")]


@pytest_twisted.ensureDeferred
async def test_purge_by_route_all_and_dead_letters(make_store: MakeStore) -> None:
    store = await make_store(max_attempts=1)
    ids = await store.append([entry(0, route="a"), entry(0, route="b", conn="x"), entry(1, route="b", conn="x")])
    await store.attempt_failed([ids[0]])
    assert await store.purge("b") == 2
    assert await store.pending() == [] and await store.conn_keys() == [] and await store.pending_for("x") == []
    assert await store.purge(dead=True) == 1
    await store.append([entry(5, route="c")])
    assert await store.purge() == 1
    assert await store.depth() == {}
    ids = await store.append([entry(6, route="b", conn="x")])  # the purged route works again
    assert [e.id for e in await store.pending_for("x")] == ids


@pytest_twisted.ensureDeferred
async def test_append_on_a_stopped_store_fails_and_what_was_accepted_stays(make_store: MakeStore) -> None:
    store = await make_store()
    d = store.append([entry(0)])
    await store.stop()  # what was appended before stop is written first
    assert len(await d) == 1
    with pytest.raises(QueueUnavailable, match="not running"):
        await store.append([entry(1)])
    again = await make_store()  # the same file; the same node id, its lease released by the graceful stop
    assert [e.seq for e in await again.pending()] == [0]


def test_ulid_is_time_ordered_and_unique() -> None:
    a, b = new_ulid(1.0), new_ulid(2.0)
    assert len(a) == 26 and a < b
    assert len({new_ulid() for _ in range(1000)}) == 1000


# -- bounds: [queue] max_bytes and max_bytes_per_connection (docs/configuration.md) ---------------------------------


def _size(e: NewEntry) -> int:
    """What an entry counts against the caps (docs/durable-delivery.md#bounds-and-disk-space)."""
    return len(e.message) + len(b"{}") + len(b"[]") + len(e.conn_key.encode()) + 64


@pytest_twisted.ensureDeferred
async def test_an_append_past_the_connections_share_is_refused_and_the_others_of_its_batch_stored(
        make_store: MakeStore) -> None:
    one = entry(0, message=b"x" * 100)
    store = await make_store(max_bytes_per_connection=3 * _size(one))
    await store.append([entry(s, message=b"x" * 100) for s in range(2)])
    # one turn, one write: c1 would pass its share, c2 is well within its own
    over = store.append([entry(s, message=b"x" * 100) for s in (2, 3)])
    other = store.append([entry(0, conn="c2", message=b"y")])
    with pytest.raises(QueueFull) as refused:
        await over
    assert not refused.value.whole and "max_bytes_per_connection" in str(refused.value)
    assert len(await other) == 1
    assert seqs(await store.pending()) == [("c1", 0), ("c1", 1), ("c2", 0)]  # nothing of the refused append
    assert store.stored_bytes == 2 * _size(one) + _size(entry(0, conn="c2", message=b"y"))
    ids = [e.id for e in await store.pending_for("c1")]
    assert await store.ack(ids[:1]) == 1  # delivery gives the share back
    assert len(await store.append([entry(2, message=b"x" * 100)])) == 1


@pytest_twisted.ensureDeferred
async def test_an_append_past_max_bytes_is_refused_and_nothing_stored_is_dropped(
        make_store: MakeStore) -> None:
    one = entry(0, message=b"z" * 50)
    store = await make_store(max_bytes=4 * _size(one), max_attempts=1)
    ids = await store.append([entry(0, conn=f"k{n}", message=b"z" * 50) for n in range(3)])
    await store.attempt_failed(ids[:1])  # a dead letter takes disk too
    assert len(await store.append([entry(0, conn="k3", message=b"z" * 50)])) == 1
    with pytest.raises(QueueFull) as refused:
        await store.append([entry(0, conn="k4", message=b"z")])
    assert refused.value.whole and isinstance(refused.value, QueueUnavailable)
    assert store.append_failed_at == T0  # a full queue refuses as a failing one does (readiness)
    assert len(await store.pending()) == 3 and len(await store.dead_letters()) == 1
    assert await store.purge(dead=True) == 1
    assert len(await store.append([entry(0, conn="k4", message=b"z")])) == 1
    assert store.append_failed_at is None
