"""
Node health: pure state and passive ejection (no clock at all), the active
checker on a L{task.Clock} with probes the tests fire, and the real probes
against loopback servers on the real reactor.
"""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import error, reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from wsgateway.config.upstreams import NodeConfig, UpstreamConfig
from wsgateway.upstream.checker import HealthChecker
from wsgateway.upstream.health import NodeHealth, OutlierDetector, eligible_nodes, is_abnormal_close
from wsgateway.upstream.probes import ProbeFailed, make_probe
from support.waiting import wait_for_async

# -- helpers ------------------------------------------------------------------


def node_config(port: int) -> NodeConfig:
    return NodeConfig(url=f"ws://127.0.0.1:{port}", scheme="ws", host="127.0.0.1", port=port, path="")


def upstream_config(ports=(9001, 9002), **kw: Any) -> UpstreamConfig:
    base = UpstreamConfig(name="u", nodes=tuple(node_config(p) for p in ports), health_check="tcp",
                          health_interval=10.0, health_timeout=2.0, healthy_threshold=2, unhealthy_threshold=3)
    return replace(base, **kw)


@dataclass(eq=False)
class FakeNode:
    """What upstream.Node will look like with ``health`` composed in."""

    config: NodeConfig
    draining: bool = False
    health: NodeHealth = field(default_factory=NodeHealth)

    def __post_init__(self) -> None:
        self.health.name = self.config.url

    @property
    def url(self) -> str:
        return self.config.url


def nodes_for(cfg: UpstreamConfig) -> list[FakeNode]:
    return [FakeNode(n) for n in cfg.nodes]


class Probes:
    """Records each probe (node, time, Deferred); the test fires them. ``auto`` answers at once."""

    def __init__(self, clock: Clock, auto: bool = False) -> None:
        self.clock = clock
        self.auto = auto
        self.calls: list[tuple[FakeNode, float, Deferred[None]]] = []
        self.cancelled: list[FakeNode] = []

    def __call__(self, node: FakeNode) -> Deferred[None]:
        if self.auto:
            self.calls.append((node, self.clock.seconds(), succeed(None)))
            return succeed(None)
        d: Deferred[None] = Deferred(lambda _: self.cancelled.append(node))
        self.calls.append((node, self.clock.seconds(), d))
        return d

    def times(self, node: FakeNode) -> list[float]:
        return [t for n, t, _ in self.calls if n is node]

    def last(self, node: FakeNode) -> Deferred[None]:
        return [d for n, _, d in self.calls if n is node][-1]


def run_until(clock: Clock, end: float) -> None:
    """Advance to each delayed call's own time, so callees see the time they were scheduled for."""
    while True:
        pending = [c.getTime() for c in clock.getDelayedCalls()]
        if not pending or min(pending) > end:
            break
        clock.advance(max(0.0, min(pending) - clock.seconds()))
    if end > clock.seconds():
        clock.advance(end - clock.seconds())


def checker(cfg: UpstreamConfig, nodes: list[FakeNode], clock: Clock, probe: Any, **kw: Any) -> HealthChecker:
    return HealthChecker(cfg, nodes, clock, probe, rng=random.Random(7), **kw)


def step(clock: Clock, probes: Probes, node: FakeNode, result: Exception | None = None) -> None:
    """Advance to the node's next probe and answer it."""
    before = len(probes.times(node))
    while len(probes.times(node)) == before:
        nxt = min(c.getTime() for c in clock.getDelayedCalls())
        clock.advance(nxt - clock.seconds())
    d = probes.last(node)
    if result is None:
        d.callback(None)
    else:
        d.errback(result)


@pytest.fixture
def events() -> Any:
    captured: list[dict[str, Any]] = []
    observer = captured.append
    globalLogPublisher.addObserver(observer)
    yield captured
    globalLogPublisher.removeObserver(observer)


def logged(events: list[dict[str, Any]], level: LogLevel) -> list[dict[str, Any]]:
    return [e for e in events
            if e.get("log_level") == level and e.get("log_namespace", "").startswith(("wsgateway.upstream.health", "wsgateway.upstream.checker"))]


