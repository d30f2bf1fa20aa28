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

from wsgateway.durable.entries import Entry, NewEntry, QueueFull, new_ulid

__all__ = ["COLUMNS", "ENTRY_OVERHEAD", "SCHEMA_VERSION", "adopt_file", "adopt_orphans", "connect", "insert",
           "entry_size", "insert_capped", "reclaim", "row_entry", "stored_bytes"]

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

# What an entry counts against the [queue] caps: its fields as stored plus a fixed share for the ids, times
# and index entries, so a flood of empty messages fills the cap as surely as one of big ones.
ENTRY_OVERHEAD = 64
_SIZE = ("(length(CAST({r}.message AS BLOB)) + length(CAST({r}.claims AS BLOB)) + length(CAST({r}.headers AS BLOB))"
         f" + length(CAST({{r}}.conn_key AS BLOB)) + {ENTRY_OVERHEAD})")

# The caps are checked in each write; summing the file there would cost a scan per batch, so triggers keep
# the totals with every insert and delete, whatever statement makes it (ack, purge, dead letters, adoption).
# queue_size counts entries and dead letters (both take disk); conn_bytes only a connection's live entries.
ACCOUNTING = f"""
CREATE TABLE IF NOT EXISTS queue_size (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    bytes       INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS conn_bytes (
    conn_key    TEXT PRIMARY KEY,
    bytes       INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO queue_size (id, bytes) VALUES (1, 0);
CREATE TRIGGER IF NOT EXISTS entries_in AFTER INSERT ON entries BEGIN
    UPDATE queue_size SET bytes = bytes + {_SIZE.format(r="new")};
    INSERT OR IGNORE INTO conn_bytes (conn_key, bytes) VALUES (new.conn_key, 0);
    UPDATE conn_bytes SET bytes = bytes + {_SIZE.format(r="new")} WHERE conn_key = new.conn_key;
END;
CREATE TRIGGER IF NOT EXISTS entries_out AFTER DELETE ON entries BEGIN
    UPDATE queue_size SET bytes = bytes - {_SIZE.format(r="old")};
    UPDATE conn_bytes SET bytes = bytes - {_SIZE.format(r="old")} WHERE conn_key = old.conn_key;
    DELETE FROM conn_bytes WHERE conn_key = old.conn_key AND bytes <= 0;
END;
CREATE TRIGGER IF NOT EXISTS dead_in AFTER INSERT ON dead_letters BEGIN
    UPDATE queue_size SET bytes = bytes + {_SIZE.format(r="new")};
END;
CREATE TRIGGER IF NOT EXISTS dead_out AFTER DELETE ON dead_letters BEGIN
    UPDATE queue_size SET bytes = bytes - {_SIZE.format(r="old")};
END;
"""

# A file written before the accounting existed: its totals, once, in the transaction that adds the triggers.
_FILL = f"""
INSERT OR REPLACE INTO queue_size (id, bytes) VALUES (1,
    (SELECT coalesce(sum({_SIZE.format(r="entries")}), 0) FROM entries)
    + (SELECT coalesce(sum({_SIZE.format(r="dead_letters")}), 0) FROM dead_letters));
DELETE FROM conn_bytes;
INSERT INTO conn_bytes (conn_key, bytes)
    SELECT conn_key, sum({_SIZE.format(r="entries")}) FROM entries GROUP BY conn_key;
"""

# Converting a file made before auto_vacuum takes a VACUUM (a full copy, in the writer thread at open):
# done once, and only up to this size, so a huge old file delays no start; beyond it a warning says how.
VACUUM_AT_OPEN_LIMIT = 1024 ** 3

# What the WAL keeps on disk after a checkpoint; between checkpoints it grows to about 1000 pages plus one batch.
WAL_LIMIT = 4 * 1024 * 1024


