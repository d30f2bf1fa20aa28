"""stats.py: per-route counts with live relays read on demand."""

from __future__ import annotations

from dataclasses import dataclass

from wsgateway.ops.stats import C2U, U2C, Connection, GatewayStats


@dataclass
class FakeRelay:
    messages_c2u: int = 0
    messages_u2c: int = 0
    bytes_c2u: int = 0
    bytes_u2c: int = 0


def conn(relay: FakeRelay, route: str = "chat", cid: str = "c1") -> Connection:
    return Connection(cid, route, "up", "ws://n", "tcp4:127.0.0.1:1", "t" * 32, None, 0.0, relay)


def test_live_and_closed_counts_add_up() -> None:
    stats = GatewayStats()
    a, b = FakeRelay(), FakeRelay()
    stats.opened(conn(a))
    stats.opened(conn(b, cid="c2"))
    a.messages_c2u, a.bytes_c2u, b.messages_u2c, b.bytes_u2c = 3, 30, 5, 50
    assert stats.active() == {"chat": 2}
    live = stats.traffic()["chat"]
    assert (live.messages[C2U], live.messages[U2C], live.bytes[C2U], live.bytes[U2C]) == (3, 5, 30, 50)
    stats.closed(a, 1000)
    a.messages_c2u = 99  # a closed relay is counted once, when it closed
    stats.closed(a, 1000)
    after = stats.traffic()["chat"]
    assert (after.messages[C2U], after.messages[U2C]) == (3, 5)
    assert stats.active() == {"chat": 1}
    assert stats.routes["chat"].closes == {1000: 1}
    assert stats.routes["chat"].handshakes == {101: 2}
    stats.closed(b, None)
    assert stats.routes["chat"].closes == {1000: 1, 1006: 1}
    assert stats.active() == {}


def test_refused_handshakes_by_route_and_without_one() -> None:
    stats = GatewayStats()
    stats.handshake("chat", 401)
    stats.handshake("chat", 401)
    stats.handshake(None, 404)
    assert stats.routes["chat"].handshakes == {401: 2}
    assert stats.routes[""].handshakes == {404: 1}
    assert list(stats.connections()) == []
