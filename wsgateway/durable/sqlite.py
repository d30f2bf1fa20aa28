# -*- test-case-name: tests.unit.durable.test_queue_store -*-
"""
The SQLite queue store of durable delivery (docs/durable-delivery.md, C{[queue]}):
L{SQLiteQueueStore}, a L{wsgateway.interfaces.QueueStore} (the semantics of
every operation are documented there). The file's schema and the adoption
of orphaned worker files are in L{wsgateway.durable.sqlite_file}.

One SQLite file in WAL mode holds the entries that could not be forwarded
(table C{entries}) and the ones that gave up (table C{dead_letters}). Every
SQLite call runs on one writer thread owned by the store (a L{ThreadPool} of
size 1), never in the reactor thread, and in submission order: the
L{SQLiteWriter} of L{wsgateway.durable.sqlite_writer}.

Group commit (L{wsgateway.durable.batching}, C{serial}): C{append} only
buffers; the buffer is written at the end of the reactor turn, and while a
write is in flight further appends wait and go into the next transaction
together. So 1 000 appends in one turn cost one transaction and one fsync,
and the event loop never waits for a disk.

Durability guarantee: C{journal_mode=WAL} with C{synchronous=FULL}. The
Deferred of C{append} fires only after COMMIT returned, and with FULL
SQLite has fsynced the WAL by then. So an accepted entry survives a
C{kill -9} of the gateway (NORMAL would already give that: the WAL is in
the OS page cache) and also an OS crash or power loss, as far as the disk
honours fsync (NORMAL could lose the last commits there). Group commit
keeps FULL cheap: one fsync per batch, not per message. Before the
Deferred fires nothing is promised; if it fails the entries were not
stored and the caller must not treat them as accepted.

Errors: any SQLite error (read-only file, "database or disk is full",
"disk I/O error", a path that cannot be opened) becomes L{QueueUnavailable}
from the operation that hit it; nothing is dropped silently. After an error
the connection is closed and the next operation opens it again, so the
store recovers by itself once the file is writable or the disk has room.

Ids: C{Entry.id} is the row id (ack, replay, order); C{Entry.entry_id} is
a 26-character ULID (time-ordered, unique) meant for the upstream to dedupe
on, since delivery is at least once. A dead letter keeps both ids, and
C{replay_dead} puts it back with them.

Order: C{pending} returns entries by id, and the entries of one connection
key by C{seq} (they occupy the same positions, sorted by C{seq}).
Retention is counted from C{enqueued_at}: the append time, reset by
C{replay_dead}; C{first_seen} stays the time the gateway first had the
message, and C{depth} reports the oldest age from it.

Bounds (C{[queue] max_bytes}, C{max_bytes_per_connection}): checked in each
group commit against totals the file keeps itself (triggers in
L{wsgateway.durable.sqlite_file}); the appends over a cap fail with
L{QueueFull}, the rest of their batch is stored. Disk space comes back
through C{auto_vacuum = INCREMENTAL}: after a purge, after the ack that
empties the queue, and otherwise at most every C{RECLAIM_INTERVAL} seconds
of acks (sqlite_writer.py), free pages are cut off the file and the WAL is
truncated.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgateway.durable.batching import GroupCommit
from wsgateway.durable.entries import (
    DeadLetter,
    Entry,
    NewEntry,
    QueueFull,
    QueueUnavailable,
    in_conn_order,
)
from wsgateway.durable.sqlite_file import COLUMNS, adopt_file, adopt_orphans, insert_capped, row_entry
from wsgateway.durable.sqlite_writer import SQLiteWriter

if TYPE_CHECKING:
    from wsgateway.interfaces import QueueStore as QueueStoreInterface

__all__ = ["SQLiteQueueStore", "adopt_file", "adopt_orphans"]


def _chunks(ids: Sequence[int], n: int = 500) -> Iterable[Sequence[int]]:
    for i in range(0, len(ids), n):
        yield ids[i : i + n]


class SQLiteQueueStore(Service):
    """
    The SQLite store. C{reactor} runs the store: the writer thread's results
    come back through it, and the group commit's flush is scheduled on it
    (the end of its turn). C{clock} only gives the time written into entries
    and read for retention and ages (tests inject a Clock and let the real
    reactor run the store). C{on_connect(conn)} runs in the writer thread on
    each new connection.
    """

    log = Logger()
    backend = "QueueStore"  # docs/admin-api.md: the name /admin/queue has always reported for SQLite

    def __init__(
        self,
        path: str,
        *,
        reactor: Any,
        clock: IReactorTime | None = None,
        max_attempts: int = 20,
        retention: float = 86400.0,
        on_connect: Callable[[sqlite3.Connection], None] | None = None,
        max_bytes: int | None = None,
        max_bytes_per_connection: int | None = None,
    ) -> None:
        self.path = path
        timer: Any = clock if clock is not None else reactor
        self._now: Callable[[], float] = timer.seconds
        self.max_attempts = max_attempts
        self.retention = retention
        self.max_bytes = max_bytes
        self.max_bytes_per_connection = max_bytes_per_connection
        self._writer = SQLiteWriter(path, reactor=reactor, log=self.log, on_connect=on_connect)
        self._commit: GroupCommit[int] = GroupCommit(self._write, clock=reactor, now=self._now, serial=True)
        self._stopping = False

    @property
    def stored_bytes(self) -> int | None:
        """What the file held as of the last write (or its opening), as the caps count it."""
        return self._writer.stored_bytes

    @stored_bytes.setter
    def stored_bytes(self, value: int | None) -> None:
        # QueueStore declares a settable attribute; the writer keeps the gauge
        self._writer.stored_bytes = value

    @property
    def errors(self) -> int:
        return self._writer.errors

    @property
    def transactions(self) -> int:
        return self._commit.transactions

    @property
    def appended(self) -> int:
        return self._commit.appended

    @property
    def append_failed_at(self) -> float | None:
        return self._commit.failed_at

    # -- lifecycle -------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Any, *, reactor: Any, clock: IReactorTime | None = None) -> SQLiteQueueStore:
        """From a C{QueueConfig}."""
        return cls(cfg.path, reactor=reactor, clock=clock, max_attempts=cfg.max_attempts, retention=cfg.retention,
                   max_bytes=cfg.max_bytes, max_bytes_per_connection=cfg.max_bytes_per_connection)

    def start(self) -> Deferred[None]:
        """Start the writer thread and open the file. Fires even if it cannot be opened (logged; operations retry)."""
        if self._writer.started:
            return succeed(None)
        self.running = 1
        self._writer.start()

        def failed(f: Failure) -> None:
            self.log.error("queue file {path} unavailable: {why}", path=self.path, why=f.getErrorMessage())

        d = self._writer.call(self._writer.open)
        return d.addCallbacks(lambda _: None, failed)

    def stop(self) -> Deferred[None]:
        """Write what is buffered, close the file, stop the thread."""
        if not self._writer.started:
            return succeed(None)
        self._stopping = True
        d = self._commit.when_idle()

        def close(_: object) -> Deferred[None]:
            return self._writer.call(self._writer.close)

        def done(result: object) -> None:
            self._stopping = False
            self.running = 0
            self._writer.stop()

        d.addCallback(close)
        d.addBoth(done)
        return d

    def startService(self) -> None:
        self.start()

    def stopService(self) -> Deferred[None]:
        return self.stop()

    # -- append (group commit) -------------------------------------------

    def append(self, entries: Sequence[NewEntry]) -> Deferred[list[int]]:
        if not self._writer.started or self._stopping:
            return fail(QueueUnavailable(f"{self.path}: the queue store is not running"))
        return self._commit.add(list(entries))

    def _write(self, rows: list[NewEntry]) -> Deferred[list[int | QueueFull]]:
        """One group commit: C{rows} in one transaction (those over a cap refused: L{insert_capped})."""
        now = self._now()

        def unavailable(f: Failure) -> Failure:
            if not f.check(QueueUnavailable):
                f = Failure(QueueUnavailable(f"{self.path}: {f.getErrorMessage()}"))
            return f

        return self._writer.tx_call(lambda conn: insert_capped(
            conn, rows, now, max_bytes=self.max_bytes, max_bytes_per_connection=self.max_bytes_per_connection,
        )).addErrback(unavailable)

    # -- reads and changes -----------------------------------------------

    def pending(self, route: str | None = None, limit: int = 1000) -> Deferred[list[Entry]]:
        def read(conn: sqlite3.Connection) -> list[Entry]:
            if route is None:
                rows = conn.execute(f"SELECT {COLUMNS} FROM entries ORDER BY id LIMIT ?", (limit,))
            else:
                rows = conn.execute(
                    f"SELECT {COLUMNS} FROM entries WHERE route = ? ORDER BY id LIMIT ?", (route, limit)
                )
            return in_conn_order([row_entry(r) for r in rows])

        return self._writer.tx_call(read, write=False)

    def pending_for(self, conn_key: str, limit: int = 500) -> Deferred[list[Entry]]:
        def read(conn: sqlite3.Connection) -> list[Entry]:
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM entries WHERE conn_key = ? ORDER BY seq, id LIMIT ?", (conn_key, limit)
            )
            return [row_entry(r) for r in rows]

        return self._writer.tx_call(read, write=False)

    def conn_keys(self, limit: int = 100) -> Deferred[list[tuple[str, str]]]:
        def read(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            q = "SELECT route, conn_key FROM entries GROUP BY conn_key ORDER BY min(id) LIMIT ?"
            return [(str(r), str(c)) for r, c in conn.execute(q, (limit,))]

        return self._writer.tx_call(read, write=False)

    def ack(self, ids: Sequence[int]) -> Deferred[int]:
        ids = list(ids)

        def delete(conn: sqlite3.Connection) -> int:
            n = 0
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                n += conn.execute(f"DELETE FROM entries WHERE id IN ({marks})", chunk).rowcount
            return n

        return self._writer.freeing_call(delete, now=self._now(), at_once=False)

    def attempt_failed(self, ids: Sequence[int]) -> Deferred[list[int]]:
        ids = list(ids)
        now = self._now()

        def bump(conn: sqlite3.Connection) -> list[int]:
            moved: list[int] = []
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                conn.execute(f"UPDATE entries SET attempts = attempts + 1 WHERE id IN ({marks})", chunk)
                moved += self._bury(conn, f"id IN ({marks}) AND attempts >= ?", [*chunk, self.max_attempts],
                                    "max_attempts", now)
                moved += self._bury(conn, f"id IN ({marks}) AND enqueued_at < ?", [*chunk, now - self.retention],
                                    "retention", now)
            return sorted(moved)

        return self._writer.tx_call(bump)

    def expire(self, now: float | None = None) -> Deferred[list[int]]:
        at = self._now() if now is None else now
        return self._writer.tx_call(
            lambda conn: self._bury(conn, "enqueued_at < ?", [at - self.retention], "retention", at))

    @staticmethod
    def _bury(conn: sqlite3.Connection, where: str, args: list[Any], reason: str, now: float) -> list[int]:
        ids = [r[0] for r in conn.execute(f"SELECT id FROM entries WHERE {where} ORDER BY id", args)]
        if ids:
            conn.execute(
                f"INSERT INTO dead_letters ({COLUMNS}, reason, dead_at)"
                f" SELECT {COLUMNS}, ?, ? FROM entries WHERE {where}",
                [reason, now, *args],
            )
            conn.execute(f"DELETE FROM entries WHERE {where}", args)
        return ids

    def depth(self) -> Deferred[dict[str, dict[str, float]]]:
        now = self._now()

        def read(conn: sqlite3.Connection) -> dict[str, dict[str, float]]:
            out: dict[str, dict[str, float]] = {}
            q = "SELECT route, count(*), min(first_seen) FROM entries GROUP BY route"
            for route, n, oldest in conn.execute(q):
                out[route] = {"depth": n, "oldest_age": max(0.0, now - oldest), "dead": 0}
            for route, n in conn.execute("SELECT route, count(*) FROM dead_letters GROUP BY route"):
                out.setdefault(route, {"depth": 0, "oldest_age": 0.0, "dead": 0})["dead"] = n
            return out

        return self._writer.tx_call(read, write=False)

    def dead_letters(self, limit: int = 100, route: str | None = None) -> Deferred[list[DeadLetter]]:
        def read(conn: sqlite3.Connection) -> list[DeadLetter]:
            where, args = ("WHERE route = ?", [route]) if route is not None else ("", [])
            rows = conn.execute(
                f"SELECT {COLUMNS}, reason, dead_at FROM dead_letters {where} ORDER BY id LIMIT ?", [*args, limit]
            )
            return [DeadLetter(row_entry(r[:13]), r[13], r[14]) for r in rows]

        return self._writer.tx_call(read, write=False)

    def replay_dead(self, ids: Sequence[int] | None = None) -> Deferred[int]:
        now = self._now()
        cols = COLUMNS.replace("attempts, first_seen, enqueued_at", "0, first_seen, ?")

        def move(conn: sqlite3.Connection) -> int:
            def one(where: str, args: Sequence[Any]) -> int:
                n = conn.execute(
                    f"INSERT INTO entries ({COLUMNS}) SELECT {cols} FROM dead_letters {where}", [now, *args]
                ).rowcount
                conn.execute(f"DELETE FROM dead_letters {where}", args)
                return n

            if ids is None:
                return one("", ())
            return sum(one(f"WHERE id IN ({','.join('?' * len(c))})", c) for c in _chunks(list(ids)))

        return self._writer.tx_call(move)

    def purge(self, route: str | None = None, *, dead: bool = False) -> Deferred[int]:
        table = "dead_letters" if dead else "entries"

        def delete(conn: sqlite3.Connection) -> int:
            if route is None:
                return conn.execute(f"DELETE FROM {table}").rowcount
            return conn.execute(f"DELETE FROM {table} WHERE route = ?", (route,)).rowcount

        return self._writer.freeing_call(delete, now=self._now(), at_once=True)


if TYPE_CHECKING:

    def _is_a_queue_store(store: SQLiteQueueStore) -> QueueStoreInterface[int]:
        return store  # mypy checks the store against the interface here
