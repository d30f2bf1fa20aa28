# -*- test-case-name: tests.unit.upstream.test_health -*-
"""
Active health checks: L{HealthChecker}, a Service probing every node of one
upstream on the injected clock, jittered; what one probe does is
L{wsgateway.upstream.probes}, what a node's state becomes is
L{wsgateway.upstream.health.NodeHealth}.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgateway.config.upstreams import UpstreamConfig
from wsgateway.upstream.errors import describe_failure
from wsgateway.upstream.probes import ProbeFailed

__all__ = ["HealthChecker"]


class _CheckedHealth(Protocol):
    """What the checker reads and records of a node's health (``health.NodeHealth``)."""

    healthy: bool
    check_successes: int
    check_failures: int

    def check_passed(self, healthy_threshold: int) -> bool: ...

    def check_failed(self, reason: str, unhealthy_threshold: int) -> bool: ...


class _Checked(Protocol):
    """What the checker needs of a node (``pool.Node``)."""

    @property
    def url(self) -> str: ...

    @property
    def health(self) -> _CheckedHealth: ...


_TIMEOUT_REASONS = {"tcp": "tcp: connect timed out", "http": "http: timed out", "ws": "ws: handshake timed out"}


@dataclass(eq=False)
class _Slot:
    node: _Checked
    call: IDelayedCall | None = None
    probe: Deferred[None] | None = None


class HealthChecker(Service):
    """
    Probes every node of one upstream. The first probe of each node comes
    at a random offset in [0, interval), each next one interval +-10% after
    the previous probe ended (probes of a node never overlap). Each probe is
    bounded by C{health_timeout}. Nothing runs when C{health_check = none}.
    C{on_change(node, healthy)} is called on each state change (metrics).
    """

    log = Logger()

    def __init__(
        self,
        config: UpstreamConfig,
        nodes: Sequence[_Checked],
        clock: IReactorTime,
        probe: Callable[[Any], Deferred[None]],
        rng: random.Random | None = None,
        on_change: Callable[[Any, bool], None] | None = None,
    ) -> None:
        self.config = config
        self.kind = config.health_check.partition(":")[0]
        self._slots = [_Slot(n) for n in nodes]
        self._clock = clock
        self._probe = probe
        self._rng = rng or random.Random()
        self._on_change = on_change

    def startService(self) -> None:
        super().startService()
        if self.kind == "none":
            return
        for slot in self._slots:
            self._schedule(slot, self._rng.random() * self.config.health_interval)

    def stopService(self) -> None:
        super().stopService()
        for slot in self._slots:
            call, slot.call = slot.call, None
            if call is not None and call.active():
                call.cancel()
            d, slot.probe = slot.probe, None
            if d is not None:
                d.cancel()

    def _schedule(self, slot: _Slot, delay: float) -> None:
        slot.call = self._clock.callLater(delay, self._run, slot)

    def _run(self, slot: _Slot) -> None:
        slot.call = None
        try:
            d = self._probe(slot.node)
        except Exception:
            d = fail()
        slot.probe = d
        d.addTimeout(self.config.health_timeout, self._clock, onTimeoutCancel=_timed_out)
        d.addCallbacks(self._passed, self._failed, callbackArgs=(slot,), errbackArgs=(slot,))
        d.addErrback(lambda f: self.log.failure("health check of {node} broke", f, node=slot.node.url))

    def _passed(self, _: object, slot: _Slot) -> None:
        slot.probe = None
        node = slot.node
        if node.health.check_passed(self.config.healthy_threshold):
            self.log.info("upstream {upstream} node {node} is healthy again after {count} passed {kind} checks",
                          upstream=self.config.name, node=node.url, count=node.health.check_successes,
                          kind=self.kind)
            self._changed(node, True)
        self._next(slot)

    def _failed(self, f: Failure, slot: _Slot) -> None:
        slot.probe = None
        if not self.running:
            return  # cancelled by stopService
        node = slot.node
        reason = self._reason(f)
        if node.health.check_failed(reason, self.config.unhealthy_threshold):
            self.log.warn("upstream {upstream} node {node} is unhealthy after {count} failed checks: {reason}",
                          upstream=self.config.name, node=node.url, count=node.health.check_failures,
                          reason=reason)
            self._changed(node, False)
            if not any(s.node.health.healthy for s in self._slots):
                self.log.error("upstream {upstream}: every node fails its health checks; new connections get 503",
                               upstream=self.config.name)
        else:
            self.log.debug("upstream {upstream} node {node} check failed: {reason}",
                           upstream=self.config.name, node=node.url, reason=reason)
        self._next(slot)

    def _next(self, slot: _Slot) -> None:
        if self.running:
            self._schedule(slot, self.config.health_interval * self._rng.uniform(0.9, 1.1))

    def _changed(self, node: Any, healthy: bool) -> None:
        if self._on_change is not None:
            self._on_change(node, healthy)

    def _reason(self, f: Failure) -> str:
        if f.check(TimeoutError):
            return _TIMEOUT_REASONS.get(self.kind, f"{self.kind}: timed out")
        if f.check(ProbeFailed):
            return str(f.value)
        return f"{self.kind}: {describe_failure(f)}"


def _timed_out(result: object, timeout: float) -> None:
    # Whatever the cancelled probe ended with (CancelledError, an endpoint's
    # ConnectingCancelledError...), our own timer fired: it is a timeout.
    raise TimeoutError(timeout, "health probe")

