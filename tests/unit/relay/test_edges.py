"""
Protocol-unit tests of the relay against hostile or broken peers (issue 16,
docs/configuration.md), on the in-memory harness: a peer stalled in the middle of
a frame (item 5), invalid close frames from a client (item 9), the lingering
close of a client that broke a rule (item 10) and the mirror's copies held
until its leg opens (item 11).
"""

from __future__ import annotations

import pytest

from wsgateway.relay.codec import OP_BINARY, OP_CLOSE, OP_TEXT, encode_close

from support.relay_harness import FakeTransport, Harness, c_frame, make, parse_frames, u_frame

# ping_interval + ping_timeout of these tests: how long a peer may send nothing in the middle of a frame
WINDOW = 15.0


def _pinging() -> Harness:
    return make(ping_interval=10, ping_timeout=5)


# -- item 5: a peer stalled in the middle of a frame ---------------------------


def test_a_client_stalled_mid_frame_is_dropped_after_ping_interval_plus_timeout() -> None:
    """10 bytes of a 60,000-byte frame, then nothing: dead, as a client that misses a pong."""
    h = _pinging()
    frame = c_frame(OP_BINARY, b"\x01" * 60_000)
    h.clock.advance(1)
    h.relay.client_data(frame[:10])
    h.clock.pump([0.5] * int((WINDOW - 0.5) / 0.5))  # up to 0.5 s before the window ends
    assert h.client.abort_calls == 0
    h.clock.advance(0.5)
    assert h.client.abort_calls == 1, "a client stalled in a frame was kept past ping_interval + ping_timeout"
    assert h.upstream.abort_calls == 0
    # its loss is a dead client's: the upstream cannot get a close inside the frame
    h.relay.client_connection_lost()
    assert h.upstream.abort_calls == 1
    h.relay.upstream_connection_lost()
    h.assert_finished()


def test_a_client_stalled_mid_frame_is_dropped_even_while_the_upstream_keeps_talking() -> None:
    """The other direction's traffic does not keep the stalled peer alive; it is judged late, never early."""
    h = _pinging()
    frame = c_frame(OP_BINARY, b"\x01" * 60_000)
    h.relay.client_data(frame[:10])
    for t in range(1, 31):
        h.clock.advance(1)
        h.relay.upstream_data(u_frame(OP_TEXT, b"tick"))
        if t < WINDOW:
            assert h.client.abort_calls == 0, f"dropped after {t} s"
        if h.client.abort_calls:
            break
    assert h.client.abort_calls == 1, "still open 2 x (ping_interval + ping_timeout) after its last byte"


def test_a_slow_client_moving_a_frame_is_not_dropped() -> None:
    h = _pinging()
    frame = c_frame(OP_BINARY, b"\x02" * 1000)
    sent = 0
    for _ in range(20):  # a few bytes every 14 s: 280 s for one frame (it cannot answer pings meanwhile)
        h.relay.client_data(frame[sent : sent + 10])
        sent += 10
        h.clock.advance(14)
    assert h.client.abort_calls == 0 and h.upstream.abort_calls == 0
    assert h.relay.closed_by is None


def test_an_upstream_stalled_mid_frame_is_dropped_and_the_client_gets_1014() -> None:
    h = _pinging()
    frame = u_frame(OP_BINARY, b"\x03" * 60_000)
    h.clock.advance(2)
    h.relay.upstream_data(frame[:10])
    h.clock.pump([0.5] * int((WINDOW - 0.5) / 0.5))
    assert h.upstream.abort_calls == 0
    h.clock.advance(0.5)
    assert h.upstream.abort_calls == 1, "an upstream stalled in a frame was kept past ping_interval + ping_timeout"
    h.relay.upstream_connection_lost()
    # the client is inside that frame: no close frame can go in it, so its
    # connection is cut; the connection is recorded as the upstream's loss
    assert (h.relay.closed_by, h.relay.close_code, h.relay.close_reason) == ("upstream", 1014, "upstream lost")
    assert h.client.abort_calls == 1
    h.relay.client_connection_lost()
    h.assert_finished()


def test_an_upstream_stalled_in_a_frame_header_gets_the_client_a_1014_close() -> None:
    """Stalled before its frame's payload: the client's stream is at a boundary and gets the close frame."""
    h = _pinging()
    h.relay.upstream_data(u_frame(OP_BINARY, b"\x03" * 60_000)[:3])  # 3 of the 4 header bytes
    h.clock.advance(10)
    h.relay.client_data(c_frame(0xA, parse_frames(h.client.value())[0].payload))
    h.clock.advance(5)  # the upstream, in its header, never answered its ping
    assert h.upstream.abort_calls == 1
    h.relay.upstream_connection_lost()
    closes = [f for f in parse_frames(h.client.value()) if f.opcode == OP_CLOSE]
    assert [f.close[0] for f in closes] == [1014]


