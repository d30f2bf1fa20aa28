"""
Hostile frames after the upgrade (docs/protocol.md#forwarding-and-close-codes, RFC 6455) on the main
gateway (max_message_size 64K).

What the gateway must stop itself (frame headers) goes to /raw, whose
upstream is a recorder that would accept any frame: so "nothing reached the
upstream" is observed, not inferred from a real server refusing it too.
What RFC 6455 leaves to the endpoint that reads payloads (UTF-8, close
codes) goes to /open, a ``websockets`` server, whose verdict must reach the
client unchanged.

Already covered in tests/integration/test_edges.py, not repeated: unmasked frames,
reserved opcodes 0x3 and 0xB, RSV1 and RSV3, a 126-byte ping or close, a
fragmented ping, a continuation with nothing to continue, a data frame inside
a fragmented message, and messages over max_message_size in one frame, in
fragments, or announced as 1 TiB (all with what the upstream got).
"""

from __future__ import annotations

import time
import zlib

import pytest

from support.rawws import OP_BINARY, OP_CLOSE, OP_CONT, OP_TEXT, frame, header

from .helpers import Main, RawSeen, echo_ok, expect_close, handshake, uid


def _open(main: Main, route: str, name: str, extra: list[tuple[str, str]] | None = None):
    path = f"/{route}/" + uid(name)
    line, headers, sock, reader = handshake(main.port, path, extra)
    assert line == "HTTP/1.1 101 Switching Protocols"
    echo_ok(sock, reader)
    return path, headers, sock, reader


def _stopped_by_the_gateway(
    main: Main, name: str, data: bytes, code: int = 1002, extra: list[tuple[str, str]] | None = None
) -> tuple[RawSeen, list[tuple[str, str]]]:
    """
    Against /raw (the recorder, which would take any frame): open, echo "ok",
    send ``data``. The client gets close ``code``, and the upstream got the
    "ok", then a close from the gateway, and nothing of ``data``. Returns
    what the upstream saw and the 101's headers.
    """
    path, headers, sock, reader = _open(main, "raw", name, extra)
    with sock:
        sock.sendall(data)
        before, (got, reason) = expect_close(reader)
        assert got == code, (got, reason)
        assert before == []
        sock.sendall(frame(OP_CLOSE, code.to_bytes(2, "big")))
        reader.wait_eof(3)
    seen = main.recorder.get(path)
    assert seen.ended.wait(3), "the upstream connection was left open"
    assert seen.data() == [(OP_TEXT, b"ok")]
    assert [c for c, _ in seen.closes()] != [] and None not in [c for c, _ in seen.closes()]
    assert not any(b"evil" in f.payload or b"smuggled" in f.payload for f in seen.frames)
    return seen, headers


def test_64bit_length_with_the_top_bit_set_is_1002(main: Main) -> None:
    """RFC 6455 5.2: the most significant bit of a 64-bit length MUST be 0."""
    _stopped_by_the_gateway(main, "topbit", frame(OP_BINARY, b"evil", length=1 << 63))


def test_64bit_length_with_every_bit_set_is_1002(main: Main) -> None:
    _stopped_by_the_gateway(main, "allbits", frame(OP_BINARY, b"evil", length=(1 << 64) - 1))


@pytest.mark.parametrize("opcode", [0x4, 0x5, 0x6, 0x7, 0xC, 0xD, 0xE, 0xF], ids=lambda o: f"op{o:#x}")
def test_reserved_opcode_is_1002(main: Main, opcode: int) -> None:
    _stopped_by_the_gateway(main, f"op{opcode:x}", frame(opcode, b"evil"))


def test_rsv2_without_an_extension_is_1002(main: Main) -> None:
    _stopped_by_the_gateway(main, "rsv2", frame(OP_TEXT, b"evil", rsv=2))


def test_frames_pipelined_after_a_violation_never_reach_the_upstream(main: Main) -> None:
    """Valid frames behind the offending one, in the same segment, are not relayed either."""
    pipelined = frame(0x5, b"evil") + frame(OP_TEXT, b"smuggled") + frame(OP_BINARY, b"smuggled")
    _stopped_by_the_gateway(main, "after", pipelined)


@pytest.mark.parametrize(
    "fragments",
    [
        [b"\xff"],
        [b"caf\xc3"],  # the message ends inside a character
        [b"\xed\xa0\x80"],  # a UTF-16 surrogate encoded as UTF-8
        [b"\xc0\xaf"],  # overlong "/", the classic path-traversal smuggler
        [b"ok \xe2\x82", b"\x28"],  # valid start in fragment one, broken in fragment two
    ],
    ids=["0xff", "truncated", "surrogate", "overlong-slash", "split-across-fragments"],
)
def test_invalid_utf8_in_a_text_message_is_1007(main: Main, fragments: list[bytes]) -> None:
    """
    The relay forwards payloads unread; the upstream (websockets) fails the
    connection with 1007 and that close must reach the client unchanged.
    """
    data = b"".join(
        frame(OP_TEXT if i == 0 else OP_CONT, part, fin=i == len(fragments) - 1) for i, part in enumerate(fragments)
    )
    path, _, sock, reader = _open(main, "open", "utf8")
    with sock:
        sock.sendall(data)
        before, (code, _) = expect_close(reader)
        assert code == 1007
        assert before == []
        sock.sendall(frame(OP_CLOSE, (1007).to_bytes(2, "big")))
        reader.wait_eof(3)
    seen = main.backend.get(path)
    assert seen.ended.wait(3), "the upstream connection was left open"
    assert seen.received == ["ok"]


