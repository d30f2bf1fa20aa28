"""
The group commit both queue stores use (wsgateway.durable.batching), on a
Clock and a fake write: what goes into one write, when it is sent, the
serial (SQLite) and pipelined (Redis) rules, caps, a failed write, cancel,
and waiting until idle.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from wsgateway.durable.batching import GroupCommit
from wsgateway.durable.entries import NewEntry, QueueFull, QueueUnavailable

_sync = SynchronousTestCase()


def entries(*seqs: int, size: int = 1) -> list[NewEntry]:
    return [NewEntry(route="r", conn_key="c", seq=s, message=b"x" * size) for s in seqs]


class Writes:
    """The fake write: records each batch (its seqs) and answers when told."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.answers: list[Deferred[list[int]]] = []

    def __call__(self, rows: list[NewEntry]) -> Deferred[list[int]]:
        self.batches.append([e.seq for e in rows])
        d: Deferred[list[int]] = Deferred()
        self.answers.append(d)
        return d

    def answer(self, i: int = 0) -> None:
        self.answers[i].callback([s + 100 for s in self.batches[i]])


def commit(serial: bool, **caps: Any) -> tuple[GroupCommit[int], Writes, Clock]:
    clock, writes = Clock(), Writes()
    return GroupCommit(writes, clock=clock, now=clock.seconds, serial=serial, **caps), writes, clock


@pytest.mark.parametrize("serial", [True, False])
def test_the_appends_of_one_turn_go_in_one_write_at_the_end_of_the_turn(serial: bool) -> None:
    c, writes, clock = commit(serial)
    a, b = c.add(entries(1, 2)), c.add(entries(3))
    assert writes.batches == []  # only buffered: the flush is on the injected clock
    clock.advance(0)
    assert writes.batches == [[1, 2, 3]] and clock.getDelayedCalls() == []
    writes.answer()
    assert _sync.successResultOf(a) == [101, 102] and _sync.successResultOf(b) == [103]
    assert (c.transactions, c.appended, c.queued, c.queued_bytes) == (1, 3, 0, 0)


def test_serial_appends_during_a_write_go_together_into_the_next_one_when_it_is_done() -> None:
    c, writes, clock = commit(serial=True)
    c.add(entries(1))
    clock.advance(0)
    later = [c.add(entries(2)), c.add(entries(3))]
    assert clock.getDelayedCalls() == []  # nothing scheduled while a write is in flight
    clock.advance(0)
    assert writes.batches == [[1]]
    writes.answer(0)
    assert writes.batches == [[1], [2, 3]]  # at once, not a turn later
    writes.answer(1)
    assert [_sync.successResultOf(d) for d in later] == [[102], [103]]


def test_pipelined_batches_are_capped_sent_at_once_and_an_append_is_never_split() -> None:
    c, writes, clock = commit(serial=False, max_entries=10, max_bytes=1000)
    c.add(entries(*range(25)))
    for i in range(25, 40):
        c.add(entries(i))
    clock.advance(0)
    assert [len(b) for b in writes.batches] == [25, 10, 5]
    c.add(entries(50, size=600))
    c.add(entries(51, size=600))
    clock.advance(0)
    assert writes.batches[3:] == [[50], [51]]  # 1 200 bytes do not fit one write of 1 000
    c.add(entries(52))
    clock.advance(0)
    assert len(writes.batches) == 6  # not waiting for the five in flight


@pytest.mark.parametrize("serial", [True, False])
def test_a_failed_write_fails_every_caller_in_it_and_the_next_success_clears_failed_at(serial: bool) -> None:
    c, writes, clock = commit(serial)
    clock.advance(7)
    ds = [c.add(entries(1)), c.add(entries(2))]
    clock.advance(0)
    writes.answers[0].errback(QueueUnavailable("disk full"))
    for d in ds:
        assert _sync.failureResultOf(d, QueueUnavailable).getErrorMessage() == "disk full"
    assert (c.failed_at, c.transactions, c.appended, c.queued) == (7, 0, 0, 0)
    d = c.add(entries(3))
    clock.advance(0)
    writes.answer(1)
    assert _sync.successResultOf(d) == [103] and c.failed_at is None


def test_cancel_takes_buffered_entries_out_but_not_sent_ones() -> None:
    c, writes, clock = commit(serial=True)
    sent = c.add(entries(1, size=5))
    clock.advance(0)
    kept, dropped = c.add(entries(2)), c.add(entries(3, size=9))
    dropped.cancel()
    _sync.failureResultOf(dropped, CancelledError)
    assert (c.queued, c.queued_bytes) == (2, 6)
    sent.cancel()  # already sent: it cannot be taken back, only no longer heard
    _sync.failureResultOf(sent, CancelledError)
    writes.answer(0)
    assert writes.batches == [[1], [2]]
    writes.answer(1)
    assert _sync.successResultOf(kept) == [102]


def test_when_idle_waits_for_buffered_and_written_and_flush_now_does_not_wait_for_the_turn() -> None:
    c, writes, clock = commit(serial=False)
    _sync.successResultOf(c.when_idle())
    d = c.add(entries(1))
    idle = c.when_idle()
    c.flush_now()
    assert writes.batches == [[1]] and clock.getDelayedCalls() == []
    _sync.assertNoResult(idle)
    writes.answer()
    _sync.successResultOf(d)
    _sync.successResultOf(idle)


def test_the_backlog_counts_are_settled_before_the_callers_hear() -> None:
    c, writes, clock = commit(serial=False)
    seen: list[int] = []
    c.add(entries(1, 2)).addCallback(lambda _: seen.append(c.queued))
    assert c.queued == 2
    clock.advance(0)
    writes.answer()
    assert seen == [0]


def test_a_write_that_refuses_one_callers_entries_fails_only_that_caller() -> None:
    # the store's size caps refuse inside the write: the refused slots hold a QueueFull
    c, writes, clock = commit(serial=True)
    a, b = c.add(entries(1, 2)), c.add(entries(3))
    clock.advance(0)
    full = QueueFull("over max_bytes_per_connection", whole=False)
    writes.answers[0].callback([101, full, 103])
    assert _sync.failureResultOf(a, QueueFull).value is full  # none of a's entries counts as stored
    assert _sync.successResultOf(b) == [103]
    assert (c.transactions, c.appended, c.queued, c.failed_at) == (1, 2, 0, None)  # one client: store healthy


def test_a_refusal_of_the_whole_queue_marks_the_store_as_failing() -> None:
    c, writes, clock = commit(serial=False)
    clock.advance(5)
    a = c.add(entries(1))
    clock.advance(0)
    writes.answers[0].callback([QueueFull("over max_bytes", whole=True)])
    assert _sync.failureResultOf(a, QueueFull).value.whole
    assert c.failed_at == 5 and c.appended == 0
