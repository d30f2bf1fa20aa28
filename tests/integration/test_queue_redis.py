"""
What only the Redis store does, against a real redis-server
(tests/redis_fixture.py; the behaviour both stores share is
tests/test_queue_contract.py): its ids, capped append scripts, the key
layout and what ack and purge leave in Redis, expire and replay in chunks,
the scripts' flags, Redis down, hung and refusing writes, the backlog, and
several stores with their own node ids on one Redis standing for gateway
nodes: ownership, adoption of a dead node's entries by exactly one
survivor, and the way back when the dead node returns.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from support.queue_stores import PREFIX, T0, Started, entry, redis_store
from support.redis_server import RedisServer
from wsgateway.config.queue import QueueConfig
from wsgateway.config.redis import RedisConfig
from wsgateway.durable.entries import Entry, QueueUnavailable
from wsgateway.durable.redis import RedisQueueStore
from wsgateway.durable.redis_scripts import SCRIPTS
from support.waiting import sleep, wait_for_async

BEAT = 0.1  # heartbeat of the cluster tests: a node is dead 0.3 s after its last one

MakeStore = Callable[..., Awaitable[RedisQueueStore]]




@pytest_twisted.async_yield_fixture
async def make_store(redis_server: RedisServer) -> AsyncIterator[MakeStore]:
    """make_store(node_id="gw-a", clock=Clock at T0, **options) -> a started store on the test's Redis."""
    started = Started()

    async def make(node_id: str = "gw-a", clock: Clock | None = None, url: str | None = None,
                   **options: Any) -> RedisQueueStore:
        return await started.start(redis_store(url or redis_server.url, node_id, clock, **options))

    yield make
    await started.stop_all()


def seqs(entries: list[Entry]) -> list[tuple[str, int]]:
    return [(e.conn_key, e.seq) for e in entries]


# -- the store's own ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ids_name_the_route_and_the_stream_entry(make_store: MakeStore) -> None:
    store = await make_store()
    ids = await store.append([entry(0, route="telemetry"), entry(1, route="telemetry")])
    assert len(set(ids)) == 2 and all(isinstance(i, str) and i.startswith("telemetry/") for i in ids)


@pytest_twisted.ensureDeferred
async def test_append_scripts_are_capped_but_one_append_call_is_never_split(make_store: MakeStore) -> None:
    small = await make_store("gw-small", max_batch_entries=10)
    ds = [small.append([entry(i, conn="s") for i in range(25)])] + [small.append([entry(i, conn="t")])
                                                                     for i in range(15)]
    await gatherResults(ds)
    assert small.transactions == 3  # 25 alone, then 10, then 5


@pytest_twisted.ensureDeferred
async def test_ack_deletes_the_stream_entry_and_its_indexes(make_store: MakeStore, redis_server: RedisServer) -> None:
    store = await make_store()
    ids = await store.append([entry(i) for i in range(5)])
    assert await store.ack(ids) == 5
    assert redis_server.command("XLEN", f"{PREFIX}:q:s:chat") == 0  # deleted, not only acknowledged
    assert redis_server.command("XPENDING", f"{PREFIX}:q:s:chat", "gw")[0] == 0  # type: ignore[index]
    assert redis_server.command("EXISTS", f"{PREFIX}:q:c:c1", f"{PREFIX}:q:o:gw-a") == 0


@pytest_twisted.ensureDeferred
async def test_expire_goes_through_many_entries_in_chunks(make_store: MakeStore, monkeypatch: Any) -> None:
    import wsgateway.durable.redis as queue_redis

    monkeypatch.setattr(queue_redis, "_CHUNK", 7)
    clock = Clock()
    clock.advance(T0)
    store = await make_store(clock=clock, retention=10)
    old = await store.append([entry(i, conn=f"c{i % 3}", route=("a", "b")[i % 2]) for i in range(40)])
    clock.advance(5)
    new = await store.append([entry(100)])
    clock.advance(6)
    assert sorted(await store.expire()) == sorted(old)
    assert [e.id for e in await store.pending()] == new
    assert len(await store.dead_letters(limit=100)) == 40


