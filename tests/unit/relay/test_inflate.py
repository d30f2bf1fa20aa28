"""
The inflated size of compressed client messages (wsgateway/relay/inflate.py)
as the frame scanner counts it, whatever the reads' boundaries.
"""

from __future__ import annotations

import os
import zlib

import pytest

from wsgateway.relay.codec import OP_BINARY, OP_CONT, OP_PING, OP_TEXT
from wsgateway.relay.frames import FrameScanner
from wsgateway.relay.inflate import MessageInflater


def deflated(payload: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return (c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]


def masked(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    head = bytes([b0, 0x80 | n]) if n < 126 else (
        bytes([b0, 0x80 | 126]) + n.to_bytes(2, "big") if n < 65536 else bytes([b0, 0x80 | 127]) + n.to_bytes(8, "big"))
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def scanner(limit: int) -> FrameScanner:
    return FrameScanner(masked=True, max_message_size=limit, on_control=lambda op, p: True, deflate=True)


def feed_in_pieces(s: FrameScanner, data: bytes, size: int) -> bytes:
    return b"".join(s.feed(data[i:i + size]) for i in range(0, len(data), size))


@pytest.mark.parametrize("size", [1, 3, 7, 100, 10_000, 1 << 20])
def test_a_message_up_to_the_limit_passes_byte_identical_whatever_the_reads(size: int) -> None:
    text = b"".join(b"%d: the quick brown fox " % i for i in range(2000))
    body = deflated(text)
    wire = masked(OP_TEXT, body[:50], fin=False, rsv1=True) + masked(OP_PING, b"p") + masked(OP_CONT, body[50:])
    s = scanner(len(text))
    assert feed_in_pieces(s, wire, size) == wire
    assert s.error is None and s.messages == 1


@pytest.mark.parametrize("size", [1, 5, 4096, 1 << 20])
def test_one_byte_over_the_limit_inflated_is_1009(size: int) -> None:
    text = bytes(100_001)
    s = scanner(100_000)
    feed_in_pieces(s, masked(OP_BINARY, deflated(text), rsv1=True), size)
    assert s.error == (1009, "message too big")


def test_a_bomb_is_refused_in_the_frame_that_passes_the_limit() -> None:
    s = scanner(1 << 20)
    out = s.feed(masked(OP_BINARY, deflated(bytes(256 << 20)), rsv1=True))
    assert s.error == (1009, "message too big") and out == b""  # nothing of it forwarded


def test_uncompressed_messages_on_a_compressed_stream_are_counted_on_the_wire() -> None:
    s = scanner(10)
    assert s.feed(masked(OP_TEXT, b"0123456789")) != b"" and s.error is None
    s.feed(masked(OP_TEXT, b"0123456789X"))
    assert s.error == (1009, "message too big")


def test_each_message_is_inflated_on_its_own() -> None:
    s = scanner(1000)
    for _ in range(20):
        s.feed(masked(OP_TEXT, deflated(b"a" * 1000), rsv1=True))
    assert s.error is None and s.messages == 20


@pytest.mark.parametrize(
    "wire",
    [
        masked(OP_TEXT, deflated(b"x"), fin=False, rsv1=True) + masked(OP_CONT, b"x", rsv1=True),
        masked(OP_PING, b"", rsv1=True),
    ],
    ids=["rsv1-continuation", "rsv1-ping"],
)
def test_rsv1_is_legal_on_a_first_data_frame_only(wire: bytes) -> None:
    s = scanner(0)
    s.feed(wire)
    assert s.error == (1002, "reserved bits set")


def test_rsv1_without_deflate_is_1002() -> None:
    s = FrameScanner(masked=True, max_message_size=0, on_control=lambda op, p: True)
    s.feed(masked(OP_TEXT, deflated(b"x"), rsv1=True))
    assert s.error == (1002, "reserved bits set")


def test_the_upstream_direction_allows_rsv1_and_inflates_nothing() -> None:
    s = FrameScanner(masked=False, max_message_size=0, on_control=lambda op, p: True, deflate=True)
    frame = bytes([0xC1, 5]) + b"\xff\xff\xff\xff\xff"  # not even deflate: not the gateway's to read
    assert s.feed(frame) == frame and s.error is None


def test_inflater_steps_are_bounded() -> None:
    m = MessageInflater(10 << 20)
    assert m.feed(deflated(bytes(10 << 20))) is None
    assert m.end() is None
    assert MessageInflater(10).feed(b"\xff\xff") == (1007, "invalid compressed data")


def test_a_one_frame_message_that_cannot_reach_the_limit_is_not_inflated() -> None:
    """Deflate inflates at most 1032 times: 100 wire bytes cannot pass 1 MiB, so they are not even read."""
    s = scanner(1 << 20)
    not_deflate = masked(OP_TEXT, b"\xff" * 100, rsv1=True)
    assert s.feed(not_deflate) == not_deflate and s.error is None  # the upstream's to judge
    # the same bytes in two frames are inflated: a fragmented message's size is unknown at its start
    s.feed(masked(OP_TEXT, b"\xff" * 50, fin=False, rsv1=True) + masked(OP_CONT, b"\xff" * 50))
    assert s.error == (1007, "invalid compressed data")
    # and one whose wire size could pass the limit is inflated whole
    s = scanner(1000)
    s.feed(masked(OP_TEXT, b"\xff" * 100, rsv1=True))
    assert s.error == (1007, "invalid compressed data")
