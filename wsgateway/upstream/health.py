# -*- test-case-name: tests.unit.upstream.test_health -*-
"""
Node health, the pure part (docs/configuration.md ``health_*`` keys, section
2's 503, section 6's ``/readyz`` node states): no reactor, no I/O.

- L{NodeHealth}: the state of one node (``node.health``).
- L{OutlierDetector}: passive ejection, the way Envoy's outlier detection
  does it: C{consecutive} connect failures or abnormal losses eject a node for
  C{base_ejection * ejections} seconds (capped), never the last available one.
- L{eligible_nodes}: which nodes a new connection may go to.

The active checks are L{wsgateway.upstream.checker} (the service) and
L{wsgateway.upstream.probes} (what one check does).

Time is always injected: C{now} floats or a C{Callable[[], float]};
ejections end lazily when C{now} passes C{ejected_until}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from twisted.logger import Logger

from wsgateway.codes import ABNORMAL

__all__ = [
    "ABNORMAL_CLOSES", "DRAINING", "EJECTED", "HEALTHY", "UNHEALTHY", "NodeHealth",
    "OutlierDetector", "eligible_nodes", "is_abnormal_close",
]

HEALTHY, UNHEALTHY, EJECTED, DRAINING = "healthy", "unhealthy", "ejected", "draining"

# Close codes of an upstream connection that count as a passive failure: the
# connection vanished without a close frame (the client then gets 1014).
# 1000, 1001, 1012, 1011 and application codes (3000-4999) are the upstream's
# own decision and never count.
ABNORMAL_CLOSES = frozenset({None, ABNORMAL})


def is_abnormal_close(code: int | None) -> bool:
    return code in ABNORMAL_CLOSES


# -- state of one node ------------------------------------------------------


@dataclass(eq=False)
class NodeHealth:
    """
    Health of one node; no clock, no I/O. C{name} (the node URL) is only for
    logs. Draining is the node's own flag (C{Node.draining}) and is passed
    to L{state} / L{snapshot}, not kept here.
    """

    name: str = ""
    healthy: bool = True  # active checks; True at start so a fresh gateway serves at once
    check_successes: int = 0  # consecutive passed active checks
    check_failures: int = 0  # consecutive failed active checks
    passive_failures: int = 0  # consecutive connect failures / abnormal losses
    passive_kinds: set[str] = field(default_factory=set)  # "connect", "loss" among those
    ejected_until: float = 0.0
    ejections: int = 0  # ejection multiplier (decays while the node behaves)
    panic: bool = False  # passive threshold reached but not ejected: last available node
    last_failure: str | None = None

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def available(self, now: float) -> bool:
        """Healthy and not ejected; draining is checked by the caller."""
        return self.healthy and not self.ejected(now)

    def state(self, now: float, draining: bool = False) -> str:
        """One of draining > unhealthy > ejected > healthy (first that applies)."""
        if draining:
            return DRAINING
        if not self.healthy:
            return UNHEALTHY
        if self.ejected(now):
            return EJECTED
        return HEALTHY

    def snapshot(self, now: float, draining: bool = False) -> dict[str, Any]:
        """The node's part of ``/readyz`` (JSON-ready)."""
        return {
            "state": self.state(now, draining),
            "last_failure": self.last_failure,
            "ejected_for": round(max(0.0, self.ejected_until - now), 3),
            "ejections": self.ejections,
        }

    def check_passed(self, healthy_threshold: int) -> bool:
        """Record a passed active check; True when the node has just become healthy."""
        self.check_failures = 0
        self.check_successes += 1
        if not self.healthy and self.check_successes >= healthy_threshold:
            self.healthy = True
            # Active checks vouch for it again: any passive ejection ends too
            # (Envoy's successful_active_health_check_uneject_host).
            self.ejected_until = 0.0
            self.passive_failures = 0
            self.passive_kinds.clear()
            return True
        return False

    def check_failed(self, reason: str, unhealthy_threshold: int) -> bool:
        """Record a failed active check; True when the node has just become unhealthy."""
        self.check_successes = 0
        self.check_failures += 1
        self.last_failure = reason
        if self.healthy and self.check_failures >= unhealthy_threshold:
            self.healthy = False
            return True
        return False



