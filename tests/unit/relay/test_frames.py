"""
Tests for L{wsgateway.relay.frames}.

The C{websockets} library's own frame code is the independent oracle: it
builds the input frames and reads the scanner's output back.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode, apply_mask
from websockets.streams import StreamReader

from wsgateway.relay import codec
from wsgateway.relay.codec import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, encode_close, encode_frame, parse_close, unmask
from wsgateway.relay.frames import FrameScanner

# Big random streams and many examples: the deadline would only add flakiness.
PROPERTY = settings(
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

FrameKey = tuple[int, bytes, bool]


# -- helpers ---------------------------------------------------------------


def ser(frame: Frame, masked: bool) -> bytes:
    return frame.serialize(mask=masked, extensions=[])


def oracle_parse(stream: bytes, *, masked: bool) -> list[Frame]:
    """Read every frame of C{stream} with websockets; fail on a partial one."""
    reader = StreamReader()
    reader.feed_data(stream)
    reader.feed_eof()
    parsed: list[Frame] = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=masked, extensions=[])
        try:
            next(parser)
        except StopIteration as done:
            parsed.append(done.value)
        else:  # pragma: no cover - only on a failing test
            raise AssertionError("oracle parser wants more data")
    return parsed


def key(frame: Frame) -> FrameKey:
    return (int(frame.opcode), bytes(frame.data), frame.fin)


def keep_all(opcode: int, payload: bytes) -> bool:
    return True


def scanner(
    masked: bool = True,
    max_message_size: int = 0,
    on_control: Callable[[int, bytes], bool] = keep_all,
) -> FrameScanner:
    return FrameScanner(masked=masked, max_message_size=max_message_size, on_control=on_control)


def split(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(stream)]
    return [stream[a:b] for a, b in zip(points, points[1:]) if b > a]


def feed_all(s: FrameScanner, chunks: Iterable[bytes]) -> bytes:
    return b"".join(s.feed(chunk) for chunk in chunks)


# -- strategies ------------------------------------------------------------

payload_sizes = st.one_of(
    st.integers(0, 300),
    st.sampled_from([0, 1, 125, 126, 127, 65535, 65536, 65537]),
    st.integers(0, 70000),
)
controls = st.lists(
    st.tuples(st.sampled_from([OP_PING, OP_PONG]), st.integers(0, 125)), max_size=2
)


@st.composite
def frame_sequences(draw: st.DrawFn) -> tuple[list[Frame], int]:
    """Valid frames: messages (some fragmented) with pings/pongs interleaved."""
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    out: list[Frame] = []

    def add_controls() -> None:
        for op, size in draw(controls):
            out.append(Frame(Opcode(op), rnd.randbytes(size)))

    add_controls()
    n_messages = draw(st.integers(0, 5))
    for _ in range(n_messages):
        first = draw(st.sampled_from([OP_TEXT, OP_BINARY]))
        sizes = draw(st.lists(payload_sizes, min_size=1, max_size=4))
        for k, size in enumerate(sizes):
            op = first if k == 0 else OP_CONT
            out.append(Frame(Opcode(op), rnd.randbytes(size), fin=k == len(sizes) - 1))
            add_controls()
    if draw(st.booleans()):
        out.append(Frame(Opcode.CLOSE, Close(1000, "bye").serialize()))
    return out, n_messages


def draw_cuts(data: st.DataObject, wires: list[bytes]) -> list[int]:
    """Split points: anywhere, and close to frame starts (to split headers)."""
    total = sum(map(len, wires))
    starts = [0]
    for wire in wires:
        starts.append(starts[-1] + len(wire))
    near_start = st.tuples(st.sampled_from(starts), st.integers(0, 15)).map(
        lambda t: min(total, t[0] + t[1])
    )
    return data.draw(st.lists(st.one_of(st.integers(0, total), near_start), max_size=16))


# -- property tests --------------------------------------------------------


@PROPERTY
@given(seq=frame_sequences(), masked=st.booleans(), data=st.data())
def test_passthrough_is_exact(
    seq: tuple[list[Frame], int], masked: bool, data: st.DataObject
) -> None:
    """
    Valid frames split anywhere come out byte for byte, counted, and each
    control frame is reported once, unmasked, in stream order.
    """
    items, n_messages = seq
    wires = [ser(f, masked) for f in items]
    stream = b"".join(wires)
    seen: list[tuple[int, bytes]] = []

    def on_control(op: int, payload: bytes) -> bool:
        seen.append((op, payload))
        return True

    s = scanner(masked, on_control=on_control)
    out = feed_all(s, split(stream, draw_cuts(data, wires)))
    assert s.error is None
    assert out == stream
    assert s.messages == n_messages
    assert s.data_frames == sum(1 for f in items if f.opcode in (OP_TEXT, OP_BINARY, OP_CONT))
    assert seen == [(int(f.opcode), bytes(f.data)) for f in items if f.opcode >= OP_CLOSE]
    assert not s.in_frame
    assert not s.in_message


@PROPERTY
@given(seq=frame_sequences(), masked=st.booleans(), data=st.data())
def test_dropping_pongs(seq: tuple[list[Frame], int], masked: bool, data: st.DataObject) -> None:
    """on_control returning False removes exactly those frames' bytes."""
    items, n_messages = seq
    wires = [ser(f, masked) for f in items]
    stream = b"".join(wires)
    s = scanner(masked, on_control=lambda op, payload: op != OP_PONG)
    out = feed_all(s, split(stream, draw_cuts(data, wires)))
    assert s.error is None
    assert out == b"".join(w for f, w in zip(items, wires) if f.opcode != OP_PONG)
    assert [key(f) for f in oracle_parse(out, masked=masked)] == [
        key(f) for f in items if f.opcode != OP_PONG
    ]
    assert s.messages == n_messages


