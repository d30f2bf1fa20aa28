"""
What the SQLite store does to keep its file bounded (docs/configuration.md,
docs/durable-delivery.md#bounds-and-disk-space), on real files: the byte
totals its triggers keep, through every statement that adds or removes
rows; a file made before auto_vacuum converted and counted when opened;
and the disk space given back after a purge and after the acks that empty
it. The caps themselves, which both stores share, are in
tests/unit/durable/test_queue_contract.py.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest_twisted

from support.queue_stores import Started, entry, sqlite_store
from wsgateway.durable.sqlite import SQLiteQueueStore
from wsgateway.durable.sqlite_file import SCHEMA, adopt_file, entry_size

MakeStore = Callable[..., Awaitable[SQLiteQueueStore]]


@pytest_twisted.async_yield_fixture
async def make_store(tmp_path: Path) -> AsyncIterator[MakeStore]:
    started = Started()

    async def make(path: Path | None = None, **options: Any) -> SQLiteQueueStore:
        store: SQLiteQueueStore = await started.start(sqlite_store(path or tmp_path / "q.sqlite", **options))
        return store

    yield make
    await started.stop_all()


def on_disk(path: Path) -> int:
    """The file and its WAL."""
    return sum(os.path.getsize(f"{path}{s}") for s in ("", "-wal") if os.path.exists(f"{path}{s}"))


def counted(path: Path) -> tuple[int, dict[str, int]]:
    """What the file's own totals say, read from the file."""
    conn = sqlite3.connect(path)
    try:
        total = conn.execute("SELECT bytes FROM queue_size").fetchone()[0]
        return total, dict(conn.execute("SELECT conn_key, bytes FROM conn_bytes"))
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_the_totals_follow_every_statement_that_adds_or_removes_rows(
        make_store: MakeStore, tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    store = await make_store(max_attempts=1)
    a = [entry(s, conn="a", message=b"a" * 10, claims={"sub": "caf\u00e9"}, headers=(("X-U", "u"),))
         for s in range(3)]
    b = [entry(s, conn="bb", message=bytes(range(256))) for s in range(2)]
    ids = await store.append(a + b)
    size_a, size_b = entry_size(a[0]), entry_size(b[0])
    assert counted(path) == (3 * size_a + 2 * size_b, {"a": 3 * size_a, "bb": 2 * size_b})
    assert store.stored_bytes == 3 * size_a + 2 * size_b
    await store.attempt_failed(ids[3:4])  # a dead letter: still on disk, no longer the connection's
    assert counted(path) == (3 * size_a + 2 * size_b, {"a": 3 * size_a, "bb": size_b})
    assert await store.replay_dead() == 1
    assert counted(path) == (3 * size_a + 2 * size_b, {"a": 3 * size_a, "bb": 2 * size_b})
    await store.ack(ids[:2])
    assert counted(path) == (size_a + 2 * size_b, {"a": size_a, "bb": 2 * size_b})
    assert await store.purge() == 3
    assert counted(path) == (0, {})  # no row left behind for a connection that has nothing queued
    assert store.stored_bytes == 0


@pytest_twisted.ensureDeferred
async def test_a_file_from_before_the_bounds_is_converted_and_counted_when_opened(
        make_store: MakeStore, tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("PRAGMA journal_mode=WAL")
    old.executescript(SCHEMA)
    old.execute("INSERT INTO entries (entry_id, route, conn_key, seq, binary, message, claims, headers, trace_id,"
                " attempts, first_seen, enqueued_at) VALUES ('01', 'chat', 'c1', 0, 0, ?, '{}', '[]', NULL, 0, 1, 1)",
                (b"x" * 1000,))
    assert old.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    old.close()
    store = await make_store(path)
    assert [e.message for e in await store.pending()] == [b"x" * 1000]
    size = entry_size(entry(0, message=b"x" * 1000))
    assert counted(path) == (size, {"c1": size})
    await store.stop()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL, after one VACUUM
    conn.close()


@pytest_twisted.ensureDeferred
async def test_adopting_a_workers_file_counts_its_entries(make_store: MakeStore, tmp_path: Path) -> None:
    target, orphan = tmp_path / "q.sqlite", tmp_path / "q.sqlite.w2"
    store = await make_store(orphan)
    await store.append([entry(0, conn="w2", message=b"o" * 40)])
    await store.stop()
    assert adopt_file(str(target), str(orphan)) == 1
    size = entry_size(entry(0, conn="w2", message=b"o" * 40))
    assert counted(target) == (size, {"w2": size})


@pytest_twisted.ensureDeferred
async def test_the_file_gives_its_space_back_after_a_purge(make_store: MakeStore, tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    store = await make_store()
    for n in range(8):  # 8 transactions of 256 KiB: file and WAL grow to a few MiB
        await store.append([entry(s, conn=f"c{n}", message=os.urandom(1024)) for s in range(256)])
    grown = on_disk(path)
    assert grown > 2 * 1024 * 1024
    assert await store.purge() == 8 * 256
    assert on_disk(path) < 256 * 1024, on_disk(path)


@pytest_twisted.ensureDeferred
async def test_the_file_gives_its_space_back_after_the_acks_that_empty_it(
        make_store: MakeStore, tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    store = await make_store()
    ids = []
    for n in range(8):
        ids += await store.append([entry(s, conn=f"c{n}", message=os.urandom(1024)) for s in range(256)])
    assert on_disk(path) > 2 * 1024 * 1024
    await store.ack(ids[:10])  # the first ack reclaims at once; the next ones wait for RECLAIM_INTERVAL...
    await store.ack(ids[10:-1])
    assert len(await store.pending()) == 1
    await store.ack(ids[-1:])  # ...unless the queue is empty now
    assert on_disk(path) < 256 * 1024, on_disk(path)
