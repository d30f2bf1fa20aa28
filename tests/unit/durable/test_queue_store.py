"""
What only the SQLite store does, on real files (the behaviour both stores
share is tests/test_queue_contract.py): row ids, the file (WAL, FULL sync,
reopened with its entries), a read-only or full file surfacing as
QueueUnavailable then recovering, a failed transaction failing every caller
in it, durability across kill -9 of a writing process, and the adoption
of the files of workers that are gone.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock

from support.queue_stores import Started, entry, sqlite_store, write_queue_file
from wsgateway.config.queue import QueueConfig
from wsgateway.durable.entries import QueueUnavailable
from wsgateway.durable.sqlite import SQLiteQueueStore

ROOT = Path(__file__).resolve().parents[3]

MakeStore = Callable[..., Awaitable[SQLiteQueueStore]]


@pytest_twisted.async_yield_fixture
async def make_store(tmp_path: Path) -> AsyncIterator[MakeStore]:
    """make_store(path=tmp_path/q.sqlite, clock=Clock at T0, **options) -> a started store; stopped after."""
    started = Started()

    async def make(path: Path | None = None, clock: Clock | None = None, **options: Any) -> SQLiteQueueStore:
        return await started.start(sqlite_store(path or tmp_path / "q.sqlite", clock, **options))

    yield make
    await started.stop_all()


@pytest_twisted.ensureDeferred
async def test_ids_are_row_ids_in_append_order_and_replay_keeps_them(make_store: MakeStore) -> None:
    store = await make_store(max_attempts=1)
    ids = await gatherResults([store.append([entry(i)]) for i in range(100)] + [store.append([entry(100), entry(101)])])
    flat = [i for chunk in ids for i in chunk]
    assert all(isinstance(i, int) for i in flat) and flat == sorted(flat) and len(set(flat)) == 102
    await store.attempt_failed(flat[:2])
    assert await store.replay_dead() == 2
    assert [e.id for e in await store.pending(limit=2)] == flat[:2]


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


def test_from_config_takes_the_queue_keys() -> None:
    store = SQLiteQueueStore.from_config(QueueConfig(path="/x/q.sqlite", max_attempts=3, retention=9.0),
                                         reactor=reactor)
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
from wsgateway.durable.entries import NewEntry
from wsgateway.durable.sqlite import SQLiteQueueStore

path, n, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
store = SQLiteQueueStore(path, reactor=reactor)

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
async def test_adopting_a_gone_workers_file_moves_everything_once_and_in_order(tmp_path: Path) -> None:
    from wsgateway.durable.sqlite_file import adopt_file

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
    from wsgateway.durable.sqlite_file import adopt_orphans

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