@PROPERTY
@given(seq=frame_sequences(), masked=st.booleans(), data=st.data())
def test_inject_lands_on_frame_boundaries(
    seq: tuple[list[Frame], int], masked: bool, data: st.DataObject
) -> None:
    """
    Frames injected between any two feeds appear at the first frame boundary
    the output reaches, in order, never inside a frame.
    """
    items, _ = seq
    wires = [ser(f, masked) for f in items]
    stream = b"".join(wires)
    boundaries = [0]
    # (header end, frame end) of each data frame: the output is "in a frame"
    # once a header is out and until its payload is.
    payload_spans: list[tuple[int, int]] = []
    for f, wire in zip(items, wires):
        start = boundaries[-1]
        boundaries.append(start + len(wire))
        if f.opcode <= OP_BINARY:
            extended = {126: 2, 127: 8}.get(wire[1] & 0x7F, 0)
            payload_spans.append((start + 2 + extended + 4 * masked, boundaries[-1]))
    chunks = split(stream, draw_cuts(data, wires))
    slots = len(chunks) + 1
    inject_before = data.draw(st.lists(st.booleans(), min_size=slots, max_size=slots))

    s = scanner(masked)
    out = b""
    fed = 0
    planned: list[tuple[int, bytes]] = []  # (offset in the original stream, frame)
    for k in range(slots):
        if inject_before[k]:
            frame = encode_frame(OP_PING, b"gw%d" % k, mask=masked)
            inside = [end for hdr_end, end in payload_spans if hdr_end <= fed < end]
            # Inside a payload: after that frame.  Otherwise at the last
            # boundary passed (a partial header is held, not yet output).
            offset = inside[0] if inside else max(b for b in boundaries if b <= fed)
            planned.append((offset, frame))
            got = s.inject(frame)
            assert got == (b"" if inside else frame)
            assert s.in_frame == bool(inside)
            out += got
        if k < len(chunks):
            out += s.feed(chunks[k])
            fed += len(chunks[k])

    expected = b""
    last = 0
    for offset, frame in planned:  # offsets never decrease
        expected += stream[last:offset] + frame
        last = offset
    expected += stream[last:]
    assert s.error is None
    assert out == expected

    expected_keys = [key(f) for f in items]
    for offset, frame in reversed(planned):
        index = boundaries.index(offset)
        expected_keys.insert(index, key(oracle_parse(frame, masked=masked)[0]))
    assert [key(f) for f in oracle_parse(out, masked=masked)] == expected_keys


