# -*- test-case-name: tests.test_queue_store -*-
"""
The SQLite queue store of durable delivery (docs/durable-delivery.md, C{[queue]}).

One SQLite file in WAL mode holds the entries that could not be forwarded
(table C{entries}) and the ones that gave up (table C{dead_letters}). Every
SQLite call runs on one writer thread owned by the store (a L{ThreadPool} of
size 1), never in the reactor thread, and in submission order.

Group commit: C{append} only buffers; the buffer is written at the end of
the reactor turn, and while a write is in flight further appends wait and
go into the next transaction together. So 1 000 appends in one turn cost
one transaction and one fsync, and the event loop never waits for a disk.

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
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from wsgateway.durable.entries import (  # noqa: F401  (re-exported: the store's interface)
    DeadLetter,
    Entry,
    NewEntry,
    QueueUnavailable,
    in_conn_order,
    new_ulid,
)

T = TypeVar("T")

SCHEMA_VERSION = 1

_COLUMNS = (
    "id, entry_id, route, conn_key, seq, binary, message, claims, headers, trace_id, attempts, first_seen, enqueued_at"
)

# What an entry and a dead letter both hold (after the id, before attempts).
_FIELDS = """
    entry_id    TEXT NOT NULL UNIQUE,
    route       TEXT NOT NULL,
    conn_key    TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    binary      INTEGER NOT NULL,
    message     BLOB NOT NULL,
    claims      TEXT NOT NULL,
    headers     TEXT NOT NULL,
    trace_id    TEXT,"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS entries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,{_FIELDS}
    attempts    INTEGER NOT NULL DEFAULT 0,
    first_seen  REAL NOT NULL,
    enqueued_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_route ON entries (route, id);
