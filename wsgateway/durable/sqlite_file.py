# -*- test-case-name: tests.unit.durable.test_queue_store -*-
"""
The SQLite queue file of durable delivery (docs/durable-delivery.md,
C{[queue] path}): its schema, opening it (WAL, C{synchronous=FULL}; why in
L{wsgateway.durable.sqlite}), reading a row back as an L{Entry}, and
moving the file of a worker that no longer exists into one in use
(C{adopt_orphans}, run before the store opens its file). The store that
owns the file while the gateway runs is L{wsgateway.durable.sqlite.SQLiteQueueStore}.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Sequence
from typing import Any

from twisted.logger import Logger

from wsgateway.durable.entries import Entry, NewEntry, new_ulid

__all__ = ["COLUMNS", "SCHEMA_VERSION", "adopt_file", "adopt_orphans", "connect", "insert", "row_entry"]

SCHEMA_VERSION = 1

COLUMNS = (
    "id, entry_id, route, conn_key, seq, binary, message, claims, headers, trace_id, attempts, first_seen, enqueued_at"
)

# What an entry and a dead letter both hold (after the id, before attempts).
FIELDS = """
    entry_id    TEXT NOT NULL UNIQUE,
    route       TEXT NOT NULL,
    conn_key    TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    binary      INTEGER NOT NULL,
    message     BLOB NOT NULL,
    claims      TEXT NOT NULL,
    headers     TEXT NOT NULL,
    trace_id    TEXT,"""

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS entries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,{FIELDS}
    attempts    INTEGER NOT NULL DEFAULT 0,
    first_seen  REAL NOT NULL,
    enqueued_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_route ON entries (route, id);
CREATE INDEX IF NOT EXISTS entries_conn ON entries (conn_key, seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY,{FIELDS}
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
        conn.executescript(SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


def insert(conn: sqlite3.Connection, rows: Sequence[NewEntry], now: float) -> list[int]:
    """Insert new entries (in the caller's transaction), appended at C{now}; their row ids."""
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


def row_entry(row: Sequence[Any]) -> Entry:
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
    fields = COLUMNS.split(", ", 1)[1]  # all but the id: the target numbers them anew
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


# The namespace these lines had when adoption lived in the store module: log filters keep working.
_log = Logger(namespace="wsgateway.durable.sqlite")


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