@PROPERTY
@given(payload=st.binary(max_size=300), mask_key=st.binary(min_size=4, max_size=4))
def test_unmask_matches_oracle(payload: bytes, mask_key: bytes) -> None:
    assert unmask(payload, mask_key) == apply_mask(payload, mask_key)
    assert unmask(unmask(payload, mask_key), mask_key) == payload


# -- scanner behaviour -----------------------------------------------------


def test_every_split_of_a_mixed_stream() -> None:
    """Feeding one byte at a time (every header split) changes nothing."""
    items = [
        Frame(Opcode.PING, b"p" * 125),
        Frame(Opcode.TEXT, b"a" * 126, fin=False),
        Frame(Opcode.PONG, b""),
        Frame(Opcode.CONT, b"b" * 65536),
        Frame(Opcode.BINARY, b""),
    ]
    for masked in (True, False):
        stream = b"".join(ser(f, masked) for f in items)
        s = scanner(masked)
        assert feed_all(s, split(stream, range(len(stream)))) == stream
        assert (s.messages, s.data_frames, s.error) == (2, 3, None)


def test_feed_returns_the_same_object() -> None:
    """No copy when nothing is dropped, held or inserted."""
    chunk = b"".join(ser(Frame(Opcode.BINARY, bytes(64)), True) for _ in range(16))
    chunk += ser(Frame(Opcode.PING, b"hi"), True)
    s = scanner(True)
    assert s.feed(chunk) is chunk
    assert s.data_frames == 16


def test_data_header_held_until_complete() -> None:
    """A split header is held back, then header and payload flow as they come."""
    wire = ser(Frame(Opcode.BINARY, bytes(70000)), True)  # 2 + 8 + 4 header bytes
    s = scanner(True)
    assert s.feed(wire[:13]) == b""
    assert not s.in_frame
    assert s.data_frames == 0
    assert s.feed(wire[13:20]) == wire[:20]
    assert s.in_frame
    assert s.data_frames == 1
    assert s.messages == 1  # counted at the FIN frame's header
    rest = wire[20:]
    assert s.feed(rest) is rest
    assert not s.in_frame


@pytest.mark.parametrize("size", [5, 300])
def test_masking_key_is_part_of_the_held_header(size: int) -> None:
    """Short and 16-bit lengths: the header is complete only with its key."""
    wire = ser(Frame(Opcode.TEXT, b"k" * size), True)
    header = 6 if size < 126 else 8
    s = scanner(True)
    for k in range(1, header):
        assert s.feed(wire[k - 1 : k]) == b""
        assert not s.in_frame
    assert s.data_frames == 0
    assert s.feed(wire[header - 1 : header + 1]) == wire[: header + 1]
    assert s.in_frame
    assert s.data_frames == 1


def test_control_frame_held_until_complete() -> None:
    wire = ser(Frame(Opcode.PING, b"abc"), True)
    seen: list[tuple[int, bytes]] = []
    s = scanner(True, on_control=lambda op, p: seen.append((op, p)) is None)
    assert s.feed(wire[:-1]) == b""
    assert seen == []
    assert s.feed(wire[-1:]) == wire
    assert seen == [(OP_PING, b"abc")]


def test_controls_between_fragments() -> None:
    seen: list[tuple[int, bytes]] = []
    s = scanner(False, on_control=lambda op, p: seen.append((op, p)) is None)
    first = ser(Frame(Opcode.TEXT, b"he", fin=False), False)
    assert s.feed(first) is first
    assert s.in_message
    ping = ser(Frame(Opcode.PING, b"x"), False)
    assert s.feed(ping) is ping
    last = ser(Frame(Opcode.CONT, b"llo"), False)
    assert s.feed(last) is last
    assert not s.in_message
    assert (s.messages, s.data_frames, seen) == (1, 2, [(OP_PING, b"x")])


def test_empty_data_frame_is_not_in_frame() -> None:
    s = scanner(True)
    wire = ser(Frame(Opcode.BINARY, b""), True)
    assert s.feed(wire) is wire
    assert not s.in_frame
    assert s.inject(b"F") == b"F"


