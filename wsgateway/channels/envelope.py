# -*- test-case-name: tests.integration.test_broker -*-
"""
How a broadcast message travels through Redis (docs/protocol.md#broadcast-channels).

What a gateway publishes to C{{prefix}:ch:NAME}, network byte order::

    0   3  magic  b"\\x00WG"
    3   1  version, 1
    4   1  flags: bit 0 = binary (else text); other bits 0
    5   8  origin instance: random per broker process (workers share a
           node_id, never an instance)
    13  8  message sequence number, per instance, from 1
    21  1  N = length of the origin node_id (UTF-8, at most 255 bytes)
    22  N  origin node_id
    22+N   payload, raw bytes, to the end

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

__all__ = ["FLAG_BINARY", "MAGIC", "VERSION", "EnvelopeError", "Message", "decode_message", "encode_envelope"]

MAGIC = b"\x00WG"
VERSION = 1
FLAG_BINARY = 0x01
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

    @property
    def outside(self) -> bool:
        return self.instance is None


def encode_envelope(instance: bytes, seq: int, node: bytes, payload: bytes, binary: bool) -> bytes:
    return _HEAD.pack(MAGIC, VERSION, FLAG_BINARY if binary else 0, instance, seq, len(node)) + node + payload


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
    if flags & ~FLAG_BINARY:
        raise EnvelopeError(f"unknown flags {flags:#x}")
    if len(data) < _HEAD.size + n:
        raise EnvelopeError("truncated node id")
    node = data[_HEAD.size : _HEAD.size + n].decode("utf-8", "replace")
    return Message(data[_HEAD.size + n :], bool(flags & FLAG_BINARY), instance, node, seq)
