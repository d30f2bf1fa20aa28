# -*- test-case-name: tests.unit.relay.test_inflate -*-
"""
The inflated size of a compressed client message, counted as it streams
through (docs/protocol.md#compression).

On a proxy route with permessage-deflate the relay forwards compressed
frames as they are; ``max_message_size`` still counts what the upstream
will inflate, so a 1 KB frame that inflates to 1 GB (a compression bomb)
is refused with 1009 as soon as the count passes the limit. The output is
thrown away as it comes, in steps of at most ``_STEP`` bytes: what one
message holds is zlib's window (32 KiB) plus one step, whatever it
inflates to. The client was answered ``client_no_context_takeover``
(upstream/compression.py), so each message is a deflate stream of its
own and nothing is kept between messages.

Pure and reactor-free.
"""

from __future__ import annotations

import zlib

from wsgateway.codes import INVALID_PAYLOAD, MESSAGE_TOO_BIG
from wsgateway.relay.codec import unmask

E_TOO_BIG = (MESSAGE_TOO_BIG, "message too big")
E_BAD_DEFLATE = (INVALID_PAYLOAD, "invalid compressed data")

# Inflated bytes per step: small enough that a bomb holds little, large
# enough that a 16 KiB message is one step.
_STEP = 64 * 1024
# RFC 7692 7.2.2: the sender removed this from the end of each message.
TAIL = b"\x00\x00\xff\xff"
# Deflate's largest ratio (a 258-byte match in about two bits, RFC 1951): a
# message of n wire bytes inflates to at most this many times n (plus the
# tail), so one that cannot reach the limit need not be inflated at all.
MAX_RATIO = 1032


class MessageInflater:
    """Counts the inflated bytes of one compressed message against ``limit``."""

    __slots__ = ("_inflate", "_left")

    def __init__(self, limit: int) -> None:
        # -15: raw deflate, any window up to 32 KiB (every client_max_window_bits)
        self._inflate = zlib.decompressobj(-15)
        self._left = limit

    def feed(self, data: bytes) -> tuple[int, str] | None:
        """The next (unmasked) payload bytes: None, or the close code and reason that end the stream."""
        inflate = self._inflate
        left = self._left
        try:
            left -= len(inflate.decompress(data, min(left + 1, _STEP)))
            while left >= 0 and inflate.unconsumed_tail:
                left -= len(inflate.decompress(inflate.unconsumed_tail, min(left + 1, _STEP)))
        except zlib.error:
            return E_BAD_DEFLATE
        self._left = left
        return E_TOO_BIG if left < 0 else None

    def end(self) -> tuple[int, str] | None:
        """The message's last byte has been fed."""
        return self.feed(TAIL)


class CompressedSizes:
    """
    The inflated sizes of a client stream's compressed messages, for its
    FrameScanner (relay/frames.py): each frame's masked payload is unmasked
    into a copy and counted, whether it arrives with its header (``frame``)
    or in later reads (``more``); the forwarded bytes are never touched.
    """

    __slots__ = ("_ends", "_key", "_key_at", "_limit", "_message")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._message: MessageInflater | None = None
        self._key = b""
        self._key_at = 0  # how far into its frame's payload the next byte is
        self._ends = False  # that frame ends its message

    @property
    def counting(self) -> bool:
        """A compressed message is open."""
        return self._message is not None

    def frame(self, data: bytes, h: int, ln: int, first: bool, fin: bool) -> tuple[int, str] | None:
        """A frame of a compressed message whose masked payload of ``ln`` bytes starts at ``data[h]``."""
        if first:
            if fin and (ln + len(TAIL)) * MAX_RATIO <= self._limit:
                # Under the limit whatever it inflates to: not inflated (most
                # chat and event messages; its deflate data is the upstream's to judge).
                return None
            self._message = MessageInflater(self._limit)
        message = self._message
        assert message is not None
        key = data[h - 4 : h]
        end = h + ln
        n = len(data)
        err = message.feed(unmask(data[h:end], key)) if h < n else None
        if err is None:
            if end > n:
                self._key, self._key_at, self._ends = key, n - h, fin
            elif fin:
                err = message.end()
                self._message = None
        return err

    def more(self, data: bytes, rem: int) -> tuple[int, str] | None:
        """``data`` continues the frame under way, of which ``rem`` bytes were still to come."""
        message = self._message
        assert message is not None
        chunk = data if rem >= len(data) else data[:rem]
        at = self._key_at & 3
        err = message.feed(unmask(chunk, self._key[at:] + self._key[:at]))
        self._key_at += len(chunk)
        if err is None and rem <= len(data) and self._ends:
            err = message.end()
            self._message = None
        return err