def connect(path: str) -> sqlite3.Connection:
    """
    A connection to the queue file ``path`` (made, with its folder, if
    missing): WAL, full sync, incremental auto-vacuum, the schema and its
    byte accounting.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    try:
        # before any table exists, so a new file needs no VACUUM to take it
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.OperationalError(f"cannot use WAL mode (journal_mode={mode})")
        conn.execute("PRAGMA synchronous=FULL")
        # the WAL grows to the auto-checkpoint (1000 pages) and would keep that size; this cuts it back
        conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT}")
        _incremental_vacuum(conn, path)
        counted = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'queue_size'").fetchone() is not None
        conn.executescript("BEGIN IMMEDIATE;" + SCHEMA + ACCOUNTING + ("" if counted else _FILL) + "COMMIT;")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()
        raise
    return conn


def _incremental_vacuum(conn: sqlite3.Connection, path: str) -> None:
    """Switch a file made without auto_vacuum to INCREMENTAL (it takes a VACUUM), if it is small enough."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
        return
    pages = conn.execute("PRAGMA page_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]
    if pages > VACUUM_AT_OPEN_LIMIT:
        _log.warn("queue file {path} ({size} bytes) gives no disk space back after delivery or purge: it was made "
                  "without auto_vacuum, and is too big to convert at start; stop the gateway and run "
                  "sqlite3 {path} 'PRAGMA auto_vacuum = INCREMENTAL; VACUUM;'", path=path, size=pages)
        return
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("VACUUM")


def stored_bytes(conn: sqlite3.Connection) -> int:
    """What the file holds, as the caps count it (entries and dead letters)."""
    row = conn.execute("SELECT bytes FROM queue_size WHERE id = 1").fetchone()
    return int(row[0]) if row else 0


def reclaim(conn: sqlite3.Connection) -> None:
    """
    Give the disk space of deleted entries back (outside a transaction):
    free pages off the end of the file, then the WAL truncated to nothing.
    """
    # one page per step, and execute() steps a statement without rows only once: executescript steps to the end
    conn.executescript("PRAGMA incremental_vacuum;")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def _fields(e: NewEntry) -> tuple[str, str]:
    return (json.dumps(dict(e.claims), separators=(",", ":")),
            json.dumps([list(h) for h in e.headers], separators=(",", ":")))


def entry_size(e: NewEntry) -> int:
    """What C{e} counts against the caps once stored: the triggers' sum (C{_SIZE})."""
    claims, headers = _fields(e)
    return (len(e.message) + len(claims.encode()) + len(headers.encode()) + len(e.conn_key.encode())
            + ENTRY_OVERHEAD)


def insert_capped(conn: sqlite3.Connection, rows: Sequence[NewEntry], now: float, *, max_bytes: int | None,
                  max_bytes_per_connection: int | None) -> list[int | QueueFull]:
    """
    C{insert}, but the rows of a connection that would pass its share, or
    the queue's, are not stored: their slots hold the L{QueueFull}. A
    connection's rows of one batch are taken or refused together (in the
    order the connections first appear), so none of them is half stored.
    """
    sizes: dict[str, int] = {}
    for e in rows:
        sizes[e.conn_key] = sizes.get(e.conn_key, 0) + entry_size(e)
    total = stored_bytes(conn)
    refused: dict[str, QueueFull] = {}
    for key, size in sizes.items():
        row = conn.execute("SELECT bytes FROM conn_bytes WHERE conn_key = ?", (key,)).fetchone()
        have = int(row[0]) if row else 0
        if max_bytes_per_connection is not None and have + size > max_bytes_per_connection:
            refused[key] = QueueFull(f"connection {key} would hold {have + size} bytes in the queue, over "
                                     f"max_bytes_per_connection = {max_bytes_per_connection}", whole=False)
        elif max_bytes is not None and total + size > max_bytes:
            refused[key] = QueueFull(f"the queue would hold {total + size} bytes, over max_bytes = {max_bytes}",
                                     whole=True)
        else:
            total += size
    ids = iter(insert(conn, [e for e in rows if e.conn_key not in refused], now))
    return [refused[e.conn_key] if e.conn_key in refused else next(ids) for e in rows]


def insert(conn: sqlite3.Connection, rows: Sequence[NewEntry], now: float) -> list[int]:
    """Insert new entries (in the caller's transaction), appended at C{now}; their row ids."""
    ids = []
    for e in rows:
        claims, headers = _fields(e)
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
                claims,
                headers,
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