def test_fifty_megabytes_stream_through() -> None:
    """A 50 MB frame streams through in 64 KiB pieces, never buffered."""
    wire = ser(Frame(Opcode.BINARY, bytes(50 * 2**20)), True)
    s = scanner(True, max_message_size=64 * 2**20)
    outs: list[bytes] = []
    for k in range(0, len(wire), 65536):
        piece = wire[k : k + 65536]
        out = s.feed(piece)
        assert out is piece  # non-empty and not even copied
        outs.append(out)
        assert s.in_frame == (k + 65536 < len(wire))
    assert len(outs) > 800
    assert b"".join(outs) == wire
    assert s.messages == 1


def test_inject_waits_for_the_frame_end() -> None:
    wire = ser(Frame(Opcode.BINARY, b"z" * 1000), False)
    s = scanner(False)
    assert s.feed(wire[:500]) == wire[:500]
    one = encode_frame(OP_PING, b"1", mask=False)
    two = encode_close(1001, "going away", mask=False)
    assert s.inject(one) == b""
    assert s.inject(two) == b""
    nxt = ser(Frame(Opcode.TEXT, b"next"), False)
    assert s.feed(wire[500:900]) == wire[500:900]
    assert s.feed(wire[900:] + nxt) == wire[900:] + one + two + nxt
    assert s.inject(one) == one


def test_inject_from_on_control() -> None:
    """Injected while the feed is running: spliced right after the control frame."""
    one = encode_frame(OP_PONG, b"1", mask=True)
    two = encode_frame(OP_PONG, b"2", mask=True)
    ping = ser(Frame(Opcode.PING, b"q"), True)
    pong = ser(Frame(Opcode.PONG, b"drop"), True)
    text = ser(Frame(Opcode.TEXT, b"t"), True)

    def on_control(op: int, payload: bytes) -> bool:
        assert s.inject(one) == b""
        assert s.inject(two) == b""
        return op == OP_PING

    s = scanner(True, on_control=on_control)
    got = s.feed(text + ping + text + pong + text)
    assert got == text + ping + one + two + text + one + two + text


def test_on_control_sees_current_counts() -> None:
    seen: list[tuple[int, int, bool]] = []

    def on_control(op: int, payload: bytes) -> bool:
        seen.append((s.messages, s.data_frames, s.in_message))
        return True

    s = scanner(False, on_control=on_control)
    ping = ser(Frame(Opcode.PING, b""), False)
    stream = b"".join(
        [
            ser(Frame(Opcode.TEXT, b"a"), False),
            ping,
            ser(Frame(Opcode.BINARY, b"b", fin=False), False),
            ping,
        ]
    )
    assert s.feed(stream) is stream
    assert seen == [(1, 1, False), (1, 2, True)]


def test_on_control_exception_poisons_the_scanner() -> None:
    def on_control(op: int, payload: bytes) -> bool:
        raise RuntimeError("boom")

    s = scanner(True, on_control=on_control)
    with pytest.raises(RuntimeError):
        s.feed(ser(Frame(Opcode.PING, b""), True))
    assert s.error == (1011, "internal error")
    assert s.feed(ser(Frame(Opcode.TEXT, b"x"), True)) == b""


def test_message_size_limit_is_inclusive_and_spans_fragments() -> None:
    s = scanner(True, max_message_size=100)
    stream = b"".join(
        ser(f, True)
        for f in [
            Frame(Opcode.TEXT, b"a" * 100),
            Frame(Opcode.BINARY, b"b" * 60, fin=False),
            Frame(Opcode.PING, b"c" * 125),  # control payloads do not count
            Frame(Opcode.CONT, b"d" * 40),
            Frame(Opcode.BINARY, b"e" * 100),  # a new message starts from zero
        ]
    )
    assert s.feed(stream) is stream
    assert (s.error, s.messages) == (None, 3)


def test_zero_means_unlimited() -> None:
    s = scanner(False, max_message_size=0)
    wire = ser(Frame(Opcode.BINARY, bytes(200000)), False)
    assert s.feed(wire) is wire
    assert s.error is None


def test_negative_limit_rejected() -> None:
    with pytest.raises(ValueError):
        scanner(True, max_message_size=-1)


# -- violations ------------------------------------------------------------


