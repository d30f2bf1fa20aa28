# -*- test-case-name: tests.unit.relay.test_relay -*-
"""
What the frame relay does with the transports it owns: the protocol each
one talks to once the relay has it (L{Leg}), the write buffer and send-now
set-up (L{take}), each transport as the streaming producer of the other
(L{Reader}, L{Both}), a mirror's overflow alarm (L{Overflow}), the one
right way to end a leg (L{lose}) and the lingering close of a client that
broke a rule (L{linger}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import BaseProtocol, Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from wsgateway._compat.sendnow import send_at_once
from wsgateway.interfaces import RelayTransport


def transport_of(protocol: BaseProtocol) -> RelayTransport:
    """
    The transport of a connected ``protocol``, as the relay uses it. Twisted
    types ``BaseProtocol.transport`` as ``ITransport | None``; what a
    connected protocol has is more: a TCP transport (``tcp.Connection``, an
    ``abstract.FileDescriptor``) is an IPushProducer and an IConsumer too,
    and a TLS one (``TLSMemoryBIOProtocol``) has ``registerProducer`` and
    ``abortConnection`` of its own and reaches the TCP transport's
    ``pauseProducing``/``resumeProducing`` through
    ``ProtocolWrapper.__getattr__``, which no declared interface shows:
    hence the cast, here only.
    """
    transport = protocol.transport
    assert transport is not None, "the protocol is not connected"
    return cast(RelayTransport, transport)


def set_write_buffer(transport: object, size: int) -> None:
    """
    Make ``size`` the high-water mark at which ``transport`` pauses its
    producer. TLS transports wrap the TCP one; the socket buffer that fills
    up is the innermost one's.
    """
    t = transport
    for _ in range(4):
        if t is None:
            return
        if hasattr(t, "bufferSize"):
            t.bufferSize = size
        t = getattr(t, "transport", None)


def take(transport: RelayTransport, write_buffer: int) -> None:
    """
    Set up a transport the relay writes to: what a stuck peer makes the
    gateway hold for it stays under ``write_buffer``, and it sends at once
    (sendnow.py).

    Twisted's ``bufferSize`` is both the mark over which a transport pauses
    its producer and the size of each read from a socket, so the other leg's
    last read lands on top of a buffer already at the mark; and writing
    joins the queued chunks into one string, a copy as large as the queue.
    A quarter each (the mark, the read) keeps queue and copy together under
    ``write_buffer``: make soak's slow_readers measured 3.4-4.5 x
    write_buffer of RSS per stuck reader with the whole of it as both, 1.6 x
    with half, 0.7 x with a quarter.
    """
    set_write_buffer(transport, max(1, write_buffer // 4))
    send_at_once(transport)


@implementer(IPushProducer)
class Reader:
    """
    One transport as the streaming producer of the other: pause and resume
    reach it, but not stopProducing. Twisted calls that on a consumer's
    loss and it would drop the other leg at once; how each leg ends (a close
    frame first, 1001 or 1014) is the relay's decision.
    """

    __slots__ = ("_transport",)

    def __init__(self, transport: RelayTransport) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


@implementer(IPushProducer)
class Both:
    """The client transport's producer when pushes share it: the upstream's reader and the push outbox."""

    __slots__ = ("_outbox", "_reader")

    def __init__(self, reader: Reader, outbox: IPushProducer) -> None:
        self._reader = reader
        self._outbox = outbox

    def pauseProducing(self) -> None:
        self._reader.pauseProducing()
        self._outbox.pauseProducing()

    def resumeProducing(self) -> None:
        self._reader.resumeProducing()
        self._outbox.resumeProducing()

    def stopProducing(self) -> None:
        pass


class Leg(Protocol):
    """
    What a transport talks to once the relay owns it: the Autobahn protocol
    that did the handshake is let go (its per-connection state is most of a
    proxied connection's memory), and each read goes to the relay with no
    layer in between.
    """

    # Each read calls the relay's own method, with no call of Leg's in between
    # (tests/unit/relay/test_hotpath_budget.py counts them). mypy types an attribute that
    # shadows a method by the method's unbound signature (python/mypy#708), so
    # declaring the attribute needs this one ignore.
    dataReceived: Callable[[bytes], None]  # type: ignore[assignment]

    def __init__(self, data: Callable[[bytes], None], lost: Callable[[], None]) -> None:
        self.dataReceived = data
        self._lost = lost

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost()

    def release(self) -> None:
        """Its transport is gone and its relay done: drop the relay's methods (a reference cycle)."""
        self.dataReceived = _ignore_data
        self._lost = _ignore_loss


def _ignore_data(data: bytes) -> None:
    """A released leg's reads (there are none: its transport is gone)."""


def _ignore_loss() -> None:
    """A released leg's loss (it was lost already)."""


@implementer(IPushProducer)
class Overflow:
    """Registered with a transport only to hear when its write buffer overflows."""

    __slots__ = ("_on_pause",)

    def __init__(self, on_pause: Callable[[], None]) -> None:
        self._on_pause = on_pause

    def pauseProducing(self) -> None:
        self._on_pause()

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def linger(transport: RelayTransport) -> None:
    """
    nginx's lingering close: our half of the connection ends once what was
    written is out (a FIN after it), and reading goes on, so that data the
    peer still sends does not make the kernel answer with a reset that could
    overtake our last bytes. The peer's FIN (or the caller's timer) ends it.
    TLS has no half-close of its own: its loseConnection sends close_notify
    and reads on until the peer's, which is the same thing.
    """
    transport.unregisterProducer()
    # it may have been paused by the other leg's buffer
    transport.resumeProducing()
    half_close = getattr(transport, "loseWriteConnection", None)
    if half_close is None or isinstance(transport, TLSMemoryBIOProtocol):
        # (a TLS transport offers the TCP transport's loseWriteConnection
        # through ProtocolWrapper.__getattr__: a FIN under TLS, not wanted)
        transport.loseConnection()
    else:
        half_close()


def lose(transport: RelayTransport) -> None:
    """
    loseConnection, after unregistering the other leg as its producer: a TLS
    transport (Twisted's TLSMemoryBIOProtocol) does not send its close_notify
    while a producer is registered, so a wss:// client would wait for our
    close until the close timer aborted the connection.
    """
    transport.unregisterProducer()
    transport.loseConnection()