# -- NodeHealth -----------------------------------------------------------------


def test_fresh_node_is_healthy_and_available() -> None:
    h = NodeHealth("ws://n")
    assert h.healthy and h.available(0.0) and h.state(0.0) == "healthy"
    assert h.last_failure is None
    assert h.snapshot(0.0) == {"state": "healthy", "last_failure": None, "ejected_for": 0.0, "ejections": 0}


def test_state_strings_and_precedence() -> None:
    h = NodeHealth("ws://n", ejected_until=100.0)
    assert h.state(50.0) == "ejected" and not h.available(50.0)
    assert h.snapshot(50.0)["ejected_for"] == 50.0
    assert h.state(100.0) == "healthy" and h.available(100.0)  # ejection ends by time alone
    assert h.state(50.0, draining=True) == "draining"
    h.healthy = False
    assert h.state(50.0) == "unhealthy"  # unhealthy outranks ejected
    assert h.state(200.0) == "unhealthy" and not h.available(200.0)
    assert h.state(200.0, draining=True) == "draining"  # draining outranks everything


def test_thresholds_on_node_health() -> None:
    h = NodeHealth()
    assert not h.check_failed("tcp: connection refused", 3)
    assert not h.check_failed("tcp: connection refused", 3)
    assert h.healthy and h.last_failure == "tcp: connection refused"
    assert h.check_failed("tcp: connect timed out", 3)
    assert not h.healthy and h.last_failure == "tcp: connect timed out"
    assert not h.check_failed("tcp: connect timed out", 3)  # a change is reported once
    assert not h.check_passed(2)
    assert h.check_passed(2) and h.healthy
    assert not h.check_passed(2)


# -- eligible_nodes ---------------------------------------------------------------


def test_eligible_nodes_skips_draining_unhealthy_and_ejected() -> None:
    a, b, c, d = (FakeNode(node_config(p)) for p in (1, 2, 3, 4))
    b.draining = True
    c.health.healthy = False
    d.health.ejected_until = 10.0
    assert eligible_nodes([a, b, c, d], 5.0) == [a]
    assert eligible_nodes([a, b, c, d], 10.0) == [a, d]


def test_eligible_nodes_panics_to_ejected_but_not_to_unhealthy_or_draining() -> None:
    a, b, c = (FakeNode(node_config(p)) for p in (1, 2, 3))
    a.health.ejected_until = 10.0  # passively ejected, active checks fine
    b.health.healthy = False
    c.draining = True
    assert eligible_nodes([a, b, c], 5.0) == [a]  # panic mode: use the ejected one
    a.health.healthy = False
    assert eligible_nodes([a, b, c], 5.0) == []  # every node unhealthy: 503


# -- OutlierDetector ------------------------------------------------------------------


class Now:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def detector(n: int = 3, **kw: Any) -> tuple[OutlierDetector, list[NodeHealth], Now]:
    now = Now()
    pool = [NodeHealth(f"ws://n{i}") for i in range(n)]
    return OutlierDetector(now, lambda: pool, upstream="u", **kw), pool, now


def test_ejected_after_consecutive_connect_failures(events: list[dict[str, Any]]) -> None:
    det, (a, *_), now = detector()
    now.t = 1000.0
    for _ in range(4):
        assert not det.connect_failed(a, "connection refused")
    assert a.available(now.t) and a.last_failure == "passive: connect failed: connection refused"
    assert det.connect_failed(a, "connection refused")
    assert a.state(now.t) == "ejected" and not a.available(now.t)
    assert a.ejected_until == 1030.0 and a.ejections == 1
    assert a.last_failure == "passive: 5 consecutive connect failures (last: connection refused)"
    assert a.healthy  # passive ejection does not touch the active-check state
    [warn] = logged(events, LogLevel.warn)
    assert warn["node"] == "ws://n0" and warn["period"] == 30.0


