"""channels.deflate: the offer a broadcast route accepts, and each published message compressed once per window."""

from __future__ import annotations

import zlib
from typing import Any

import pytest
from autobahn.websocket.compress import PerMessageDeflate, PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.exception import PayloadExceededError
from twisted.internet.task import Clock

from wsgateway.channels import deflate as deflate_module
from wsgateway.channels.broker import InProcessBroker
from wsgateway.channels.deflate import (
    PreparedMessage, accept_offers, acceptor, frame_payload_size, negotiated,
)
from wsgateway.channels.outbox import ChannelSession, Outbox, PreparedSubscription, Subscription
from wsgateway.relay.codec import OP_CLOSE, OP_TEXT, encode_frame

MESSAGE = b'{"event": "tick", "price": 100, "symbol": "ABC"} ' * 40


def offer(*params: tuple[str, Any]) -> PerMessageDeflateOffer:
    parsed: dict[str, list[Any]] = {}
    for name, value in params:
        parsed.setdefault(name, []).append(value)
    return PerMessageDeflateOffer.parse(parsed)


def inflate(frame: bytes, window: int = 15) -> bytes:
    """A client's reading of one unmasked server frame (RFC 7692 7.2.2)."""
    assert frame[0] & 0x40, "RSV1 set on a compressed message"
    start = len(frame) - frame_payload_size(frame)
    return zlib.decompressobj(-window).decompress(frame[start:] + b"\x00\x00\xff\xff")


@pytest.fixture
def compressions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every deflate() call, by window."""
    calls: list[int] = []
    real = deflate_module.deflate

    def counted(payload: bytes, window: int) -> bytes:
        calls.append(window)
        return real(payload, window)

    monkeypatch.setattr(deflate_module, "deflate", counted)
    return calls


# -- negotiation ---------------------------------------------------------------------


def test_the_first_deflate_offer_is_accepted_with_server_no_context_takeover() -> None:
    first, second = offer(), offer(("server_max_window_bits", "10"))
    accept = accept_offers([object(), first, second], 1 << 20)
    assert accept is not None and accept.offer is first
    assert accept.get_extension_string() == "permessage-deflate; server_no_context_takeover"
    pmce = PerMessageDeflate.create_from_offer_accept(True, accept)
    assert pmce.server_no_context_takeover and pmce.max_message_size == 1 << 20
    assert negotiated([pmce]) == (True, 15)


def test_the_window_the_client_asks_for_is_the_one_used_and_a_requested_reset_is_said_once() -> None:
    accept = accept_offers([offer(("server_max_window_bits", "10"), ("server_no_context_takeover", True))], 1000)
    assert accept is not None
    answer = accept.get_extension_string()
    assert answer.count("server_no_context_takeover") == 1 and "server_max_window_bits=10" in answer
    assert negotiated([PerMessageDeflate.create_from_offer_accept(True, accept)]) == (True, 10)


def test_declined_without_compression_or_without_a_deflate_offer() -> None:
    assert acceptor(False, 1000)([offer()]) is None
    assert acceptor(True, 1000)([]) is None
    assert isinstance(acceptor(True, 1000)([offer()]), PerMessageDeflateOfferAccept)
    assert negotiated([]) == (False, None)


def test_a_deflate_connection_keeping_its_context_gets_plain_frames() -> None:
    kept = PerMessageDeflate(True, False, False, 0, 0, 8)
    assert negotiated([kept]) == (True, None)


def test_a_bomb_from_the_client_stops_at_the_limit_not_after_inflating_it() -> None:
    accept = accept_offers([offer()], 64 * 1024)
    assert accept is not None
    pmce = PerMessageDeflate.create_from_offer_accept(True, accept)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = c.compress(bytes(16 << 20)) + c.flush(zlib.Z_SYNC_FLUSH)[:-4]
    assert len(bomb) < 32 * 1024
    pmce.start_decompress_message()
    with pytest.raises(PayloadExceededError):
        pmce.decompress_message_data(bomb)


# -- the frames ------------------------------------------------------------------------


def test_a_prepared_message_makes_each_frame_once() -> None:
    m = PreparedMessage(MESSAGE, False)
    plain = m.frame(None)
    assert plain == encode_frame(OP_TEXT, MESSAGE, mask=False) and m.frame(None) is plain
    f15, f9 = m.frame(15), m.frame(9)
    assert m.frame(15) is f15 and len(f15) < len(MESSAGE) // 4
    assert f15[0] == 0xC1  # FIN, RSV1, text
    assert inflate(f15) == MESSAGE and inflate(f9, 9) == MESSAGE
    binary = PreparedMessage(MESSAGE, True).frame(12)
    assert binary[0] == 0xC2 and inflate(binary, 12) == MESSAGE


def test_a_message_that_does_not_shrink_goes_plain() -> None:
    m = PreparedMessage(b"hi", False)
    assert m.frame(15) is m.frame(None)


def test_frame_payload_size_reads_each_length_form() -> None:
    for n in (0, 125, 126, 65535, 65536):
        assert frame_payload_size(encode_frame(OP_TEXT, bytes(n), mask=False)) == n


def test_encode_frame_refuses_a_compressed_control_frame() -> None:
    with pytest.raises(ValueError):
        encode_frame(OP_CLOSE, b"", mask=False, rsv1=True)


# -- compressed once per message, through the broker -----------------------------------


class Wire:
    """A subscriber's socket: the frames written, in order."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.closes: list[tuple[int, str]] = []

    def outbox(self, limit: int = 1 << 20) -> Outbox:
        return Outbox(lambda f, b: self.frames.append(f), lambda c, r: self.closes.append((c, r)),
                      limit=limit, policy="close")