@pytest_twisted.ensureDeferred
async def test_replay_all_goes_in_chunks(make_store: MakeStore, monkeypatch: Any) -> None:
    import wsgateway.durable.redis as queue_redis

    monkeypatch.setattr(queue_redis, "_CHUNK", 4)
    store = await make_store(max_attempts=1)
    ids = await store.append([entry(i, route=("x", "y")[i % 2], conn=("p", "q")[i % 2]) for i in range(10)])
    await store.attempt_failed(ids)
    assert await store.replay_dead() == 10
    assert seqs(await store.pending_for("p")) == [("p", i) for i in range(0, 10, 2)]
    assert (await store.depth()) == {"x": {"depth": 5, "oldest_age": 0.0, "dead": 0},
                                     "y": {"depth": 5, "oldest_age": 0.0, "dead": 0}}


@pytest_twisted.ensureDeferred
async def test_purge_leaves_no_keys_of_entries_behind(make_store: MakeStore, redis_server: RedisServer) -> None:
    store = await make_store(max_attempts=1)
    ids = await store.append([entry(0, route="a"), entry(0, route="b", conn="x"), entry(1, route="b", conn="x")])
    await store.attempt_failed([ids[0]])
    assert await store.purge("b") == 2
    assert await store.purge(dead=True) == 1
    await store.append([entry(5, route="c")])
    assert await store.purge() == 1
    await store.append([entry(6, route="b", conn="x")])  # a purged route in use again, then purged again
    await store.purge()
    keys = set(redis_server.command("KEYS", f"{PREFIX}:q:*"))  # type: ignore[arg-type]
    assert keys <= {f"{PREFIX}:q:{k}".encode() for k in ("n", "nodes", "alive:gw-a", "lease:gw-a")}, keys


@pytest_twisted.ensureDeferred
async def test_key_layout_and_the_fields_of_an_entry(make_store: MakeStore, redis_server: RedisServer) -> None:
    store = await make_store()
    [i] = await store.append([entry(3, route="r/with/slashes", conn="k", message=b"\x00\xff", binary=True,
                                    trace_id="t1")])
    route, _, sid = i.rpartition("/")
    assert route == "r/with/slashes"
    [[got_id, flat]] = redis_server.command("XRANGE", f"{PREFIX}:q:s:{route}", sid, sid)  # type: ignore[misc]
    f = dict(zip(flat[0::2], flat[1::2]))
    assert got_id.decode() == sid
    assert (f[b"node"], f[b"conn"], f[b"seq"], f[b"bin"], f[b"msg"], f[b"trace"]) == (
        b"gw-a", b"k", b"3", b"1", b"\x00\xff", b"=t1")
    assert float(f[b"first"]) == float(f[b"enq"]) == T0 and json.loads(f[b"ck"]) == [route, "k"]
    # in gw-a's pending list of the consumer group
    [[pid, consumer, _, _]] = redis_server.command(  # type: ignore[misc]
        "XPENDING", f"{PREFIX}:q:s:{route}", "gw", "-", "+", 10)
    assert (pid.decode(), consumer) == (sid, b"gw-a")
    assert redis_server.command("GET", f"{PREFIX}:q:lease:gw-a") == store.token.encode()
    assert 0 < int(redis_server.command("PTTL", f"{PREFIX}:q:alive:gw-a")) <= 3000  # type: ignore[call-overload]
    assert [e.id for e in await store.pending_for("k")] == [i]


def test_from_config_takes_the_queue_and_redis_keys() -> None:
    store = RedisQueueStore.from_config(
        QueueConfig(backend="redis", max_attempts=3, retention=9.0), RedisConfig(url="redis://h:7/2", prefix="p"),
        node_id="gw-9", reactor=reactor,
    )
    assert (store.max_attempts, store.retention, store.prefix, store.node_id) == (3, 9.0, "p:q", "gw-9")
    assert store.target.describe() == "redis://h:7/2" and not store.ready and not store.running


def test_every_script_is_flagged_for_redis_7() -> None:
    flags = {name: s.text.split(b"\n", 1)[0] for name, s in SCRIPTS.items()}
    assert all(f.startswith(b"#!lua") for f in flags.values())
    assert {n for n, f in flags.items() if b"no-writes" in f} == {
        "pending", "pending_for", "conn_keys", "depth", "dead_letters"}


