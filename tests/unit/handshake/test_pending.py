"""
Connections not upgraded yet (issue 16 item 8, docs/configuration.md): they count
towards max_connections_per_ip from the moment they open, and past
max_pending_handshakes the oldest are dropped. Pure units of the limiter
and the pending set, then the client leg in memory (StringTransport, fake
clock).
"""

from __future__ import annotations

from ipaddress import ip_network
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from wsgateway import codes
from wsgateway.config.gateway import ServerConfig
from wsgateway.config.limits import LimitsConfig
from wsgateway.config.loader import GatewayConfig
from wsgateway.config.routes import RouteConfig
from wsgateway.config.upstreams import NodeConfig, UpstreamConfig
from wsgateway.config.values import FrozenMap
from wsgateway.connections import LiveConnections
from wsgateway.handshake.admission import ConnectionLimiter, PendingHandshakes
from wsgateway.handshake.chain import HandshakeChain
from wsgateway.handshake.server import GatewayServerFactory
from wsgateway.routing.router import Router

# -- the limiter -----------------------------------------------------------------


def test_pending_connections_count_towards_the_per_ip_share() -> None:
    limiter = ConnectionLimiter(0, 3)
    assert limiter.begin_pending("a") is None
    assert limiter.begin_pending("a") is None
    assert limiter.admit("a") is None  # a third, open one
    assert limiter.begin_pending("a") == codes.TOO_MANY_REQUESTS
    assert limiter.admit("a") == codes.TOO_MANY_REQUESTS
    assert limiter.begin_pending("b") is None  # another address has its own share
    # a pending one reads its request: uncounted as pending, counted as open
    assert limiter.end_pending("a")
    assert limiter.admit("a") is None
    assert (limiter.per_ip("a"), limiter.pending_per_ip("a")) == (2, 1)
    assert limiter.begin_pending("a") == codes.TOO_MANY_REQUESTS


def test_end_pending_pairs_exactly_and_leaves_no_entry_behind() -> None:
    limiter = ConnectionLimiter(0, 0)
    for ip in ("a", "b", "b"):
        assert limiter.begin_pending(ip) is None  # 0 = unlimited
    assert limiter.end_pending("a") and limiter.end_pending("b") and limiter.end_pending("b")
    assert not limiter.end_pending("b")
    assert (limiter.pending_per_ip("a"), limiter.pending_per_ip("b"), len(limiter)) == (0, 0, 0)


def test_the_pending_set_gives_back_the_oldest_past_its_bound() -> None:
    pending = PendingHandshakes()
    assert [pending.add(n, 3) for n in "abc"] == [[], [], []]
    assert pending.add("d", 3) == ["a"]
    assert pending.discard("c") and not pending.discard("c")
    assert pending.add("e", 3) == []
    assert pending.add("f", 2) == ["b", "d"]  # a lower bound after a reload: down to it at once
    assert len(pending) == 2 and "e" in pending and "f" in pending


# -- the client leg in memory --------------------------------------------------------

REQUEST = (
    b"GET /nowhere HTTP/1.1\r\n"
    b"Host: HOST\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"\r\n"
)


class Transport(StringTransport):
    aborted = False

    def unregisterProducer(self) -> None:
        self.producer = None

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


def factory(limits: LimitsConfig, trusted: tuple[Any, ...] = ()) -> GatewayServerFactory:
    """A listener's factory on a fake clock (``factory.clock``), with one route on host ``*.internal.example``."""
    node = NodeConfig(url="ws://127.0.0.1:9", scheme="ws", host="127.0.0.1", port=9, path="")
    config = GatewayConfig(
        path="test.ini",
        gateway=ServerConfig(node_id="t", listen=("tcp:0",), trusted_proxies=trusted),
        limits=limits,
        routes=(RouteConfig(name="chat", path="/chat", upstream="u", host="*.internal.example"),),
        upstreams=FrozenMap({"u": UpstreamConfig(name="u", nodes=(node,))}),
    )
    clock = MemoryReactorClock()
    live = LiveConnections(clock=clock, limiter=ConnectionLimiter(limits.max_connections,
                                                                  limits.max_connections_per_ip))
    chain = HandshakeChain(config, Router(config.routes), {}, None, live=live)
    return GatewayServerFactory(chain, live, reactor=clock, clock=clock)


def connect(f: GatewayServerFactory, ip: str = "127.0.0.1") -> tuple[Any, Transport]:
    proto = f.buildProtocol(IPv4Address("TCP", ip, 5555))
    transport = Transport(peerAddress=IPv4Address("TCP", ip, 5555))
    proto.makeConnection(transport)
    return proto, transport


def lose(proto: Any) -> None:
    proto.connectionLost(Failure(ConnectionError("gone")))


