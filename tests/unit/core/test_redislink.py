"""
wsgateway.redis.link and the Redis broker's timers on a task.Clock: the
heartbeat, reply timeouts, reconnect backoff and stop all run on the
injected clock, never on the reactor that only makes the connections.
No Redis server: each connection is a StringTransport the test answers.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from wsgateway.channels.redisbroker import RedisBroker
from wsgateway.config.redis import RedisConfig
from wsgateway.redis.link import Backoff, CommandProtocol, RedisLink
from wsgateway.redis.target import RedisTarget

PING = b"*1\r\n$4\r\nPING\r\n"
HEARTBEAT = 5.0
REPLY_TIMEOUT = 2.0


class Harness:
    """A MemoryReactorClock to connect with (its own timers must stay unused) and a Clock for everything else."""

    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        self.clock = Clock()
        self.taken = 0

    def accept(self) -> list[tuple[Any, StringTransport]]:
        """Complete every connection attempt made since the last call."""
        out = []
        for _, factory, *_ in self.reactor.unixClients[self.taken:]:
            proto = factory.buildProtocol(None)
            transport = StringTransport()
            proto.makeConnection(transport)
            out.append((proto, transport))
        self.taken = len(self.reactor.unixClients)
        return out

    def refuse(self) -> None:
        for _, factory, *_ in self.reactor.unixClients[self.taken:]:
            factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.taken = len(self.reactor.unixClients)

    def assert_reactor_unused(self) -> None:
        assert self.reactor.getDelayedCalls() == []


def broker(h: Harness) -> RedisBroker:
    return RedisBroker(
        RedisConfig(url="unix:///nonexistent/redis.sock", prefix="t"), "gw-1", reactor=h.reactor, clock=h.clock,
        heartbeat=HEARTBEAT, reply_timeout=REPLY_TIMEOUT, backoff=Backoff(initial=0.2, maximum=3.0),
        rng=random.Random(1),
    )


def test_the_heartbeat_pings_both_connections_on_the_clock() -> None:
    h = Harness()
    b = broker(h)
    b.startService()
    links = h.accept()
    assert len(links) == 2 and b.ready
    h.clock.advance(HEARTBEAT - 0.01)
    assert all(PING not in t.value() for _, t in links)
    h.clock.advance(0.01)
    assert all(t.value().endswith(PING) for _, t in links)
    for proto, t in links:
        t.clear()
        proto.dataReceived(b"+PONG\r\n")  # answered: the reply timeouts are cancelled
    h.clock.advance(HEARTBEAT)
    assert all(t.value() == PING for _, t in links)
    h.assert_reactor_unused()
    b.stopService()
    for proto, t in links:
        proto.connectionLost(Failure(ConnectionRefusedError()))
    assert h.clock.getDelayedCalls() == []
    h.assert_reactor_unused()


def test_a_hung_server_is_cut_off_after_the_reply_timeout_and_the_link_comes_back() -> None:
    h = Harness()
    b = broker(h)
    b.startService()
    links = h.accept()
    h.clock.advance(HEARTBEAT)  # PINGs that nobody answers
    h.clock.advance(REPLY_TIMEOUT - 0.01)
    assert b.ready
    h.clock.advance(0.01)
    for proto, t in links:
        assert t.disconnecting  # txredisapi aborts the connection of a command that timed out
        proto.connectionLost(Failure(ConnectionRefusedError()))
    assert not b.ready
    # the reconnects: equal jitter around Backoff.initial, on the clock
    retries = [c for c in h.clock.getDelayedCalls() if "_attempt" in repr(c)]
    assert len(retries) == 2 and all(0.1 <= c.getTime() - h.clock.seconds() <= 0.2 for c in retries)
    h.clock.advance(0.2)
    assert len(h.accept()) == 2 and b.ready
    h.assert_reactor_unused()


def test_reconnect_backoff_grows_on_the_clock() -> None:
    h = Harness()
    link = RedisLink(
        RedisTarget(host=None, port=0, path="/nonexistent/redis.sock"), reactor=h.reactor, clock=h.clock,
        protocol=CommandProtocol, reply_timeout=REPLY_TIMEOUT, connect_timeout=1.0,
        backoff=Backoff(initial=0.2, maximum=3.0), rng=random.Random(2),
        on_up=lambda p: None, on_down=lambda f: None, on_failure=lambda f: None,
    )
    link.start()
    waits = []
    for _ in range(7):
        h.refuse()
        (call,) = h.clock.getDelayedCalls()
        waits.append(call.getTime() - h.clock.seconds())
        h.clock.advance(waits[-1])
    for failures, wait in enumerate(waits, start=1):
        base = min(3.0, 0.2 * 2 ** (failures - 1))
        assert base / 2 <= wait <= base
    h.assert_reactor_unused()
    link.stop()
    assert h.clock.getDelayedCalls() == []
