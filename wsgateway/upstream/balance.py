# -*- test-case-name: tests.unit.upstream.test_balance -*-
"""
Node-picking strategies for the ``[upstream:NAME] balance`` key
(docs/configuration.md); the ``zone`` / ``version_header`` filter applied
before them is L{wsgateway.upstream.preference}. Pure: no reactor, no I/O;
time and randomness are injected.

A strategy turns the nodes that may take a new connection into the order in
which a handshake tries them: the first is the pick, the rest are the
failover candidates for retries, so a retry never goes back to a node that
has just failed while another one is left. Every ``order()`` returns each
node it was given exactly once.

Strategies keep their per-node state by ``url`` (not by object), so the
caller may hand them any subset of the configured nodes on each call.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar


class BalancedNode(Protocol):
    """What a strategy may read from a node (``upstream.Node`` provides it).

    Read-only properties, so both plain attributes and properties satisfy it.
    """

    @property
    def url(self) -> str: ...

    @property
    def active(self) -> int:
        """Open connections on this node now, handshakes in flight included."""

    @property
    def weight(self) -> int: ...


T = TypeVar("T")
N = TypeVar("N", bound=BalancedNode)


class Strategy(Protocol):
    name: str

    def order(self, nodes: Sequence[N], key: str | None = None) -> list[N]:
        """All of ``nodes``, each once, the pick first. ``key``: hash:* only."""

    def observe(self, node: N, latency: float) -> None:
        """A handshake to ``node`` took ``latency`` seconds."""

    def failed(self, node: N) -> None:
        """An attempt to ``node`` failed."""


def _weight(node: BalancedNode) -> int:
    # config guarantees >= 1; a 0 would stall SWRR and empty the hash ring.
    return max(1, int(node.weight))


class _Stateless:
    """observe()/failed() for strategies that ignore handshake outcomes."""

    def observe(self, node: Any, latency: float) -> None:
        pass

    def failed(self, node: Any) -> None:
        pass


class RoundRobin(_Stateless):
    """Each new connection starts one node further along the list."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    # Unbounded T: callers (and tests) may rotate anything, not just nodes.
    def order(self, nodes: Sequence[T], key: str | None = None) -> list[T]:
        n = len(nodes)
        if n == 0:
            return []
        start = self._next % n
        self._next = start + 1
        return [*nodes[start:], *nodes[:start]]


class _Swrr:
    """nginx's smooth weighted round robin (ngx_http_upstream_get_peer).

    Every pick adds each candidate's weight to its current weight, takes the
    largest (first in list order on a tie, as nginx does) and subtracts the
    candidates' total from it. Over any run of ``total`` picks with the same
    candidates each node is picked exactly ``weight`` times, spread evenly
    (5/1/1 gives a a b a c a a), because the current weights return to
    where they started. Current weights of nodes left out of a call are kept,
    so a node that comes back resumes where it was instead of bursting.
    """

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def pick(self, nodes: Sequence[N]) -> N:
        total = 0
        best: N | None = None
        best_current = 0
        for node in nodes:
            w = _weight(node)
            total += w
            current = self._current.get(node.url, 0) + w
            self._current[node.url] = current
            if best is None or current > best_current:
                best, best_current = node, current
        assert best is not None
        self._current[best.url] = best_current - total
        return best


def _pick_first(nodes: Sequence[N], pick: N, rest_key: Callable[[N], Any]) -> list[N]:
    """``pick`` then the others sorted by ``rest_key`` (stable: list order on ties)."""
    return [pick, *sorted((n for n in nodes if n is not pick), key=rest_key)]


class Weighted(_Stateless):
    """Smooth weighted round robin; failover: the others by descending weight."""

    name = "weighted"

    def __init__(self) -> None:
        self._swrr = _Swrr()

    def order(self, nodes: Sequence[N], key: str | None = None) -> list[N]:
        if not nodes:
            return []
        return _pick_first(nodes, self._swrr.pick(nodes), lambda n: -_weight(n))


