"""
The client leg's handshake in memory (StringTransport, fake clock): the
Autobahn traps that must never reach a client.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from wsgateway.config.gateway import ServerConfig
from wsgateway.config.limits import LimitsConfig
from wsgateway.config.loader import GatewayConfig
from wsgateway.config.routes import RouteConfig
from wsgateway.config.upstreams import NodeConfig, UpstreamConfig
from wsgateway.config.values import FrozenMap
from wsgateway.connections import LiveConnections
from wsgateway.handshake.admission import ConnectionLimiter
from wsgateway.handshake.chain import HandshakeChain
from wsgateway.handshake.server import GatewayServerFactory, GatewayServerProtocol
from wsgateway.routing.router import Router

REQUEST = (
    b"GET /chat HTTP/1.1\r\n"
    b"Host: gw.example\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"\r\n"
)


class ExplodingRouter(Router):
    def match(self, path: str, host: str | None, headers: Any) -> Any:
        raise RuntimeError("secret internal detail /etc/passwd")


def factory(router: Router | None = None) -> tuple[GatewayServerFactory, MemoryReactorClock]:
    node = NodeConfig(url="ws://127.0.0.1:9", scheme="ws", host="127.0.0.1", port=9, path="")
    route = RouteConfig(name="chat", path="/chat", upstream="u")
    config = GatewayConfig(
        path="test.ini",
        gateway=ServerConfig(node_id="t", listen=("tcp:0",)),
        routes=(route,),
        upstreams=FrozenMap({"u": UpstreamConfig(name="u", nodes=(node,))}),
    )
    clock = MemoryReactorClock()
    live = LiveConnections(clock=clock, limiter=ConnectionLimiter(0, 0))
    chain = HandshakeChain(config, router or Router(config.routes), {}, None, live=live)
    return GatewayServerFactory(chain, live, reactor=clock, clock=clock), clock


class Transport(StringTransport):
    """Like a TCP transport: unregistering when no producer is registered is fine."""

    aborted = False

    def unregisterProducer(self) -> None:
        self.producer = None

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


def connect(f: GatewayServerFactory) -> tuple[Any, StringTransport]:
    proto = f.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = Transport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    proto.makeConnection(transport)
    return proto, transport


def test_unexpected_exception_in_handshake_is_a_fixed_500():
    f, clock = factory(ExplodingRouter([]))
    proto, transport = connect(f)
    proto.dataReceived(REQUEST)
    response = transport.value()
    assert response.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert b"secret" not in response and b"passwd" not in response and b"RuntimeError" not in response
    assert transport.disconnecting


def test_handshake_timeout_drops_a_client_that_never_finishes_its_request():
    f, clock = factory()
    proto, transport = connect(f)
    proto.dataReceived(REQUEST[:20])
    clock.advance(f.chain.limits.handshake_timeout - 0.01)
    assert not transport.disconnecting
    clock.advance(0.02)
    assert transport.aborted
    assert transport.value() == b""


def test_refusals_never_name_the_server_software():
    f, clock = factory()
    proto, transport = connect(f)
    proto.dataReceived(REQUEST.replace(b"/chat", b"/nowhere"))
    response = transport.value()
    assert response.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"autobahn" not in response.lower() and b"server:" not in response.lower()


def test_autobahn_option_table_is_formatted_only_when_read():
    from pprint import pformat

    from autobahn.websocket import protocol

    from wsgateway._compat import autobahn as _autobahn

    _autobahn.install()
    table = [("openHandshakeTimeout", 0, "GatewayServerFactory")]
    lazy = protocol.pformat(table)
    assert not isinstance(lazy, str)  # nothing formatted yet
    assert str(lazy) == pformat(table) and f"{lazy}" == pformat(table)
    timings = protocol.Timings()
    timings.track("x")
    assert isinstance(str(timings), str)
    from autobahn import util

    assert str(protocol.hltype(test_autobahn_option_table_is_formatted_only_when_read)) == util.hltype(
        test_autobahn_option_table_is_formatted_only_when_read
    )
    assert f"{protocol.hlval(42)}" == util.hlval(42)


def test_adopt_finds_the_protocol_behind_tcp_tls_and_endpoint_wrappers():
    from twisted.internet.endpoints import _WrappingProtocol
    from twisted.internet.defer import Deferred
    from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
    from twisted.internet.protocol import Protocol
    from twisted.internet.ssl import optionsForClientTLS

    from wsgateway.upstream.leg import adopt

    class TCP:
        """Like tcp.Server: the transport holds its protocol in .protocol."""

    leg = Protocol()
    # plain TCP, as accepted by a listening port
    proto = Protocol()
    tcp = TCP()
    tcp.protocol = proto
    proto.transport = tcp
    assert adopt(proto, leg) and tcp.protocol is leg
    # a client endpoint wraps the protocol
    proto = Protocol()
    tcp = TCP()
    tcp.protocol = _WrappingProtocol(Deferred(), proto)
    proto.transport = tcp
    assert adopt(proto, leg) and tcp.protocol._wrappedProtocol is leg
    # TLS: the protocol's transport is the TLS wrapper
    proto = Protocol()
    tls = TLSMemoryBIOProtocol(TLSMemoryBIOFactory(optionsForClientTLS("localhost"), True, None), proto)
    proto.transport = tls
    assert adopt(proto, leg) and tls.wrappedProtocol is leg
    # anything else: left alone
    proto = Protocol()
    proto.transport = object()
    assert not adopt(proto, leg)


def test_listeners_share_the_limiter_they_are_given_even_while_it_is_empty():
    # An idle ConnectionLimiter is falsy (its __len__ is 0): "limiter or a new
    # one" gave each listener a limiter of its own, so max_connections was
    # per listener, and the service's limiter counted nothing.
    f, clock = factory()
    shared = ConnectionLimiter(1, 1)
    live = LiveConnections(clock=clock, limiter=shared)
    a = GatewayServerFactory(f.chain, live, reactor=clock, clock=clock)
    b = GatewayServerFactory(f.chain, live, reactor=clock, clock=clock)
    assert a.live.limiter is shared and b.live.limiter is shared


def test_reconfigure_changes_what_new_connections_get():
    f, clock = factory()
    route = RouteConfig(name="other", path="/other", upstream="u", allowed_origins=("https://a.example",))
    config = replace(f.chain.config, routes=(route,), limits=LimitsConfig(max_message_size=1234, write_buffer=4096))
    router = Router(config.routes)
    chain = HandshakeChain(config, router, {}, None, live=f.live)
    f.reconfigure(chain)
    assert f.chain is chain and (chain.config, chain.router, chain.upstreams, chain.auth) == (config, router, {}, None)
    assert f.maxMessagePayloadSize == f.maxFramePayloadSize == 1234  # Autobahn's, for new protocols
    assert f.write_buffer == 4096
    assert set(chain.plans) == {"other"} and chain.origins_of("other").allows("https://a.example")
    # the options preset on the protocol class are the new ones too
    proto, _ = connect(f)
    assert proto.maxMessagePayloadSize == proto.maxFramePayloadSize == 1234
    assert isinstance(proto, GatewayServerProtocol) and type(proto).__name__ == "GatewayServerProtocol"


def test_protocols_get_the_factory_options_from_their_class():
    f, _ = factory()
    proto, _ = connect(f)
    for name in proto.CONFIG_ATTRS:
        assert getattr(proto, name) == getattr(f, name), name
    # a function option stays a function of its own arguments, not a method
    assert proto.perMessageCompressionAccept(["offer"]) is None
    assert proto.webStatus is False and proto.versions == [13]
    # what a protocol sets for itself wins, as in Autobahn
    other = f.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5556))
    other.maxMessagePayloadSize = 7
    other.makeConnection(Transport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5556)))
    assert other.maxMessagePayloadSize == 7 and f.maxMessagePayloadSize != 7


def test_an_upstream_that_speaks_first_is_kept_and_paused_only_past_the_bound():
    from twisted.internet.defer import Deferred
    from autobahn.twisted.websocket import WebSocketClientFactory

    from wsgateway.upstream.leg import _PENDING_LIMIT, UpstreamProtocol

    leg = UpstreamProtocol()
    leg.factory = WebSocketClientFactory("ws://127.0.0.1:9")
    leg.transport = Transport()
    opened: Deferred[Any] = Deferred()
    leg.opened = opened
    leg.state = leg.STATE_OPEN
    # what came with the 101 is kept; a leg that opens is not paused for it
    leg.data = b"hello"
    leg.onOpen()
    assert opened.called and leg.transport.producerState == "producing"
    # more before the client leg opens: kept; past the bound, the upstream is paused
    leg.dataReceived(b"x" * _PENDING_LIMIT)
    assert leg.transport.producerState == "paused"
    leg.dataReceived(b"y")
    # whoever reads the leg now gets it all, in order, and the upstream is read again
    assert leg.take_pending() == b"hello" + b"x" * _PENDING_LIMIT + b"y"
    assert leg.transport.producerState == "producing"
    assert leg.take_pending() == b""
