# -*- test-case-name: tests.unit.channels.test_deflate -*-
"""
permessage-deflate (RFC 7692) on broadcast routes, where the gateway itself
is the client's WebSocket endpoint (docs/protocol.md#compression-on-broadcast-routes).

Negotiation (L{acceptor}): on a route with compression, the client's first
permessage-deflate offer is accepted with C{server_no_context_takeover}.
The gateway then deflates each message it sends on its own, so the
compressed bytes depend on the message and the window
(C{server_max_window_bits}, which the client may lower) and on nothing the
connection was sent before: one compressed copy of a published message
serves every subscriber that negotiated the same window. L{PreparedMessage}
is that copy: built once per published message (fanout.py), it makes each
frame the first time a subscriber needs it and keeps it for the others.

What clients send is inflated by Autobahn, bounded twice by the route's
C{max_message_size}: the protocol's C{maxMessagePayloadSize} (the budget it
hands to every inflate call) and the extension's own C{max_message_size}
set here. A compression bomb is closed with 1009 as soon as its output
passes the limit; it is never inflated whole.

Pure: nothing here imports Twisted.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from autobahn.websocket.compress import PerMessageDeflate, PerMessageDeflateOffer, PerMessageDeflateOfferAccept

from wsgateway.relay.codec import OP_BINARY, OP_TEXT, encode_frame
from wsgateway.relay.inflate import TAIL

__all__ = [
    "LEVEL", "MEM_LEVEL", "Negotiated", "PreparedMessage", "SharedDeflateAccept", "accept_offers", "acceptor",
    "decline", "deflate", "frame_payload_size", "json_text", "negotiated",
]

# Autobahn's own choices for the messages it compresses itself: zlib's
# default level (6) and memory level (8). With the window, they are all the
# compressed bytes depend on, so they are fixed here, not per connection.
LEVEL = zlib.Z_DEFAULT_COMPRESSION
MEM_LEVEL = 8

Acceptor = Callable[[Sequence[Any]], PerMessageDeflateOfferAccept | None]


class SharedDeflateAccept(PerMessageDeflateOfferAccept):
    """
    An accept whose answer says C{server_no_context_takeover} even when the
    client did not ask for it (RFC 7692 7.1.1.1 lets a server add it).
    Autobahn writes the parameter only when the offer requested it, though
    it honours C{no_context_takeover=True} either way: the client is told
    what the gateway does.
    """

    def get_extension_string(self) -> str:
        answer: str = super().get_extension_string()
        if self.no_context_takeover and not self.offer.request_no_context_takeover:
            answer += "; server_no_context_takeover"
        return answer


def accept_offers(offers: Sequence[Any], max_message_size: int) -> SharedDeflateAccept | None:
    """
    The answer to a client's offers (in its order of preference): its first
    permessage-deflate offer, with the gateway's context reset per message.
    The window is the client's (C{server_max_window_bits} if it asked for
    one, else 15): each distinct window costs one more compression of a
    message, and there are at most 7. The client keeps its own context
    takeover: that costs the gateway one inflater per connection either way.
    """
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return SharedDeflateAccept(
                offer,
                no_context_takeover=True,
                mem_level=MEM_LEVEL,
                # the extension's own bound on inflating one message, on top of the protocol's
                max_message_size=max_message_size if max_message_size > 0 else None,
            )
    return None


def decline(offers: Sequence[Any]) -> None:
    """A route with C{compression = off} (or at_least_once): no extension."""
    return None


def acceptor(compressed: bool, max_message_size: int) -> Acceptor:
    """A connection's ``perMessageCompressionAccept``, from its route (RouteConfig.compressed) and limits."""
    if not compressed:
        return decline
    return lambda offers: accept_offers(offers, max_message_size)


class Negotiated(NamedTuple):
    compressed: bool  # permessage-deflate in use on the connection
    window: int | None  # the window of the shared frames it takes; None: plain frames


def negotiated(extensions: Iterable[Any]) -> Negotiated:
    """
    What a connection's handshake agreed (Autobahn's ``websocket_extensions_in_use``).
    A deflate connection whose context is kept from message to message
    cannot take shared compressed frames: it gets plain ones, which RFC 7692
    allows on any connection (RSV1 clear: not compressed).
    """
    for ext in extensions:
        if isinstance(ext, PerMessageDeflate):
            if ext.server_no_context_takeover:
                return Negotiated(True, int(ext.server_max_window_bits))
            return Negotiated(True, None)
    return Negotiated(False, None)


def deflate(payload: bytes, window: int) -> bytes:
    """One message deflated on its own (no context before it), as RFC 7692 7.2.1 puts it on the wire."""
    c = zlib.compressobj(LEVEL, zlib.DEFLATED, -window, MEM_LEVEL)
    data = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
    return data[: -len(TAIL)] if data.endswith(TAIL) else data


class PreparedMessage:
    """
    One published message and the frames made of it, each made once: the
    plain frame, and a compressed frame per window (L{frame}). Every
    subscriber writes the same bytes object. Subscribers of the
    C{wsgateway.json} subprotocol take the frames of L{enveloped} instead.
    """

    __slots__ = ("payload", "binary", "channel", "position", "_plain", "_deflated", "_envelope")

    def __init__(self, payload: bytes, binary: bool, channel: str = "", position: Any = None) -> None:
        self.payload = payload
        self.binary = binary
        self.channel = channel
        self.position = position  # history.Position of a channel with history, else None
        self._plain: bytes | None = None
        self._deflated: dict[int, bytes] | None = None
        self._envelope: PreparedMessage | None = None

    @property
    def offset(self) -> int | None:
        return None if self.position is None else int(self.position.offset)

    def enveloped(self) -> PreparedMessage:
        """
        The message as the C{wsgateway.json} subprotocol carries it
        (docs/protocol.md#channel-history-and-recovery): one JSON text
        message, made once for all its subscribers.
        """
        env = self._envelope
        if env is None:
            doc: dict[str, Any] = {"channel": self.channel}
            if self.position is not None:
                doc["offset"] = self.position.offset
                doc["epoch"] = self.position.epoch
            if self.binary:
                doc["data_b64"] = base64.b64encode(self.payload).decode("ascii")
            else:
                doc["data"] = self.payload.decode("utf-8", "replace")
            env = self._envelope = PreparedMessage(json_text(doc), False, self.channel, self.position)
        return env

    def frame(self, window: int | None) -> bytes:
        """The whole unmasked frame for a subscriber with that window (None: no compression)."""
        if window is None:
            return self._plain_frame()
        frames = self._deflated
        if frames is None:
            frames = self._deflated = {}
        f = frames.get(window)
        if f is None:
            body = deflate(self.payload, window)
            if len(body) >= len(self.payload):
                # nothing saved (short or random messages): sent as they
                # are, which RFC 7692 6 allows (RSV1 clear)
                f = self._plain_frame()
            else:
                f = encode_frame(OP_BINARY if self.binary else OP_TEXT, body, mask=False, rsv1=True)
            frames[window] = f
        return f

    def _plain_frame(self) -> bytes:
        f = self._plain
        if f is None:
            f = self._plain = encode_frame(OP_BINARY if self.binary else OP_TEXT, self.payload, mask=False)
        return f


def json_text(doc: Any) -> bytes:
    """A JSON document as a text message (compact, UTF-8)."""
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def frame_payload_size(frame: bytes) -> int:
    """The payload length of an unmasked frame built here (what the byte counters count, as the relay's do)."""
    n = frame[1] & 0x7F
    return len(frame) - (2 if n < 126 else 4 if n == 126 else 10)