def test_ejection_expires_by_time() -> None:
    det, (a, *_), now = detector()
    for _ in range(5):
        det.connect_failed(a, "connection refused")
    now.t = 29.9
    assert a.state(now.t) == "ejected"
    now.t = 30.0
    assert a.state(now.t) == "healthy" and a.available(now.t)


def test_ejection_period_grows_and_is_capped() -> None:
    det, (a, *_), now = detector(base_ejection=30.0, max_ejection=300.0)
    periods = []
    for _ in range(12):
        for _ in range(5):
            det.connect_failed(a, "connection refused")
        periods.append(a.ejected_until - now.t)
        now.t = a.ejected_until  # fails again the moment it is back
    assert periods == [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300]


def test_ejection_multiplier_decays_while_the_node_behaves() -> None:
    det, (a, *_), now = detector()
    for _ in range(2):
        for _ in range(5):
            det.connect_failed(a, "connection refused")
        now.t = a.ejected_until
    assert a.ejections == 2  # 30 s then 60 s
    now.t += 45.0  # one base period of good behaviour
    for _ in range(5):
        det.connect_failed(a, "connection refused")
    assert a.ejected_until - now.t == 60.0  # multiplier 2 -> 1 -> 2, not 3
    now.t = a.ejected_until + 3600.0
    for _ in range(5):
        det.connect_failed(a, "connection refused")
    assert a.ejected_until - now.t == 30.0


def test_success_resets_the_consecutive_count() -> None:
    det, (a, *_), now = detector()
    for _ in range(4):
        det.connect_failed(a, "connection refused")
    det.succeeded(a)
    for _ in range(4):
        assert not det.connect_failed(a, "connection refused")
    assert a.available(now.t) and a.ejections == 0


def test_never_ejects_the_last_available_node(events: list[dict[str, Any]]) -> None:
    det, (a, b), now = detector(n=2)
    for _ in range(5):
        det.connect_failed(a, "connection refused")
    assert a.state(now.t) == "ejected"
    for _ in range(9):
        assert not det.connect_failed(b, "connection refused")
    assert b.available(now.t)  # panic mode: it stays in
    assert b.last_failure == ("passive: 9 consecutive connect failures (last: connection refused); "
                              "not ejected: last available node")
    panic = [e for e in logged(events, LogLevel.warn) if "panic" in e["log_format"]]
    assert len(panic) == 1  # logged once, not on every failure
    now.t = 30.0  # a is back: b's next failure ejects it
    assert det.connect_failed(b, "connection refused")
    assert b.state(now.t) == "ejected" and a.available(now.t)


def test_single_node_upstream_is_never_ejected() -> None:
    det, (a,), now = detector(n=1)
    for _ in range(50):
        assert not det.connect_failed(a, "connection refused")
    assert a.available(now.t) and a.ejections == 0


def test_draining_nodes_do_not_count_as_available_for_ejection() -> None:
    now = Now()
    a, b = FakeNode(node_config(1)), FakeNode(node_config(2))
    b.draining = True
    det = OutlierDetector(now, lambda: [n.health for n in (a, b) if not n.draining])
    for _ in range(5):
        assert not det.connect_failed(a.health, "connection refused")
    b.draining = False
    assert det.connect_failed(a.health, "connection refused")


@pytest.mark.parametrize("code", [1000, 1001, 1011, 1012, 3000, 4000, 4999])
def test_normal_and_application_closes_are_not_failures(code: int) -> None:
    det, (a, *_), now = detector()
    assert not is_abnormal_close(code)
    for _ in range(10):
        assert not det.connection_closed(a, code)
    assert a.passive_failures == 0 and a.last_failure is None and a.available(now.t)


def test_abnormal_losses_eject() -> None:
    det, (a, b, _), now = detector()
    assert is_abnormal_close(None) and is_abnormal_close(1006)
    for code in (None, 1006, None, 1006):
        assert not det.connection_closed(a, code)
    assert a.last_failure == "passive: connection lost without a close frame"
    assert det.connection_closed(a, None)
    assert a.last_failure == ("passive: 5 consecutive connection losses "
                              "(last: connection lost without a close frame)")
    for _ in range(4):
        det.connect_failed(b, "connection refused")
    assert det.connection_lost(b)
    assert b.last_failure.startswith("passive: 5 consecutive failures ")


