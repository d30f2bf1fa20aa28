# -*- test-case-name: tests.unit.upstream.test_upstream -*-
"""
Upstreams: their nodes, which node a new connection goes to, and connecting
with retries, backoff and a bounded wait (docs/configuration.md ``[upstream:NAME]``,
section 2 statuses).

The actual WebSocket connect of one attempt is injected (``connect_node``), so
the retry policy here is tested with a fake clock and fake attempts, and the
proxy supplies the Autobahn client leg.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgateway import codes
from wsgateway.backoff import exponential, full_jitter
from wsgateway.config.upstreams import NodeConfig, UpstreamConfig
from wsgateway.upstream.balance import Strategy, strategy_for
from wsgateway.upstream.compression import Deflate
from wsgateway.upstream.errors import describe_error
from wsgateway.upstream.health import NodeHealth, OutlierDetector, eligible_nodes
from wsgateway.upstream.preference import filter_nodes

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
    """One node of an upstream and what the balancer and health checks know of it."""

    config: NodeConfig
    active: int = 0  # open connections, handshakes in flight included
    draining: bool = False
    health: NodeHealth = field(init=False)

    def __post_init__(self) -> None:
        self.health = NodeHealth(name=self.config.url)

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def weight(self) -> int:
        return self.config.weight

    @property
    def zone(self) -> str | None:
        return self.config.zone

    @property
    def version(self) -> str | None:
        return self.config.version

    def snapshot(self, now: float) -> dict[str, Any]:
        """This node's part of /readyz and the admin JSON."""
        return {"url": self.url, "active": self.active, **self.health.snapshot(now, self.draining)}


@dataclass(frozen=True)
class UpstreamRequest:
    """What the upstream leg's handshake sends, the same for every attempt."""

    resource: str
    headers: dict[str, str]
    protocols: tuple[str, ...] = ()
    origin: str | None = None
    useragent: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    trace_id: str = ""  # for the log lines about this connection's attempts
    # attempt failures at debug level: the durable queue's background retries,
    # which would otherwise log a warning per client every few seconds of an outage
    quiet: bool = False
    # the client's permessage-deflate offers, passed on (handshake/compression.py)
    deflate_offers: tuple[Deflate, ...] = ()


