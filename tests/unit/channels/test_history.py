"""
Channel history without a reactor (wsgateway.channels.history and
recovery): which channels keep one, the in-process store and its bounds,
the recovery decision, and the merge of live messages at the seam.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from wsgateway.channels.deflate import PreparedMessage
from wsgateway.channels.history import HistoryRule, HistoryRules, Kept, MemoryHistory, Position, Window, recover
from wsgateway.channels.recovery import RecoveryGate, kept_messages, recovered_frame

RULE = HistoryRule(size=3, ttl=60.0)


def route(name: str, channel: str, size: int, mode: str = "broadcast", ttl: float = 60.0) -> SimpleNamespace:
    return SimpleNamespace(name=name, channel=channel, history_size=size, history_ttl=ttl, mode=mode)


def test_rules_match_channel_templates_first_route_first() -> None:
    rules = HistoryRules.of([
        route("plain", "room:{room}", 0),
        route("feed", "feed:{name}", 10, ttl=30),
        route("other", "feed:{a}", 99),
        route("user", "user:{claims.sub}:inbox", 5),
        route("proxy", "news", 7, mode="proxy"),
    ])
    assert rules.rule("feed:x") == HistoryRule(10, 30)
    assert rules.rule("feed:a:b") == HistoryRule(10, 30)  # a field matches any characters, as templates fill them
    assert rules.rule("user:alice:inbox") == HistoryRule(5, 60)
    assert rules.rule("room:x") is None  # history_size = 0
    assert rules.rule("feed:") is None  # a field is never empty
    assert rules.rule("news") is None  # proxy routes' channels keep none
    assert rules.rule("xfeed:a") is None and rules.rule("user:a:inboxes") is None
    assert not HistoryRules() and rules


def test_rules_treat_regex_characters_in_templates_as_text() -> None:
    rules = HistoryRules.of([route("r", "a.b+{x}", 1)])
    assert rules.rule("a.b+1") is not None
    assert rules.rule("axb+1") is None and rules.rule("a.bb1") is None


def test_offsets_count_up_per_channel_and_the_size_is_kept() -> None:
    h = MemoryHistory()
    positions = [h.append("c", RULE, str(i).encode(), False, now=1.0) for i in range(5)]
    assert [p.offset for p in positions] == [1, 2, 3, 4, 5]
    assert len({p.epoch for p in positions}) == 1
    assert h.append("d", RULE, b"x", True, now=1.0).offset == 1
    w = h.read("c", RULE, since=0, now=2.0)
    assert (w.top, w.first) == (5, 3)
    assert [(k.offset, k.payload) for k in w.messages] == [(3, b"2"), (4, b"3"), (5, b"4")]
    assert h.read("d", RULE, 0, 2.0).messages == [Kept(1, b"x", True)]


def test_expired_messages_are_not_recoverable() -> None:
    h = MemoryHistory()
    h.append("c", RULE, b"old", False, now=0.0)
    h.append("c", RULE, b"new", False, now=50.0)
    w = h.read("c", RULE, since=0, now=70.0)  # ttl 60: the first one expired at 60
    assert (w.first, [k.offset for k in w.messages]) == (2, [2])
    w = h.read("c", RULE, since=0, now=200.0)
    assert (w.top, w.first, w.messages) == (2, 3, [])


def test_total_bytes_are_bounded_by_dropping_the_oldest_message_anywhere() -> None:
    h = MemoryHistory(max_bytes=100)
    big = HistoryRule(size=1000, ttl=60)
    for i in range(30):
        h.append(f"ch{i % 3}", big, b"x" * 10, False, now=float(i))
    assert h.bytes == 100 and h.count == 10
    kept = {c: [k.offset for k in h.read(c, big, 0, 30.0).messages] for c in ("ch0", "ch1", "ch2")}
    assert kept == {"ch0": [8, 9, 10], "ch1": [8, 9, 10], "ch2": [7, 8, 9, 10]}  # the last 10 published


def test_what_it_holds_stays_proportional_to_what_it_keeps() -> None:
    """One old message kept on a quiet channel must not let a busy one's trimmed entries pile up."""
    h = MemoryHistory()
    long_lived = HistoryRule(size=1, ttl=1e9)
    h.append("quiet", long_lived, b"q", False, now=0.0)
    for i in range(20000):
        h.append("busy", RULE, b"b", False, now=1.0)
    assert h.count == 4
    assert len(h._all) <= 2 * h.count + 1024 + 1


def test_idle_channels_are_forgotten_and_start_a_new_epoch() -> None:
    h = MemoryHistory(meta_ttl=100)
    first = h.append("c", RULE, b"a", False, now=0.0)
    h.append("other", RULE, b"b", False, now=150.0)  # "c" idle for 150 s: forgotten
    again = h.append("c", RULE, b"c", False, now=151.0)
    assert again.offset == 1 and again.epoch != first.epoch
    assert h.bytes == 2 and h.count == 2


