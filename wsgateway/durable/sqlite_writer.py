# -*- test-case-name: tests.unit.durable.test_queue_store -*-
"""
The writer thread of the SQLite queue store (L{wsgateway.durable.sqlite}):
L{SQLiteWriter}, one L{ThreadPool} of size 1 and the one connection to the
file that only that thread touches. Every SQLite call of the store runs
here, in submission order, never in the reactor thread.

Errors: a SQLite error or an C{OSError} becomes L{QueueUnavailable} (counted
in C{errors}, logged) and drops the connection; the next call opens it
again, so the store recovers by itself once the file is usable. The
C{stored_bytes} gauge is read inside each write transaction, and when the
file is opened.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from wsgateway.durable.entries import QueueUnavailable
from wsgateway.durable.sqlite_file import connect, reclaim, stored_bytes

__all__ = ["RECLAIM_INTERVAL", "SQLiteWriter"]

T = TypeVar("T")

RECLAIM_INTERVAL = 30.0  # seconds (store clock) between reclaims while acks keep coming


class SQLiteWriter:
    """
    The writer thread and its connection to C{path}. C{reactor} gets the
    results back from the thread; C{log} is the store's (its events keep the
    store's namespace). C{on_connect(conn)} runs in the writer thread on each
    new connection. The store starts the thread (C{start}) before any
    C{call} and stops it (C{stop}) after its last one.
    """

    def __init__(
        self,
        path: str,
        *,
        reactor: Any,
        log: Logger,
        on_connect: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        self.path = path
        self._reactor = reactor
        self._log = log
        self._on_connect = on_connect
        self.stored_bytes: int | None = None  # as of the last write (set in the writer thread)
        self._reclaimed_at: float | None = None  # writer thread
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="wsgateway-queue")
        self._conn: sqlite3.Connection | None = None  # writer thread only
        self.started = False
        self.errors = 0  # QueueUnavailable failures (reactor thread)

    def start(self) -> None:
        """Start the thread: calls are taken from here on."""
        self.started = True
        self._pool.start()

    def stop(self) -> None:
        """Stop the thread (after the store's last call has run)."""
        self.started = False
        self._pool.stop()

    # -- in the writer thread ------------------------------------------------

    def open(self) -> sqlite3.Connection:
        """The connection, opened first if there is none (writer thread)."""
        if self._conn is None:
            conn = connect(self.path)
            if self._on_connect is not None:
                try:
                    self._on_connect(conn)
                except BaseException:
                    conn.close()
                    raise
            self._conn = conn
            self.stored_bytes = stored_bytes(conn)  # the gauge, before the first write after a restart
        return self._conn

    def close(self) -> None:
        """Close the connection, if open (writer thread)."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def tx(self, work: Callable[[sqlite3.Connection], T], write: bool = True) -> T:
        """Run C{work} in one transaction, in the writer thread; on error roll back and drop the connection."""
        try:
            conn = self.open()
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = work(conn)
                if write:
                    self.stored_bytes = stored_bytes(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result
        except (sqlite3.Error, OSError) as e:
            try:
                self.close()
            except sqlite3.Error:
                self._conn = None
            raise QueueUnavailable(f"{self.path}: {e}") from e

    # -- from the reactor thread -----------------------------------------------

    def call(self, fn: Callable[[], T]) -> Deferred[T]:
        """Run C{fn} in the writer thread; its SQLite errors fail the Deferred with L{QueueUnavailable}."""
        if not self.started:
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

    def tx_call(self, work: Callable[[sqlite3.Connection], T], write: bool = True) -> Deferred[T]:
        """C{tx} in the writer thread."""
        return self.call(lambda: self.tx(work, write))

    def freeing_call(self, work: Callable[[sqlite3.Connection], T], *, now: float, at_once: bool) -> Deferred[T]:
        """C{tx_call} of a delete, then the space given back (L{reclaim}) when it is due."""
        def run() -> T:
            result = self.tx(work)
            last = self._reclaimed_at
            if at_once or not self.stored_bytes or last is None or now - last >= RECLAIM_INTERVAL:
                self._reclaimed_at = now
                try:
                    reclaim(self.open())
                except (sqlite3.Error, OSError) as e:
                    # what was deleted stays deleted; the space comes back with a later reclaim
                    self._log.warn("queue file {path}: giving disk space back failed: {why}", path=self.path, why=e)
            return result

        return self.call(run)

    def _count_error(self, f: Failure) -> Failure:
        if f.check(QueueUnavailable):
            self.errors += 1
            self._log.warn("queue store: {why}", why=f.getErrorMessage())
        return f
