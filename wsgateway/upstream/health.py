# -*- test-case-name: tests.test_health -*-
"""
Node health: active checks and passive ejection (docs/configuration.md
``health_*`` keys, section 2's 503, section 6's ``/readyz`` node states).

- L{NodeHealth}: the pure state of one node (``node.health``).
- L{OutlierDetector}: passive ejection, the way Envoy's outlier detection
  does it: C{consecutive} connect failures or abnormal losses eject a node for
  C{base_ejection * ejections} seconds (capped), never the last available one.
- L{HealthChecker}: a Service probing every node of one upstream, jittered.
- L{make_probe}: the C{tcp}, C{http:/path} and C{ws:/path} probes.
- L{eligible_nodes}: which nodes a new connection may go to.

Time is always injected: C{now} floats, a C{Callable[[], float]} or an
C{IReactorTime}; ejections end lazily when C{now} passes C{ejected_until}.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol as TypingProtocol, TypeVar

from twisted.application.service import Service
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgateway.config.loader import NodeConfig, UpstreamConfig

__all__ = [
    "HEALTHY", "UNHEALTHY", "EJECTED", "DRAINING", "NodeHealth", "OutlierDetector", "HealthChecker",
    "ProbeFailed", "make_probe", "eligible_nodes", "is_abnormal_close", "ABNORMAL_CLOSES", "describe_error",
]

HEALTHY, UNHEALTHY, EJECTED, DRAINING = "healthy", "unhealthy", "ejected", "draining"

# Close codes of an upstream connection that count as a passive failure: the
# connection vanished without a close frame (the client then gets 1014).
# 1000, 1001, 1012, 1011 and application codes (3000-4999) are the upstream's
# own decision and never count.
ABNORMAL_CLOSES = frozenset({None, 1006})


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


class _Checked(TypingProtocol):
    """What the checker needs of a node (``upstream.Node`` once it has ``health``)."""

    @property
    def url(self) -> str: ...

    @property
    def config(self) -> NodeConfig: ...

    @property
    def health(self) -> NodeHealth: ...


class _Routable(TypingProtocol):
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


# -- active checks ----------------------------------------------------------


class ProbeFailed(Exception):
    """A probe's answer said unhealthy; C{str()} is the short reason, e.g. C{http: status 503}."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
        return f"{self.kind}: {describe_error(f.value)}"


def _timed_out(result: object, timeout: float) -> None:
    # Whatever the cancelled probe ended with (CancelledError, an endpoint's
    # ConnectingCancelledError...), our own timer fired: it is a timeout.
    raise TimeoutError(timeout, "health probe")


# -- probes -----------------------------------------------------------------


def describe_error(e: BaseException) -> str:
    """A short, log-safe reason for a connection error."""
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, (error.TimeoutError, error.TCPTimedOutError)):
        return "connect timed out"
    if isinstance(e, error.DNSLookupError):
        return "DNS lookup failed"
    if isinstance(e, error.NoRouteError):
        return "no route to host"
    if isinstance(e, (error.ConnectionDone, error.ConnectionLost)):
        return "connection closed"
    if type(e).__module__.startswith("OpenSSL"):
        # OpenSSL's own fixed reasons, e.g. "certificate verify failed"
        reasons = [str(a[-1]) for a in (e.args[0] if e.args and isinstance(e.args[0], list) else [])
                   if isinstance(a, tuple) and a]
        return "TLS handshake failed" + (f": {', '.join(reasons)}" if reasons else "")
    if type(e).__module__.startswith("service_identity"):
        return "TLS handshake failed: the certificate does not match the host name"
    status = getattr(e, "status", None)
    if isinstance(status, int):  # upstream.UpstreamRefused, duck-typed (no import cycle)
        return f"handshake refused: status {status}"
    text = str(e) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _cancelled(e: BaseException) -> bool:
    return isinstance(e, (CancelledError, error.ConnectingCancelledError))