def patched(frame: Frame, masked: bool, fix: Callable[[bytearray], None]) -> bytes:
    """Serialize a valid frame with the oracle, then break its header."""
    raw = bytearray(ser(frame, masked))
    fix(raw)
    return bytes(raw)


def set_bits(index: int, bits: int) -> Callable[[bytearray], None]:
    def fix(raw: bytearray) -> None:
        raw[index] |= bits

    return fix


def clear_bits(index: int, bits: int) -> Callable[[bytearray], None]:
    def fix(raw: bytearray) -> None:
        raw[index] &= ~bits & 0xFF

    return fix


def set_opcode(op: int) -> Callable[[bytearray], None]:
    def fix(raw: bytearray) -> None:
        raw[0] = (raw[0] & 0xF0) | op

    return fix


T, B, PING = Opcode.TEXT, Opcode.BINARY, Opcode.PING
RSV = (1002, "reserved bits set")
OPCODE = (1002, "reserved opcode")
MUST_MASK = (1002, "frame must be masked")
MUST_NOT_MASK = (1002, "frame must not be masked")
CONTROL = (1002, "bad control frame")
UNEXPECTED = (1002, "unexpected continuation frame")
EXPECTED = (1002, "expected continuation frame")
LENGTH = (1002, "bad frame length")
TOO_BIG = (1009, "message too big")

Case = tuple[bool, int, list[Frame], bytes, tuple[int, str]]


def case(
    masked: bool, bad: bytes, error: tuple[int, str], *, limit: int = 0, extra: Iterable[Frame] = ()
) -> Case:
    """(masked, max_message_size, frames before the bad one, bad bytes, expected error)"""
    return masked, limit, list(extra), bad, error


VIOLATIONS: dict[str, Case] = {
    "rsv1": case(True, patched(Frame(T, b"x"), True, set_bits(0, 0x40)), RSV),
    "rsv2": case(False, patched(Frame(B, b"x"), False, set_bits(0, 0x20)), RSV),
    "rsv3-ping": case(True, patched(Frame(PING, b""), True, set_bits(0, 0x10)), RSV),
    "opcode-3": case(True, patched(Frame(B, b"x"), True, set_opcode(0x3)), OPCODE),
    "opcode-7": case(False, patched(Frame(B, b"x"), False, set_opcode(0x7)), OPCODE),
    "opcode-B": case(True, patched(Frame(B, b""), True, set_opcode(0xB)), OPCODE),
    "opcode-F": case(False, patched(Frame(B, b""), False, set_opcode(0xF)), OPCODE),
    "unmasked-data": case(True, ser(Frame(T, b"x"), False), MUST_MASK),
    "unmasked-ping": case(True, ser(Frame(PING, b"x"), False), MUST_MASK),
    "masked-data": case(False, ser(Frame(B, b"x"), True), MUST_NOT_MASK),
    "masked-close": case(False, ser(Frame(Opcode.CLOSE, b"\x03\xe8"), True), MUST_NOT_MASK),
    "control-no-fin": case(True, patched(Frame(PING, b"p"), True, clear_bits(0, 0x80)), CONTROL),
    "control-126": case(True, patched(Frame(B, bytes(126)), True, set_opcode(OP_PONG)), CONTROL),
    "control-64bit": case(
        False, patched(Frame(B, bytes(70000)), False, set_opcode(OP_CLOSE)), CONTROL
    ),
    "unexpected-continuation": case(True, ser(Frame(Opcode.CONT, b"x"), True), UNEXPECTED),
    "expected-continuation": case(
        False, ser(Frame(B, b"x"), False), EXPECTED, extra=[Frame(T, b"open", fin=False)]
    ),
    "top-bit-length": case(
        True, patched(Frame(B, bytes(65536)), True, set_bits(2, 0x80)), LENGTH
    ),
    # RFC 6455 5.2: "the minimal number of bytes MUST be used to encode the length"
    "16bit-length-under-126": case(False, b"\x82\x7e\x00\x7d" + bytes(125), LENGTH),
    "64bit-length-under-65536": case(
        True, b"\x82\xff" + (65535).to_bytes(8, "big") + b"\0\0\0\0" + bytes(65535), LENGTH
    ),
    "too-big-frame": case(True, ser(Frame(B, bytes(101)), True), TOO_BIG, limit=100),
    "too-big-fragments": case(
        False,
        ser(Frame(Opcode.CONT, bytes(41)), False),
        TOO_BIG,
        limit=100,
        extra=[Frame(B, bytes(60), fin=False)],
    ),
    # Refused on the declared length alone, before any payload arrives.
    "too-big-header-only": case(
        True, ser(Frame(B, bytes(70000)), True)[:14], TOO_BIG, limit=1000
    ),
}