def test_the_number_of_channels_is_bounded() -> None:
    h = MemoryHistory(max_channels=10)
    for i in range(50):
        h.append(f"c{i}", RULE, b"x", False, now=1.0)
    assert len(h._channels) == 10 and h.count == 10 and h.bytes == 10
    h.read("never-published", RULE, 0, 1.0)  # a read names a channel too
    assert len(h._channels) == 10


@pytest.mark.parametrize(("since", "epoch", "recovered", "sent"), [
    (7, "e", True, [8, 9, 10]),
    (10, "e", True, []),  # saw everything
    (4, "e", True, [5, 6, 7, 8, 9, 10]),  # the oldest kept is the next one
    (3, "e", False, []),  # 4 is gone: a gap
    (11, "e", False, []),  # an offset this epoch never reached
    (7, "other", False, []),  # history lost since
    (7, None, False, []),  # no epoch: nothing proves it is the same history
])
def test_the_recovery_decision(since: int, epoch: str | None, recovered: bool, sent: list[int]) -> None:
    kept = [Kept(o, b"m", False) for o in range(5, 11) if o > since]
    r = recover("c", since, epoch, Window("e", 10, 5, kept))
    assert (r.recovered, [k.offset for k in r.messages], r.offset, r.epoch) == (recovered, sent, 10, "e")


def test_no_history_is_recovered_false() -> None:
    r = recover("c", 3, "e", None)
    assert r.frame() == {"recovered": False, "channel": "c", "offset": 0, "epoch": ""}


def message(offset: int | None, size: int = 1) -> PreparedMessage:
    return PreparedMessage(b"x" * size, False, "c", None if offset is None else Position(offset, "e"))


def test_the_gate_releases_only_what_history_did_not_already_send() -> None:
    gate = RecoveryGate(limit=100, policy="close", on_drop=lambda n: None, on_overflow=lambda: None)
    for m in (message(9), message(10), message(11), message(None), message(12)):
        gate.hold(m)
    assert [m.offset for m in gate.release(top=10)] == [11, None, 12]
    assert not gate.held and gate.bytes == 0


def test_the_gate_overflows_with_the_routes_policy() -> None:
    events: list[object] = []
    closing = RecoveryGate(limit=10, policy="close", on_drop=events.append, on_overflow=lambda: events.append("x"))
    for i in range(3):
        closing.hold(message(i, 4))
    assert events == [3, "x"] and closing.overflowed and not closing.held
    closing.hold(message(4))
    assert not closing.held
    dropped: list[int] = []
    dropping = RecoveryGate(limit=10, policy="drop_oldest", on_drop=dropped.append, on_overflow=lambda: 1 / 0)
    for i in range(4):
        dropping.hold(message(i, 4))
    assert [m.offset for m in dropping.held] == [2, 3] and dropped == [1, 1]


def test_the_recovered_frame_and_the_kept_messages() -> None:
    r = recover("c", 1, "e", Window("e", 3, 1, [Kept(2, b"two", False), Kept(3, b"\x00", True)]))
    frame = recovered_frame(r)
    assert not frame.binary and json.loads(frame.payload) == {"recovered": True, "channel": "c", "offset": 3,
                                                               "epoch": "e"}
    out = kept_messages(r)
    assert [json.loads(m.enveloped().payload) for m in out] == [
        {"channel": "c", "offset": 2, "epoch": "e", "data": "two"},
        {"channel": "c", "offset": 3, "epoch": "e", "data_b64": "AA=="},
    ]


def test_an_envelope_is_made_once_and_is_text() -> None:
    m = PreparedMessage("h\u00e9".encode(), False, "room:1")
    env = m.enveloped()
    assert env is m.enveloped() and not env.binary
    assert json.loads(env.payload) == {"channel": "room:1", "data": "h\u00e9"}
    assert env.frame(None) is env.frame(None)


def test_redis_history_reads_in_flight_are_bounded() -> None:
    """A recovery storm queues its reads beside the link: replies never pile past the reply timeout."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock

    from wsgateway.channels.redishistory import MAX_READS, RedisHistory

    sent: list[Deferred[object]] = []

    class Proto:
        def execute_command(self, *args: object) -> Deferred[object]:
            d: Deferred[object] = Deferred()
            sent.append(d)
            return d

    class Link:
        protocol = Proto()

        def check(self, failure: object) -> object:
            return failure

        def describe(self) -> str:
            return "fake"

    history = RedisHistory(Link(), "p", Clock())  # type: ignore[arg-type]
    got: list[Window] = []
    for _ in range(3 * MAX_READS):
        history.read("c", RULE, 0).addCallback(got.append)
    assert len(sent) == MAX_READS
    for _ in range(2 * MAX_READS):
        sent.pop(0).callback([b"e", 0, 1, b""])
    assert len(sent) == MAX_READS and len(got) == 2 * MAX_READS
    assert got[0] == Window("e", 0, 1, [])