# -- failures -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_redis_down_fails_fast_then_works_after_restart(
    make_store: MakeStore, redis_server: RedisServer
) -> None:
    store = await make_store()
    first = await store.append([entry(0)])
    redis_server.kill()
    with pytest.raises(QueueUnavailable):  # the kill may or may not be noticed yet: fails either way
        await store.append([entry(1)])
    await wait_for_async(lambda: not store.ready, timeout=2.0, what="the store sees redis down")
    for op in (store.append([entry(2)]), store.pending(), store.ack(first), store.depth(), store.conn_keys()):
        assert op.called  # refused at once: nothing waits for Redis
        with pytest.raises(QueueUnavailable, match="redis down"):
            await op
    assert store.errors >= 6
    redis_server.start()  # same port, empty (its persistence is off)
    await wait_for_async(lambda: store.ready, timeout=3.0, what="the store sees redis back")
    ids = await store.append([entry(3)])  # scripts loaded again, group and lease recreated
    assert [e.id for e in await store.pending()] == ids


@pytest_twisted.ensureDeferred
async def test_a_hung_redis_fails_operations_after_the_reply_timeout(
    make_store: MakeStore, redis_server: RedisServer
) -> None:
    store = await make_store(reply_timeout=0.3)
    await store.append([entry(0)])
    redis_server.pause()
    try:
        # fails on its own (the reply timeout), well before this deadline: nothing else answers while paused
        with pytest.raises(QueueUnavailable):
            await store.append([entry(1)]).addTimeout(5.0, reactor)
    finally:
        redis_server.resume()
    # the timeout aborted the connection (nothing else would ever answer on it), and a new one comes up
    await wait_for_async(lambda: not store.ready, timeout=1.0, what="the hung connection dropped")
    await wait_for_async(lambda: store.ready, timeout=3.0, what="reconnected")
    await store.append([entry(2)])
    # 1 may be stored all the same: Redis, once resumed, may run what it had read before it saw the close
    assert [e.seq for e in await store.pending()] in ([0, 2], [0, 1, 2])


@pytest_twisted.ensureDeferred
async def test_refused_writes_fail_append_but_reads_and_acks_go_on(
    make_store: MakeStore, redis_server: RedisServer
) -> None:
    store = await make_store()
    ids = await store.append([entry(0), entry(1)])
    redis_server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    redis_server.command("CONFIG", "SET", "maxmemory", "1")
    try:
        with pytest.raises(QueueUnavailable, match="OOM"):
            await store.append([entry(2)])
        assert store.append_failed_at == T0
        assert [e.id for e in await store.pending()] == ids  # no-writes scripts still run
        assert await store.ack([ids[0]]) == 1  # allow-oom: acks free memory
    finally:
        redis_server.command("CONFIG", "SET", "maxmemory", "0")
    more = await store.append([entry(3)])
    assert store.append_failed_at is None
    assert [e.id for e in await store.pending()] == [ids[1], *more]


@pytest_twisted.ensureDeferred
async def test_appends_beyond_the_backlog_are_refused_at_once(make_store: MakeStore) -> None:
    store = await make_store(max_pending=10)
    ok = store.append([entry(i) for i in range(8)])
    refused = store.append([entry(i) for i in range(8, 11)])
    assert refused.called
    with pytest.raises(QueueUnavailable, match="backlog"):
        await refused
    assert len(await ok) == 8
    assert len(await store.append([entry(i) for i in range(8, 11)])) == 3  # answered: room again


@pytest_twisted.ensureDeferred
async def test_starting_without_redis_does_not_wait(make_store: MakeStore, tmp_path: Path) -> None:
    later = RedisServer(tmp_path / "later")
    store = await make_store(url=later.url)  # returns although nothing answers
    assert store.running and not store.ready
    with pytest.raises(QueueUnavailable, match="redis down"):
        await store.append([entry(0)])
    later.start()
    try:
        await wait_for_async(lambda: store.ready, timeout=3.0, what="connected")
        await store.append([entry(0)])
        assert len(await store.pending()) == 1
    finally:
        await store.stop()
        later.kill()


