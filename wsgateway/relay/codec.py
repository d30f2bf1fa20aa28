# -*- test-case-name: tests.security.test_frames, tests.unit.relay.test_frames -*-
"""
The few WebSocket frames the gateway builds or reads whole: its own pings and
closes (L{encode_frame}, L{encode_close}), a close frame's code and reason
(L{parse_close}), and unmasking a control payload (L{unmask}). The relay's
hot path never builds frames: it forwards them (L{wsgateway.relay.frames}).

Pure and reactor-free: nothing here imports Twisted.
"""

from __future__ import annotations

import os

from wsgateway.codes import INVALID_PAYLOAD, PROTOCOL_ERROR

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

OPCODES = frozenset((OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))
_MAX_CONTROL = 125
# Two bytes of close code leave 123 for the reason.
_MAX_REASON = _MAX_CONTROL - 2


def unmask(payload: bytes, key: bytes) -> bytes:
    """
    XOR C{payload} with the repeated 4-byte C{key} (masking is its own inverse).

    Meant for control payloads (at most 125 bytes); data payloads are never
    unmasked by the gateway.
    """
    n = len(payload)
    if not n:
        return b""
    # One big-int XOR beats a per-byte Python loop by far, even for 125 bytes.
    stream = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        n, "little"
    )


def encode_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool, rsv1: bool = False) -> bytes:
    """
    Build a complete frame the gateway originates.

    @param mask: C{True} towards an upstream (the gateway is its client, RFC
        6455 5.3 requires masking), C{False} towards a client.
    @param rsv1: the "compressed" bit of permessage-deflate (RFC 7692 6):
        C{payload} is already deflated (wsgateway.channels.deflate).
    @raise ValueError: for an unknown opcode or a control frame that RFC 6455
        forbids (fragmented, over 125 bytes or compressed): we must never
        emit a frame we would reject ourselves.
    """
    if opcode not in OPCODES:
        raise ValueError(f"reserved opcode {opcode:#x}")
    n = len(payload)
    if opcode >= OP_CLOSE and (n > _MAX_CONTROL or not fin or rsv1):
        raise ValueError("control frames must be final, uncompressed and carry at most 125 bytes")
    b0 = ((0xC0 if rsv1 else 0x80) if fin else (0x40 if rsv1 else 0)) | opcode
    b1 = 0x80 if mask else 0
    if n < 126:
        header = bytes((b0, b1 | n))
    elif n < 0x10000:
        header = bytes((b0, b1 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((b0, b1 | 127)) + n.to_bytes(8, "big")
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + unmask(payload, key)


def _truncate_utf8(encoded: bytes, limit: int) -> bytes:
    if len(encoded) <= limit:
        return encoded
    cut = limit
    # Back off while the first dropped byte continues a character that started
    # before the cut, so the kept prefix still decodes.
    while cut and (encoded[cut] & 0xC0) == 0x80:
        cut -= 1
    return encoded[:cut]


def encode_close(code: int, reason: str = "", *, mask: bool) -> bytes:
    """
    Build a close frame; C{reason} is cut to fit 125 bytes on a UTF-8 boundary.

    @raise ValueError: if C{code} is outside 1000-4999 (it would not fit the
        2-byte field, or is a code that never goes on the wire by that range).
    """
    if not 1000 <= code <= 4999:
        raise ValueError(f"close code {code} out of range")
    # "replace": a lone surrogate relayed from somewhere must not turn into an
    # exception on the close path.
    raw = _truncate_utf8(reason.encode("utf-8", "replace"), _MAX_REASON)
    return encode_frame(OP_CLOSE, code.to_bytes(2, "big") + raw, mask=mask)


# The codes below 3000 a peer may put in a close frame: RFC 6455 7.4.1 and the
# IANA "WebSocket Close Code Number Registry" (1012-1014 were registered there
# later). 1004 is reserved, 1005, 1006 and 1015 must never go on the wire, the
# rest of 1000-2999 is unassigned; 3000-4999 are for libraries and
# applications; anything else is not a close code at all.
_SENDABLE_BELOW_3000 = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))

# what an invalid close frame from a client gets (fixed reasons, as the scanner's)
E_CLOSE_LENGTH = (PROTOCOL_ERROR, "bad close frame")
E_CLOSE_CODE = (PROTOCOL_ERROR, "bad close code")
E_CLOSE_REASON = (INVALID_PAYLOAD, "invalid UTF-8 in close reason")


def close_error(payload: bytes) -> tuple[int, str] | None:
    """
    Why an unmasked close payload may not be relayed (RFC 6455 5.5.1, 7.4):
    None when it is valid (empty, or a sendable code and a UTF-8 reason),
    else the (close code, fixed reason) to fail the connection with.
    """
    n = len(payload)
    if n == 0:
        return None
    if n == 1:
        return E_CLOSE_LENGTH
    code = (payload[0] << 8) | payload[1]
    if code not in _SENDABLE_BELOW_3000 and not 3000 <= code <= 4999:
        return E_CLOSE_CODE
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return E_CLOSE_REASON
    return None


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """
    Read an unmasked close payload as (code, reason).

    Empty (and the malformed 1-byte) payloads give C{(None, "")}; an
    undecodable reason gives C{""}.  Codes are not validated: endpoints do that.
    """
    if len(payload) < 2:
        return None, ""
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        reason = ""
    return int.from_bytes(payload[:2], "big"), reason
