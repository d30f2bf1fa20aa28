"""
queue_store.py on real SQLite files: order and exact fields, group commit,
ack, attempts and dead letters (injected clock), depth, replay, purge,
durability across kill -9 of a writing process, and a read-only or full
file surfacing as QueueUnavailable, then recovering.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock

from wsgateway.config.loader import QueueConfig
from wsgateway.durable.sqlite import NewEntry, QueueStore, QueueUnavailable, new_ulid

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000.0

MakeStore = Callable[..., Awaitable[QueueStore]]


@pytest_twisted.async_yield_fixture
async def make_store(tmp_path: Path) -> AsyncIterator[MakeStore]:
    """make_store(path=tmp_path/q.sqlite, clock=Clock at T0, **options) -> a started QueueStore; stopped after."""
    made: list[QueueStore] = []

    async def make(path: Path | None = None, clock: Clock | None = None, **options: Any) -> QueueStore:
        if clock is None:
            clock = Clock()
            clock.advance(T0)
        store = QueueStore(str(path or tmp_path / "q.sqlite"), reactor=reactor, clock=clock, **options)
        made.append(store)
        await store.start()
        return store

    yield make
    for s in made:
        await s.stop()


def entry(seq: int, *, route: str = "chat", conn: str = "c1", message: bytes | None = None, **kw: Any) -> NewEntry:
    return NewEntry(route=route, conn_key=conn, seq=seq, message=message if message is not None else b"m%d" % seq, **kw)


@pytest_twisted.ensureDeferred
async def test_append_then_pending_gives_exact_fields_in_order(make_store: MakeStore) -> None:
    store = await make_store()
    blob = bytes(range(256)) * 3 + b"\x00\xff\x00"
    first = NewEntry(
        route="telemetry",
        conn_key="conn-7",
        seq=0,
        message=blob,
        binary=True,
        claims={"sub": "alice", "roles": ["a", "b"], "n": 1},
        headers=(("X-User", "alice"), ("X-Roles", "a,b"), ("X-User", "dup")),
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        first_seen=T0 - 5,
    )
    text = NewEntry(route="telemetry", conn_key="conn-7", seq=1, message="héllo".encode())
    ids = await store.append([first, text])
    assert len(ids) == 2 and ids[0] < ids[1]
    got = await store.pending()
    assert [e.id for e in got] == ids
    a, b = got
    assert a.route == "telemetry" and a.conn_key == "conn-7" and a.seq == 0
    assert a.message == blob and isinstance(a.message, bytes) and a.binary is True
    assert a.claims == {"sub": "alice", "roles": ["a", "b"], "n": 1}
    assert a.headers == (("X-User", "alice"), ("X-Roles", "a,b"), ("X-User", "dup"))
    assert a.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert a.attempts == 0 and a.first_seen == T0 - 5 and a.enqueued_at == T0
    assert len(a.entry_id) == 26 and a.entry_id != b.entry_id
    assert b.message.decode() == "héllo" and b.binary is False and b.claims == {} and b.headers == ()
    assert b.trace_id is None and b.first_seen == T0


@pytest_twisted.ensureDeferred
async def test_pending_orders_by_id_and_each_connection_by_seq(make_store: MakeStore) -> None:
    store = await make_store()
    # c1's seq 1 is appended before its seq 0 (a retry path); c2 interleaves.
    await store.append([entry(1, conn="c1"), entry(0, conn="c2")])
    await store.append([entry(0, conn="c1"), entry(1, conn="c2"), entry(0, conn="c3", route="other")])
    got = await store.pending()
    assert [(e.conn_key, e.seq) for e in got] == [("c1", 0), ("c2", 0), ("c1", 1), ("c2", 1), ("c3", 0)]
    assert [(e.conn_key, e.seq) for e in await store.pending(route="chat", limit=3)] == [
        ("c1", 0),
        ("c2", 0),
        ("c1", 1),
    ]
    assert [e.route for e in await store.pending(route="other")] == ["other"]


@pytest_twisted.ensureDeferred
async def test_pending_for_and_conn_keys_walk_connections_oldest_first(make_store: MakeStore) -> None:
    store = await make_store()
    await store.append([entry(2, conn="b"), entry(1, conn="a", route="orders"), entry(1, conn="b"),
                        entry(2, conn="a", route="orders")])
    assert await store.conn_keys() == [("chat", "b"), ("orders", "a")]
    assert [(e.conn_key, e.seq) for e in await store.pending_for("b")] == [("b", 1), ("b", 2)]
    assert [e.seq for e in await store.pending_for("a", limit=1)] == [1]
    assert await store.pending_for("nobody") == []


@pytest_twisted.ensureDeferred
async def test_many_appends_in_one_reactor_turn_share_one_transaction(make_store: MakeStore) -> None:
    store = await make_store()
    before = store.transactions
    ds = [store.append([entry(i)]) for i in range(1000)]
    ids = await gatherResults(ds)
    assert store.transactions - before == 1
    assert store.appended == 1000
    flat = [i for chunk in ids for i in chunk]
    assert flat == sorted(flat) and len(set(flat)) == 1000
    assert [e.seq for e in await store.pending(limit=2000)] == list(range(1000))


@pytest_twisted.ensureDeferred
async def test_ack_removes_only_the_given_entries(make_store: MakeStore) -> None:
    store = await make_store()
    ids = await store.append([entry(i) for i in range(5)])
    assert await store.ack([ids[0], ids[2]]) == 2
    assert await store.ack([ids[0]]) == 0
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
    assert dead[0].dead_at == T0


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
async def test_replay_dead_puts_entries_back_with_their_ids(make_store: MakeStore) -> None:
    clock = Clock()
    clock.advance(T0)
    store = await make_store(clock=clock, max_attempts=1)
    ids = await store.append([entry(i) for i in range(4)])
    before = {e.id: e for e in await store.pending()}
    await store.attempt_failed(ids)
    assert await store.pending() == []
    clock.advance(100)
    assert await store.replay_dead([ids[1]]) == 1
    got = await store.pending()
    assert [e.id for e in got] == [ids[1]]
    e = got[0]
    assert e.entry_id == before[ids[1]].entry_id and e.first_seen == T0
    assert e.attempts == 0 and e.enqueued_at == T0 + 100
    assert await store.replay_dead() == 3
    assert [e.seq for e in await store.pending()] == [0, 1, 2, 3]
    assert await store.dead_letters() == []


@pytest_twisted.ensureDeferred
async def test_purge_by_route_all_and_dead_letters(make_store: MakeStore) -> None:
    store = await make_store(max_attempts=1)
    ids = await store.append([entry(0, route="a"), entry(0, route="b", conn="x"), entry(1, route="b", conn="x")])
    await store.attempt_failed([ids[0]])
    assert await store.purge("b") == 2
    assert await store.pending() == []
    assert await store.purge(dead=True) == 1
    await store.append([entry(5, route="c")])
    assert await store.purge() == 1
    assert await store.depth() == {}


@pytest_twisted.ensureDeferred
async def test_file_is_in_wal_mode_and_reopens_with_its_entries(make_store: MakeStore, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "q.sqlite"
    seen: list[int] = []
    store = await make_store(path, on_connect=lambda c: seen.append(c.execute("PRAGMA synchronous").fetchone()[0]))
    await store.append([entry(0, message=b"\x00\x01")])
    assert seen == [2]  # FULL: the WAL is fsynced at every commit
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")} >= {
            "entries",
            "dead_letters",
        }
    await store.stop()
    again = await make_store(path)
    assert [e.message for e in await again.pending()] == [b"\x00\x01"]


def test_ulid_is_time_ordered_and_unique() -> None:
    a, b = new_ulid(1.0), new_ulid(2.0)
    assert len(a) == 26 and a < b
    assert len({new_ulid() for _ in range(1000)}) == 1000


def test_from_config_takes_the_queue_keys() -> None:
    store = QueueStore.from_config(QueueConfig(path="/x/q.sqlite", max_attempts=3, retention=9.0), reactor=reactor)
    assert (store.path, store.max_attempts, store.retention) == ("/x/q.sqlite", 3, 9.0)


# -- failures ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_full_database_fails_append_with_queue_unavailable_then_recovers(make_store: MakeStore) -> None:
    limit = {"pages": 40}

    def cap(conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA max_page_count = {limit['pages']}")

    store = await make_store(on_connect=cap)
    small = await store.append([entry(0)])
    with pytest.raises(QueueUnavailable, match="full"):
        await store.append([entry(1, message=os.urandom(400_000))])
    assert store.errors == 1
    limit["pages"] = 100_000  # "the disk has room again" (applies to the connection opened after the error)
    assert [e.id for e in await store.pending()] == small  # the failed batch left nothing behind
    ids = await store.append([entry(2, message=os.urandom(400_000))])
    assert [e.id for e in await store.pending()] == small + ids


@pytest_twisted.ensureDeferred
async def test_a_batch_that_fails_fails_every_caller_in_it(make_store: MakeStore) -> None:
    store = await make_store(on_connect=lambda c: c.execute("PRAGMA max_page_count = 40"))
    d1 = store.append([entry(0)])
    d2 = store.append([entry(1, message=os.urandom(400_000))])
    for d in (d1, d2):
        with pytest.raises(QueueUnavailable):
            await d
    assert await store.pending() == []


def make_read_only(path: Path) -> Callable[[], None]:
    """Make ``path`` unwritable (root ignores file modes: then ``chattr +i``); returns the undo."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        return lambda: path.chmod(0o644)
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
        # never a skip: a test that quietly does not run in CI proves nothing
        pytest.fail("running as root without a working chattr +i (e2fsprogs): cannot make a file read-only")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True) and None