def test_the_stall_check_is_off_with_pings_and_stops_with_the_relay() -> None:
    h = make(ping_interval=0)
    h.relay.client_data(c_frame(OP_BINARY, b"\x04" * 1000)[:10])
    assert h.clock.getDelayedCalls() == []
    h = _pinging()
    h.lose_both()
    h.assert_finished()


# -- item 9: invalid close frames from the client ----------------------------------


def _assert_invalid_close_answered(h: Harness, code: int, forwarded: bytes = b"") -> None:
    [to_client] = parse_frames(h.client.value())
    assert to_client.opcode == OP_CLOSE and not to_client.masked
    assert to_client.close[0] == code
    up = h.upstream.value()
    assert up.startswith(forwarded)
    [to_upstream] = parse_frames(up[len(forwarded):])
    assert to_upstream.opcode == OP_CLOSE and to_upstream.masked
    assert to_upstream.close == (1001, "client closed")
    assert (h.relay.closed_by, h.relay.close_code) == ("gateway", code)
    assert not h.relay.close_from_client


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
def test_a_close_code_never_sent_on_the_wire_is_answered_1002_and_not_relayed(code: int) -> None:
    h = make()
    ok = c_frame(OP_TEXT, b"before")
    h.relay.client_data(ok + c_frame(OP_CLOSE, code.to_bytes(2, "big") + b"bye") + c_frame(OP_TEXT, b"after"))
    _assert_invalid_close_answered(h, 1002, ok)
    assert b"after" not in h.upstream.value()


def test_a_one_byte_close_payload_is_answered_1002() -> None:
    h = make()
    h.relay.client_data(c_frame(OP_CLOSE, b"\x03"))
    _assert_invalid_close_answered(h, 1002)


@pytest.mark.parametrize("reason", [b"\xff", b"caf\xc3", b"\xed\xa0\x80", b"\xc0\xaf"])
def test_a_close_reason_that_is_not_utf8_is_answered_1007(reason: bytes) -> None:
    h = make()
    h.relay.client_data(c_frame(OP_CLOSE, (1000).to_bytes(2, "big") + reason))
    _assert_invalid_close_answered(h, 1007)


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000,
                                  3999, 4000, 4999])
def test_a_valid_close_is_relayed_unchanged(code: int) -> None:
    h = make()
    close = c_frame(OP_CLOSE, code.to_bytes(2, "big") + "fin ✓".encode())
    h.relay.client_data(close)
    assert h.upstream.value() == close
    assert h.client.value() == b""
    assert (h.relay.closed_by, h.relay.close_code) == ("client", code)


def test_an_empty_close_is_relayed() -> None:
    h = make()
    h.relay.client_data(c_frame(OP_CLOSE))
    [f] = parse_frames(h.upstream.value())
    assert f.opcode == OP_CLOSE and f.payload == b""
    assert h.relay.close_code == 1005


def test_close_error_is_pure() -> None:
    from wsgateway.relay.codec import close_error  # here: the module's other tests show the bug without it

    assert close_error(b"") is None
    assert close_error(encode_close(1000, "ok", mask=False)[2:]) is None
    assert close_error(b"\x03") == (1002, "bad close frame")
    assert close_error((1005).to_bytes(2, "big")) == (1002, "bad close code")
    assert close_error((3000).to_bytes(2, "big") + b"\xff") == (1007, "invalid UTF-8 in close reason")


# -- item 10: the lingering close of a client that broke a rule ----------------------


def test_a_client_closed_for_a_rule_is_half_closed_and_read_until_close_timeout() -> None:
    h = make(max_message_size=100, close_timeout=3.0)
    h.client.pauseProducing()  # e.g. the upstream's buffer was full
    big = c_frame(OP_BINARY, b"b" * 10_000)
    h.relay.client_data(big[:4000])
    [to_client] = parse_frames(h.client.value())
    assert to_client.close[0] == 1009
    # the close frame, then a FIN: no loseConnection, which would stop reading
    assert h.client.kinds() == ["write", "linger"]
    assert h.client.producerState == "producing", "the lingering client is not read"
    sent_up = h.upstream.value()
    # what the client still sends is read and discarded: nothing more goes anywhere
    for k in range(4000, len(big), 1000):
        h.relay.client_data(big[k : k + 1000])
    h.relay.client_data(c_frame(OP_TEXT, b"more"))
    assert h.upstream.value() == sent_up
    assert h.client.kinds() == ["write", "linger"]
    h.clock.advance(2.9)
    assert h.client.abort_calls == 0
    h.clock.advance(0.1)
    assert h.client.abort_calls == 1  # close_timeout bounds the lingering
    h.lose_both()
    h.assert_finished()