def test_failures_while_ejected_are_ignored() -> None:
    det, (a, *_), now = detector()
    for _ in range(5):
        det.connect_failed(a, "connection refused")
    reason = a.last_failure
    for _ in range(10):
        assert not det.connection_lost(a)  # open connections on it may still end
    assert a.ejected_until == 30.0 and a.last_failure == reason and a.passive_failures == 0


def test_active_recovery_ends_a_passive_ejection() -> None:
    det, (a, *_), now = detector()
    for _ in range(5):
        det.connect_failed(a, "connection refused")
    a.check_failed("tcp: connection refused", 1)
    assert a.state(now.t) == "unhealthy"
    a.check_passed(1)
    assert a.state(now.t) == "healthy" and a.available(now.t)


# -- HealthChecker on a fake clock ------------------------------------------------------


def test_unhealthy_after_threshold_then_recovers(events: list[dict[str, Any]]) -> None:
    cfg = upstream_config(health_timeout=1000.0)  # the other node's probe just waits
    nodes = nodes_for(cfg)
    a = nodes[0]
    clock = Clock()
    probes = Probes(clock)
    changes: list[tuple[str, bool]] = []
    hc = checker(cfg, nodes, clock, probes, on_change=lambda n, ok: changes.append((n.url, ok)))
    hc.startService()
    step(clock, probes, a, ProbeFailed("tcp: connection refused"))
    step(clock, probes, a, ProbeFailed("tcp: connection refused"))
    assert a.health.healthy and changes == []
    step(clock, probes, a, ProbeFailed("tcp: connection refused"))
    assert not a.health.healthy and a.health.state(clock.seconds()) == "unhealthy"
    assert a.health.last_failure == "tcp: connection refused"
    assert changes == [(a.url, False)]
    [warn] = logged(events, LogLevel.warn)
    assert warn["reason"] == "tcp: connection refused" and warn["node"] == a.url
    step(clock, probes, a)
    step(clock, probes, a, ProbeFailed("tcp: connection refused"))  # breaks the run of successes
    step(clock, probes, a)
    assert not a.health.healthy
    step(clock, probes, a)
    assert a.health.healthy and changes == [(a.url, False), (a.url, True)]
    [info] = [e for e in logged(events, LogLevel.info) if "healthy again" in e["log_format"]]
    assert info["node"] == a.url
    hc.stopService()
    assert clock.getDelayedCalls() == []


def test_a_success_resets_the_failure_run() -> None:
    cfg = upstream_config(health_timeout=1000.0)
    nodes = nodes_for(cfg)
    clock = Clock()
    probes = Probes(clock)
    hc = checker(cfg, nodes, clock, probes)
    hc.startService()
    for result in (ProbeFailed("x"), ProbeFailed("x"), None, ProbeFailed("x"), ProbeFailed("x"), None):
        step(clock, probes, nodes[0], result)
    assert nodes[0].health.healthy
    hc.stopService()


def test_every_node_unhealthy_is_logged_as_an_error(events: list[dict[str, Any]]) -> None:
    cfg = upstream_config(unhealthy_threshold=1, health_timeout=1000.0)
    nodes = nodes_for(cfg)
    clock = Clock()
    probes = Probes(clock)
    hc = checker(cfg, nodes, clock, probes)
    hc.startService()
    step(clock, probes, nodes[0], ProbeFailed("tcp: connection refused"))
    assert logged(events, LogLevel.error) == []
    step(clock, probes, nodes[1], ProbeFailed("tcp: connection refused"))
    assert len(logged(events, LogLevel.error)) == 1
    assert eligible_nodes(nodes, clock.seconds()) == []
    hc.stopService()