@pytest_twisted.ensureDeferred
async def test_read_only_file_fails_append_with_queue_unavailable_then_recovers(
    make_store: MakeStore, tmp_path: Path
) -> None:
    path = tmp_path / "q.sqlite"
    store = await make_store(path)
    first = await store.append([entry(0)])
    await store.stop()
    undo = make_read_only(path)
    try:
        store = await make_store(path)  # starts even though the file cannot be written
        with pytest.raises(QueueUnavailable, match="readonly"):
            await store.append([entry(1)])
        assert store.errors >= 1
    finally:
        undo()
    ids = await store.append([entry(2)])
    assert [e.id for e in await store.pending()] == first + ids


# -- durability across kill -9 ----------------------------------------------

KILL_SCRIPT = """
import os, sys
from twisted.internet import reactor, task
from twisted.internet.defer import gatherResults
from wsgateway.durable.sqlite import NewEntry, QueueStore

path, n, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
store = QueueStore(path, reactor=reactor)

def burst(conn, count):
    return [
        store.append([NewEntry(route="r", conn_key=conn, seq=i, message=os.urandom(200), binary=True)])
        for i in range(count)
    ]

def accepted(ids):
    print("accepted", sum(len(i) for i in ids), flush=True)
    # Keep writing: the kill lands while later transactions are in flight.
    task.LoopingCall(burst, tag + "-more", 50).start(0.001)

def go():
    d = store.start()
    # Half in one reactor turn, half in later turns while the first batch is written.
    d.addCallback(lambda _: gatherResults(burst(tag, n // 2) + [d2]))
    d.addCallback(accepted)

d2 = None
def later():
    global d2
    from twisted.internet.defer import Deferred
    d2 = Deferred()
    ds = [store.append([NewEntry(route="r", conn_key=tag + "-b", seq=i, message=b"b%d" % i)]) for i in range(n - n // 2)]
    gatherResults(ds).chainDeferred(d2)

reactor.callWhenRunning(lambda: (go(), reactor.callLater(0, later)))
reactor.run()
"""