CREATE INDEX IF NOT EXISTS entries_conn ON entries (conn_key, seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY,{_FIELDS}
    attempts    INTEGER NOT NULL,
    first_seen  REAL NOT NULL,
    enqueued_at REAL NOT NULL,
    reason      TEXT NOT NULL,
    dead_at     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_route ON dead_letters (route, id);
PRAGMA user_version = {SCHEMA_VERSION};
"""


def connect(path: str) -> sqlite3.Connection:
    """A connection to the queue file ``path`` (made, with its folder, if missing): WAL, full sync, the schema."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.OperationalError(f"cannot use WAL mode (journal_mode={mode})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


def _entry(row: Sequence[Any]) -> Entry:
    return Entry(
        id=row[0],
        entry_id=row[1],
        route=row[2],
        conn_key=row[3],
        seq=row[4],
        binary=bool(row[5]),
        message=bytes(row[6]),
        claims=json.loads(row[7]),
        headers=tuple((str(n), str(v)) for n, v in json.loads(row[8])),
        trace_id=row[9],
        attempts=row[10],
        first_seen=row[11],
        enqueued_at=row[12],
    )


def _chunks(ids: Sequence[int], n: int = 500) -> Iterable[Sequence[int]]:
    for i in range(0, len(ids), n):
        yield ids[i : i + n]


class QueueStore(Service):
    """
    The SQLite store. C{reactor} runs the writer thread's results back in
    the reactor thread; C{clock} gives the time (tests inject a Clock).
    C{on_connect(conn)} runs in the writer thread on each new connection.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        *,
        reactor: Any,
        clock: IReactorTime | None = None,
        max_attempts: int = 20,
        retention: float = 86400.0,
        on_connect: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        self.path = path
        self._reactor = reactor
        timer: Any = clock if clock is not None else reactor
        self._now: Callable[[], float] = timer.seconds
        self.max_attempts = max_attempts
        self.retention = retention
        self._on_connect = on_connect
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="wsgateway-queue")
        self._conn: sqlite3.Connection | None = None  # writer thread only
        self._buffer: list[tuple[list[NewEntry], Deferred[list[int]]]] = []
        self._flush_call: Any = None
        self._writing = False
        self._idle: list[Deferred[None]] = []
        self._started = False
        self._stopping = False
        # Counters, for metrics and tests (written in the reactor thread).
        self.transactions = 0  # append transactions committed
        self.appended = 0
        self.errors = 0
        self.append_failed_at: float | None = None  # clock time of the last failed append

    # -- lifecycle -------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Any, *, reactor: Any, clock: IReactorTime | None = None) -> QueueStore:
        """From a C{QueueConfig}."""
        return cls(cfg.path, reactor=reactor, clock=clock, max_attempts=cfg.max_attempts, retention=cfg.retention)

    def start(self) -> Deferred[None]:
        """Start the writer thread and open the file. Fires even if it cannot be opened (logged; operations retry)."""
        if self._started:
            return succeed(None)
        self._started = True
        self.running = 1
        self._pool.start()

        def failed(f: Failure) -> None:
            self.log.error("queue file {path} unavailable: {why}", path=self.path, why=f.getErrorMessage())

        d = self._call(self._open)
        return d.addCallbacks(lambda _: None, failed)

    def stop(self) -> Deferred[None]:
        """Write what is buffered, close the file, stop the thread."""
        if not self._started:
            return succeed(None)
        self._stopping = True
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        self._maybe_idle()

        def close(_: object) -> Deferred[None]:
            return self._call(self._close)

        def done(result: object) -> None:
            self._started = self._stopping = False
            self.running = 0
            self._pool.stop()

        d.addCallback(close)
        d.addBoth(done)
        return d

    def startService(self) -> None:
        self.start()

    def stopService(self) -> Deferred[None]:
        return self.stop()

    # -- writer thread ---------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = connect(self.path)
            if self._on_connect is not None:
                try:
                    self._on_connect(conn)
                except BaseException:
                    conn.close()
                    raise
            self._conn = conn
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def _tx(self, work: Callable[[sqlite3.Connection], T], write: bool = True) -> T:
        """Run C{work} in one transaction, in the writer thread; on error roll back and drop the connection."""
        try:
            conn = self._open()
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = work(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result
        except (sqlite3.Error, OSError) as e:
            try:
                self._close()
            except sqlite3.Error:
                self._conn = None
            raise QueueUnavailable(f"{self.path}: {e}") from e

    def _call(self, fn: Callable[[], T]) -> Deferred[T]:
        if not self._started:
            raise RuntimeError("the queue store is not started")

        def run() -> T:
            try:
                return fn()
            except (sqlite3.Error, OSError) as e:
                self._conn = None
                raise QueueUnavailable(f"{self.path}: {e}") from e

        d = deferToThreadPool(self._reactor, self._pool, run)
        d.addErrback(self._count_error)
        return d

    def _tx_call(self, work: Callable[[sqlite3.Connection], T], write: bool = True) -> Deferred[T]:
        return self._call(lambda: self._tx(work, write))

    def _count_error(self, f: Failure) -> Failure:
        if f.check(QueueUnavailable):
            self.errors += 1
            self.log.warn("queue store: {why}", why=f.getErrorMessage())
        return f

    # -- append (group commit) -------------------------------------------

    def append(self, entries: Sequence[NewEntry]) -> Deferred[list[int]]:
        """
        Store C{entries} (in this order); fires with their ids once the
        commit is durable, or fails with L{QueueUnavailable}.
        """
        if not self._started or self._stopping:
            return fail(QueueUnavailable(f"{self.path}: the queue store is not running"))
        d: Deferred[list[int]] = Deferred()
        self._buffer.append((list(entries), d))
        if not self._writing and self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        self._flush_call = None
        if self._writing:
            return
        if not self._buffer:
            self._maybe_idle()
            return
        batch, self._buffer = self._buffer, []
        self._writing = True
        now = self._now()
        rows = [e for entries, _ in batch for e in entries]

        def write(conn: sqlite3.Connection) -> list[int]:
            ids = []
            for e in rows:
                cur = conn.execute(
                    "INSERT INTO entries (entry_id, route, conn_key, seq, binary, message, claims, headers,"
                    " trace_id, attempts, first_seen, enqueued_at) VALUES (?,?,?,?,?,?,?,?,?,0,?,?)",
                    (
                        new_ulid(now),
                        e.route,
                        e.conn_key,
                        e.seq,
                        int(e.binary),
                        sqlite3.Binary(bytes(e.message)),
                        json.dumps(dict(e.claims), separators=(",", ":")),
                        json.dumps([list(h) for h in e.headers], separators=(",", ":")),
                        e.trace_id,
                        now if e.first_seen is None else e.first_seen,
                        now,
                    ),
                )
                ids.append(int(cur.lastrowid or 0))
            return ids

        def written(ids: list[int]) -> None:
            self.append_failed_at = None
            self.transactions += 1
            self.appended += len(ids)
            i = 0
            for entries, d in batch:
                d.callback(ids[i : i + len(entries)])
                i += len(entries)

        def failed(f: Failure) -> None:
            if not f.check(QueueUnavailable):
                f = Failure(QueueUnavailable(f"{self.path}: {f.getErrorMessage()}"))
            self.append_failed_at = self._now()
            for _, d in batch:
                d.errback(f)

        def next_batch(_: object) -> None:
            self._writing = False
            self._flush()

        d = self._tx_call(write)
        d.addCallbacks(written, failed)
        d.addBoth(next_batch)

    def _maybe_idle(self) -> None:
        if self._writing or self._buffer or self._flush_call is not None:
            return
        idle, self._idle = self._idle, []
        for d in idle:
            d.callback(None)

    # -- reads and changes -----------------------------------------------

    def pending(self, route: str | None = None, limit: int = 1000) -> Deferred[list[Entry]]:
        """The oldest C{limit} entries (of C{route}, or all), in delivery order."""

        def read(conn: sqlite3.Connection) -> list[Entry]:
            if route is None:
                rows = conn.execute(f"SELECT {_COLUMNS} FROM entries ORDER BY id LIMIT ?", (limit,))
            else:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM entries WHERE route = ? ORDER BY id LIMIT ?", (route, limit)
                )
            return in_conn_order([_entry(r) for r in rows])

        return self._tx_call(read, write=False)

    def pending_for(self, conn_key: str, limit: int = 500) -> Deferred[list[Entry]]:
        """The oldest C{limit} entries of one client connection, by C{seq}."""

        def read(conn: sqlite3.Connection) -> list[Entry]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE conn_key = ? ORDER BY seq, id LIMIT ?", (conn_key, limit)
            )
            return [_entry(r) for r in rows]

        return self._tx_call(read, write=False)

    def conn_keys(self, limit: int = 100) -> Deferred[list[tuple[str, str]]]:
        """
        C{(route, conn_key)} of the connections that have entries, the one
        with the oldest entry first: what a replay pass walks through.
        """

        def read(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            q = "SELECT route, conn_key FROM entries GROUP BY conn_key ORDER BY min(id) LIMIT ?"
            return [(str(r), str(c)) for r, c in conn.execute(q, (limit,))]

        return self._tx_call(read, write=False)

    def ack(self, ids: Sequence[int]) -> Deferred[int]:
        """Remove delivered entries; fires with how many were removed."""
        ids = list(ids)

        def delete(conn: sqlite3.Connection) -> int:
            n = 0
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                n += conn.execute(f"DELETE FROM entries WHERE id IN ({marks})", chunk).rowcount
            return n

        return self._tx_call(delete)

    def attempt_failed(self, ids: Sequence[int]) -> Deferred[list[int]]:
        """
        Count one more failed delivery attempt for C{ids}; those that reach
        C{max_attempts}, or are older than C{retention}, move to the dead
        letters. Fires with the ids moved.
        """
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

        return self._tx_call(bump)

    def expire(self, now: float | None = None) -> Deferred[list[int]]:
        """Move every entry older than C{retention} to the dead letters; fires with their ids."""
        at = self._now() if now is None else now
        return self._tx_call(lambda conn: self._bury(conn, "enqueued_at < ?", [at - self.retention], "retention", at))

    @staticmethod
    def _bury(conn: sqlite3.Connection, where: str, args: list[Any], reason: str, now: float) -> list[int]:
        ids = [r[0] for r in conn.execute(f"SELECT id FROM entries WHERE {where} ORDER BY id", args)]
        if ids:
            conn.execute(
                f"INSERT INTO dead_letters ({_COLUMNS}, reason, dead_at)"
                f" SELECT {_COLUMNS}, ?, ? FROM entries WHERE {where}",
                [reason, now, *args],
            )
            conn.execute(f"DELETE FROM entries WHERE {where}", args)
        return ids

    def depth(self) -> Deferred[dict[str, dict[str, float]]]:
        """C{{route: {"depth": n, "oldest_age": seconds, "dead": n}}} for every route with entries or dead letters."""
        now = self._now()

        def read(conn: sqlite3.Connection) -> dict[str, dict[str, float]]:
            out: dict[str, dict[str, float]] = {}
            q = "SELECT route, count(*), min(first_seen) FROM entries GROUP BY route"
            for route, n, oldest in conn.execute(q):
                out[route] = {"depth": n, "oldest_age": max(0.0, now - oldest), "dead": 0}
            for route, n in conn.execute("SELECT route, count(*) FROM dead_letters GROUP BY route"):
                out.setdefault(route, {"depth": 0, "oldest_age": 0.0, "dead": 0})["dead"] = n
            return out

        return self._tx_call(read, write=False)

    def dead_letters(self, limit: int = 100, route: str | None = None) -> Deferred[list[DeadLetter]]:
        """The oldest C{limit} dead letters (of C{route}, or all), by id."""

        def read(conn: sqlite3.Connection) -> list[DeadLetter]:
            where, args = ("WHERE route = ?", [route]) if route is not None else ("", [])
            rows = conn.execute(
                f"SELECT {_COLUMNS}, reason, dead_at FROM dead_letters {where} ORDER BY id LIMIT ?", [*args, limit]
            )
            return [DeadLetter(_entry(r[:13]), r[13], r[14]) for r in rows]

        return self._tx_call(read, write=False)

    def replay_dead(self, ids: Sequence[int] | None = None) -> Deferred[int]:
        """
        Put dead letters (C{ids}, or all when None) back in the queue with
        the same ids, zero attempts and a fresh retention window. Fires with
        how many moved.
        """
        now = self._now()
        cols = _COLUMNS.replace("attempts, first_seen, enqueued_at", "0, first_seen, ?")

        def move(conn: sqlite3.Connection) -> int:
            def one(where: str, args: Sequence[Any]) -> int:
                n = conn.execute(
                    f"INSERT INTO entries ({_COLUMNS}) SELECT {cols} FROM dead_letters {where}", [now, *args]
                ).rowcount
                conn.execute(f"DELETE FROM dead_letters {where}", args)
                return n

            if ids is None:
                return one("", ())
            return sum(one(f"WHERE id IN ({','.join('?' * len(c))})", c) for c in _chunks(list(ids)))

        return self._tx_call(move)

    def purge(self, route: str | None = None, *, dead: bool = False) -> Deferred[int]:
        """Delete the entries (C{dead}: the dead letters) of C{route}, or of all routes; fires with how many."""
        table = "dead_letters" if dead else "entries"

        def delete(conn: sqlite3.Connection) -> int:
            if route is None:
                return conn.execute(f"DELETE FROM {table}").rowcount
            return conn.execute(f"DELETE FROM {table} WHERE route = ?", (route,)).rowcount

        return self._tx_call(delete)


def adopt_file(path: str, orphan: str) -> int:
    """
    Move what the queue file ``orphan`` holds (entries and dead letters) into
    the queue file ``path``, then delete ``orphan``: the file of a worker
    that no longer exists, after ``[gateway] workers`` was lowered, would
    otherwise wait for a worker that never comes. Entries keep their order
    (per connection they all come from the one file). Safe to repeat after a
    crash between the copy and the delete: an entry id already copied is
    skipped. Runs before the workers start, so no one else has either file
    open. Returns how many entries and dead letters were moved.
    """
    fields = _COLUMNS.split(", ", 1)[1]  # all but the id: the target numbers them anew
    dead = fields + ", reason, dead_at"
    conn = connect(path)
    try:
        conn.execute("ATTACH DATABASE ? AS orphan", (orphan,))
        try:
            conn.execute("BEGIN IMMEDIATE")
            moved = conn.execute(
                f"INSERT OR IGNORE INTO entries ({fields}) SELECT {fields} FROM orphan.entries ORDER BY id"
            ).rowcount
            moved += conn.execute(
                f"INSERT OR IGNORE INTO dead_letters ({dead}) SELECT {dead} FROM orphan.dead_letters ORDER BY id"
            ).rowcount
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.execute("DETACH DATABASE orphan")
    finally:
        conn.close()
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(orphan + suffix)
        except FileNotFoundError:
            pass
    return moved


_log = Logger()


def adopt_orphans(path: str, workers: int) -> None:
    """
    Queue files that no process of this gateway will open any more move
    into the ones that will, before those are opened: with one process the
    queue is ``path``, with N workers ``path.w1`` .. ``path.wN`` (one each).
    After a restart with another ``workers``, the files of the old layout
    (``path.wK`` for K > N, ``path`` itself when N > 1, every ``path.wK``
    when N = 1) would otherwise wait for a process that never comes. Each
    move is logged; a file that cannot be moved is left where it is, with
    an error line saying how to reach it.
    """
    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(name) + r"(?:\.w([0-9]+))?")
    try:
        found = sorted((int(m.group(1) or 0), f) for f in os.listdir(folder) if (m := pattern.fullmatch(f)))
    except FileNotFoundError:
        return
    for k, filename in found:
        if (workers == 1 and k == 0) or (workers > 1 and 1 <= k <= workers):
            continue  # in use
        target = name if workers == 1 else f"{name}.w{max(k - 1, 0) % workers + 1}"
        orphan = os.path.join(folder, filename)
        try:
            moved = adopt_file(os.path.join(folder, target), orphan)
        except Exception as e:
            _log.error("queue file {orphan} could not be moved into {target}: {error}; its entries wait there until "
                       "the gateway runs with the workers setting that wrote it again", orphan=orphan,
                       target=target, error=e)
            continue
        _log.info("queue file {orphan} (workers = {workers} now) moved into {target}: {moved} entries and dead "
                  "letters", orphan=orphan, workers=workers, target=target, moved=moved)