def test_first_probes_are_spread_over_one_interval() -> None:
    cfg = upstream_config(ports=range(9000, 9020))
    nodes = nodes_for(cfg)
    clock = Clock()
    probes = Probes(clock, auto=True)
    hc = checker(cfg, nodes, clock, probes)
    hc.startService()
    run_until(clock, cfg.health_interval - 1e-9)
    firsts = [probes.times(n)[0] for n in nodes if probes.times(n)]
    assert len(firsts) == len(nodes)  # every node probed within the first interval
    assert len(set(firsts)) == len(nodes)
    assert max(firsts) - min(firsts) > cfg.health_interval / 2
    hc.stopService()


def test_nodes_are_never_probed_in_lock_step() -> None:
    cfg = upstream_config()
    nodes = nodes_for(cfg)
    clock = Clock()
    probes = Probes(clock, auto=True)
    hc = checker(cfg, nodes, clock, probes)
    hc.startService()
    run_until(clock, 50 * cfg.health_interval)
    ta, tb = probes.times(nodes[0]), probes.times(nodes[1])
    assert len(ta) > 40 and len(tb) > 40
    assert not set(ta) & set(tb)
    for times in (ta, tb):
        gaps = [y - x for x, y in zip(times, times[1:])]
        assert all(0.9 * cfg.health_interval - 1e-9 <= g <= 1.1 * cfg.health_interval + 1e-9 for g in gaps)
        assert len({round(g, 6) for g in gaps}) > 10  # jittered, not a fixed period
    hc.stopService()
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("kind, reason", [
    ("tcp", "tcp: connect timed out"),
    ("http:/health", "http: timed out"),
    ("ws:/health", "ws: handshake timed out"),
])
def test_a_probe_past_health_timeout_is_cancelled_and_fails(kind: str, reason: str) -> None:
    cfg = upstream_config(ports=(9001,), health_check=kind, unhealthy_threshold=1)
    nodes = nodes_for(cfg)
    a = nodes[0]
    clock = Clock()
    probes = Probes(clock)
    hc = checker(cfg, nodes, clock, probes)
    hc.startService()
    before = len(probes.times(a))
    while len(probes.times(a)) == before:
        clock.advance(0.01)
    started = clock.seconds()
    clock.advance(cfg.health_timeout - 0.01)
    assert probes.cancelled == [] and a.health.healthy
    clock.advance(0.02)
    assert probes.cancelled == [a]
    assert not a.health.healthy and a.health.last_failure == reason
    run_until(clock, started + cfg.health_timeout + 1.1 * cfg.health_interval)
    assert len(probes.times(a)) == before + 2  # probing goes on after a timeout
    hc.stopService()


def test_probe_errors_become_reasons() -> None:
    cfg = upstream_config(unhealthy_threshold=1)
    nodes = nodes_for(cfg)
    clock = Clock()
    calls = []

    def probe(node: FakeNode) -> Deferred[None]:
        calls.append(node)
        if node is nodes[0]:
            raise RuntimeError("probe is broken")  # raising instead of returning a Deferred
        return Deferred.fromCoroutine(_refused())

    async def _refused() -> None:
        raise error.ConnectionRefusedError()

    hc = checker(cfg, nodes, clock, probe)
    hc.startService()
    run_until(clock, cfg.health_interval)
    assert set(calls) == set(nodes)
    assert nodes[0].health.last_failure == "tcp: probe is broken"
    assert nodes[1].health.last_failure == "tcp: connection refused"
    hc.stopService()


def test_stop_service_cancels_timers_and_probes_in_flight() -> None:
    cfg = upstream_config(ports=range(9000, 9006), health_timeout=1000.0)
    nodes = nodes_for(cfg)
    clock = Clock()
    probes = Probes(clock)
    hc = checker(cfg, nodes, clock, probes)
    hc.startService()
    run_until(clock, cfg.health_interval / 2)
    in_flight = [n for n, _, d in probes.calls if not d.called]
    assert in_flight and len(in_flight) < len(nodes)  # some probing, some still waiting
    assert clock.getDelayedCalls()
    hc.stopService()
    assert clock.getDelayedCalls() == []
    assert sorted(n.url for n in probes.cancelled) == sorted(n.url for n in in_flight)
    assert all(n.health.healthy and n.health.check_failures == 0 for n in nodes)  # a cancel is not a failure
    clock.advance(10 * cfg.health_interval)
    assert len(probes.calls) == len(in_flight)


