# -*- test-case-name: tests.integration.test_redis_ha -*-
"""
L{SentinelLocator}: where a master is, asked of Redis Sentinel
(docs/configuration.md#redis), and L{locator_for}, the locator of each
C{[redis]} shard.

Each ask is one short connection to a sentinel (C{AUTH} with
C{sentinel_password} if set, then C{SENTINEL get-master-addr-by-name}),
trying the sentinels in turn, the last one that answered first, each
bounded by the connect and reply timeouts: a sentinel that is down or hung
costs one timeout, never a wait without end. txredisapi has a Sentinel
client of its own (C{txredisapi.Sentinel}), but it connects through
C{ConnectionHandler} pools, which queue commands while no connection is up
and time on the global reactor: what L{wsgateway.redis.link} avoids. Here
only its protocol class is used, on the injected clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol

from wsgateway.config.redis import RedisConfig, RedisShard
from wsgateway.redis.target import FixedLocator, Locator, RedisTarget, parse_url

__all__ = ["SentinelLocator", "locator_for"]


class SentinelLocator:
    """The address of master C{master}, as the first sentinel that knows it says."""

    follows_master = True

    def __init__(self, sentinels: Sequence[str], master: str, *, reactor: Any, clock: Any, timeout: float,
                 password: str | None = None, sentinel_password: str | None = None) -> None:
        self.sentinels = [_split(s) for s in sentinels]
        self.master = master
        self.password = password
        self.sentinel_password = sentinel_password
        self._reactor = reactor
        self._clock = clock
        self._timeout = timeout
        self._first = 0  # the sentinel that answered last

    def describe(self) -> str:
        return f"sentinel master {self.master}"

    def locate(self) -> Deferred[RedisTarget]:
        return Deferred.fromCoroutine(self._locate())

    async def _locate(self) -> RedisTarget:
        problems = []
        n = len(self.sentinels)
        for i in range(n):
            k = (self._first + i) % n
            host, port = self.sentinels[k]
            try:
                reply = await self._ask(host, port)
            except Exception as e:  # refused, timed out, AUTH refused, not a sentinel...
                problems.append(f"{host}:{port}: {e}")
                continue
            if not isinstance(reply, list) or len(reply) != 2:
                problems.append(f"{host}:{port}: does not know master {self.master}")
                continue
            self._first = k
            return RedisTarget(host=_text(reply[0]), port=int(reply[1]), password=self.password)
        raise ConnectionError(f"no sentinel gave the address of master {self.master} ({'; '.join(problems)})")

    async def _ask(self, host: str, port: int) -> Any:
        proto = txredisapi.RedisProtocol(charset=None, replyTimeout=self._timeout, convertNumbers=False)
        proto.callLater = self._clock.callLater
        endpoint = HostnameEndpoint(self._reactor, host, port, timeout=self._timeout)
        await connectProtocol(endpoint, proto)
        try:
            if self.sentinel_password is not None:
                await proto.execute_command("AUTH", self.sentinel_password)
            return await proto.execute_command("SENTINEL", "get-master-addr-by-name", self.master)
        finally:
            proto.transport.loseConnection()


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _text(value: Any) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def locator_for(config: RedisConfig, shard: RedisShard, *, reactor: Any, clock: Any, timeout: float) -> Locator:
    """A shard's locator: its url (with C{password} if the url has none), or its master through the sentinels."""
    if shard.master is not None:
        return SentinelLocator(config.sentinels, shard.master, reactor=reactor, clock=clock, timeout=timeout,
                               password=config.password, sentinel_password=config.sentinel_password)
    assert shard.url is not None
    target = parse_url(shard.url)
    if config.password is not None and target.password is None:
        target = RedisTarget(host=target.host, port=target.port, path=target.path, tls=target.tls, db=target.db,
                             username=target.username, password=config.password)
    return FixedLocator(target)