@pytest_twisted.ensureDeferred
async def test_accepted_entries_survive_kill_9(make_store: MakeStore, tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    deadline = time.monotonic() + 10
    rounds = 0
    while rounds < 3 and time.monotonic() < deadline:
        tag = f"k{rounds}"
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_SCRIPT, str(path), "400", tag],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(5)
        assert line.strip() == "accepted 400", line + (proc.stderr.read() if proc.stderr else "")
        store = await make_store(path)
        got = await store.pending(limit=1_000_000)
        mine = [e.seq for e in got if e.conn_key == tag]
        others = [e.seq for e in got if e.conn_key == tag + "-b"]
        assert mine == list(range(200)) and others == list(range(200))
        await store.stop()
        rounds += 1
    assert rounds >= 2


@pytest_twisted.ensureDeferred
async def test_append_on_a_stopped_store_fails_instead_of_hanging(make_store: MakeStore) -> None:
    store = await make_store()
    d = store.append([entry(0)])
    await store.stop()  # what was accepted before stop is written first
    assert len(await d) == 1
    with pytest.raises(QueueUnavailable, match="not running"):
        await store.append([entry(1)])
    again = await make_store()
    assert [e.seq for e in await again.pending()] == [0]


async def write_queue_file(path: Path, entries: Sequence[NewEntry], *, dead: Sequence[NewEntry] = (),
                           attempts: int = 0) -> None:
    """
    A queue file as a gateway process leaves it behind, written by the
    store itself: ``entries`` after ``attempts`` failed deliveries each, and
    ``dead`` as dead letters.
    """
    store = QueueStore(str(path), reactor=reactor, max_attempts=attempts + 1)
    await store.start()
    try:
        ids = await store.append(list(entries))
        for _ in range(attempts):
            await store.attempt_failed(ids)
        if dead:
            dead_ids = await store.append(list(dead))
            for _ in range(attempts + 1):
                await store.attempt_failed(dead_ids)
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_adopting_a_gone_workers_file_moves_everything_once_and_in_order(tmp_path: Path) -> None:
    from wsgateway.durable.sqlite import adopt_file

    async def fill(path: Path, conn_key: str, n: int, dead: int = 0) -> None:
        await write_queue_file(path, [entry(seq, route="r", conn=conn_key, message=f"{conn_key}:{seq}".encode())
                                for seq in range(1, n + 1)],
                         dead=[entry(i, route="r", conn="dead") for i in range(dead)], attempts=1)

    def rows(path: Path) -> tuple[list[tuple[Any, ...]], int]:
        conn = sqlite3.connect(str(path))
        entries = conn.execute("SELECT conn_key, seq, message, attempts FROM entries ORDER BY id").fetchall()
        dead = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        conn.close()
        return entries, dead

    target, orphan = tmp_path / "q.sqlite.w1", tmp_path / "q.sqlite.w3"
    await fill(target, "mine", 2)
    await fill(orphan, "theirs", 3, dead=2)
    crashed = tmp_path / "copy"  # the orphan as a crash after the copy, before the delete, would leave it
    for suffix in ("", "-wal"):
        if Path(str(orphan) + suffix).exists():
            shutil.copy(str(orphan) + suffix, str(crashed) + suffix)

    assert adopt_file(str(target), str(orphan)) == 5
    assert not orphan.exists() and not Path(str(orphan) + "-wal").exists()
    entries, dead = rows(target)
    assert [(c, s) for c, s, _, _ in entries] == [("mine", 1), ("mine", 2), ("theirs", 1), ("theirs", 2), ("theirs", 3)]
    assert [m for _, _, m, _ in entries][2:] == [b"theirs:1", b"theirs:2", b"theirs:3"]
    assert {a for _, _, _, a in entries} == {1}  # attempts kept
    assert dead == 2
    # done again after such a crash: nothing is doubled
    assert adopt_file(str(target), str(crashed)) == 0
    assert rows(target) == (entries, 2)


