"""Node order, retries with backoff, and the statuses they end in, on a fake clock."""

from __future__ import annotations

import random

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from wsgateway.upstream.balance import RoundRobin
from wsgateway.config.upstreams import NodeConfig, UpstreamConfig
from wsgateway.upstream.pool import Upstream, UpstreamError, UpstreamRefused, UpstreamRequest, backoff_delay


def node(port: int) -> NodeConfig:
    return NodeConfig(
        url=f"ws://127.0.0.1:{port}", scheme="ws", host="127.0.0.1", port=port, path="",
        weight=1, zone=None, version=None, labels={},
    )


def upstream_config(ports, retries=2) -> UpstreamConfig:
    return UpstreamConfig(
        name="u", nodes=tuple(node(p) for p in ports), balance="round_robin", zone=None, version_header=None,
        connect_timeout=3.0, retries=retries, backoff_initial=0.1, backoff_max=2.0, tls_ca=None, tls_cert=None,
        tls_key=None, health_check="none", health_interval=5.0, health_timeout=2.0, healthy_threshold=2,
        unhealthy_threshold=3, reconnect_buffer=1024 * 1024,
    )


REQ = UpstreamRequest(resource="/", headers={})


class Attempts:
    """Records attempts; each returns a Deferred the test fires."""

    def __init__(self):
        self.calls = []

    def __call__(self, node, req, timeout):
        d = Deferred(lambda d: self.cancelled.append(node.url))
        self.calls.append((node.url, d))
        return d

    cancelled: list = []


def run(coro):
    return Deferred.fromCoroutine(coro)


def test_round_robin_rotates():
    rr = RoundRobin()
    assert [rr.order([1, 2, 3])[0] for _ in range(6)] == [1, 2, 3, 1, 2, 3]
    assert rr.order([1, 2, 3]) == [1, 2, 3]
    assert rr.order([]) == []


def test_retry_goes_to_the_next_node_after_backoff():
    clock, attempts = Clock(), Attempts()
    up = Upstream(upstream_config([1, 2, 3]), clock, attempts, rng=random.Random(1))
    result = run(up.connect(REQ))
    assert [u for u, _ in attempts.calls] == ["ws://127.0.0.1:1"]
    attempts.calls[0][1].errback(Failure(ConnectionRefusedError()))
    assert len(attempts.calls) == 1  # waiting for the backoff
    clock.advance(0.1)  # attempt 1 backoff is at most backoff_initial
    assert [u for u, _ in attempts.calls] == ["ws://127.0.0.1:1", "ws://127.0.0.1:2"]
    attempts.calls[1][1].callback("leg")
    node, leg = result.result
    assert (node.url, leg) == ("ws://127.0.0.1:2", "leg")


def test_all_attempts_refused_is_502():
    clock, attempts = Clock(), Attempts()
    up = Upstream(upstream_config([1, 2], retries=2), clock, attempts)
    result = run(up.connect(REQ))
    for i in range(3):
        attempts.calls[i][1].errback(Failure(ConnectionRefusedError()))
        clock.advance(2)
    assert [u for u, _ in attempts.calls] == ["ws://127.0.0.1:1", "ws://127.0.0.1:2", "ws://127.0.0.1:1"]
    err = result.result.value
    result.addErrback(lambda f: None)
    assert isinstance(err, UpstreamError) and err.status == 502


def test_timeout_of_last_attempt_is_504():
    clock, attempts = Clock(), Attempts()
    up = Upstream(upstream_config([1], retries=0), clock, attempts)
    result = run(up.connect(REQ))
    clock.advance(3.0)  # connect_timeout
    err = result.result.value
    result.addErrback(lambda f: None)
    assert isinstance(err, UpstreamError) and err.status == 504
    assert clock.getDelayedCalls() == []


def test_upstream_http_answer_is_not_retried():
    clock, attempts = Clock(), Attempts()
    up = Upstream(upstream_config([1, 2], retries=2), clock, attempts)
    result = run(up.connect(REQ))
    attempts.calls[0][1].errback(Failure(UpstreamRefused(403)))
    err = result.result.value
    result.addErrback(lambda f: None)
    assert err.status == 403
    assert len(attempts.calls) == 1


def test_drained_nodes_get_no_connections_and_none_left_is_503():
    clock, attempts = Clock(), Attempts()
    up = Upstream(upstream_config([1, 2]), clock, attempts)
    assert up.drain("ws://127.0.0.1:1")
    for _ in range(3):
        run(up.connect(REQ)).addErrback(lambda f: None)
    assert {u for u, _ in attempts.calls} == {"ws://127.0.0.1:2"}
    up.drain("ws://127.0.0.1:2")
    result = run(up.connect(REQ))
    err = result.result.value
    result.addErrback(lambda f: None)
    assert err.status == 503


