# -*- test-case-name: tests.integration.test_broker -*-
"""
How a broadcast message travels through Redis (docs/protocol.md#broadcast-channels).

What a gateway publishes to C{{prefix}:ch:NAME}, network byte order::

    0   3  magic  b"\\x00WG"
    3   1  version, 1
    4   1  flags: bit 0 = binary (else text); bit 1 = positioned (below);
           other bits 0
    5   8  origin instance: random per broker process (workers share a
           node_id, never an instance)
    13  8  message sequence number, per instance, from 1
    21  1  N = length of the origin node_id (UTF-8, at most 255 bytes)
    22  N  origin node_id
    22+N   positioned only (a message of a channel with history,
           docs/protocol.md#channel-history-and-recovery):
             1  D = length of the offset
             D  the offset, ASCII decimal
             1  E = length of the epoch
             E  the epoch, ASCII
           then the payload, raw bytes, to the end

The position is written by the Redis script that assigns it
(L{wsgateway.channels.redishistory}), in the same step as the PUBLISH, so
the offset a live subscriber sees is the one history keeps.

Messages published to C{{prefix}:ch:NAME} by anything else (a backend's
C{PUBLISH}) are accepted when they do not start with the magic: the whole
message is the payload, sent to clients as a text message when it is valid
UTF-8, as a binary one otherwise. A message that starts with the magic but
is not a valid version-1 envelope raises L{EnvelopeError} (the broker drops,
logs and counts it as "malformed"): never guessed at.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "FLAG_BINARY", "FLAG_POSITIONED", "MAGIC", "VERSION", "EnvelopeError", "Message", "decode_message",
    "encode_envelope", "envelope_head",
]

MAGIC = b"\x00WG"
VERSION = 1
FLAG_BINARY = 0x01
FLAG_POSITIONED = 0x02
_HEAD = struct.Struct(">3sBB8sQB")


class EnvelopeError(ValueError):
    """Starts with the magic, but is no envelope this version can read."""


@dataclass(frozen=True)
class Message:
    payload: bytes
    binary: bool
    instance: bytes | None = None  # None: published to Redis by something else
    node: str | None = None
    seq: int | None = None
    offset: int | None = None  # positioned messages only
    epoch: str | None = None

    @property
    def outside(self) -> bool:
        return self.instance is None


def envelope_head(instance: bytes, seq: int, node: bytes, binary: bool, positioned: bool = False) -> bytes:
    """Everything before the payload (before the position, when C{positioned})."""
    flags = (FLAG_BINARY if binary else 0) | (FLAG_POSITIONED if positioned else 0)
    return _HEAD.pack(MAGIC, VERSION, flags, instance, seq, len(node)) + node


def encode_envelope(instance: bytes, seq: int, node: bytes, payload: bytes, binary: bool,
                    position: tuple[int, str] | None = None) -> bytes:
    if position is None:
        return envelope_head(instance, seq, node, binary) + payload
    offset, epoch = str(position[0]).encode("ascii"), position[1].encode("ascii")
    return (envelope_head(instance, seq, node, binary, True) + bytes([len(offset)]) + offset
            + bytes([len(epoch)]) + epoch + payload)


def decode_message(data: bytes) -> Message:
    """An envelope, or an outside message (see the module docstring); L{EnvelopeError} if malformed."""
    if not data.startswith(MAGIC):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return Message(data, True)
        return Message(data, False)
    if len(data) < _HEAD.size:
        raise EnvelopeError("truncated header")
    _, version, flags, instance, seq, n = _HEAD.unpack_from(data)
    if version != VERSION:
        raise EnvelopeError(f"unknown version {version}")
    if flags & ~(FLAG_BINARY | FLAG_POSITIONED):
        raise EnvelopeError(f"unknown flags {flags:#x}")
    at = _HEAD.size + n
    if len(data) < at:
        raise EnvelopeError("truncated node id")
    node = data[_HEAD.size : at].decode("utf-8", "replace")
    offset = epoch = None
    if flags & FLAG_POSITIONED:
        digits, at = _field(data, at)
        text, at = _field(data, at)
        if not digits.isdigit():
            raise EnvelopeError("bad offset")
        offset, epoch = int(digits), text.decode("ascii", "replace")
    return Message(data[at:], bool(flags & FLAG_BINARY), instance, node, seq, offset, epoch)


def _field(data: bytes, at: int) -> tuple[bytes, int]:
    """One length-prefixed field of the position."""
    if at >= len(data) or at + 1 + data[at] > len(data):
        raise EnvelopeError("truncated position")
    end = at + 1 + data[at]
    return data[at + 1 : end], end