@pytest_twisted.ensureDeferred
async def test_queue_files_of_another_layout_move_into_the_files_in_use(tmp_path: Path) -> None:
    from wsgateway.durable.sqlite import adopt_orphans

    async def make(name: str, n: int) -> None:
        await write_queue_file(tmp_path / name, [entry(seq, route="r", conn=name) for seq in range(1, n + 1)])

    def count(name: str) -> int:
        conn = sqlite3.connect(str(tmp_path / name))
        n = conn.execute("SELECT count(*) FROM entries").fetchone()[0]
        conn.close()
        return n

    # a single process's file, and the files of four workers, now run with two
    for name, n in (("q", 1), ("q.w1", 2), ("q.w2", 3), ("q.w3", 4), ("q.w4", 5), ("other.w9", 6)):
        await make(name, n)
    adopt_orphans(str(tmp_path / "q"), 2)
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm")))
    assert left == ["other.w9", "q.w1", "q.w2"]  # another queue's file is not ours to move
    assert (count("q.w1"), count("q.w2")) == (2 + 1 + 4, 3 + 5)  # q -> w1, w3 -> w1, w4 -> w2
    # and back to one process: every worker's file into the plain one
    adopt_orphans(str(tmp_path / "q"), 1)
    assert count("q") == 15 and not (tmp_path / "q.w1").exists() and not (tmp_path / "q.w2").exists()