def test_health_check_none_probes_nothing() -> None:
    cfg = upstream_config(health_check="none")
    clock = Clock()
    probes = Probes(clock)
    hc = checker(cfg, nodes_for(cfg), clock, probes)
    hc.startService()
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert probes.calls == []
    hc.stopService()


def test_make_probe_rejects_bad_kinds() -> None:
    for kind in ("none", "http", "ws:health", "tcp:/x", "udp"):
        with pytest.raises(ValueError):
            make_probe(kind, endpoints=lambda n, t: None, ws_connect=lambda *a: None, timeout=1.0)
    with pytest.raises(ValueError):
        make_probe("ws:/health", endpoints=lambda n, t: None, ws_connect=None, timeout=1.0)


# -- real probes on loopback (real reactor) ---------------------------------------------


def endpoints(node: Any, timeout: float) -> TCP4ClientEndpoint:
    return TCP4ClientEndpoint(reactor, node.config.host, node.config.port, timeout=timeout)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listen(factory: Factory) -> Any:
    return reactor.listenTCP(0, factory, interface="127.0.0.1")


async def failure_of(d: Deferred[None]) -> ProbeFailed:
    try:
        await d
    except ProbeFailed as e:
        return e
    raise AssertionError("the probe succeeded")


class Recorder(Protocol):
    def __init__(self, seen: list[str], reply: bytes = b"") -> None:
        self.seen = seen
        self.reply = reply

    def connectionMade(self) -> None:
        self.seen.append("open")
        if self.reply:
            self.transport.write(self.reply)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.seen.append("lost")


def recording_factory(seen: list[str], reply: bytes = b"") -> Factory:
    f = Factory.forProtocol(lambda: Recorder(seen, reply))  # type: ignore[arg-type, misc]
    f.noisy = False
    return f


@pytest_twisted.ensureDeferred
async def test_tcp_probe_against_a_listening_port() -> None:
    seen: list[str] = []
    port = listen(recording_factory(seen))
    try:
        probe = make_probe("tcp", endpoints=endpoints, timeout=2.0)
        assert await probe(FakeNode(node_config(port.getHost().port))) is None
        await wait_for_async(lambda: seen == ["open", "lost"])  # the probe closed its connection
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_tcp_probe_against_a_closed_port() -> None:
    probe = make_probe("tcp", endpoints=endpoints, timeout=2.0)
    e = await failure_of(probe(FakeNode(node_config(closed_port()))))
    assert str(e) == "tcp: connection refused"


class Health(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[bytes, bytes | None, bytes | None]] = []

    def render_GET(self, request: Any) -> bytes:
        self.requests.append((request.uri, request.getHeader(b"host"), request.getHeader(b"connection")))
        if request.uri != b"/health":
            request.setResponseCode(503)
            return b"down\n"
        return b"ok\n"


@pytest.fixture
def http_server() -> Any:
    resource = Health()
    site = Site(resource)
    site.noisy = False
    port = listen(site)
    yield resource, port.getHost().port
    port.stopListening()


@pytest_twisted.ensureDeferred
async def test_http_probe_2xx_is_healthy(http_server: Any) -> None:
    resource, port = http_server
    probe = make_probe("http:/health", endpoints=endpoints, timeout=2.0)
    assert await probe(FakeNode(node_config(port))) is None
    assert resource.requests == [(b"/health", f"127.0.0.1:{port}".encode(), b"close")]


