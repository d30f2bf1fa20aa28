# -*- test-case-name: tests.unit.durable.test_queue_batching -*-
"""
Group commit, written once for both queue stores: C{append} only buffers,
and the buffer is written at the end of the reactor turn. So 1 000 appends
in one turn cost one transaction (one fsync) or one Lua script (one round
trip), and the event loop never waits for a disk or for Redis.

The two stores differ in two rules, each a constructor argument:
  - C{serial}: one write in flight at a time (SQLite, one writer thread);
    appends made meanwhile wait and go into the next write together, sent
    as soon as the one in flight is done. Otherwise (Redis) every flush
    sends what is buffered at once, without waiting for earlier writes.
  - C{max_entries} / C{max_bytes} (of messages): one write holds at most
    that much, but one C{append} call is never split (a batch has at least
    one). SQLite has no cap.

A write that fails fails every caller in its batch with the same failure
(the store makes it a C{QueueUnavailable}); a caller whose Deferred is
cancelled while its entries are still buffered is taken out of the buffer
(once sent, a write cannot be taken back).

A write may also refuse some of its entries without failing: the store's
size caps (C{[queue] max_bytes}, C{max_bytes_per_connection}) are checked
inside the write, where the bytes already stored are known. Such an entry's
slot in the ids holds a L{QueueFull}, and each caller with one fails with
it while the rest of the batch is stored: one client over its share must
not cost the others their appends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from wsgateway.durable.entries import NewEntry, QueueFull

__all__ = ["GroupCommit"]

IdT = TypeVar("IdT")


@dataclass(eq=False)
class _Waiter(Generic[IdT]):
    entries: list[NewEntry]
    size: int  # bytes of messages
    done: Deferred[list[IdT]]


class GroupCommit(Generic[IdT]):
    """
    Batches appends for C{write(entries) -> Deferred[ids]} (one transaction
    or script, ids in the order of C{entries}). C{clock} schedules the flush
    at the end of the turn; C{now} stamps C{failed_at}.

    Counters, for the store's interface: C{transactions} (writes done),
    C{appended} (entries written), C{failed_at} (time of the last failed
    write, None after one succeeds; the store also sets it when it refuses
    an append), C{queued} / C{queued_bytes} (entries buffered or being
    written: what a store's backlog limit counts).
    """

    def __init__(
        self,
        write: Callable[[list[NewEntry]], Deferred[list[IdT]] | Deferred[list[IdT | QueueFull]]],
        *,
        clock: IReactorTime,
        now: Callable[[], float],
        serial: bool,
        max_entries: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self._write_batch = write
        self._clock = clock
        self._now = now
        self._serial = serial
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._buffer: list[_Waiter[IdT]] = []
        self._flush_call: IDelayedCall | None = None
        self._in_flight = 0
        self._idle: list[Deferred[None]] = []
        self.transactions = 0
        self.appended = 0
        self.failed_at: float | None = None
        self.queued = 0
        self.queued_bytes = 0

    def add(self, entries: list[NewEntry]) -> Deferred[list[IdT]]:
        """Buffer C{entries}; fires with their ids once the batch they go in is written."""
        size = sum(len(e.message) for e in entries)

        def cancel(d: Deferred[list[IdT]]) -> None:
            for i, w in enumerate(self._buffer):
                if w.done is d:
                    del self._buffer[i]
                    self.queued -= len(entries)
                    self.queued_bytes -= size
                    return

        waiter: _Waiter[IdT] = _Waiter(entries, size, Deferred(cancel))
        self._buffer.append(waiter)
        self.queued += len(entries)
        self.queued_bytes += size
        if self._flush_call is None and not (self._serial and self._in_flight):
            self._flush_call = self._clock.callLater(0, self._flush)
        return waiter.done

    def flush_now(self) -> None:
        """Write what is buffered now, not at the end of the turn (a store stopping)."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush()

    def when_idle(self) -> Deferred[None]:
        """Fires once nothing is buffered or being written (at once if so now)."""
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        self._maybe_idle()
        return d

    def _flush(self) -> None:
        self._flush_call = None
        while self._buffer and not (self._serial and self._in_flight):
            self._write(self._take())
        self._maybe_idle()

    def _take(self) -> list[_Waiter[IdT]]:
        """The first waiters of the buffer that fit in one write (at least one)."""
        count = size = 0
        n = 0
        for w in self._buffer:
            if n and ((self._max_entries is not None and count + len(w.entries) > self._max_entries)
                      or (self._max_bytes is not None and size + w.size > self._max_bytes)):
                break
            count, size, n = count + len(w.entries), size + w.size, n + 1
        batch, self._buffer = self._buffer[:n], self._buffer[n:]
        return batch

    def _write(self, batch: list[_Waiter[IdT]]) -> None:
        rows = [e for w in batch for e in w.entries]
        size = sum(w.size for w in batch)
        self._in_flight += 1

        def settle(result: Any) -> Any:
            # Before the callers hear: one that appends again is counted against the backlog as it is now.
            self.queued -= len(rows)
            self.queued_bytes -= size
            return result

        def written(ids: list[Any]) -> None:
            refusals = [i for i in ids if isinstance(i, QueueFull)]
            # a full queue refuses new messages as a failing one does (health); one client's share does not
            self.failed_at = self._now() if any(r.whole for r in refusals) else None
            self.transactions += 1
            self.appended += len(ids) - len(refusals)
            at = 0
            for w in batch:
                mine = ids[at : at + len(w.entries)]
                at += len(w.entries)
                refused = next((i for i in mine if isinstance(i, QueueFull)), None)
                if refused is not None:
                    w.done.errback(Failure(refused))
                else:
                    w.done.callback(mine)

        def failed(f: Failure) -> None:
            self.failed_at = self._now()
            for w in batch:
                w.done.errback(f)

        def done(_: object) -> None:
            self._in_flight -= 1
            if self._serial:
                self._flush()  # what was buffered meanwhile: the next write, at once
            else:
                self._maybe_idle()

        d = self._write_batch(rows)
        d.addBoth(settle)
        d.addCallbacks(written, failed)
        d.addBoth(done)

    def _maybe_idle(self) -> None:
        if self._in_flight or self._buffer or self._flush_call is not None:
            return
        idle, self._idle = self._idle, []
        for d in idle:
            d.callback(None)