def violation_case(name: str) -> tuple[bool, int, bytes, bytes, tuple[int, str]]:
    masked, limit, extra, bad, expected = VIOLATIONS[name]
    head = [Frame(Opcode.PING, b"before"), Frame(T, b"whole message"), *extra]
    prefix = b"".join(ser(f, masked) for f in head)
    return masked, limit, prefix, bad, expected


@pytest.mark.parametrize("name", sorted(VIOLATIONS))
def test_violation_in_one_feed(name: str) -> None:
    masked, limit, prefix, bad, expected = violation_case(name)
    seen: list[int] = []
    s = scanner(masked, limit, on_control=lambda op, p: seen.append(op) is None)
    after = ser(Frame(Opcode.PING, b"after"), masked)
    assert s.feed(prefix + bad + after) == prefix
    assert s.error == expected
    assert s.feed(after) == b""
    assert seen == [OP_PING]  # nothing after the bad frame reached on_control
    assert not s.in_frame
    close = encode_close(expected[0], expected[1], mask=not masked)
    assert s.inject(close) == close


@pytest.mark.parametrize("name", sorted(VIOLATIONS))
def test_violation_byte_by_byte(name: str) -> None:
    masked, limit, prefix, bad, expected = violation_case(name)
    s = scanner(masked, limit)
    stream = prefix + bad
    assert feed_all(s, split(stream, range(len(stream)))) == prefix
    assert s.error == expected


# -- frames the gateway originates -----------------------------------------

SIZES = [0, 1, 125, 126, 65535, 65536]


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY, OP_CONT])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("fin", [True, False])
def test_encode_data_frame_round_trip(masked: bool, opcode: int, size: int, fin: bool) -> None:
    payload = random.Random(size).randbytes(size)
    wire = encode_frame(opcode, payload, fin=fin, mask=masked)
    assert [key(f) for f in oracle_parse(wire, masked=masked)] == [(opcode, payload, fin)]
    # RFC 6455 5.2: the minimal length encoding, which the oracle does not check.
    extended = 0 if size < 126 else 2 if size < 65536 else 8
    assert len(wire) == 2 + extended + (4 if masked else 0) + size


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("opcode", [OP_CLOSE, OP_PING, OP_PONG])
@pytest.mark.parametrize("size", [0, 1, 125])
def test_encode_control_frame_round_trip(masked: bool, opcode: int, size: int) -> None:
    payload = bytes(range(size))
    wire = encode_frame(opcode, payload, mask=masked)
    assert [key(f) for f in oracle_parse(wire, masked=masked)] == [(opcode, payload, True)]


def test_encode_frame_masks_with_urandom(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec.os, "urandom", lambda n: b"\x01\x02\x03\x04"[:n])
    wire = encode_frame(OP_TEXT, b"hello", mask=True)
    assert wire == b"\x81\x85\x01\x02\x03\x04" + apply_mask(b"hello", b"\x01\x02\x03\x04")


@pytest.mark.parametrize(
    "opcode, payload, fin",
    [(OP_PING, bytes(126), True), (OP_CLOSE, b"", False), (0x3, b"", True), (0xB, b"", True)],
)
def test_encode_frame_refuses_invalid_frames(opcode: int, payload: bytes, fin: bool) -> None:
    with pytest.raises(ValueError):
        encode_frame(opcode, payload, fin=fin, mask=True)


close_codes = st.one_of(
    st.sampled_from([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]),
    st.integers(3000, 4999),
)
reasons = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)