@pytest_twisted.ensureDeferred
async def test_http_probe_503_fails_with_the_status(http_server: Any) -> None:
    resource, port = http_server
    probe = make_probe("http:/bad", endpoints=endpoints, timeout=2.0)
    e = await failure_of(probe(FakeNode(node_config(port))))
    assert str(e) == "http: status 503"
    assert resource.requests[0][0] == b"/bad"


@pytest.mark.parametrize("reply, reason", [
    (b"SSH-2.0-OpenSSH_9.6\r\n", "http: bad status line"),
    (b"HTTP/1.1 20", "http: connection closed before the status line"),
])
@pytest_twisted.ensureDeferred
async def test_http_probe_against_something_else(reply: bytes, reason: str) -> None:
    port = listen(recording_factory([], reply))
    try:
        probe = make_probe("http:/health", endpoints=endpoints, timeout=2.0)
        e = await failure_of(probe(FakeNode(node_config(port.getHost().port))))
        assert str(e) == reason
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_http_probe_against_a_closed_port() -> None:
    probe = make_probe("http:/health", endpoints=endpoints, timeout=2.0)
    e = await failure_of(probe(FakeNode(node_config(closed_port()))))
    assert str(e) == "http: connection refused"


def ws_connect_for() -> Any:
    """What the wiring passes: UpstreamConnector.connect with an UpstreamRequest for the path."""
    from wsgateway.upstream.leg import UpstreamConnector
    from wsgateway.upstream.pool import UpstreamRequest

    connector = UpstreamConnector(reactor, endpoints)
    return lambda node, path, timeout: connector.connect(node, UpstreamRequest(resource=path, headers={}), timeout)


@pytest_twisted.ensureDeferred
async def test_ws_probe_handshake_succeeds_and_closes_normally(make_upstream: Any) -> None:
    up = make_upstream()
    probe = make_probe("ws:/health", endpoints=endpoints, ws_connect=ws_connect_for(), timeout=2.0)
    assert await probe(FakeNode(node_config(up.port))) is None
    await wait_for_async(lambda: len(up.closes) == 1)
    assert [r.path for r in up.requests] == ["/health"]
    assert up.closes[0][0] == 1000  # a normal close, not 1006


@pytest_twisted.ensureDeferred
async def test_ws_probe_refused_handshake_fails(make_upstream: Any) -> None:
    up = make_upstream(process_request=lambda conn, req: conn.respond(403, "Forbidden\n"))
    probe = make_probe("ws:/health", endpoints=endpoints, ws_connect=ws_connect_for(), timeout=2.0)
    e = await failure_of(probe(FakeNode(node_config(up.port))))
    assert str(e) == "ws: handshake refused: status 403"
    assert [r.path for r in up.requests] == ["/health"]  # asked, refused: no connection opened
    assert up.connections == []


@pytest_twisted.ensureDeferred
async def test_ws_probe_against_a_closed_port() -> None:
    probe = make_probe("ws:/health", endpoints=endpoints, ws_connect=ws_connect_for(), timeout=2.0)
    e = await failure_of(probe(FakeNode(node_config(closed_port()))))
    assert str(e) == "ws: connection refused"


@pytest_twisted.ensureDeferred
async def test_checker_times_out_a_silent_server_and_drops_the_connection() -> None:
    seen: list[str] = []
    port = listen(recording_factory(seen))  # accepts, never answers
    cfg = upstream_config(ports=(port.getHost().port,), health_check="http:/health", health_interval=0.05,
                          health_timeout=0.2, unhealthy_threshold=1)
    nodes = nodes_for(cfg)
    probe = make_probe(cfg.health_check, endpoints=endpoints, timeout=cfg.health_timeout)
    hc = HealthChecker(cfg, nodes, reactor, probe)
    hc.startService()
    try:
        await wait_for_async(lambda: not nodes[0].health.healthy)
        assert nodes[0].health.last_failure == "http: timed out"
        await wait_for_async(lambda: "lost" in seen)  # the timed-out probe's connection was aborted
    finally:
        hc.stopService()
        await port.stopListening()
    assert [c for c in reactor.getDelayedCalls() if c.func == hc._run] == []