def test_cancel_while_connecting_cancels_the_attempt():
    clock, attempts = Clock(), Attempts()
    Attempts.cancelled = []
    up = Upstream(upstream_config([1]), clock, attempts)
    result = run(up.connect(REQ))
    result.cancel()
    result.addErrback(lambda f: None)
    assert Attempts.cancelled == ["ws://127.0.0.1:1"]
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("attempt", range(8))
def test_backoff_is_full_jitter_capped(attempt):
    rng = random.Random(attempt)
    delays = [backoff_delay(attempt, 0.1, 2.0, rng) for _ in range(200)]
    cap = min(2.0, 0.1 * 2**attempt)
    assert all(0 <= d <= cap for d in delays)
    assert max(delays) > cap * 0.8  # really spread over the whole range


def alternate(up, attempts, n, fail_node1):
    """n connections; round robin alternates nodes; node 1's attempts get fail_node1(), node 2's succeed."""
    for _ in range(n):
        d = run(up.connect(REQ))
        url, attempt = attempts.calls[-1]
        if url.endswith(":1"):
            attempt.errback(fail_node1())
        else:
            attempt.callback("leg")
        d.addErrback(lambda f: None)


def test_consecutive_connect_failures_eject_a_node_and_it_gets_no_attempts():
    clock, attempts = Clock(), Attempts()
    up = Upstream(upstream_config([1, 2], retries=0), clock, attempts)
    n1 = up.node("ws://127.0.0.1:1")
    alternate(up, attempts, 10, lambda: Failure(ConnectionRefusedError()))
    assert n1.health.state(clock.seconds()) == "ejected"
    assert "5 consecutive connect failures" in n1.health.last_failure
    calls = len(attempts.calls)
    for _ in range(4):
        run(up.connect(REQ)).addErrback(lambda f: None)
    assert {u for u, _ in attempts.calls[calls:]} == {"ws://127.0.0.1:2"}
    clock.advance(30)  # the first ejection lasts 30 s
    assert n1.health.state(clock.seconds()) == "healthy"


def test_the_last_node_is_never_ejected_panic_mode():
    clock, attempts = Clock(), Attempts()
    up = Upstream(upstream_config([1], retries=0), clock, attempts)
    for _ in range(8):
        d = run(up.connect(REQ))
        attempts.calls[-1][1].errback(Failure(ConnectionRefusedError()))
        d.addErrback(lambda f: None)
    node = up.nodes[0]
    assert node.health.state(clock.seconds()) == "healthy"
    assert "last available node" in node.health.last_failure
    run(up.connect(REQ)).addErrback(lambda f: None)
    assert len(attempts.calls) == 9  # still tried


def test_upstream_5xx_answers_count_as_failures_4xx_do_not():
    clock, attempts = Clock(), Attempts()
    up = Upstream(upstream_config([1, 2], retries=0), clock, attempts)
    n1 = up.node("ws://127.0.0.1:1")
    statuses = iter([403, 404, 401, 400, 429, 403])
    alternate(up, attempts, 12, lambda: Failure(UpstreamRefused(next(statuses))))
    assert n1.health.passive_failures == 0
    alternate(up, attempts, 10, lambda: Failure(UpstreamRefused(503)))
    assert n1.health.state(clock.seconds()) == "ejected"


def test_active_connections_count_and_vanished_upstreams_are_passive_failures():
    clock, attempts = Clock(), Attempts()
    up = Upstream(upstream_config([1, 2], retries=0), clock, attempts)
    d = run(up.connect(REQ))
    attempts.calls[-1][1].callback("leg")
    node, _ = d.result
    assert node.active == 1
    up.release(node)
    assert node.active == 0 and node.health.passive_failures == 0
    d = run(up.connect(REQ))
    assert attempts.calls[-1][0] != node.url  # round robin moved on
    assert [n.active for n in up.nodes] == [0, 1]  # counted while the handshake is in flight
    attempts.calls[-1][1].callback("leg")
    other, _ = d.result
    up.release(other, vanished=True)
    assert other.health.passive_failures == 1


def test_every_node_unhealthy_by_active_checks_is_503_without_attempts():
    clock, attempts = Clock(), Attempts()
    up = Upstream(upstream_config([1, 2]), clock, attempts)
    for n in up.nodes:
        n.health.healthy = False
    d = run(up.connect(REQ))
    err = d.result.value
    d.addErrback(lambda f: None)
    assert err.status == 503 and attempts.calls == []
