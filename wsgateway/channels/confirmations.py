# -*- test-case-name: tests.integration.test_history -*-
"""
Which Redis channels the broker's current pub/sub connection has had
confirmed (Redis answered the SUBSCRIBE), and the recoveries waiting for
that (L{wsgateway.channels.redisbroker.RedisBroker.subscribed}): a
recovery reads history only once every later message is sure to arrive
live (docs/protocol.md#channel-history-and-recovery).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from wsgateway.channels.fanout import BrokerUnavailable

__all__ = ["Confirmations"]


class Confirmations:
    def __init__(self) -> None:
        self._active: set[bytes] = set()
        self._waiters: dict[bytes, list[Deferred[None]]] = {}

    def __contains__(self, key: bytes) -> bool:
        return key in self._active

    def confirmed(self, key: bytes) -> None:
        self._active.add(key)
        for w in self._waiters.pop(key, []):
            w.callback(None)

    def wait(self, key: bytes) -> Deferred[None]:
        """Fires once C{key} is confirmed; fails if it is unsubscribed or the connection goes first."""
        if key in self._active:
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        d = Deferred()
        self._waiters.setdefault(key, []).append(d)
        return d

    def forget(self, key: bytes) -> None:
        """C{key} unsubscribed (its last local subscriber left)."""
        self._active.discard(key)
        _fail(self._waiters.pop(key, []), "unsubscribed")

    def reset(self, why: str) -> None:
        """The pub/sub connection is gone, and every subscription with it."""
        self._active.clear()
        waiting, self._waiters = self._waiters, {}
        for waiters in waiting.values():
            _fail(waiters, why)


def _fail(waiters: list[Deferred[None]], why: str) -> None:
    for w in waiters:
        w.errback(BrokerUnavailable("redis_down", why))