def test_over_its_addresss_share_a_connection_gets_a_short_grace_then_its_429() -> None:
    f = factory(LimitsConfig(max_connections_per_ip=2))
    clock = f.clock
    held = [connect(f) for _ in range(2)]
    proto, transport = connect(f)
    # no answer before its request (it would race the request into a reset)
    assert transport.value() == b"" and not transport.disconnecting
    assert proto not in f.live.pending and f.live.over_share == 1  # not pending: it pushes nobody out
    assert f.live.limiter.pending_per_ip("127.0.0.1") == 2
    proto.dataReceived(REQUEST.replace(b"/nowhere", b"/chat").replace(b"HOST", b"a.internal.example"))
    assert transport.value().startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert f.live.over_share == 0
    lose(proto)
    # one that sends nothing is dropped after the grace, well before handshake_timeout
    idle, idle_transport = connect(f)
    clock.advance(1.01)
    assert idle_transport.aborted and idle_transport.value() == b""
    lose(idle)
    assert f.live.over_share == 0 and len(f.live.pending) == 2
    # another address is not affected
    _, other = connect(f, "127.0.0.2")
    assert other.value() == b"" and not other.disconnecting and f.live.over_share == 0
    # one of the held ones leaves: its place is free again
    lose(held[0][0])
    again, _ = connect(f)
    assert again in f.live.pending and f.live.over_share == 0


def test_waiting_over_share_is_bounded_too() -> None:
    f = factory(LimitsConfig(max_connections_per_ip=1, max_pending_handshakes=3))
    connect(f)
    waiting = [connect(f) for _ in range(3)]
    assert f.live.over_share == 3 and not any(t.disconnecting for _, t in waiting)
    _, dropped = connect(f)
    assert dropped.aborted and f.live.over_share == 3


def test_a_pending_connection_is_counted_as_open_once_its_request_is_read() -> None:
    f = factory(LimitsConfig(max_connections_per_ip=2))
    proto, transport = connect(f)
    assert f.live.limiter.pending_per_ip("127.0.0.1") == 1
    proto.dataReceived(REQUEST.replace(b"HOST", b"a.internal.example"))  # /nowhere: 404
    assert transport.value().startswith(b"HTTP/1.1 404 ")
    assert f.live.limiter.pending_per_ip("127.0.0.1") == 0
    lose(proto)
    assert len(f.live.pending) == 0 and len(f.live.limiter) == 0


def test_a_trusted_proxy_is_not_counted_per_address_while_pending() -> None:
    f = factory(LimitsConfig(max_connections_per_ip=1), trusted=(ip_network("127.0.0.0/8"),))
    conns = [connect(f) for _ in range(5)]
    assert all(t.value() == b"" and not t.disconnecting for _, t in conns)
    assert f.live.limiter.pending_per_ip("127.0.0.1") == 0 and len(f.live.pending) == 5


def test_past_max_pending_handshakes_the_oldest_are_dropped() -> None:
    f = factory(LimitsConfig(max_pending_handshakes=3, max_connections_per_ip=0))
    conns = [connect(f, f"127.0.0.{i}") for i in range(1, 4)]
    assert not any(t.disconnecting for _, t in conns)
    newest, newest_transport = connect(f, "127.0.0.4")
    assert conns[0][1].aborted and conns[0][1].value() == b""
    assert not any(t.disconnecting for _, t in conns[1:]) and not newest_transport.disconnecting
    lose(conns[0][0])  # the abort's connectionLost: nothing left to uncount
    assert len(f.live.pending) == 3
    assert all(f.live.limiter.pending_per_ip(f"127.0.0.{i}") == (0 if i == 1 else 1) for i in range(1, 5))
    # the next one drops the next oldest, and one that has left frees its place
    lose(conns[1][0])
    connect(f, "127.0.0.5")
    assert not conns[2][1].disconnecting


@pytest.mark.parametrize(
    "host",
    [b"evil.example, a.internal.example", b"evil.example/a.internal.example", b"evil.example a.internal.example",
     b"evil.example?a.internal.example", b"evil.example;a.internal.example", b"evil.example\ta.internal.example",
     b"a.internal.example:99999"],
)
def test_a_malformed_host_is_400_before_routing(host: bytes) -> None:
    f = factory(LimitsConfig())
    proto, transport = connect(f)
    proto.dataReceived(REQUEST.replace(b"/nowhere", b"/chat").replace(b"HOST", host))
    assert transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert proto.route is None  # never routed


def test_a_valid_host_reaches_the_host_route() -> None:
    f = factory(LimitsConfig())
    proto, transport = connect(f)
    proto.dataReceived(REQUEST.replace(b"/nowhere", b"/chat").replace(b"HOST", b"a.internal.example:8443"))
    assert proto.route is not None and proto.route.name == "chat"