class _StatusLine(Protocol):
    """Sends one request, fires C{status} with the status code of the answer, then closes."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._buffer = b""
        self.status: Deferred[int] = Deferred(self._abort)

    def _abort(self, _: Deferred[int]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self.status.called:
            return
        self._buffer += data
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > 8192:
                self._done(ProbeFailed("http: bad status line"))
            return
        parts = self._buffer[:end].rstrip(b"\r").split(None, 2)
        if len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and len(parts[1]) == 3 and parts[1].isdigit():
            self._done(int(parts[1]))
        else:
            self._done(ProbeFailed("http: bad status line"))

    def _done(self, result: int | Exception) -> None:
        self.transport.loseConnection()
        if isinstance(result, Exception):
            self.status.errback(result)
        else:
            self.status.callback(result)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.status.called:
            e = reason.value if reason is not None else None
            text = ("connection closed before the status line"
                    if e is None or isinstance(e, (error.ConnectionDone, error.ConnectionLost))
                    else describe_error(e))
            self.status.errback(ProbeFailed(f"http: {text}"))


class _Once(Factory):
    """Hands out one prepared protocol."""

    noisy = False

    def __init__(self, proto: Protocol) -> None:
        self._proto = proto

    def buildProtocol(self, addr: Any) -> Protocol:
        self._proto.factory = self
        return self._proto


def _host_header(cfg: NodeConfig) -> str:
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return f"{host}:{cfg.port}"


# A masked client Close frame with code 1000 (RFC 6455 5.5.1), so an
# upstream sees a normal close after a ws probe rather than a 1006.
def _close_frame() -> bytes:
    mask = os.urandom(4)
    payload = (1000).to_bytes(2, "big")
    return b"\x88\x82" + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def make_probe(
    kind: str,
    *,
    endpoints: Callable[[Any, float], IStreamClientEndpoint],
    ws_connect: Callable[[Any, str, float], Deferred[Any]] | None = None,
    timeout: float,
) -> Callable[[Any], Deferred[None]]:
    """
    The probe for a C{health_check} value: C{tcp}, C{http:/path} or
    C{ws:/path}. Each probe fires None when healthy and fails with
    L{ProbeFailed} (reason prefixed with the kind) otherwise; cancelling it
    aborts its connection. C{endpoints(node, timeout)} gives the node's client
    endpoint (TLS included for wss nodes); C{ws_connect(node, path, timeout)}
    opens a WebSocket leg and fires with its protocol. The path is used as
    written, not joined to the node URL's path.
    """
    name, _, path = kind.partition(":")

    async def connect(node: Any, proto: Protocol) -> None:
        try:
            await endpoints(node, timeout).connect(_Once(proto))
        except Exception as e:
            if _cancelled(e):
                raise CancelledError() from None
            raise ProbeFailed(f"{name}: {describe_error(e)}") from None

    async def tcp(node: Any) -> None:
        proto = Protocol()
        await connect(node, proto)
        proto.transport.loseConnection()

    async def http(node: Any) -> None:
        request = (f"GET {path} HTTP/1.1\r\nHost: {_host_header(node.config)}\r\n"
                   "User-Agent: wsgateway-health\r\nAccept: */*\r\nConnection: close\r\n\r\n").encode("ascii")
        proto = _StatusLine(request)
        await connect(node, proto)
        status = await proto.status
        if not 200 <= status < 300:
            raise ProbeFailed(f"http: status {status}")

    async def ws(node: Any) -> None:
        assert ws_connect is not None
        try:
            proto = await ws_connect(node, path, timeout)
        except Exception as e:
            if _cancelled(e):
                raise CancelledError() from None
            raise ProbeFailed(f"ws: {describe_error(e)}") from None
        transport = getattr(proto, "transport", None)
        if transport is not None:
            transport.write(_close_frame())
            transport.loseConnection()

    probes = {"tcp": tcp, "http": http, "ws": ws}
    wants_path = name in ("http", "ws")
    if name not in probes or (path.startswith("/") if wants_path else bool(path)) is not wants_path:
        raise ValueError(f"not a health check: {kind!r}")
    if name == "ws" and ws_connect is None:
        raise ValueError("ws health checks need ws_connect")
    run = probes[name]
    return lambda node: Deferred.fromCoroutine(run(node))
