"""
Protocol-unit tests of L{wsgateway.relay.relay.Relay} (STYLE 2.7, layer 2): two
in-memory transports and a L{task.Clock}, no reactor, no sockets.

The relay is fed raw bytes as the client and upstream protocols would feed
it (``client_data`` / ``upstream_data`` / ``*_connection_lost``) and what it
writes to each transport is decoded by a small independent frame parser
below (not by ``wsgateway.relay.frames``), so a scanner bug cannot hide itself.

Binding behaviour: docs/protocol.md#forwarding-and-close-codes (forwarding semantics, close codes).
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred

from wsgateway.relay.codec import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, encode_close
from wsgateway.relay.relay import Relay
from wsgateway.relay.transport import set_write_buffer

from support.relay_harness import FakeTransport, Harness, c_frame, make, parse_frames, u_frame


# -- forwarding --------------------------------------------------------------


def test_client_frames_reach_upstream_byte_identical() -> None:
    h = make()
    frames = [
        c_frame(OP_TEXT, "héllo".encode()),
        c_frame(OP_BINARY, bytes(range(256)) * 2),  # 16-bit length
        c_frame(OP_TEXT, b"frag-1 ", fin=False),
        c_frame(OP_PING, b"client-ping"),  # control frame between fragments
        c_frame(OP_CONT, b"frag-2", fin=True),
    ]
    wire = b"".join(frames)
    h.relay.client_data(wire)

    assert h.upstream.value() == wire
    assert h.client.value() == b""
    assert h.relay.messages_c2u == 3
    assert h.relay.messages_u2c == 0
    assert h.relay.bytes_c2u == len(wire)
    assert h.relay.bytes_u2c == 0
    assert all(f.masked for f in parse_frames(h.upstream.value()))


def test_upstream_frames_reach_client_byte_identical() -> None:
    h = make()
    big = bytes(range(256)) * 300  # 76800 bytes: 64-bit length field
    frames = [
        u_frame(OP_BINARY, big),
        u_frame(OP_TEXT, b"one"),
        u_frame(OP_TEXT, b"a", fin=False),
        u_frame(OP_CONT, b"b", fin=False),
        u_frame(OP_CONT, b"c", fin=True),
    ]
    wire = b"".join(frames)
    # in uneven chunks, as TCP delivers them
    for k in range(0, len(wire), 7001):
        h.relay.upstream_data(wire[k : k + 7001])

    assert h.client.value() == wire
    assert h.upstream.value() == b""
    assert h.relay.messages_u2c == 3
    assert h.relay.messages_c2u == 0
    assert h.relay.bytes_u2c == len(wire)
    got = parse_frames(h.client.value())
    assert [f.masked for f in got] == [False] * 5
    assert got[0].payload == big


def test_byte_by_byte_both_ways_is_identical() -> None:
    h = make()
    c_wire = c_frame(OP_TEXT, b"x" * 130) + c_frame(OP_PONG, b"unsolicited") + c_frame(OP_BINARY, b"")
    u_wire = u_frame(OP_BINARY, b"y" * 200) + u_frame(OP_PING, b"up") + u_frame(OP_TEXT, b"z")
    for i in range(max(len(c_wire), len(u_wire))):
        if i < len(c_wire):
            h.relay.client_data(c_wire[i : i + 1])
        if i < len(u_wire):
            h.relay.upstream_data(u_wire[i : i + 1])
    assert h.upstream.value() == c_wire
    assert h.client.value() == u_wire
    assert (h.relay.messages_c2u, h.relay.messages_u2c) == (2, 2)
    assert (h.relay.bytes_c2u, h.relay.bytes_u2c) == (len(c_wire), len(u_wire))


def test_large_frame_is_streamed_not_buffered() -> None:
    h = make()
    frame = u_frame(OP_BINARY, b"\x01" * 100_000)
    h.relay.upstream_data(frame[:5000])
    assert h.client.value() == frame[:5000]
    h.relay.upstream_data(frame[5000:])
    assert h.client.value() == frame


# -- close handshake pass-through -------------------------------------------


def test_client_initiated_close_passes_through() -> None:
    h = make(ping_interval=30, ping_timeout=10, idle_timeout=600)
    close = encode_close(4000, "bye", mask=True)
    h.relay.client_data(close)

    assert h.upstream.value() == close  # unchanged, mask key and all
    assert h.client.value() == b""
    assert h.client.lose_calls == 0  # not before the upstream answered
    assert h.relay.closed_by == "client"
    assert (h.relay.close_code, h.relay.close_reason) == (4000, "bye")

    reply = encode_close(4000, "bye", mask=False)
    h.relay.upstream_data(reply)
    assert h.client.value() == reply
    h.clock.advance(0)
    # the server side of the client hop closes TCP first, after the reply
    assert h.client.events == [("write", reply), ("lose",)]
    assert h.client.abort_calls == 0 and h.upstream.abort_calls == 0

    h.relay.client_connection_lost()
    assert h.done == []
    h.relay.upstream_connection_lost()
    h.assert_finished()
    assert h.relay.closed_by == "client"
    assert h.relay.close_code == 4000
    # further loss reports do not call on_done again
    h.lose_both()
    assert h.done == [h.relay]


def test_upstream_initiated_close_passes_through() -> None:
    h = make(ping_interval=30, ping_timeout=10)
    close = encode_close(1000, "done", mask=False)
    h.relay.upstream_data(close)
    assert h.client.value() == close
    assert h.upstream.value() == b""
    assert h.relay.closed_by == "upstream"
    assert (h.relay.close_code, h.relay.close_reason) == (1000, "done")

    reply = encode_close(1000, "done", mask=True)
    h.relay.client_data(reply)
    assert h.upstream.value() == reply
    h.clock.advance(0)
    assert h.client.kinds() == ["write", "lose"]
    assert h.upstream.lose_calls == 0  # the upstream (a server) closes its TCP itself

    h.relay.upstream_connection_lost()
    h.relay.client_connection_lost()
    h.assert_finished()
    assert h.client.abort_calls == 0 and h.upstream.abort_calls == 0


@pytest.mark.parametrize("initiator", ["client", "upstream"])
def test_close_handshake_is_bounded_by_close_timeout(initiator: str) -> None:
    h = make(close_timeout=3.0)
    if initiator == "client":
        h.relay.client_data(encode_close(1000, "", mask=True))
    else:
        h.relay.upstream_data(encode_close(1000, "", mask=False))
    h.clock.advance(2.9)
    assert h.client.abort_calls == 0 and h.upstream.abort_calls == 0
    h.clock.advance(0.1)
    assert h.client.abort_calls == 1
    assert h.upstream.abort_calls == 1
    h.lose_both()
    h.assert_finished()


# -- transport loss ------------------------------------------------------------


def test_upstream_lost_without_close_sends_1014_to_client() -> None:
    h = make(ping_interval=30, ping_timeout=10, idle_timeout=600)
    h.relay.upstream_data(u_frame(OP_TEXT, b"last words"))
    h.client.clear()
    h.client.events.clear()

    h.relay.upstream_connection_lost()
    [close] = parse_frames(h.client.value())
    assert close.opcode == OP_CLOSE and not close.masked
    assert close.close[0] == 1014
    assert h.relay.close_code == 1014
    assert h.relay.closed_by == "upstream"
    assert h.client.abort_calls == 0

    # the client's answer completes its handshake; it is not sent anywhere
    h.relay.client_data(encode_close(1014, "", mask=True))
    h.clock.advance(0)
    assert h.client.kinds() == ["write", "lose"]
    assert h.upstream.value() == b""
    h.relay.client_connection_lost()
    h.assert_finished()


def test_upstream_lost_mid_frame_aborts_client() -> None:
    h = make()
    frame = u_frame(OP_BINARY, b"\x02" * 1000)
    h.relay.upstream_data(frame[:300])
    h.relay.upstream_connection_lost()
    # no close frame can be put inside the half-sent frame
    assert h.client.value() == frame[:300]
    assert h.client.abort_calls == 1
    assert h.relay.close_code == 1014
    h.relay.client_connection_lost()
    h.assert_finished()


def test_upstream_lost_after_client_close_finishes_client_handshake() -> None:
    """
    The client sent its close, the upstream vanished before answering: the
    gateway answers with 1014, and that completes the client's handshake, so
    the gateway (server side) closes the client TCP connection at once
    (RFC 6455 7.1.1) rather than aborting it close_timeout later.
    """
    h = make(close_timeout=5.0)
    h.relay.client_data(encode_close(1000, "bye", mask=True))
    h.relay.upstream_connection_lost()
    [close] = parse_frames(h.client.value())
    assert close.close[0] == 1014
    h.clock.advance(0)
    assert h.client.kinds() == ["write", "lose"], h.client.events
    h.relay.client_connection_lost()
    h.assert_finished()
    assert h.client.abort_calls == 0


def test_client_lost_sends_masked_1001_upstream() -> None:
    h = make(ping_interval=30, ping_timeout=10, idle_timeout=600)
    h.relay.client_connection_lost()
    [close] = parse_frames(h.upstream.value())
    assert close.opcode == OP_CLOSE and close.masked
    assert close.close[0] == 1001
    assert h.upstream.kinds() == ["write", "lose"]  # close frame first, then FIN
    assert h.relay.closed_by == "client"
    assert h.relay.close_code == 1006
    assert h.done == []
    h.relay.upstream_connection_lost()
    h.assert_finished()
    assert h.client.value() == b""


def test_client_lost_mid_frame_aborts_upstream() -> None:
    h = make()
    frame = c_frame(OP_BINARY, b"\x03" * 1000)
    h.relay.client_data(frame[:100])
    h.relay.client_connection_lost()
    assert h.upstream.value() == frame[:100]
    assert h.upstream.abort_calls == 1
    h.relay.upstream_connection_lost()
    h.assert_finished()


# -- protocol violations -----------------------------------------------------------


def _assert_violation_closes(h: Harness, code: int, forwarded: bytes) -> None:
    [to_client] = parse_frames(h.client.value())
    assert not to_client.masked and to_client.opcode == OP_CLOSE
    assert to_client.close[0] == code
    # a lingering close: a FIN after the close frame, reads go on (test_edges.py)
    assert h.client.kinds() == ["write", "linger"]
    up = h.upstream.value()
    assert up.startswith(forwarded)
    [to_upstream] = parse_frames(up[len(forwarded) :])
    assert to_upstream.masked and to_upstream.opcode == OP_CLOSE
    assert to_upstream.close[0] == 1001
    assert h.relay.closed_by == "gateway"
    assert h.relay.close_code == code


def test_unmasked_client_frame_is_1002_and_never_forwarded() -> None:
    h = make()
    good = c_frame(OP_TEXT, b"fine")
    bad = u_frame(OP_TEXT, b"EVIL-UNMASKED")
    h.relay.client_data(good + bad)
    assert b"EVIL-UNMASKED" not in h.upstream.value()
    _assert_violation_closes(h, 1002, good)
    h.relay.client_data(c_frame(OP_TEXT, b"after"))  # nothing more goes up
    assert len(parse_frames(h.upstream.value())) == 2
    h.lose_both()
    h.assert_finished()


def test_too_big_client_message_is_1009() -> None:
    h = make(max_message_size=100)
    ok = c_frame(OP_BINARY, b"a" * 100)
    big = c_frame(OP_BINARY, b"b" * 101)
    h.relay.client_data(ok + big)
    assert b"b" * 10 not in h.upstream.value()
    _assert_violation_closes(h, 1009, ok)
    h.lose_both()
    h.assert_finished()


def test_too_big_fragmented_client_message_is_1009() -> None:
    h = make(max_message_size=100)
    first = c_frame(OP_TEXT, b"a" * 60, fin=False)
    second = c_frame(OP_CONT, b"b" * 60, fin=True)
    h.relay.client_data(first)
    h.relay.client_data(second)
    _assert_violation_closes(h, 1009, first)
    assert h.relay.messages_c2u == 0


def test_masked_upstream_frame_closes_upstream_1002_and_client_1014() -> None:
    h = make()
    h.relay.upstream_data(c_frame(OP_TEXT, b"masked-from-upstream"))
    assert h.client.value() != b""
    [to_client] = parse_frames(h.client.value())
    assert to_client.close[0] == 1014 and not to_client.masked
    [to_upstream] = parse_frames(h.upstream.value())
    assert to_upstream.close[0] == 1002 and to_upstream.masked
    assert h.upstream.lose_calls == 1
    assert h.relay.close_code == 1014
    h.lose_both()
    h.assert_finished()


# -- the gateway's pings ---------------------------------------------------------------


def _gateway_pings(h: Harness) -> bytes:
    [to_client] = parse_frames(h.client.value())
    [to_upstream] = parse_frames(h.upstream.value())
    assert to_client.opcode == OP_PING and not to_client.masked
    assert to_upstream.opcode == OP_PING and to_upstream.masked
    assert to_client.payload == to_upstream.payload
    assert to_client.payload
    return to_client.payload


def test_gateway_pings_each_hop_and_swallows_matching_pongs() -> None:
    h = make(ping_interval=10, ping_timeout=5)
    h.clock.advance(9.9)
    assert h.client.value() == b"" and h.upstream.value() == b""
    h.clock.advance(0.1)
    payload = _gateway_pings(h)
    h.client.clear()
    h.upstream.clear()

    h.relay.client_data(c_frame(OP_PONG, payload))
    h.relay.upstream_data(u_frame(OP_PONG, payload))
    assert h.upstream.value() == b""  # the client's pong is not forwarded
    assert h.client.value() == b""  # nor the upstream's

    h.clock.advance(5)  # pong deadline: both answered
    assert h.client.abort_calls == 0 and h.upstream.abort_calls == 0
    # and the next round comes ping_interval after the first
    h.clock.advance(4.9)
    assert h.client.value() == b""
    h.clock.advance(0.1)
    assert _gateway_pings(h) == payload
    h.relay.client_data(c_frame(OP_PONG, payload))
    h.relay.upstream_data(u_frame(OP_PONG, payload))
    h.clock.advance(5)
    assert h.client.abort_calls == 0 and h.upstream.abort_calls == 0

    h.relay.close(1001, "server shutting down")
    h.lose_both()
    h.assert_finished()


def test_foreign_pongs_and_peer_pings_pass_through() -> None:
    h = make(ping_interval=10, ping_timeout=5)
    h.clock.advance(10)
    payload = _gateway_pings(h)
    h.client.clear()
    h.upstream.clear()

    c_wire = c_frame(OP_PONG, b"not-ours") + c_frame(OP_PING, payload) + c_frame(OP_PING, b"cp")
    u_wire = u_frame(OP_PONG, b"also-not-ours") + u_frame(OP_PING, payload) + u_frame(OP_PING, b"up")
    h.relay.client_data(c_wire)
    h.relay.upstream_data(u_wire)
    assert h.upstream.value() == c_wire
    assert h.client.value() == u_wire
    # and the pong for the gateway's own payload is still swallowed
    h.relay.client_data(c_frame(OP_PONG, payload))
    h.relay.upstream_data(u_frame(OP_PONG, payload))
    assert h.upstream.value() == c_wire
    assert h.client.value() == u_wire


@pytest.mark.parametrize("silent", ["client", "upstream"])
def test_missing_pong_aborts_that_transport(silent: str) -> None:
    h = make(ping_interval=10, ping_timeout=5)
    h.clock.advance(10)
    payload = _gateway_pings(h)
    if silent == "client":
        h.relay.upstream_data(u_frame(OP_PONG, payload))
        h.relay.client_data(c_frame(OP_PONG, b"wrong payload"))
    else:
        h.relay.client_data(c_frame(OP_PONG, payload))
        h.relay.upstream_data(u_frame(OP_PONG, b"wrong payload"))
    h.clock.advance(4.9)
    assert h.client.abort_calls == 0 and h.upstream.abort_calls == 0
    h.clock.advance(0.1)
    dead, alive = (h.client, h.upstream) if silent == "client" else (h.upstream, h.client)
    assert dead.abort_calls == 1
    assert alive.abort_calls == 0
    h.lose_both()
    h.assert_finished()


def test_gateway_ping_to_client_waits_for_end_of_data_frame() -> None:
    h = make(ping_interval=10, ping_timeout=5)
    frame = u_frame(OP_BINARY, b"\x04" * 500)
    after = u_frame(OP_TEXT, b"next")
    h.relay.upstream_data(frame[:200])
    h.clock.advance(10)
    assert h.client.value() == frame[:200]  # nothing inserted inside the frame
    h.relay.upstream_data(frame[200:] + after)
    ping = u_frame(OP_PING, parse_frames(h.upstream.value())[0].payload)
    assert h.client.value() == frame + ping + after


def test_gateway_ping_to_upstream_waits_for_end_of_data_frame() -> None:
    h = make(ping_interval=10, ping_timeout=5)
    frame = c_frame(OP_BINARY, b"\x05" * 500)
    after = c_frame(OP_TEXT, b"next")
    h.relay.client_data(frame[:200])
    h.clock.advance(10)
    assert h.upstream.value() == frame[:200]
    h.relay.client_data(frame[200:] + after)
    out = h.upstream.value()
    assert out.startswith(frame) and out.endswith(after)
    [ping] = parse_frames(out[len(frame) : -len(after)])
    assert ping.opcode == OP_PING and ping.masked
    assert ping.payload == parse_frames(h.client.value())[0].payload


# -- gateway closes held behind a half-written frame ------------------------------------


def test_shutdown_close_to_client_waits_for_end_of_data_frame() -> None:
    h = make()
    frame = u_frame(OP_BINARY, b"\x06" * 500)
    h.relay.upstream_data(frame[:200])
    h.relay.close(1001, "server shutting down")
    assert h.client.value() == frame[:200]  # not inside the frame
    h.relay.upstream_data(frame[200:])
    out = h.client.value()
    assert out[: len(frame)] == frame, f"the rest of the frame was not written ({len(out)} of {len(frame)} bytes)"
    assert out == frame + encode_close(1001, "server shutting down", mask=False)


def test_shutdown_close_to_upstream_waits_for_end_of_data_frame() -> None:
    h = make()
    frame = c_frame(OP_BINARY, b"\x07" * 500)
    h.relay.client_data(frame[:200])
    h.relay.close(1001, "server shutting down")
    assert h.upstream.value() == frame[:200]
    h.relay.client_data(frame[200:])
    out = h.upstream.value()
    assert out[: len(frame)] == frame, f"the rest of the frame was not written ({len(out)} of {len(frame)} bytes)"
    [close] = parse_frames(out[len(frame) :])
    assert close.masked and close.close == (1001, "server shutting down")


# -- idle timeout -------------------------------------------------------------------


def _assert_idle_closed(h: Harness) -> None:
    [to_client] = parse_frames(h.client.value()[-len(encode_close(1001, "idle timeout", mask=False)) :])
    assert to_client.close == (1001, "idle timeout") and not to_client.masked
    closes = [f for f in parse_frames(h.upstream.value()) if f.opcode == OP_CLOSE]
    assert len(closes) == 1
    assert closes[0].close == (1001, "idle timeout") and closes[0].masked
    assert h.relay.closed_by == "gateway"
    assert h.relay.close_code == 1001


def test_idle_timeout_closes_both_sides_1001() -> None:
    h = make(idle_timeout=60)
    h.clock.advance(59.9)
    assert h.client.value() == b"" and h.upstream.value() == b""
    h.clock.advance(0.1)
    _assert_idle_closed(h)
    # the answers complete the handshakes and are not relayed
    h.relay.client_data(encode_close(1001, "", mask=True))
    h.relay.upstream_data(encode_close(1001, "", mask=False))
    h.clock.advance(0)
    assert h.client.kinds() == ["write", "lose"]
    assert len(parse_frames(h.upstream.value())) == 1
    h.lose_both()
    h.assert_finished()


def test_activity_keeps_idle_connection_open() -> None:
    h = make(idle_timeout=60)
    for _ in range(10):
        h.clock.advance(30)
        h.relay.client_data(c_frame(OP_TEXT, b"tick"))
        h.clock.advance(30)
        h.relay.upstream_data(u_frame(OP_TEXT, b"tock"))
    assert h.relay.closed_by is None
    assert all(f.opcode == OP_TEXT for f in parse_frames(h.client.value()))
    assert all(f.opcode == OP_TEXT for f in parse_frames(h.upstream.value()))
    h.clock.pump([1] * 200)  # then silence: it closes
    _assert_idle_closed(h)


def test_idle_timeout_counts_from_last_data_frame() -> None:
    """
    "no data frame either way -> close 1001" after idle_timeout: a connection
    silent for idle_timeout since its last data frame is closed then, not up
    to twice that long later.
    """
    h = make(idle_timeout=60)
    h.clock.advance(1)
    h.relay.client_data(c_frame(OP_TEXT, b"only message"))
    h.clock.pump([0.5] * 121)  # 60.5 s of silence since the last data frame
    assert h.relay.closed_by == "gateway", "still open 60.5 s after the last data frame (idle_timeout=60)"
    _assert_idle_closed(h)


def test_idle_connection_mid_frame_is_not_closed() -> None:
    h = make(idle_timeout=60)
    frame = u_frame(OP_BINARY, b"\x08" * 1000)
    # one slow frame: its header is the only "data frame" seen, but its
    # payload keeps arriving, for well over idle_timeout
    for k in range(10, 300, 10):
        h.relay.upstream_data(frame[k - 10 : k])
        h.clock.pump([1] * 59)
    assert h.relay.closed_by is None
    assert h.client.value() == frame[:290]


def test_idle_timeout_applies_to_a_stalled_frame() -> None:
    """
    A peer that sends a frame header and then nothing holds the connection
    with no data moving either way: idle_timeout must still end it (here with
    the gateway's pings off, so nothing else will).
    """
    h = make(idle_timeout=60)
    frame = c_frame(OP_BINARY, b"\x09" * 1000)
    h.relay.client_data(frame[:20])  # then silence
    h.clock.pump([1] * 600)
    assert h.relay.closed_by == "gateway", "open after 10 x idle_timeout with no byte moving"


def test_pings_do_not_count_as_activity() -> None:
    h = make(idle_timeout=60, ping_interval=20, ping_timeout=5)
    for t in range(1, 60):
        h.clock.advance(1)
        if t % 7 == 0:
            h.relay.client_data(c_frame(OP_PING, b"c"))
            h.relay.upstream_data(u_frame(OP_PONG, b"c"))
        if t % 20 == 0:
            # answer the gateway's own pings so nobody is dropped for that
            payload = parse_frames(h.upstream.value())[-1].payload
            h.relay.client_data(c_frame(OP_PONG, payload))
            h.relay.upstream_data(u_frame(OP_PONG, payload))
    assert h.relay.closed_by is None
    h.clock.advance(1.5)
    assert h.relay.closed_by == "gateway"
    assert h.relay.close_reason == "idle timeout"
    assert h.client.abort_calls == 0 and h.upstream.abort_calls == 0
    h.lose_both()
    h.assert_finished()


# -- the gateway's own close (shutdown) ---------------------------------------------


def test_shutdown_close_1001_both_sides() -> None:
    h = make(ping_interval=25, ping_timeout=10, idle_timeout=600, close_timeout=60)
    h.relay.close(1001, "server shutting down")
    [to_client] = parse_frames(h.client.value())
    [to_upstream] = parse_frames(h.upstream.value())
    assert to_client.close == (1001, "server shutting down") and not to_client.masked
    assert to_upstream.close == (1001, "server shutting down") and to_upstream.masked
    assert (h.relay.closed_by, h.relay.close_code) == ("gateway", 1001)

    # no more pings (nor pong deadlines) once closing
    h.clock.pump([1] * 50)
    assert len(parse_frames(h.client.value())) == 1
    assert len(parse_frames(h.upstream.value())) == 1
    assert h.client.abort_calls == 0 and h.upstream.abort_calls == 0

    # the answers are not relayed across
    h.relay.upstream_data(encode_close(1001, "", mask=False))
    h.relay.client_data(encode_close(1001, "", mask=True))
    assert len(parse_frames(h.client.value())) == 1
    assert len(parse_frames(h.upstream.value())) == 1
    h.clock.advance(0)
    assert h.client.kinds() == ["write", "lose"]
    h.relay.upstream_connection_lost()
    h.relay.client_connection_lost()
    h.assert_finished()
    assert h.client.abort_calls == 0 and h.upstream.abort_calls == 0


def test_shutdown_close_is_bounded_too() -> None:
    h = make(close_timeout=2)
    h.relay.close(1001, "server shutting down")
    h.clock.advance(2)
    assert h.client.abort_calls == 1 and h.upstream.abort_calls == 1
    h.lose_both()
    h.assert_finished()


# -- backpressure ------------------------------------------------------------------


def test_each_transport_is_streaming_producer_of_the_other() -> None:
    h = make(write_buffer=12345)
    assert h.client.streaming is True and h.upstream.streaming is True
    # pausing the producer registered with one transport pauses the other
    h.client.producer.pauseProducing()
    assert h.upstream.producerState == "paused"
    h.client.producer.resumeProducing()
    assert h.upstream.producerState == "producing"
    h.upstream.producer.pauseProducing()
    assert h.client.producerState == "paused"
    # Twisted calls stopProducing when the consumer's connection is lost: the
    # other leg must not be dropped by that (the relay sends its close first)
    h.client.producer.stopProducing()
    h.upstream.producer.stopProducing()
    assert h.client.lose_calls == 0 and h.upstream.lose_calls == 0
    # a quarter each: the mark over which a transport pauses and the size of the other
    # leg's read landing on top of it, so queue and write copy stay under it (transport.take)
    assert h.client.bufferSize == 12345 // 4
    assert h.upstream.bufferSize == 12345 // 4


class _Wrapper:
    """Like TLSMemoryBIOProtocol: no bufferSize of its own, wraps a transport."""

    def __init__(self, inner: Any) -> None:
        self.transport = inner


def test_set_write_buffer_walks_transport_chain() -> None:
    inner = FakeTransport()
    middle = FakeTransport()
    middle.transport = inner  # type: ignore[attr-defined]
    outer = _Wrapper(middle)
    set_write_buffer(outer, 4096)
    assert not hasattr(outer, "bufferSize")
    assert middle.bufferSize == 4096
    assert inner.bufferSize == 4096
    set_write_buffer(None, 1)  # harmless


def test_pause_reaches_the_other_side_through_registration() -> None:
    # what Twisted does when the client's buffer passes bufferSize
    h = make()
    h.client.producer.pauseProducing()
    assert h.upstream.producerState == "paused"
    assert h.client.producerState == "producing"
    h.client.producer.resumeProducing()
    assert h.upstream.producerState == "producing"
    h.upstream.producer.pauseProducing()
    assert h.client.producerState == "paused"


# -- on_upstream_close = reconnect -------------------------------------------


class Reconnects:
    """The factory's side of a reconnect, driven by the test."""

    def __init__(self) -> None:
        self.calls: list[Deferred[None]] = []
        self.cancelled = 0

    def __call__(self, relay: Relay) -> Deferred[None]:
        d: Deferred[None] = Deferred(lambda d: self._cancel())
        self.calls.append(d)
        return d

    def _cancel(self) -> None:
        self.cancelled += 1


def make_reconnecting(buffer: int = 1 << 20) -> tuple[Harness, Reconnects]:
    r = Reconnects()
    return make(reconnect=r, reconnect_buffer=buffer), r


def test_upstream_vanishing_holds_client_frames_and_flushes_them_in_order() -> None:
    h, r = make_reconnecting()
    h.relay.client_data(c_frame(OP_TEXT, b"before"))
    h.relay.upstream_leg.connectionLost(None)  # vanished, no close frame
    assert h.relay.reconnecting and len(r.calls) == 1
    assert h.client.events == []  # the client sees nothing of it
    held = [c_frame(OP_TEXT, f"m{i}".encode()) for i in range(5)]
    for f in held:
        h.relay.client_data(f)
    new = FakeTransport()
    leg = h.relay.upstream_reconnected(new)
    r.calls[0].callback(None)
    assert new.value() == b"".join(held)
    assert not h.relay.reconnecting and h.relay.reconnects == 1
    # the new leg relays both ways; the old one is ignored
    h.relay.client_data(c_frame(OP_TEXT, b"after"))
    assert parse_frames(new.value())[-1].payload == b"after"
    leg.dataReceived(u_frame(OP_TEXT, b"from the new node"))
    assert parse_frames(h.client.value())[-1].payload == b"from the new node"
    old_upstream_writes = len(h.upstream.events)
    h.relay.client_data(c_frame(OP_TEXT, b"x"))
    assert len(h.upstream.events) == old_upstream_writes


def test_upstream_going_away_1012_is_answered_and_not_shown_to_the_client() -> None:
    h, r = make_reconnecting()
    h.relay.upstream_leg.dataReceived(u_frame(OP_TEXT, b"last") + u_frame(OP_CLOSE, b"\x03\xf4restart"))
    assert [f.payload for f in parse_frames(h.client.value())] == [b"last"]  # no close to the client
    (reply,) = parse_frames(h.upstream.value())
    assert reply.opcode == OP_CLOSE and reply.close[0] == 1012  # the upstream's handshake completed
    assert h.upstream.lose_calls == 1
    assert h.relay.reconnecting and len(r.calls) == 1


def test_other_upstream_close_codes_are_passed_through_without_reconnect() -> None:
    h, r = make_reconnecting()
    h.relay.upstream_leg.dataReceived(u_frame(OP_CLOSE, b"\x0f\xa0bye"))  # 4000
    assert parse_frames(h.client.value())[0].close == (4000, "bye")
    assert r.calls == [] and not h.relay.reconnecting


def test_reconnect_buffer_overflow_closes_the_client_1014() -> None:
    h, r = make_reconnecting(buffer=100)
    h.relay.upstream_leg.connectionLost(None)
    h.relay.client_data(c_frame(OP_BINARY, b"x" * 200))
    assert r.cancelled == 1 and not h.relay.reconnecting
    assert parse_frames(h.client.value())[0].close[0] == 1014


def test_failed_reconnect_closes_the_client_1014() -> None:
    h, r = make_reconnecting()
    h.relay.upstream_leg.connectionLost(None)
    h.relay.client_data(c_frame(OP_TEXT, b"lost with the upstream"))
    r.calls[0].errback(RuntimeError("no node"))
    assert parse_frames(h.client.value())[0].close == (1014, "upstream lost")
    h.relay.client_data(c_frame(OP_CLOSE, b"\x03\xf6"))  # the client's answer
    h.clock.advance(0)
    assert h.client.lose_calls == 1
    h.relay.client_connection_lost()
    h.assert_finished()


def test_client_closing_during_reconnect_is_answered_by_the_gateway() -> None:
    h, r = make_reconnecting()
    h.relay.upstream_leg.connectionLost(None)
    h.relay.client_data(c_frame(OP_CLOSE, b"\x03\xe8done"))
    assert r.cancelled == 1
    assert parse_frames(h.client.value())[0].close == (1000, "done")
    h.clock.advance(0)
    assert h.client.lose_calls == 1
    h.relay.client_connection_lost()
    h.assert_finished()


def test_no_reconnect_in_the_middle_of_a_message() -> None:
    h, r = make_reconnecting()
    h.relay.upstream_leg.dataReceived(u_frame(OP_TEXT, b"half", fin=False))
    h.relay.upstream_leg.connectionLost(None)
    assert r.calls == []
    # the client cannot get a close inside the open message stream... it gets
    # 1014 at the frame boundary (a control frame may come between fragments)
    frames = parse_frames(h.client.value())
    assert frames[-1].opcode == OP_CLOSE and frames[-1].close[0] == 1014


def test_ping_held_behind_a_large_frame_does_not_make_a_slow_peer_look_dead() -> None:
    h = make(ping_interval=10, ping_timeout=5)
    # the upstream starts a 1 MB frame to the client and sends it slowly
    header = u_frame(OP_BINARY, b"x" * 1_000_000)[:10]
    h.relay.upstream_data(header + b"x" * 250_000)
    h.clock.advance(10)  # ping time: the client's ping is held behind that frame
    h.relay.upstream_data(b"x" * 250_000)  # still moving: not a stalled peer
    h.clock.advance(5)  # pong deadline: the ping never left, the client is not judged
    assert h.client.abort_calls == 0
    h.relay.upstream_data(b"x" * 500_000)  # the frame ends; the held ping goes out
    pings = [f for f in parse_frames(h.client.value()) if f.opcode == OP_PING]
    assert len(pings) == 1
    h.relay.client_data(c_frame(OP_PONG, pings[0].payload))
    h.clock.advance(5)
    assert h.client.abort_calls == 0 and h.upstream.abort_calls == 1  # the upstream never answered its ping


def test_a_peer_that_never_answers_is_still_dropped_once_the_ping_is_out() -> None:
    h = make(ping_interval=10, ping_timeout=5)
    h.relay.upstream_data(u_frame(OP_BINARY, b"x" * 10, fin=True)[:6])  # a frame in flight...
    h.clock.advance(10)
    h.clock.advance(5)
    assert h.client.abort_calls == 0
    h.relay.upstream_data(b"x" * 6)  # ...ends, the ping goes out, no pong ever comes
    h.clock.advance(5)
    assert h.client.abort_calls == 1


# -- message rate (messages_per_second) ------------------------------------------


def _assert_policy_closed(h: Harness, reason: str, forwarded: bytes) -> None:
    """1008 with ``reason`` to the client; 1001 upstream after ``forwarded``, as for 1009."""
    _assert_violation_closes(h, 1008, forwarded)
    [to_client] = parse_frames(h.client.value())
    assert to_client.close == (1008, reason)
    [to_upstream] = parse_frames(h.upstream.value()[len(forwarded) :])
    assert to_upstream.close == (1001, "client closed")
    assert h.relay.close_reason == reason


def test_burst_of_twice_the_rate_passes_then_the_next_message_closes_1008() -> None:
    h = make(messages_per_second=5)
    burst = b"".join(c_frame(OP_TEXT, f"m{i}".encode()) for i in range(10))
    h.relay.client_data(burst)
    assert h.upstream.value() == burst and h.client.value() == b""
    h.relay.client_data(c_frame(OP_TEXT, b"BREACH"))
    assert b"BREACH" not in h.upstream.value()
    _assert_policy_closed(h, "rate limit exceeded", burst)
    assert h.relay.messages_c2u == 10
    h.relay.client_data(c_frame(OP_TEXT, b"after"))  # nothing more goes up
    assert len(parse_frames(h.upstream.value())) == 11  # the burst and the close
    h.lose_both()
    h.assert_finished()


def test_breach_inside_one_read_forwards_only_what_came_before() -> None:
    h = make(messages_per_second=1)  # burst 2
    ok = c_frame(OP_BINARY, b"one") + c_frame(OP_BINARY, b"two")
    h.relay.client_data(ok + c_frame(OP_BINARY, b"three") + c_frame(OP_BINARY, b"four"))
    _assert_policy_closed(h, "rate limit exceeded", ok)
    h.lose_both()
    h.assert_finished()


def test_tokens_come_back_at_the_rate() -> None:
    h = make(messages_per_second=5)
    for i in range(10):
        h.relay.client_data(c_frame(OP_TEXT, b"burst"))
    h.clock.advance(0.2)  # one token
    h.relay.client_data(c_frame(OP_TEXT, b"refilled"))
    assert h.relay.closed_by is None and h.relay.messages_c2u == 11
    h.relay.client_data(c_frame(OP_TEXT, b"too soon"))
    assert h.relay.close_code == 1008


@pytest.mark.parametrize("burst_first", [False, True])
def test_steady_rate_at_the_limit_never_closes(burst_first: bool) -> None:
    h = make(messages_per_second=10, idle_timeout=60, ping_interval=25, ping_timeout=10)
    sent = 0
    if burst_first:
        # an empty bucket: from here each message takes the one token that
        # 0.1 s (summed in floats) brings back
        for _ in range(20):
            h.relay.client_data(c_frame(OP_TEXT, b"burst"))
            sent += 1
        h.clock.advance(0.1)
    for _ in range(3000):  # five minutes at exactly 10/s
        h.relay.client_data(c_frame(OP_TEXT, b"tick"))
        sent += 1
        for f in parse_frames(h.client.value()):  # answer the gateway's pings
            if f.opcode == OP_PING:
                h.relay.client_data(c_frame(OP_PONG, f.payload))
        h.client.clear()
        h.clock.advance(0.1)
    assert h.relay.closed_by is None
    assert h.relay.messages_c2u == sent


def test_control_frames_do_not_count() -> None:
    h = make(messages_per_second=1)  # burst 2
    for _ in range(100):
        h.relay.client_data(c_frame(OP_PING, b"p") + c_frame(OP_PONG, b"q"))
    h.relay.client_data(c_frame(OP_TEXT, b"a") + c_frame(OP_TEXT, b"b"))
    assert h.relay.closed_by is None and h.relay.messages_c2u == 2


def test_a_message_in_many_fragments_counts_once() -> None:
    h = make(messages_per_second=1)  # burst 2
    wire = b""
    for m in range(2):
        wire += c_frame(OP_TEXT, b"f0", fin=False)
        for i in range(1, 50):
            wire += c_frame(OP_CONT, b"f%d" % i, fin=(i == 49))
            if i % 10 == 0:
                wire += c_frame(OP_PING, b"between")
    h.relay.client_data(wire)
    assert h.upstream.value() == wire and h.relay.closed_by is None
    assert h.relay.messages_c2u == 2
    third = c_frame(OP_TEXT, b"3rd-start", fin=False)
    h.relay.client_data(third)
    assert b"3rd-start" not in h.upstream.value()
    _assert_policy_closed(h, "rate limit exceeded", wire)


def test_a_message_dribbled_byte_by_byte_counts_once() -> None:
    h = make(messages_per_second=1)  # burst 2
    wire = c_frame(OP_BINARY, b"x" * 300) + c_frame(OP_TEXT, b"y", fin=False) + c_frame(OP_CONT, b"z")
    for k in range(len(wire)):
        h.relay.client_data(wire[k : k + 1])
    assert h.upstream.value() == wire and h.relay.closed_by is None
    h.relay.client_data(c_frame(OP_TEXT, b"over")[:3])  # a partial header is not judged yet...
    assert h.relay.closed_by is None
    h.relay.client_data(c_frame(OP_TEXT, b"over")[3:])
    _assert_policy_closed(h, "rate limit exceeded", wire)


def test_limit_off_lets_any_rate_through() -> None:
    h = make(messages_per_second=0)
    wire = c_frame(OP_TEXT, b"m") * 10_000
    h.relay.client_data(wire)
    assert h.upstream.value() == wire and h.relay.closed_by is None
    assert h.relay.c2u._on_message is None  # nothing runs per message


def test_a_slow_rate_still_allows_one_message() -> None:
    h = make(messages_per_second=0.1)  # 2x would be a burst under one message
    h.relay.client_data(c_frame(OP_TEXT, b"first"))
    assert h.relay.closed_by is None
    h.relay.client_data(c_frame(OP_TEXT, b"second"))
    assert h.relay.close_code == 1008
    h.relay.client_connection_lost()
    h.relay.upstream_connection_lost()
    h.assert_finished()


def test_upstream_messages_are_not_limited() -> None:
    h = make(messages_per_second=1)
    wire = u_frame(OP_TEXT, b"push") * 100
    h.relay.upstream_data(wire)
    assert h.client.value() == wire and h.relay.closed_by is None


# -- token expiry (close_at) -------------------------------------------------------


def test_close_at_closes_1008_token_expired_at_that_time_and_not_before() -> None:
    h = make(close_at=100.0, idle_timeout=600, ping_interval=0)
    h.clock.advance(99.999)
    assert h.client.value() == b"" and h.upstream.value() == b""
    h.clock.advance(0.001)
    [to_client] = parse_frames(h.client.value())
    assert to_client.close == (1008, "token expired") and not to_client.masked
    [to_upstream] = parse_frames(h.upstream.value())
    assert to_upstream.close == (1001, "client closed") and to_upstream.masked
    assert (h.relay.closed_by, h.relay.close_code, h.relay.close_reason) == ("gateway", 1008, "token expired")
    # the client's stream is sound: its close handshake is completed, not cut
    assert h.client.lose_calls == 0
    h.relay.client_data(c_frame(OP_TEXT, b"too late"))
    assert b"too late" not in h.upstream.value()
    h.relay.client_data(encode_close(1008, "", mask=True))
    h.relay.upstream_data(encode_close(1001, "", mask=False))
    h.clock.advance(0)
    assert h.client.kinds() == ["write", "lose"]
    assert len(parse_frames(h.upstream.value())) == 1
    h.relay.upstream_connection_lost()
    h.relay.client_connection_lost()
    h.assert_finished()
    assert h.client.abort_calls == 0 and h.upstream.abort_calls == 0


def test_close_at_already_past_closes_on_the_next_turn() -> None:
    clock = task.Clock()
    clock.advance(1000)
    h = make(clock=clock, close_at=900.0)
    assert h.client.value() == b""  # not from inside the constructor
    clock.advance(0)
    assert parse_frames(h.client.value())[0].close == (1008, "token expired")


def test_close_at_waits_for_a_frame_in_flight_to_the_client() -> None:
    h = make(close_at=10.0)
    frame = u_frame(OP_BINARY, b"x" * 1000)
    h.relay.upstream_data(frame[:100])
    h.clock.advance(10)
    assert h.client.value() == frame[:100]  # the close waits behind the frame
    h.relay.upstream_data(frame[100:])
    frames = parse_frames(h.client.value())
    assert [f.opcode for f in frames] == [OP_BINARY, OP_CLOSE]
    assert frames[1].close == (1008, "token expired")


def test_expiry_timer_is_cancelled_when_the_connection_ends_first() -> None:
    h = make(close_at=3600.0, ping_interval=25, ping_timeout=10, idle_timeout=600, messages_per_second=5)
    h.relay.client_data(encode_close(1000, "bye", mask=True))
    h.relay.upstream_data(encode_close(1000, "bye", mask=False))
    h.clock.advance(0)
    h.relay.upstream_connection_lost()
    h.relay.client_connection_lost()
    h.assert_finished()  # no delayed call left on the clock
    assert h.relay.close_code == 1000


def test_expiry_timer_is_cancelled_when_the_client_vanishes() -> None:
    h = make(close_at=3600.0)
    h.lose_both()
    h.assert_finished()


def test_expiry_during_a_close_in_progress_changes_nothing() -> None:
    h = make(close_at=10.0, close_timeout=60)
    h.relay.client_data(encode_close(4000, "bye", mask=True))
    h.clock.advance(10)
    assert h.client.value() == b""
    assert (h.relay.closed_by, h.relay.close_code) == ("client", 4000)


def test_expiry_while_reconnecting_stops_the_reconnect() -> None:
    r = Reconnects()
    h = make(close_at=10.0, reconnect=r, reconnect_buffer=1 << 20)
    h.relay.upstream_leg.connectionLost(None)
    assert h.relay.reconnecting
    h.clock.advance(10)
    assert r.cancelled == 1 and not h.relay.reconnecting
    assert parse_frames(h.client.value())[0].close == (1008, "token expired")
    h.relay.client_data(encode_close(1008, "", mask=True))
    h.clock.advance(0)
    h.relay.client_connection_lost()
    h.assert_finished()


# -- pushes --------------------------------------------------------------------


def test_a_push_waits_for_the_end_of_a_fragmented_upstream_message() -> None:
    h = make()
    h.relay.upstream_data(u_frame(OP_TEXT, b"part1", fin=False))
    frame2 = u_frame(OP_CONT, b"part2-and-more", fin=True)
    h.relay.upstream_data(frame2[:5])  # mid-frame too
    h.relay.push(b"pushed", False)
    h.relay.push(b"\x00\x01", True)
    h.relay.upstream_data(frame2[5:])
    frames = parse_frames(h.client.value())
    assert [(f.opcode, f.fin, f.payload) for f in frames] == [
        (OP_TEXT, False, b"part1"),
        (OP_CONT, True, b"part2-and-more"),
        (OP_TEXT, True, b"pushed"),
        (OP_BINARY, True, b"\x00\x01"),
    ]
    assert h.relay.messages_u2c == 3


def test_a_push_at_a_message_boundary_goes_out_at_once_and_not_after_close() -> None:
    h = make()
    h.relay.push(b"now", False)
    assert [(f.opcode, f.payload) for f in parse_frames(h.client.value())] == [(OP_TEXT, b"now")]
    h.relay.close(1001, "bye")
    before = h.client.value()
    h.relay.push(b"late", False)
    assert h.client.value() == before


class _Outbox:
    """A push outbox that records what the client's buffer tells it."""

    def __init__(self) -> None:
        self.state = "producing"

    def pauseProducing(self) -> None:
        self.state = "paused"

    def resumeProducing(self) -> None:
        self.state = "producing"

    def stopProducing(self) -> None:
        self.state = "stopped"


def test_an_outbox_attached_while_the_upstream_reconnects_is_paused_alone_then_with_the_new_leg() -> None:
    h, r = make_reconnecting()
    h.relay.upstream_leg.connectionLost(None)
    assert h.relay.reconnecting
    outbox = _Outbox()
    h.relay.attach_outbox(outbox)  # a subscribe that completes during the reconnect
    h.client.producer.pauseProducing()  # the client's socket is full: no leg to pause yet
    assert outbox.state == "paused"
    h.client.producer.resumeProducing()
    new = FakeTransport()
    h.relay.upstream_reconnected(new)
    r.calls[0].callback(None)
    h.client.producer.pauseProducing()
    assert (outbox.state, new.producerState) == ("paused", "paused")