class ConnectObserver(Protocol):
    """
    What ``Upstream.connect`` reports as it goes, for metrics
    (``metrics.GatewayMetrics`` is one): a successful attempt's handshake
    time, and each attempt after a connection's first.
    """

    def upstream_connected(self, upstream: str, seconds: float) -> None: ...

    def upstream_retry(self, upstream: str) -> None: ...


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Before retry C{attempt} (0 for the first): full jitter, U(0, min(max, initial * 2**attempt))."""
    return full_jitter(exponential(attempt, initial=initial, maximum=maximum), rng)


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
        observer: ConnectObserver | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.nodes = [Node(n) for n in config.nodes]
        self._clock = clock
        self._connect_node = connect_node
        self._rng = rng or random.Random()
        self._strategy = strategy or strategy_for(config.balance, self.nodes, clock=clock.seconds, rng=self._rng)
        self.outliers = OutlierDetector(
            clock.seconds, lambda: [n.health for n in self.nodes if not n.draining], upstream=self.name
        )
        self.retried = 0  # extra attempts made
        self._observer = observer

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
        if not n.draining:
            n.draining = True
            self.log.info("upstream {upstream} node {node} draining", upstream=self.name, node=url)
        return True

    def undrain(self, url: str) -> bool:
        n = self.node(url)
        if n is None:
            return False
        n.draining = False
        return True

    def snapshot(self) -> list[dict[str, Any]]:
        now = self._clock.seconds()
        return [n.snapshot(now) for n in self.nodes]

    def attempt_order(self, key: str | None = None, version: str | None = None) -> list[Node]:
        """
        The nodes a new connection tries, in order: healthy, not ejected,
        not draining (passive ejection never empties the list: panic mode),
        filtered by zone and version with fallback, ordered by the strategy.
        Empty when active checks or draining leave no node: 503.
        """
        eligible = eligible_nodes(self.nodes, self._clock.seconds())
        if not eligible:
            return []
        zone = self.config.zone
        preferred, fell_back = filter_nodes(eligible, zone=zone, version=version)
        if fell_back and (zone or version):
            self.log.warn(
                "upstream {upstream}: no healthy node for zone={zone} version={version}; using the others",
                upstream=self.name,
                zone=zone,
                version=version,
            )
        order = self._strategy.order(preferred, key)
        if zone and not fell_back and len(preferred) < len(eligible):
            # A zone is a preference: retries may leave it (a version is not:
            # another version may not speak the client's API).
            order += [n for n in eligible if n not in preferred and (version is None or n.version == version)]
        return order

    async def connect(
        self, request: UpstreamRequest, *, key: str | None = None, version: str | None = None
    ) -> tuple[Node, P]:
        """
        Open an upstream leg: the picked node first, then the others, with
        backoff between attempts, at most ``retries`` extra attempts.

        On success the caller owns one count of ``node.active`` and hands it
        back with ``release``. Raises UpstreamError with the client's status:
        the upstream's own status when it answered the upgrade (never
        retried: the upstream decided), 504 when the last attempt timed out,
        502 otherwise, and 503 when no node may take connections at all.
        """
        cfg = self.config
        order = self.attempt_order(key, version)
        if not order:
            raise UpstreamError(codes.UNAVAILABLE, "no healthy node")
        last_error: Failure | None = None
        for attempt in range(cfg.retries + 1):
            if attempt:
                self.retried += 1
                if self._observer is not None:
                    self._observer.upstream_retry(self.name)
                await self._sleep(backoff_delay(attempt - 1, cfg.backoff_initial, cfg.backoff_max, self._rng))
            node = order[attempt % len(order)]
            node.active += 1
            started = self._clock.seconds()
            d = self._connect_node(node, request, cfg.connect_timeout)
            d.addTimeout(cfg.connect_timeout, self._clock)
            try:
                proto = await d
            except UpstreamRefused as e:
                node.active -= 1
                if e.status >= 500:
                    self.outliers.connect_failed(node.health, f"upstream answered {e.status}")
                else:
                    self.outliers.succeeded(node.health)
                raise UpstreamError(e.status, f"upstream answered {e.status}") from None
            except CancelledError:
                node.active -= 1
                raise
            except Exception as e:
                node.active -= 1
                last_error = Failure()
                self._strategy.failed(node)
                self.outliers.connect_failed(node.health, describe_error(e))
                (self.log.debug if request.quiet else self.log.warn)(
                    "upstream {upstream} node {node} attempt {attempt} failed: {error}",
                    upstream=self.name,
                    node=node.url,
                    attempt=attempt + 1,
                    error=_describe(last_error),
                    trace_id=request.trace_id or None,
                )
                continue
            elapsed = self._clock.seconds() - started
            self._strategy.observe(node, elapsed)
            if self._observer is not None:
                self._observer.upstream_connected(self.name, elapsed)
            self.outliers.succeeded(node.health)
            return node, proto
        assert last_error is not None
        if last_error.check(TimeoutError):
            raise UpstreamError(codes.UPSTREAM_TIMEOUT, "upstream handshake timed out")
        raise UpstreamError(codes.UPSTREAM_FAILED, _describe(last_error))

    def release(self, node: Node, *, vanished: bool = False) -> None:
        """
        A connection that ``connect`` opened has ended. ``vanished``: the
        upstream dropped it without a close frame (1006), a passive failure;
        normal and application closes are not.
        """
        node.active -= 1
        if vanished:
            self.outliers.connection_lost(node.health)

    def _sleep(self, seconds: float) -> Deferred[None]:
        d: Deferred[None] = Deferred(lambda d: call.cancel())
        call = self._clock.callLater(seconds, d.callback, None)
        return d


def _describe(f: Failure) -> str:
    if f.check(TimeoutError):
        return "timed out"
    return f"{type(f.value).__name__}: {f.value}"