class LeastConn(_Stateless):
    """
    Fewest ``active / weight`` first, as nginx's least_conn: the nodes tied
    for the lowest load share the picks by smooth weighted round robin, so a
    burst of connections arriving before any ``active`` changes is spread
    instead of all landing on the first node. Failover: ascending load.
    """

    name = "least_conn"

    def __init__(self) -> None:
        self._swrr = _Swrr()

    def order(self, nodes: Sequence[N], key: str | None = None) -> list[N]:
        if not nodes:
            return []

        # Floats are fine: a/b and c/d with a*d == c*b round to the same double,
        # so ties stay ties.
        def load(n: N) -> float:
            return n.active / _weight(n)

        lowest = min(load(n) for n in nodes)
        tied = [n for n in nodes if load(n) == lowest]
        return _pick_first(nodes, self._swrr.pick(tied), load)


class _PeakEwma:
    """
    Finagle's PeakEwma (and tower's ``peak_ewma``, which Linkerd uses): a
    sample above the estimate replaces it at once (peak), one below it is
    blended in by how long ago the last update was, and reading decays the
    estimate towards 0 (a zero sample), so a node that was slow and is no
    longer picked is eventually tried again instead of being starved forever.
    """

    def __init__(self, initial: float, now: float) -> None:
        self.estimate = initial
        self.stamp = now
        self.measured = False

    def update(self, sample: float, now: float, tau: float) -> float:
        elapsed = max(now - self.stamp, 0.0)
        self.stamp = max(now, self.stamp)
        if sample > self.estimate:
            self.estimate = sample
        else:
            w = math.exp(-elapsed / tau)
            self.estimate = self.estimate * w + sample * (1.0 - w)
        return self.estimate


