"""
A broadcast connection's recovery on the in-process broker, without a
reactor (task.Clock): the recovered frame first, then what was kept, then
live messages published while history was being read, each once and in
order; and the burst meeting the route's slow-consumer policy.
"""

from __future__ import annotations

import json
from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from wsgateway.channels.broker import InProcessBroker
from wsgateway.channels.deflate import frame_payload_size
from wsgateway.channels.history import HistoryRules, Window
from wsgateway.channels.outbox import SLOW_CONSUMER, ChannelSession

from .test_history import route


class Transport:
    def __init__(self) -> None:
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer


class Proto:
    """What ChannelSession uses of Autobahn's protocol: the state, sendData, the close frame."""

    state = WebSocketProtocol.STATE_OPEN

    def __init__(self) -> None:
        self.transport = Transport()
        self.frames: list[bytes] = []
        self.closes: list[tuple[int, bytes]] = []

    def sendData(self, data: bytes) -> None:
        self.frames.append(data)

    def sendCloseFrame(self, code: int, reason: bytes, isReply: bool) -> None:
        self.closes.append((code, reason))
        self.state = WebSocketProtocol.STATE_CLOSING

    def texts(self) -> list[Any]:
        out = []
        for f in self.frames:  # whole unmasked frames, as the gateway builds them
            out.append(json.loads(f[len(f) - frame_payload_size(f):]))
        return out


class SlowRead(InProcessBroker):
    """The history read answers when the test says so, as Redis's does a round trip later."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reads: list[tuple[Deferred[Window | None], str, int]] = []

    def history(self, channel: str, since: int) -> Deferred[Window | None]:
        d: Deferred[Window | None] = Deferred()
        self.reads.append((d, channel, since))
        return d

    def answer(self) -> None:
        d, channel, since = self.reads.pop(0)
        InProcessBroker.history(self, channel, since).chainDeferred(d)


def broker(cls: type[InProcessBroker] = InProcessBroker, size: int = 100) -> Any:
    b = cls(node_id="n", clock=Clock())
    b.history_rules = HistoryRules.of([route("feed", "feed:{x}", size)])
    return b


def session(b: Any, recover_from: tuple[int, str | None] | None, limit: int = 1 << 20,
            policy: str = "close") -> tuple[Proto, ChannelSession]:
    proto = Proto()
    s = ChannelSession(proto, b, "feed:a", conn_id="c1", user=None, client_publish=True, slow_consumer=policy,
                       queue_limit=limit, messages_per_second=0, clock=b.clock, json=True,
                       recover_from=recover_from, route="feed")
    return proto, s


def test_live_messages_published_during_the_read_follow_history_once_in_order() -> None:
    b = broker(SlowRead)
    positions = [b.publish("feed:a", f"m{i}".encode(), False).result for i in range(5)]
    epoch = positions[0].epoch
    proto, _ = session(b, (2, epoch))
    b.publish("feed:a", b"m5", False)  # after the subscription, before the read: held
    b.answer()
    b.publish("feed:a", b"m6", False)  # after the read: live
    got = proto.texts()
    assert got[0] == {"recovered": True, "channel": "feed:a", "offset": 6, "epoch": epoch}
    assert [(m["offset"], m["data"]) for m in got[1:]] == [(3, "m2"), (4, "m3"), (5, "m4"), (6, "m5"), (7, "m6")]


def test_a_recovery_burst_meets_the_slow_consumer_policy() -> None:
    b = broker()
    first = b.publish("feed:a", b"x" * 100, False).result
    for _ in range(50):
        b.publish("feed:a", b"x" * 100, False)
    proto = Proto()
    proto.transport.registerProducer = lambda producer, streaming: producer.pauseProducing()  # a full socket
    ChannelSession(proto, b, "feed:a", conn_id="c1", user=None, client_publish=True, slow_consumer="close",
                   queue_limit=1000, messages_per_second=0, clock=b.clock, json=True,
                   recover_from=(first.offset, first.epoch), route="feed")
    assert proto.closes == [(1008, SLOW_CONSUMER.encode())]
    assert proto.frames == []


def test_held_messages_over_the_write_buffer_close_the_connection() -> None:
    b = broker(SlowRead)
    first = b.publish("feed:a", b"0", False).result
    proto, s = session(b, (first.offset, first.epoch), limit=500)
    for _ in range(10):
        b.publish("feed:a", b"x" * 100, False)
    assert proto.closes == [(1008, SLOW_CONSUMER.encode())]
    b.answer()
    assert proto.frames == []  # closed: nothing of the recovery is sent
    assert s.outbox.dropped == 6  # the sixth passed 500 bytes: all six held are dropped


def test_a_failed_read_closes_1013() -> None:
    b = broker(SlowRead)
    proto, _ = session(b, (0, "e"))
    d, _, _ = b.reads.pop()
    d.errback(RuntimeError("redis went away"))
    assert proto.closes == [(1013, b"broadcast unavailable")]