def subscribers(broker: InProcessBroker, windows: list[int | None]) -> list[Wire]:
    wires = []
    for window in windows:
        wire = Wire()
        PreparedSubscription(broker, wire.outbox(), ("room",), window=window, max_size=1 << 20)
        wires.append(wire)
    return wires


def test_n_subscribers_with_one_window_cost_one_compression_per_message(compressions: list[int]) -> None:
    broker = InProcessBroker("gw", clock=Clock())
    wires = subscribers(broker, [15] * 50)
    for n in range(3):
        broker.publish("room", MESSAGE + b"%d" % n, False)
    assert compressions == [15, 15, 15]
    for n in range(3):
        first = wires[0].frames[n]
        assert inflate(first) == MESSAGE + b"%d" % n
        assert all(w.frames[n] is first for w in wires)  # the same bytes object, written 50 times


def test_two_windows_cost_two_compressions_and_plain_subscribers_none(compressions: list[int]) -> None:
    broker = InProcessBroker("gw", clock=Clock())
    wires = subscribers(broker, [15, 10, None, 15, 10, None])
    broker.publish("room", MESSAGE, True)
    assert sorted(compressions) == [10, 15]
    assert inflate(wires[1].frames[0], 10) == MESSAGE and wires[1].frames[0] is wires[4].frames[0]
    assert wires[2].frames[0] == encode_frame(0x2, MESSAGE, mask=False)


def test_plain_subscribers_alone_compress_nothing(compressions: list[int]) -> None:
    broker = InProcessBroker("gw", clock=Clock())
    wires = subscribers(broker, [None] * 5)
    broker.publish("room", MESSAGE, False)
    assert compressions == [] and all(w.frames == [encode_frame(OP_TEXT, MESSAGE, mask=False)] for w in wires)


def test_a_plain_subscriber_still_gets_the_payload_and_the_origin_no_echo(compressions: list[int]) -> None:
    broker = InProcessBroker("gw", clock=Clock())
    got: list[tuple[bytes, bool]] = []
    pushes = Outbox(lambda p, b: got.append((p, b)), lambda c, r: None, limit=100, policy="close")
    Subscription(broker, pushes, ("room",))  # a proxy route's pushes: payloads, never frames
    wire = Wire()
    me = PreparedSubscription(broker, wire.outbox(), ("room",), window=15, max_size=0)
    broker.publish("room", MESSAGE, False, origin=me)
    assert got == [(MESSAGE, False)] and wire.frames == [] and compressions == []


def test_the_outbox_counts_the_compressed_frame_against_its_limit() -> None:
    broker = InProcessBroker("gw", clock=Clock())
    wire = Wire()
    box = wire.outbox(limit=1000)
    PreparedSubscription(broker, box, ("room",), window=15, max_size=0)
    box.pauseProducing()
    for _ in range(5):
        broker.publish("room", MESSAGE, False)  # 2 KiB each, about 80 bytes compressed
    size = len(PreparedMessage(MESSAGE, False).frame(15))
    assert box.queued == 5 * size and wire.closes == []
    box.resumeProducing()
    assert len(wire.frames) == 5 and box.queued == 0


def test_a_message_over_the_limit_is_refused_to_that_subscriber_only() -> None:
    broker = InProcessBroker("gw", clock=Clock())
    small, big = Wire(), Wire()
    PreparedSubscription(broker, small.outbox(), ("room",), window=15, max_size=100)
    PreparedSubscription(broker, big.outbox(), ("room",), window=15, max_size=0)
    broker.publish("room", MESSAGE, False)
    assert small.frames == [] and len(big.frames) == 1


# -- the session's writes --------------------------------------------------------------


class FakeTransport:
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass


class FakeProto:
    def __init__(self) -> None:
        self.transport = FakeTransport()
        self.state = WebSocketProtocol.STATE_OPEN
        self.sent: list[bytes] = []

    def sendData(self, data: bytes) -> None:
        self.sent.append(data)


def test_a_session_writes_shared_frames_counts_wire_bytes_and_stops_at_the_close() -> None:
    broker = InProcessBroker("gw", clock=Clock())
    proto, other = FakeProto(), FakeProto()
    kwargs: Any = dict(user=None, client_publish=True, slow_consumer="close", queue_limit=1 << 20,
                       messages_per_second=0, clock=Clock(), window=15, max_size=1 << 20)
    session = ChannelSession(proto, broker, "room", conn_id="a", **kwargs)
    ChannelSession(other, broker, "room", conn_id="b", **kwargs)
    broker.publish("room", MESSAGE, False)
    assert proto.sent[0] is other.sent[0] and inflate(proto.sent[0]) == MESSAGE
    assert session.messages_u2c == 1 and session.bytes_u2c == frame_payload_size(proto.sent[0]) < len(MESSAGE)
    proto.state = WebSocketProtocol.STATE_CLOSING
    broker.publish("room", MESSAGE, False)
    assert len(proto.sent) == 1 and len(other.sent) == 2 and session.messages_u2c == 1