@PROPERTY
@given(code=close_codes, reason=reasons, masked=st.booleans())
def test_encode_close_round_trip(code: int, reason: str, masked: bool) -> None:
    (frame,) = oracle_parse(encode_close(code, reason, mask=masked), masked=masked)
    assert frame.opcode == Opcode.CLOSE
    assert len(frame.data) <= 125
    close = Close.parse(bytes(frame.data))
    assert close.code == code
    assert reason.startswith(close.reason)
    kept = len(close.reason.encode())
    if close.reason != reason:  # truncated: the next character would not fit
        assert kept + len(reason[len(close.reason)].encode()) > 123
    assert parse_close(bytes(frame.data)) == (code, close.reason)


@pytest.mark.parametrize("char, kept", [("a", 123), ("é", 61), ("€", 41), ("😀", 30)])
def test_encode_close_truncates_on_character_boundary(char: str, kept: int) -> None:
    (frame,) = oracle_parse(encode_close(1001, char * 200, mask=False), masked=False)
    assert Close.parse(bytes(frame.data)) == Close(1001, char * kept)


@pytest.mark.parametrize("code", [999, 5000, 70000])
def test_encode_close_refuses_bad_codes(code: int) -> None:
    with pytest.raises(ValueError):
        encode_close(code, mask=False)


@PROPERTY
@given(code=close_codes, reason=st.text(max_size=40).filter(lambda r: r.isprintable()))
def test_parse_close_reads_oracle_payloads(code: int, reason: str) -> None:
    assert parse_close(Close(code, reason).serialize()) == (code, reason)


@pytest.mark.parametrize(
    "payload, expected",
    [
        (b"", (None, "")),
        (b"\x03", (None, "")),
        (b"\x03\xe8", (1000, "")),
        (b"\x03\xe9bye", (1001, "bye")),
        (b"\x03\xe8\xff\xfe", (1000, "")),  # undecodable reason
        (b"\x03\xe7odd", (999, "odd")),  # codes are the endpoints' business
    ],
)
def test_parse_close_edges(payload: bytes, expected: tuple[int | None, str]) -> None:
    assert parse_close(payload) == expected


# -- on_message (the relay's per-message rate check) ----------------------------


def test_on_message_is_called_once_per_message_before_its_bytes_go_out() -> None:
    calls: list[int] = []
    verdicts = iter([None, None, (1008, "rate limit exceeded")])

    def on_message() -> tuple[int, str] | None:
        calls.append(s.messages)
        return next(verdicts)

    s = FrameScanner(masked=True, max_message_size=0, on_control=keep_all, on_message=on_message)
    m1 = encode_frame(OP_TEXT, b"a", fin=False, mask=True) + encode_frame(OP_PING, b"p", mask=True)
    m1 += encode_frame(OP_CONT, b"b", fin=False, mask=True) + encode_frame(OP_CONT, b"c", mask=True)
    m2 = encode_frame(OP_BINARY, b"d" * 200, mask=True)
    m3 = encode_frame(OP_TEXT, b"refused", mask=True)
    wire = m1 + m2 + m3
    out = b"".join(s.feed(wire[i : i + 3]) for i in range(0, len(wire), 3))
    assert out == m1 + m2
    assert len(calls) == 3
    assert s.error == (1008, "rate limit exceeded")
    assert s.messages == 2
    assert s.feed(encode_frame(OP_TEXT, b"later", mask=True)) == b""


def test_on_message_raising_poisons_the_stream() -> None:
    def boom() -> tuple[int, str] | None:
        raise RuntimeError("bug")

    s = FrameScanner(masked=True, max_message_size=0, on_control=keep_all, on_message=boom)
    with pytest.raises(RuntimeError):
        s.feed(encode_frame(OP_TEXT, b"x", mask=True))
    assert s.error == (1011, "internal error")
    assert s.feed(encode_frame(OP_TEXT, b"y", mask=True)) == b""


def test_too_big_is_checked_before_the_rate() -> None:
    def refuse() -> tuple[int, str] | None:
        return (1008, "rate limit exceeded")

    s = FrameScanner(masked=True, max_message_size=10, on_control=keep_all, on_message=refuse)
    assert s.feed(encode_frame(OP_TEXT, b"x" * 11, mask=True)) == b""
    assert s.error == (1009, "message too big")
