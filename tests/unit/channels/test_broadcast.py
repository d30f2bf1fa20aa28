"""broadcast.Outbox: straight through while the socket keeps up, bounded while it does not."""

from __future__ import annotations

import gc
import weakref

from wsgateway.channels.outbox import SLOW_CONSUMER, Outbox


class Sink:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed: list[tuple[int, str]] = []
        self.drops: list[int] = []

    def outbox(self, policy: str, limit: int = 10) -> Outbox:
        return Outbox(lambda p, b: self.sent.append(p), lambda c, r: self.closed.append((c, r)),
                      limit=limit, policy=policy, on_drop=self.drops.append)


def test_straight_through_then_queued_then_flushed_in_order() -> None:
    s = Sink()
    box = s.outbox("close")
    box.deliver(b"a", False)
    box.pauseProducing()
    box.deliver(b"bb", False)
    box.deliver(b"ccc", True)
    assert s.sent == [b"a"] and box.queued == 5
    box.resumeProducing()
    assert s.sent == [b"a", b"bb", b"ccc"] and box.queued == 0
    box.deliver(b"d", False)
    assert s.sent[-1] == b"d"


def test_close_policy_closes_1008_and_drops_the_queue() -> None:
    s = Sink()
    box = s.outbox("close", limit=4)
    box.pauseProducing()
    box.deliver(b"12", False)
    box.deliver(b"34", False)
    assert s.closed == []
    box.deliver(b"5", False)
    assert s.closed == [(1008, SLOW_CONSUMER)]
    assert box.queued == 0 and s.drops == [3]
    box.deliver(b"late", False)
    box.resumeProducing()
    assert s.sent == []


def test_drop_oldest_keeps_the_newest_within_the_limit() -> None:
    s = Sink()
    box = s.outbox("drop_oldest", limit=4)
    box.pauseProducing()
    for m in (b"11", b"22", b"33", b"44"):
        box.deliver(m, False)
    assert [p for p, _ in box.queue] == [b"33", b"44"] and box.dropped == 2
    box.resumeProducing()
    assert s.sent == [b"33", b"44"] and s.closed == []


def test_a_pause_during_the_flush_keeps_the_rest_queued() -> None:
    s = Sink()
    box: Outbox
    sent: list[bytes] = []

    def send(p: bytes, b: bool) -> None:
        sent.append(p)
        box.pauseProducing()  # the socket fills again after each write

    box = Outbox(send, lambda c, r: None, limit=100, policy="close")
    box.pauseProducing()
    box.deliver(b"x", False)
    box.deliver(b"y", False)
    box.resumeProducing()
    assert sent == [b"x"] and [p for p, _ in box.queue] == [b"y"]
    assert s.sent == []


def test_a_released_outbox_sends_nothing_and_lets_go_of_its_session() -> None:
    class Session:
        def __init__(self) -> None:
            self.sent: list[bytes] = []
            self.outbox = Outbox(self.send, self.close, limit=100, policy="close")

        def send(self, payload: bytes, binary: bool) -> None:
            self.sent.append(payload)

        def close(self, code: int, reason: str) -> None:
            raise AssertionError("a released outbox closes nothing")

    session = Session()
    outbox = session.outbox
    outbox.pauseProducing()
    outbox.deliver(b"queued", False)
    outbox.release()
    outbox.resumeProducing()
    outbox.deliver(b"late", False)
    outbox.deliver(b"x" * 1000, False)  # over the limit: no slow-consumer close either
    assert session.sent == []
    gc.disable()
    try:
        ref = weakref.ref(session)
        del session
        assert ref() is None  # no cycle through the outbox's methods
    finally:
        gc.enable()
