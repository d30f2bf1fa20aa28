"""
The in-memory relay harness: a L{Relay} between two recording transports on a
L{task.Clock}, and an independent frame parser (not wsgateway.relay.frames,
so a scanner bug cannot hide itself). Used by tests/unit/relay, the drain
and durable units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import task
from twisted.internet.testing import StringTransport

from wsgateway.relay.codec import OP_CLOSE, encode_frame
from wsgateway.relay.relay import Relay

# -- test doubles ----------------------------------------------------------


class FakeTransport(StringTransport):
    """
    A L{StringTransport} that records, in order, what the relay did to it:
    ``("write", bytes)``, ``("lose",)``, ``("linger",)`` (loseWriteConnection:
    a FIN, reading goes on) and ``("abort",)``. Connection loss is
    never reported back by itself: each test calls ``*_connection_lost`` when
    the "socket" goes away, so the order of events is under the test's control.
    """

    bufferSize = 65536  # like twisted.internet.abstract.FileDescriptor

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[Any, ...]] = []
        self.lose_calls = 0
        self.linger_calls = 0
        self.abort_calls = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self.events.append(("write", bytes(data)))

    def loseConnection(self) -> None:
        self.lose_calls += 1
        self.events.append(("lose",))
        super().loseConnection()

    def loseWriteConnection(self) -> None:
        # like TCP's: the write half ends once what is written is out; reads go on
        self.linger_calls += 1
        self.events.append(("linger",))

    def unregisterProducer(self) -> None:
        # like Twisted's TCP and TLS transports: a no-op without a producer
        # (StringTransport raises)
        self.producer = None
        self.streaming = None

    def abortConnection(self) -> None:
        self.abort_calls += 1
        self.events.append(("abort",))
        self.disconnected = True
        self.disconnecting = True

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]


@dataclass
class Frame:
    fin: bool
    opcode: int
    masked: bool
    payload: bytes  # unmasked

    @property
    def close(self) -> tuple[int | None, str]:
        assert self.opcode == OP_CLOSE
        if len(self.payload) < 2:
            return None, ""
        return int.from_bytes(self.payload[:2], "big"), self.payload[2:].decode("utf-8")


def parse_frames(data: bytes) -> list[Frame]:
    """Decode a complete byte stream of frames (independent of wsgateway.relay.frames)."""
    frames = []
    i = 0
    while i < len(data):
        assert len(data) - i >= 2, f"truncated header at {i}: {data[i:]!r}"
        b0, b1 = data[i], data[i + 1]
        i += 2
        ln = b1 & 0x7F
        if ln == 126:
            ln = int.from_bytes(data[i : i + 2], "big")
            i += 2
        elif ln == 127:
            ln = int.from_bytes(data[i : i + 8], "big")
            i += 8
        masked = bool(b1 & 0x80)
        key = b""
        if masked:
            key = data[i : i + 4]
            i += 4
        payload = data[i : i + ln]
        assert len(payload) == ln, f"truncated payload at {i}"
        i += ln
        if masked:
            payload = bytes(b ^ key[j % 4] for j, b in enumerate(payload))
        frames.append(Frame(bool(b0 & 0x80), b0 & 0x0F, masked, payload))
    return frames


def c_frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """A frame as a client sends it: masked."""
    return encode_frame(opcode, payload, fin=fin, mask=True)


def u_frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """A frame as an upstream sends it: unmasked."""
    return encode_frame(opcode, payload, fin=fin, mask=False)


@dataclass
class Harness:
    relay: Relay
    client: FakeTransport
    upstream: FakeTransport
    clock: task.Clock
    done: list[Relay]

    def lose_both(self) -> None:
        self.relay.client_connection_lost()
        self.relay.upstream_connection_lost()

    def assert_finished(self) -> None:
        assert self.done == [self.relay]
        assert self.relay.done
        assert self.clock.getDelayedCalls() == []


def make(**kw: Any) -> Harness:
    clock = task.Clock()
    client, upstream = FakeTransport(), FakeTransport()
    done: list[Relay] = []
    opts: dict[str, Any] = dict(
        clock=clock,
        max_message_size=1 << 20,
        write_buffer=1 << 20,
        idle_timeout=0,
        ping_interval=0,
        ping_timeout=0,
        close_timeout=5.0,
        on_done=done.append,
    )
    opts.update(kw)
    relay = Relay(client, upstream, **opts)
    return Harness(relay, client, upstream, clock, done)