def test_compression_declined_by_the_upstream_makes_a_deflate_bomb_a_1002(main: Main) -> None:
    """
    The client offers permessage-deflate with every parameter (and another
    extension); the gateway passes on the permessage-deflate offers only, the
    upstream answers without the extension, so neither is the client's: a
    compressed frame (RSV1) is a protocol error, and 64 KiB on the wire that
    would inflate to 64 MiB is refused with 1002 and never relayed.
    (tests/integration/test_compression.py: the same bomb where it was agreed.)
    """
    offer = (
        "permessage-deflate; client_max_window_bits; server_max_window_bits=10; "
        "client_no_context_takeover; server_no_context_takeover, permessage-deflate, x-webkit-deflate-frame"
    )
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = squeeze.compress(b"\0" * (64 << 20)) + squeeze.flush(zlib.Z_SYNC_FLUSH)[:-4]
    assert len(bomb) < 64 * 1024 - 4
    seen, headers = _stopped_by_the_gateway(
        main, "deflate", frame(OP_BINARY, b"evil" + bomb, rsv=4), extra=[("Sec-WebSocket-Extensions", offer)]
    )
    assert header(headers, "Sec-WebSocket-Extensions") == []
    offered = [line for line in seen.head.split(b"\r\n") if line.lower().startswith(b"sec-websocket-extensions:")]
    assert offered == [b"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; "
                       b"client_no_context_takeover; server_max_window_bits=10; client_max_window_bits, "
                       b"permessage-deflate"]


@pytest.mark.parametrize(
    "payload",
    [(1005).to_bytes(2, "big"), (1006).to_bytes(2, "big"), (999).to_bytes(2, "big"), (5000).to_bytes(2, "big"), b"\x03"],
    ids=["1005", "1006", "999", "5000", "one-byte"],
)
def test_close_frame_with_an_invalid_code_is_answered_1002(main: Main, payload: bytes) -> None:
    """RFC 6455 7.4: codes 1005/1006 and codes outside 1000-4999 never go on the wire; a 1-byte body is malformed."""
    path, _, sock, reader = _open(main, "open", "badclose")
    with sock:
        sock.sendall(frame(OP_CLOSE, payload))
        before, (code, _) = expect_close(reader)
        assert before == []
        assert code == 1002
        reader.wait_eof(3)
    assert main.backend.get(path).ended.wait(3)


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ((1005).to_bytes(2, "big"), 1002),
        ((1006).to_bytes(2, "big"), 1002),
        ((1015).to_bytes(2, "big"), 1002),
        ((2000).to_bytes(2, "big"), 1002),
        ((5000).to_bytes(2, "big"), 1002),
        (b"\x03", 1002),
        ((1000).to_bytes(2, "big") + b"bye \xff", 1007),
    ],
    ids=["1005", "1006", "1015", "2000-unassigned", "5000", "one-byte", "reason-not-utf8"],
)
def test_an_invalid_close_is_answered_by_the_gateway_and_never_relayed(main: Main, payload: bytes, code: int) -> None:
    """
    Against /raw, whose recorder would take any close and echo its code:
    the gateway itself answers 1002 (1007 for the reason), and the upstream
    gets 1001, never the client's invalid close (docs/configuration.md, issue 16 item 9).
    """
    path, _, sock, reader = _open(main, "raw", "badclose-raw")
    with sock:
        sock.sendall(frame(OP_CLOSE, payload))
        before, (got, reason) = expect_close(reader)
        assert before == []
        assert (got, bool(reason)) == (code, True), (got, reason)
        reader.wait_eof(3)
    seen = main.recorder.get(path)
    assert seen.ended.wait(3), "the upstream connection was left open"
    assert seen.closes() == [(1001, "client closed")]


def test_an_oversize_message_from_a_client_still_sending_gets_1009_not_a_reset(main: Main) -> None:
    """
    The client announces an 8 MiB message (over max_message_size = 64K) and
    keeps writing its payload without reading, as a client streaming a big
    upload does: the gateway reads and discards it (lingering close, issue 16
    item 10), so the client's writes never meet a reset and it then reads
    the 1009 close frame and the end of the stream.
    """
    path, _, sock, reader = _open(main, "raw", "linger")
    chunk = b"\x00" * 65536
    sent = 0
    with sock:
        try:
            sock.sendall(frame(OP_BINARY, b"", length=64 << 20))
            # 8 MiB behind the header, spread over about 0.1 s: the writes go
            # on well after the gateway has sent its close, as a real upload's would
            for i in range(128):
                sock.sendall(chunk)
                sent += len(chunk)
                if i % 8 == 7:
                    time.sleep(0.006)
        except OSError as e:
            pytest.fail(f"the gateway reset the connection after {sent} bytes of payload: {e!r}")
        before, (code, reason) = expect_close(reader)
        assert before == []
        assert (code, reason) == (1009, "message too big")
        assert reader.wait_eof(5) == b""
    seen = main.recorder.get(path)
    assert seen.ended.wait(3)
    assert seen.closes() == [(1001, "client closed")]
    assert seen.data() == [(OP_TEXT, b"ok")]