KILL_SCRIPT = """
import sys
from twisted.internet import reactor, task
from twisted.internet.defer import gatherResults
from wsgateway.durable.entries import NewEntry
from wsgateway.durable.redis import RedisQueueStore

url, n = sys.argv[1], int(sys.argv[2])
store = RedisQueueStore(url, prefix="t", node_id="gw-k", reactor=reactor, heartbeat=0.1)

def burst(conn, count):
    return [store.append([NewEntry(route="r", conn_key=conn, seq=i, message=bytes([i % 256]) * 300, binary=True)])
            for i in range(count)]

def accepted(ids):
    print("accepted", sum(len(i) for i in ids), flush=True)
    task.LoopingCall(burst, "more", 20).start(0.001)  # the kill lands while later appends are in flight

store.start().addCallback(lambda _: gatherResults(burst("k", n))).addCallback(accepted)
reactor.run()
"""


@pytest_twisted.ensureDeferred
async def test_accepted_entries_survive_kill_9_of_the_gateway(
    make_store: MakeStore, redis_server: RedisServer
) -> None:
    import signal
    import subprocess
    import sys

    from support.gateway import ROOT

    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, redis_server.url, "500"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = await deferToThread(proc.stdout.readline)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(5)
    assert line.strip() == "accepted 500", line + (proc.stderr.read() if proc.stderr else "")
    again = await make_store("gw-k", heartbeat=BEAT)  # its old lease runs out within 0.3 s: then it is ours
    await wait_for_async(lambda: again.held == ["gw-k"], timeout=3.0, what="the lease of the killed process")
    got = await again.pending_for("k", limit=1000)
    assert [e.seq for e in got] == list(range(500))
    assert all(e.message == bytes([e.seq % 256]) * 300 for e in got)


# -- several nodes on one Redis ---------------------------------------------------


def crash(store: RedisQueueStore) -> Awaitable[None]:
    """The node dies: no more heartbeats, its connection gone, nothing cleaned up in Redis."""
    store._node._beat.stop()
    return store._node._link.stop()


async def owned(store: RedisQueueStore) -> list[tuple[str, int]]:
    return seqs(await store.pending(limit=10_000))


@pytest_twisted.ensureDeferred
async def test_each_node_sees_only_its_own_entries(make_store: MakeStore) -> None:
    a = await make_store("gw-a", heartbeat=BEAT)
    b = await make_store("gw-b", heartbeat=BEAT)
    await a.append([entry(0, conn="a1"), entry(1, conn="a1")])
    ib = await b.append([entry(0, conn="b1"), entry(0, conn="b2", route="other")])
    assert await owned(a) == [("a1", 0), ("a1", 1)]
    assert await owned(b) == [("b1", 0), ("b2", 0)]
    assert await a.conn_keys() == [("chat", "a1")] and await b.conn_keys() == [("chat", "b1"), ("other", "b2")]
    assert await a.pending_for("b1") == [] and seqs(await b.pending_for("b1")) == [("b1", 0)]
    await sleep(5 * BEAT)  # heartbeats come and go: nobody adopts a live node
    assert await owned(a) == [("a1", 0), ("a1", 1)] and len(await owned(b)) == 2
    # depth, dead letters and acks are cluster-wide
    assert (await a.depth())["chat"]["depth"] == 3
    assert await a.ack([ib[0]]) == 1
    assert await owned(b) == [("b2", 0)]


@pytest_twisted.ensureDeferred
async def test_a_dead_nodes_entries_are_adopted_in_order(make_store: MakeStore) -> None:
    a = await make_store("gw-a", heartbeat=BEAT)
    b = await make_store("gw-b", heartbeat=BEAT)
    await a.append([entry(0, conn="a1")])
    mine = [entry(i, conn=f"b{i % 3}", route=("chat", "other")[i % 2]) for i in range(30)]
    await b.append(mine[::-1][:10])  # seq order differs from append order on purpose
    await b.append(mine[::-1][10:])
    expected = await owned(b)
    assert len(expected) == 30
    b_conns = await b.conn_keys()
    await crash(b)
    await wait_for_async(lambda: _has(a, 31), timeout=3.0, what="a adopts b's entries")
    assert await owned(a) == [("a1", 0), *expected]  # same delivery order as b had
    assert seqs(await a.pending_for("b1")) == [("b1", i) for i in range(1, 30, 3)]
    assert await a.conn_keys() == [("chat", "a1"), *b_conns]
    assert sorted(a.held) == ["gw-a", "gw-b"]
    # a delivers them: acks, attempts and dead letters work on adopted entries
    adopted = [e for e in await a.pending(limit=100) if e.conn_key != "a1"]
    assert await a.ack([e.id for e in adopted[:29]]) == 29
    assert await a.attempt_failed([adopted[29].id]) == []
    await a.ack([adopted[29].id])
    # nothing left of b: a forgets it
    await wait_for_async(lambda: a.held == ["gw-a"], timeout=2.0, what="b forgotten")


