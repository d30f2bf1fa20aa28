# -*- test-case-name: tests.unit.durable.test_durable_units -*-
"""
A client's relayed stream (masked frames, already checked by the relay's
FrameScanner) read the way durable delivery needs it: whole messages to
queue (L{MessageReader}), and the copy of what went upstream unconfirmed,
trimmed only at message boundaries (L{Window}).
"""

from __future__ import annotations

from dataclasses import dataclass

from wsgateway.relay.codec import OP_BINARY, OP_CLOSE, OP_PING, unmask


def frame_header(buf: bytes | bytearray, i: int) -> tuple[int, int, int, int] | None:
    """(b0, header length, payload length, mask offset) of the masked frame at C{i}, or None if incomplete."""
    n = len(buf)
    if n - i < 2:
        return None
    b0 = buf[i]
    ln = buf[i + 1] & 0x7F
    h = i + 2
    if ln == 126:
        if n - h < 2:
            return None
        ln = (buf[h] << 8) | buf[h + 1]
        h += 2
    elif ln == 127:
        if n - h < 8:
            return None
        ln = int.from_bytes(buf[h : h + 8], "big")
        h += 8
    mask_at = h
    h += 4
    if h > n:
        return None
    return b0, h - i, ln, mask_at


@dataclass
class Message:
    seq: int
    binary: bool
    payload: bytes


class MessageReader:
    """
    Whole client messages out of the relayed (masked, already checked)
    client stream, from a message boundary on: what is queued. Control
    frames are not messages; pings are reported so that the gateway can
    answer them while no upstream does.
    """

    def __init__(self, first_seq: int) -> None:
        self.next_seq = first_seq
        self._buf = bytearray()
        self._parts: list[bytes] = []  # payloads of the open message's frames so far
        self._raw: list[bytes] = []  # those frames as received
        self._binary = False

    def feed(self, data: bytes) -> tuple[list[Message], list[bytes]]:
        """The messages completed by C{data}, and the payloads of the pings in it."""
        buf = self._buf
        buf += data
        done: list[Message] = []
        pings: list[bytes] = []
        i = 0
        while True:
            head = frame_header(buf, i)
            if head is None:
                break
            b0, hlen, ln, mask_at = head
            end = i + hlen + ln
            if end > len(buf):
                break
            op = b0 & 0x0F
            payload = unmask(bytes(buf[i + hlen : end]), bytes(buf[mask_at : mask_at + 4]))
            if op >= OP_CLOSE:
                if op == OP_PING:
                    pings.append(payload)
            else:
                if op:
                    self._binary = op == OP_BINARY
                self._parts.append(payload)
                self._raw.append(bytes(buf[i:end]))
                if b0 & 0x80:
                    done.append(Message(self.next_seq, self._binary, b"".join(self._parts)))
                    self.next_seq += 1
                    self._parts, self._raw = [], []
            i = end
        del buf[:i]
        return done, pings

    def rest(self) -> bytes:
        """What has been read of the open message (and of a frame after it), as received."""
        return b"".join(self._raw) + bytes(self._buf)


class Window:
    """
    Client bytes written upstream and not yet confirmed, from a message
    boundary on. C{confirm(mark)} drops the whole messages that lie before
    C{mark} (an offset from C{total} when the confirming ping was sent).
    """

    def __init__(self, base_seq: int, data: bytes = b"") -> None:
        self.base_seq = base_seq  # client messages before the window
        self.buf = bytearray(data)
        self.start = 0  # stream offset of buf[0]
        self.total = len(data)

    def add(self, data: bytes) -> None:
        self.buf += data
        self.total += len(data)

    def __len__(self) -> int:
        return len(self.buf)

    def confirm(self, mark: int) -> None:
        buf = self.buf
        limit = mark - self.start
        i = cut = 0
        messages = 0
        open_message = False
        while i < limit:
            head = frame_header(buf, i)
            if head is None:
                break
            b0, hlen, ln, _ = head
            end = i + hlen + ln
            if end > limit:
                break
            if (b0 & 0x0F) < OP_CLOSE:
                open_message = not (b0 & 0x80)
                if not open_message:
                    messages += 1
            if not open_message:
                cut = end
                self.base_seq += messages
                messages = 0
            i = end
        if cut:
            del buf[:cut]
            self.start += cut
