"""
sendnow: a relayed chunk leaves in the turn it was written, and nothing
else about Twisted's TCP transport changes (order, producers, errors, TLS).
All over real loopback sockets: a Twisted TCP transport on one end, a plain
socket the test reads (or does not read) on the other.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from wsgateway._compat.sendnow import send_at_once


class Held(Protocol):
    def __init__(self) -> None:
        self.made: Deferred[Held] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        self.made.callback(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.lost.callback(None)


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


@pytest.fixture
def pair() -> Iterator[Any]:
    """Yields an async factory of (twisted server transport's protocol, peer socket)."""
    ports: list[Any] = []
    peers: list[socket.socket] = []

    async def make(rcvbuf: int = 0) -> tuple[Held, socket.socket]:
        proto = Held()
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: proto), interface="127.0.0.1")
        ports.append(port)
        peer = socket.socket()
        peers.append(peer)
        if rcvbuf:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        peer.setblocking(False)
        peer.connect_ex(("127.0.0.1", port.getHost().port))
        await proto.made
        return proto, peer

    yield make
    for peer in peers:
        peer.close()
    for port in ports:
        port.stopListening()


def recv_now(peer: socket.socket) -> bytes:
    try:
        return peer.recv(1 << 20)
    except BlockingIOError:
        return b""


async def recv_all(peer: socket.socket, n: int) -> bytes:
    got = bytearray()
    for _ in range(5000):
        while chunk := recv_now(peer):
            got += chunk
        if len(got) >= n:
            break
        await deferLater(reactor, 0.001, lambda: None)
    return bytes(got)


@pytest_twisted.ensureDeferred
async def test_a_write_is_on_the_wire_before_the_reactor_turns(pair: Any) -> None:
    proto, peer = await pair()
    t = proto.transport
    t.write(b"queued by twisted")
    # without sendnow nothing has left yet: it waits for the next reactor turn
    assert recv_now(peer) == b""
    assert await recv_all(peer, 17) == b"queued by twisted"

    send_at_once(t)
    assert isinstance(t, tcp.Server)
    t.write(b"sent at once")
    assert recv_now(peer) == b"sent at once"
    assert t.dataBuffer == b"" and t._tempDataLen == 0


@pytest_twisted.ensureDeferred
async def test_what_the_socket_does_not_take_is_queued_in_order_and_pauses_the_producer(pair: Any) -> None:
    proto, peer = await pair(rcvbuf=4096)
    t = proto.transport
    t.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    send_at_once(t)
    t.bufferSize = 64 * 1024
    producer = Producer()
    t.registerProducer(producer, True)
    chunks = [struct.pack("!I", i) * 16384 for i in range(40)]  # 64 KiB each, numbered
    for chunk in chunks:
        t.write(chunk)
    # the peer has not read: most of it waits in the transport, and the producer is told
    assert len(t.dataBuffer) + t._tempDataLen > 1024 * 1024
    assert producer.paused >= 1
    got = await recv_all(peer, sum(map(len, chunks)))
    assert got == b"".join(chunks)
    # drained: the producer may go on, and the next write is sent at once again
    assert producer.resumed >= 1
    t.write(b"after")
    assert recv_now(peer) == b"after"


@pytest_twisted.ensureDeferred
async def test_a_write_while_bytes_are_queued_goes_behind_them(pair: Any) -> None:
    proto, peer = await pair()
    t = proto.transport
    t.write(b"first,")  # queued the Twisted way
    send_at_once(t)
    t.write(b"second")
    assert recv_now(peer) == b""
    assert await recv_all(peer, 12) == b"first,second"


@pytest_twisted.ensureDeferred
async def test_a_reset_connection_is_reported_not_raised(pair: Any) -> None:
    proto, peer = await pair()
    t = proto.transport
    send_at_once(t)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # RST
    await deferLater(reactor, 0.05, lambda: None)
    for _ in range(3):
        t.write(b"x" * 1000)  # must not raise, whatever the kernel says
    await proto.lost
    assert proto.reason is not None
    t.write(b"after the loss")  # dropped, as Twisted drops it


@pytest_twisted.ensureDeferred
async def test_after_lose_connection_written_bytes_still_arrive_then_eof(pair: Any) -> None:
    proto, peer = await pair()
    t = proto.transport
    send_at_once(t)
    t.loseConnection()
    t.write(b"last words")
    await proto.lost
    peer.setblocking(True)
    peer.settimeout(5)
    data = b""
    while True:
        chunk = peer.recv(100)
        if not chunk:
            break
        data += chunk
    assert data == b"last words"


def test_other_transports_are_left_alone() -> None:
    st = StringTransport()
    send_at_once(st)
    assert type(st) is StringTransport
    send_at_once(None)


@pytest_twisted.ensureDeferred
async def test_under_tls_the_tcp_transport_sends_at_once(pair: Any) -> None:
    # a TLS transport wraps the TCP one: that one is switched, the wrapper is not
    proto, peer = await pair()
    tcp_transport = proto.transport

    class Wrapper:
        transport = tcp_transport

    send_at_once(Wrapper())
    tcp_transport.write(b"ciphertext")
    assert recv_now(peer) == b"ciphertext"
    send_at_once(tcp_transport)  # a second call changes nothing
    assert type(tcp_transport).__mro__[1] is tcp.Server


@pytest_twisted.ensureDeferred
async def test_the_relay_sends_what_it_relays_in_the_same_turn(pair: Any) -> None:
    from twisted.internet.task import Clock

    from wsgateway.relay.codec import encode_frame
    from wsgateway.relay.relay import Relay

    client_proto, client_peer = await pair()
    upstream_proto, upstream_peer = await pair()
    relay = Relay(
        client_proto.transport, upstream_proto.transport, clock=Clock(), max_message_size=1 << 20,
        write_buffer=1 << 20, idle_timeout=0, ping_interval=0, ping_timeout=0,
    )
    masked = encode_frame(0x1, b"to the upstream", mask=True)
    relay.client_data(masked)
    assert recv_now(upstream_peer) == masked  # no reactor turn in between
    unmasked = encode_frame(0x1, b"to the client", mask=False)
    relay.upstream_data(unmasked)
    assert recv_now(client_peer) == unmasked