class _Routable(Protocol):
    @property
    def draining(self) -> bool: ...

    @property
    def health(self) -> NodeHealth: ...


R = TypeVar("R", bound=_Routable)


def eligible_nodes(nodes: Sequence[R], now: float) -> list[R]:
    """
    The nodes a new connection may go to, in their order: not draining and
    available. If none is, but some non-draining node passes its active checks
    and is only ejected, those (panic mode: passive ejection never empties an
    upstream). Empty when every node is unhealthy or draining: answer 503.
    """
    serving = [n for n in nodes if not n.draining]
    usable = [n for n in serving if n.health.available(now)]
    return usable or [n for n in serving if n.health.healthy]


# -- passive ejection -------------------------------------------------------


class OutlierDetector:
    """
    Passive ejection for one upstream.

    Caller contract (the upstream connect path and the relay):
      - L{connect_failed} for an attempt that did not open: refused, reset,
        timed out, TLS failure, handshake broken, or the upstream answered
        the upgrade with a 5xx. A 4xx answer is the upstream's verdict on
        that request, not on its health: call L{succeeded}.
      - L{succeeded} when an upstream leg opened (resets the count).
      - L{connection_closed} with the close code when an open upstream leg
        ends (C{None} when it vanished without a close frame): only abnormal
        codes (L{ABNORMAL_CLOSES}) count, through L{connection_lost}.
    C{pool()} gives the NodeHealth of the upstream's nodes that take new
    connections apart from health (i.e. not draining); a node is only
    ejected while another node in it stays available.
    """

    log = Logger()

    def __init__(
        self,
        now: Callable[[], float],
        pool: Callable[[], Iterable[NodeHealth]],
        *,
        upstream: str = "",
        consecutive: int = 5,
        base_ejection: float = 30.0,
        max_ejection: float = 300.0,
    ) -> None:
        self._now = now
        self._pool = pool
        self.upstream = upstream
        self.consecutive = consecutive
        self.base_ejection = base_ejection
        self.max_ejection = max_ejection

    def connect_failed(self, h: NodeHealth, reason: str) -> bool:
        """True when this failure ejected the node."""
        return self._failure(h, "connect", "connect failed: ", reason)

    def connection_lost(self, h: NodeHealth, reason: str = "connection lost without a close frame") -> bool:
        return self._failure(h, "loss", "", reason)

    def connection_closed(self, h: NodeHealth, code: int | None) -> bool:
        if not is_abnormal_close(code):
            return False
        return self.connection_lost(h)

    def succeeded(self, h: NodeHealth) -> None:
        h.passive_failures = 0
        h.passive_kinds.clear()
        h.panic = False

    def _failure(self, h: NodeHealth, kind: str, label: str, reason: str) -> bool:
        now = self._now()
        if h.ejected(now):
            return False  # already out; keep the reason it was ejected for
        h.passive_failures += 1
        h.passive_kinds.add(kind)
        h.last_failure = f"passive: {label}{reason}"
        if h.passive_failures < self.consecutive:
            return False
        kinds = h.passive_kinds
        what = "connect failures" if kinds == {"connect"} else "connection losses" if kinds == {"loss"} else "failures"
        summary = f"passive: {h.passive_failures} consecutive {what} (last: {reason})"
        if not any(o is not h and o.available(now) for o in self._pool()):
            h.last_failure = summary + "; not ejected: last available node"
            if not h.panic:
                h.panic = True
                self.log.warn(
                    "upstream {upstream} node {node}: {summary}; not ejected, it is the last available node "
                    "(panic mode)", upstream=self.upstream, node=h.name, summary=summary)
            return False
        if h.ejections and h.ejected_until:
            # Envoy-like decay: each base period the node behaved takes one step off the multiplier.
            h.ejections = max(0, h.ejections - int((now - h.ejected_until) // self.base_ejection))
        h.ejections += 1
        period = min(self.base_ejection * h.ejections, self.max_ejection)
        h.ejected_until = now + period
        h.passive_failures = 0
        h.passive_kinds.clear()
        h.panic = False
        h.last_failure = summary
        self.log.warn(
            "upstream {upstream} node {node} ejected for {period:.0f}s (ejection {ejections}): {summary}",
            upstream=self.upstream, node=h.name, period=period, ejections=h.ejections, summary=summary)
        return True