@pytest_twisted.ensureDeferred
async def test_two_survivors_racing_for_one_dead_node(make_store: MakeStore) -> None:
    survivors = [await make_store(f"gw-{n}", heartbeat=BEAT) for n in ("a", "b", "c")]
    dead = await make_store("gw-dead", heartbeat=BEAT)
    ids = await dead.append([entry(i, conn=f"d{i % 4}") for i in range(40)])
    await crash(dead)
    # Each survivor also runs heartbeats back to back, all sent in one go: Redis runs one at a time.
    for _ in range(3):
        for s in survivors:
            s._node._heartbeat()
        await sleep(BEAT)
    await wait_for_async(lambda: _any_has(survivors, 40), timeout=3.0, what="someone adopts")
    for _ in range(5):  # and it stays so, heartbeat after heartbeat
        seen = [[e.id for e in await s.pending(limit=100)] for s in survivors]
        assert sorted(len(x) for x in seen) == [0, 0, 40]
        assert sorted(i for x in seen for i in x) == sorted(ids)  # each entry returned by exactly one store
        pf = [[e.id for e in await s.pending_for("d1")] for s in survivors]
        assert sorted(len(x) for x in pf) == [0, 0, 10]
        await sleep(BEAT)


@pytest_twisted.ensureDeferred
async def test_the_dead_node_comes_back_and_takes_its_entries_back(make_store: MakeStore) -> None:
    a = await make_store("gw-a", heartbeat=BEAT)
    b = await make_store("gw-b", heartbeat=BEAT)
    await b.append([entry(i, conn="b1") for i in range(5)])
    await crash(b)
    await wait_for_async(lambda: _has(a, 5), timeout=3.0, what="a adopts b's entries")
    again = await make_store("gw-b", heartbeat=BEAT)  # same node id, new process
    more = await again.append([entry(5, conn="b1")])  # owned by gw-b: delivered by a until the hand-back
    await wait_for_async(lambda: _has(again, 6), timeout=3.0, what="b takes its entries back")
    assert await owned(again) == [("b1", i) for i in range(6)]
    assert await owned(a) == [] and a.held == ["gw-a"]
    assert [e.id for e in await again.pending_for("b1")][-1] == more[0]


@pytest_twisted.ensureDeferred
async def test_a_graceful_stop_hands_the_entries_over_at_once(make_store: MakeStore) -> None:
    a = await make_store("gw-a", heartbeat=BEAT)
    b = await make_store("gw-b", heartbeat=BEAT, alive_ttl=30.0, lease_ttl=30.0)  # a crash would take 30 s
    await b.append([entry(i, conn="b1") for i in range(3)])
    await b.stop()  # releases its lease and its liveness
    await wait_for_async(lambda: _has(a, 3), timeout=1.0, what="a adopts b's entries")


@pytest_twisted.ensureDeferred
async def test_one_node_id_in_two_processes_delivers_once(make_store: MakeStore) -> None:
    first = await make_store("gw-a", heartbeat=BEAT)
    second = await make_store("gw-a", heartbeat=BEAT)  # a misconfiguration, or a restart before the TTL ran out
    await second.append([entry(0)])
    await first.append([entry(1)])
    await sleep(3 * BEAT)
    assert await owned(first) == [("c1", 0), ("c1", 1)] and await owned(second) == []
    await crash(first)
    await wait_for_async(lambda: _has(second, 2), timeout=3.0, what="the second process takes over")


async def _has(store: RedisQueueStore, n: int) -> bool:
    return len(await store.pending(limit=10_000)) == n


async def _any_has(stores: list[RedisQueueStore], n: int) -> bool:
    return any([len(await s.pending(limit=10_000)) == n for s in stores])
