# -*- test-case-name: tests.unit.durable.test_durable_relay_units -*-
"""
The messages a durable relay holds (docs/durable-delivery.md), on their way
into the queue store: the appends of one client connection in flight, what
they add up to, and what waits for none to be in flight any more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from wsgateway.durable.clientstream import Message
from wsgateway.durable.entries import NewEntry
from wsgateway.durable.replay import QueueLink


class Appends:
    """
    ``appended`` is called after each append that succeeded, ``failed`` with
    the failure of one that did not; while any is in flight the caller keeps
    the client paused (an append may fail, and then nothing after it may be
    taken).
    """

    def __init__(self, link: QueueLink, clock: IReactorTime, *, appended: Callable[[], None],
                 failed: Callable[[Failure], None]) -> None:
        self._link = link
        self._clock = clock
        self._appended = appended
        self._failed = failed
        self.in_flight = 0
        self.begun = 0  # appends ever begun: a flush compares it to see whether one began while it read
        self.queued = 0  # messages the store has taken
        self._settled: list[Deferred[None]] = []  # waiting for the appends in flight

    def add(self, messages: Sequence[Message]) -> None:
        link = self._link
        now = self._clock.seconds()
        entries = [NewEntry(route=link.route, conn_key=link.conn_key, seq=m.seq, message=m.payload,
                            binary=m.binary, claims=link.claims, headers=link.headers, trace_id=link.trace_id,
                            first_seen=now) for m in messages]
        self.in_flight += 1
        self.begun += 1
        d = link.store.append(entries)
        d.addCallbacks(self._done, self._refused, callbackArgs=(len(entries),))

    def _done(self, _ids: Any, n: int) -> None:
        self.in_flight -= 1
        self.queued += n
        self._appended()
        self._settle()

    def _refused(self, f: Failure) -> None:
        self.in_flight -= 1
        self._failed(f)
        self._settle()

    def _settle(self) -> None:
        """Fire what waits for the appends in flight, once there is none."""
        if not self.in_flight:
            settled, self._settled = self._settled, []
            for d in settled:
                d.callback(None)

    def settled(self) -> Deferred[None]:
        """Fires once no append is in flight."""
        if not self.in_flight:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._settled.append(d)
        return d