def test_a_lingering_client_that_closes_ends_the_connection_at_once() -> None:
    h = make(max_message_size=100, close_timeout=5.0)
    h.relay.client_data(c_frame(OP_BINARY, b"b" * 101))
    h.relay.client_data(c_frame(OP_CLOSE, (1009).to_bytes(2, "big")))  # its answer: discarded too
    h.relay.upstream_data(encode_close(1001, "", mask=False))
    h.relay.upstream_connection_lost()
    h.relay.client_connection_lost()  # its FIN
    h.assert_finished()
    assert h.client.abort_calls == 0


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (u_frame(OP_TEXT, b"unmasked"), 1002),
        (c_frame(OP_CLOSE, (1005).to_bytes(2, "big")), 1002),
        (c_frame(OP_CLOSE, (1000).to_bytes(2, "big") + b"\xff"), 1007),
    ],
    ids=["framing", "close-code", "close-reason"],
)
def test_every_rule_broken_lingers(wire: bytes, code: int) -> None:
    h = make()
    h.relay.client_data(wire)
    assert parse_frames(h.client.value())[0].close[0] == code
    assert h.client.kinds() == ["write", "linger"]


def test_a_rate_limited_client_lingers() -> None:
    h = make(messages_per_second=1)
    h.relay.client_data(b"".join(c_frame(OP_TEXT, b"m") for _ in range(5)))
    assert parse_frames(h.client.value())[0].close == (1008, "rate limit exceeded")
    assert h.client.kinds() == ["write", "linger"]


def test_the_lingering_close_waits_for_a_frame_in_flight_to_the_client() -> None:
    h = make(max_message_size=100)
    frame = u_frame(OP_BINARY, b"\x06" * 500)
    h.relay.upstream_data(frame[:200])
    h.relay.client_data(c_frame(OP_BINARY, b"b" * 101))
    assert h.client.kinds() == ["write"]
    h.relay.upstream_data(frame[200:])
    assert h.client.kinds()[-1] == "linger"
    assert h.client.value() == frame + encode_close(1009, "message too big", mask=False)


def test_a_transport_without_half_close_is_closed_as_before() -> None:
    class NoHalfClose(FakeTransport):
        loseWriteConnection = None  # type: ignore[assignment]

    h = make(max_message_size=100)
    h.relay.client = NoHalfClose()  # as a transport the relay knows nothing of
    h.relay.client_data(c_frame(OP_BINARY, b"b" * 101))
    assert h.relay.client.kinds() == ["write", "lose"]  # type: ignore[attr-defined]


# -- item 11: the mirror's copies held until its leg opens -------------------------------


def test_the_mirror_gets_the_first_messages_sent_before_it_opened() -> None:
    h = make()
    copies = h.relay.expect_mirror(1000)
    assert copies is not None
    first = c_frame(OP_TEXT, b"hello") + c_frame(OP_TEXT, b"subscribe", fin=False)
    h.relay.client_data(first)
    assert h.upstream.value() == first  # the primary is never held up
    mirror = FakeTransport()
    released: list[bool] = []
    assert copies.opened(mirror, lambda: released.append(True))
    assert mirror.value() == first
    later = c_frame(0x0, b" me", fin=True)
    h.relay.client_data(later)
    assert mirror.value() == first + later
    assert h.relay.mirror_dropped == 0
    h.relay.mirror_lost()
    assert released == [True]


def test_copies_beyond_write_buffer_cut_the_mirror_off() -> None:
    h = make()
    copies = h.relay.expect_mirror(100)
    assert copies is not None
    for i in range(3):
        h.relay.client_data(c_frame(OP_TEXT, bytes([65 + i]) * 40))
    assert h.relay.mirror is None
    h.relay.client_data(c_frame(OP_TEXT, b"x"))
    mirror = FakeTransport()
    assert not copies.opened(mirror, lambda: None)  # the caller closes that leg
    assert mirror.value() == b""
    assert h.relay.mirror_dropped == 4
    assert len(parse_frames(h.upstream.value())) == 4


def test_a_mirror_that_fails_to_open_drops_its_copies() -> None:
    h = make()
    copies = h.relay.expect_mirror(1000)
    assert copies is not None
    h.relay.client_data(c_frame(OP_TEXT, b"hello"))
    copies.failed()
    assert h.relay.mirror is None
    h.relay.client_data(c_frame(OP_TEXT, b"again"))
    assert h.relay.mirror_dropped == 0
    assert len(parse_frames(h.upstream.value())) == 2


def test_a_session_over_before_the_mirror_opened_still_reaches_it_whole() -> None:
    h = make()
    copies = h.relay.expect_mirror(1000)
    assert copies is not None
    session = c_frame(OP_TEXT, b"hello") + encode_close(1000, "bye", mask=True)
    h.relay.client_data(session)
    h.relay.upstream_data(encode_close(1000, "bye", mask=False))
    h.clock.advance(0)
    h.lose_both()
    h.assert_finished()
    mirror = FakeTransport()
    assert copies.opened(mirror, lambda: None)
    assert mirror.value() == session
    assert mirror.kinds()[-1] == "lose"


def test_no_mirror_for_a_connection_already_closing() -> None:
    h = make()
    h.relay.close(1001, "server shutting down")
    assert h.relay.expect_mirror(1000) is None