class Ewma:
    """
    Peak-EWMA of handshake latency; cost = estimate * (active + 1).

    The pick is by "power of two choices" (two distinct random nodes, the
    cheaper wins), as Finagle and Linkerd do: a full sort would send every
    gateway worker's next connections to the same single cheapest node
    (workers do not see each other's ``active``), while P2C never picks the
    most expensive node and spreads the rest. The failover order after the
    pick is the others by ascending cost.

    Defaults as Linkerd's proxy: decay time 10 s, 30 ms for a node never
    measured (low enough that a new node gets tried soon). A failed attempt
    counts as a ``failure_penalty`` sample: 5 s is longer than any handshake
    that succeeds within the default ``connect_timeout`` (3 s), so a node
    that just failed ranks behind every node that answered, and decays back
    into use within about a minute if nothing else marks it unhealthy.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        *,
        decay: float = 10.0,
        default_latency: float = 0.030,
        failure_penalty: float = 5.0,
    ) -> None:
        self.name = "ewma"
        self._clock = clock
        self._rng = rng or random.Random()
        self._decay = decay
        self._default = default_latency
        self._penalty = failure_penalty
        self._stats: dict[str, _PeakEwma] = {}

    def _stat(self, url: str, now: float) -> _PeakEwma:
        stat = self._stats.get(url)
        if stat is None:
            stat = self._stats[url] = _PeakEwma(self._default, now)
        return stat

    def cost(self, node: BalancedNode) -> float:
        now = self._clock()
        return self._stat(node.url, now).update(0.0, now, self._decay) * (node.active + 1)

    def order(self, nodes: Sequence[N], key: str | None = None) -> list[N]:
        if not nodes:
            return []
        costs = {id(n): self.cost(n) for n in nodes}
        if len(nodes) == 1:
            pick = nodes[0]
        else:
            a, b = self._rng.sample(range(len(nodes)), 2)
            pick = nodes[b] if costs[id(nodes[b])] < costs[id(nodes[a])] else nodes[a]
        return _pick_first(nodes, pick, lambda n: costs[id(n)])

    def observe(self, node: N, latency: float) -> None:
        now = self._clock()
        stat = self._stat(node.url, now)
        if not stat.measured:
            # The default is a placeholder, not a measurement: the first real
            # sample replaces it even when lower (a blend would keep a fast
            # new node at the default for a whole decay time).
            stat.measured = True
            stat.estimate, stat.stamp = max(latency, 0.0), now
            return
        stat.update(max(latency, 0.0), now, self._decay)

    def failed(self, node: N) -> None:
        self.observe(node, self._penalty)


def _point(text: str) -> int:
    # A stable hash (Python's hash() is salted per process): every gateway
    # worker and node must put a key on the same upstream node.
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


class ConsistentHash(_Stateless):
    """
    ``hash:*``: a consistent hash ring (Karger et al.; ketama's 160 points
    per node, times the node's weight divided by the weights' common divisor,
    so 90/10 costs 1 440 + 160 points, not 16 000).

    The ring holds every configured node; a key's order is the ring walked
    clockwise from the key's point, skipping nodes not offered, each node
    once. So a key stays on its node while that node is available, and when a
    node goes away only its keys move (to the next node on the ring, i.e.
    spread over the others) and come back when it returns. Without a key the
    order is plain round robin.
    """

    POINTS = 160
    MAX_POINTS = 1 << 16  # whole ring; huge weights are scaled down to fit

    def __init__(self, name: str, nodes: Sequence[BalancedNode] = ()) -> None:
        self.name = name
        self._rr = RoundRobin()
        self._hashes: list[int] = []
        self._urls: list[str] = []
        self._known: set[str] = set()
        weights = [_weight(n) for n in nodes]
        self._divisor = math.gcd(*weights) if weights else 1
        total = sum(w // self._divisor for w in weights) * self.POINTS
        self._scale = min(1.0, self.MAX_POINTS / total) if total else 1.0
        self._add(nodes)

    def _add(self, nodes: Iterable[BalancedNode]) -> None:
        points = list(zip(self._hashes, self._urls))
        for node in nodes:
            if node.url in self._known:
                continue
            self._known.add(node.url)
            count = max(1, round(self.POINTS * _weight(node) / self._divisor * self._scale))
            points.extend((_point(f"{node.url}#{i}"), node.url) for i in range(count))
        points.sort()
        self._hashes = [h for h, _ in points]
        self._urls = [u for _, u in points]

    def order(self, nodes: Sequence[N], key: str | None = None) -> list[N]:
        if key is None or not nodes:
            return self._rr.order(nodes)
        if any(n.url not in self._known for n in nodes):
            # Only when built without the configured nodes (the old
            # strategy_for(name) call): points depend on the url alone, so
            # adding late gives the same ring as building up front.
            self._add(nodes)
        offered: dict[str, list[N]] = {}
        for n in nodes:
            offered.setdefault(n.url, []).append(n)
        result: list[N] = []
        start = bisect.bisect_right(self._hashes, _point(key))
        size = len(self._urls)
        for i in range(size):
            found = offered.pop(self._urls[(start + i) % size], None)
            if found is not None:
                result.extend(found)
                if not offered:
                    break
        return result


def strategy_for(
    balance: str,
    nodes: Sequence[BalancedNode] = (),
    *,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> Strategy:
    """
    The strategy for a validated ``balance`` value; ``nodes``: every
    configured node (hash rings and weight divisors are built from them).
    """
    if balance == "round_robin":
        return RoundRobin()
    if balance == "weighted":
        return Weighted()
    if balance == "least_conn":
        return LeastConn()
    if balance == "ewma":
        return Ewma(clock, rng)
    if balance == "hash:ip" or _hash_name(balance, "hash:claim:") or _hash_name(balance, "hash:header:"):
        return ConsistentHash(balance, nodes)
    raise ValueError(f"unknown balance strategy {balance!r}")


def _hash_name(balance: str, prefix: str) -> str | None:
    if balance.startswith(prefix) and len(balance) > len(prefix):
        return balance[len(prefix):]
    return None


def hash_key(
    balance: str,
    *,
    peer_ip: str,
    claims: Mapping[str, Any] | None,
    headers: Mapping[str, str],
) -> str | None:
    """
    The key a ``hash:*`` strategy places a connection by; None (round robin)
    when the strategy is not a hash or the connection does not carry the
    key. ``headers`` as Autobahn gives them (names lower-cased).
    """
    if balance == "hash:ip":
        return peer_ip or None
    claim = _hash_name(balance, "hash:claim:")
    if claim is not None:
        value = (claims or {}).get(claim)
        return None if value is None else str(value)
    header = _hash_name(balance, "hash:header:")
    if header is not None:
        wanted = header.lower()
        value = headers.get(wanted)
        if value is None:  # a mapping not lower-cased by its maker
            value = next((v for k, v in headers.items() if k.lower() == wanted), None)
        # An empty header would pin every such client to one node.
        return value or None
    return None
