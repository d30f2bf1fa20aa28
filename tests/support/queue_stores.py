"""
Making queue stores for the tests: a SQLite store on a file, a Redis store
on a ``support.redis_server`` server, each with its clock at ``T0`` unless given
one, and ``Started`` to stop every store a test started. Used by the
contract suite (tests/unit/durable/test_queue_contract.py) and by each store's own tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock

from wsgateway.durable.entries import NewEntry
from wsgateway.durable.redis import RedisQueueStore
from wsgateway.durable.sqlite import SQLiteQueueStore
from wsgateway.redis.link import Backoff

T0 = 1_700_000_000.0
PREFIX = "t"


def at_t0() -> Clock:
    clock = Clock()
    clock.advance(T0)
    return clock


def sqlite_store(path: Path, clock: Clock | None = None, **options: Any) -> SQLiteQueueStore:
    return SQLiteQueueStore(str(path), reactor=reactor, clock=clock or at_t0(), **options)


def redis_store(url: str, node_id: str = "gw-a", clock: Clock | None = None, **options: Any) -> RedisQueueStore:
    # short timeouts: the failure tests wait for them
    options.setdefault("reply_timeout", 1.0)
    options.setdefault("connect_timeout", 1.0)
    options.setdefault("backoff", Backoff(initial=0.05, maximum=0.2))
    return RedisQueueStore(url, prefix=PREFIX, node_id=node_id, reactor=reactor, clock=clock or at_t0(), **options)


class Started:
    """The stores a test started, stopped at its end (by its fixture)."""

    def __init__(self) -> None:
        self.stores: list[Any] = []

    async def start(self, store: Any) -> Any:
        self.stores.append(store)
        await store.start()
        return store

    async def stop_all(self) -> None:
        for s in self.stores:
            await s.stop()


def entry(seq: int, *, route: str = "chat", conn: str = "c1", message: bytes | None = None, **kw: Any) -> NewEntry:
    return NewEntry(route=route, conn_key=conn, seq=seq, message=message if message is not None else b"m%d" % seq, **kw)


async def write_queue_file(path: Path, entries: Sequence[NewEntry], *, dead: Sequence[NewEntry] = (),
                           attempts: int = 0) -> None:
    """
    A queue file as a gateway process leaves it behind, written by the
    store itself: ``entries`` after ``attempts`` failed deliveries each, and
    ``dead`` as dead letters.
    """
    store = SQLiteQueueStore(str(path), reactor=reactor, max_attempts=attempts + 1)
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
