# -*- test-case-name: tests.test_upstream -*-
"""
Upstreams: their nodes, which node a new connection goes to, and connecting
with retries, backoff and a bounded wait (SPEC section 1 ``[upstream:NAME]``,
section 2 statuses).

The actual WebSocket connect of one attempt is injected (``connect_node``), so
the retry policy here is tested with a fake clock and fake attempts, and the
proxy supplies the Autobahn client leg.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgateway import closecodes
from wsgateway.balance import Strategy, strategy_for
from wsgateway.config import NodeConfig, UpstreamConfig

P = TypeVar("P")


class UpstreamError(Exception):
    """No upstream connection: ``status`` is what the client is answered."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail


class UpstreamRefused(Exception):
    """The upstream answered the upgrade with an HTTP status other than 101."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass(eq=False)
class Node:
    config: NodeConfig
    active: int = 0
    healthy: bool = True
    draining: bool = False
    failures: int = 0

    @property
    def url(self) -> str:
        return self.config.url

    def available(self) -> bool:
        return self.healthy and not self.draining


@dataclass(frozen=True)
class UpstreamRequest:
    """What the upstream leg's handshake sends, the same for every attempt."""

    resource: str
    headers: dict[str, str]
    protocols: tuple[str, ...] = ()
    origin: str | None = None
    useragent: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter (AWS architecture blog): U(0, min(max, initial * 2**attempt))."""
    return rng.uniform(0, min(maximum, initial * (2**attempt)))


class Upstream(Generic[P]):
    log = Logger()

    def __init__(
        self,
        config: UpstreamConfig,
        clock: IReactorTime,
        connect_node: Callable[[Node, UpstreamRequest, float], Deferred[P]],
        *,
        strategy: Strategy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.nodes = [Node(n) for n in config.nodes]
        self._clock = clock
        self._connect_node = connect_node
        self._strategy = strategy or strategy_for(config.balance)
        self._rng = rng or random.Random()

    def node(self, url: str) -> Node | None:
        for n in self.nodes:
            if n.url == url:
                return n
        return None

    def drain(self, url: str) -> bool:
        """No new connections to this node; open ones stay."""
        n = self.node(url)
        if n is None:
            return False
        n.draining = True
        return True

    def attempt_order(self) -> list[Node]:
        return self._strategy.order([n for n in self.nodes if n.available()])

    async def connect(self, request: UpstreamRequest) -> tuple[Node, P]:
        """
        Open an upstream leg: the picked node first, then the others, with
        backoff between attempts, at most ``retries`` extra attempts.

        Raises UpstreamError with the client's status: the upstream's own
        status when it answered the upgrade (never retried: the upstream
        decided), 504 when the last attempt timed out, 502 otherwise, and 503
        when no node may take connections at all.
        """
        cfg = self.config
        order = self.attempt_order()
        if not order:
            raise UpstreamError(closecodes.UNAVAILABLE, "no healthy node")
        last_error: Failure | None = None
        for attempt in range(cfg.retries + 1):
            if attempt:
                await self._sleep(backoff_delay(attempt - 1, cfg.backoff_initial, cfg.backoff_max, self._rng))
            node = order[attempt % len(order)]
            d = self._connect_node(node, request, cfg.connect_timeout)
            d.addTimeout(cfg.connect_timeout, self._clock)
            try:
                proto = await d
            except UpstreamRefused as e:
                raise UpstreamError(e.status, f"upstream answered {e.status}") from None
            except CancelledError:
                raise
            except Exception:
                last_error = Failure()
                node.failures += 1
                self.log.warn(
                    "upstream {upstream} node {node} attempt {attempt} failed: {error}",
                    upstream=self.name,
                    node=node.url,
                    attempt=attempt + 1,
                    error=_describe(last_error),
                )
                continue
            node.failures = 0
            return node, proto
        assert last_error is not None
        if last_error.check(TimeoutError):
            raise UpstreamError(closecodes.UPSTREAM_TIMEOUT, "upstream handshake timed out")
        raise UpstreamError(closecodes.UPSTREAM_FAILED, _describe(last_error))

    def _sleep(self, seconds: float) -> Deferred[None]:
        d: Deferred[None] = Deferred(lambda d: call.cancel())
        call = self._clock.callLater(seconds, d.callback, None)
        return d


def _describe(f: Failure) -> str:
    if f.check(TimeoutError):
        return "timed out"
    return f"{type(f.value).__name__}: {f.value}"
