"""
Balancing strategies (wsgateway.upstream.balance) and the zone/version filter
(wsgateway.upstream.preference): pure, no reactor; time is a list the tests
move, randomness a seeded Random.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsgateway.upstream.balance import (
    ConsistentHash,
    Ewma,
    LeastConn,
    RoundRobin,
    Strategy,
    Weighted,
    hash_key,
    strategy_for,
)
from wsgateway.upstream.preference import filter_nodes

ALL_BALANCES = ["round_robin", "weighted", "least_conn", "ewma", "hash:ip", "hash:claim:sub", "hash:header:X-Shard"]


@dataclass(eq=False)
class FakeNode:
    url: str
    weight: int = 1
    zone: str | None = None
    version: str | None = None
    active: int = 0

    def __repr__(self) -> str:
        return self.url


def nodes(*weights: int) -> list[FakeNode]:
    return [FakeNode(f"ws://10.0.0.{i}:9000", weight=w) for i, w in enumerate(weights, start=1)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def picks(strategy: Strategy, ns: Sequence[FakeNode], count: int, key: str | None = None) -> list[FakeNode]:
    return [strategy.order(ns, key)[0] for _ in range(count)]


# ------------------------------------------------------------ round robin


def test_round_robin_rotates_and_ignores_key() -> None:
    a, b, c = ns = nodes(1, 1, 1)
    rr = RoundRobin()
    assert picks(rr, ns, 6, key="k") == [a, b, c, a, b, c]
    assert rr.order(ns) == [a, b, c]
    assert rr.order([]) == []


# ------------------------------------------------------------ weighted (SWRR)


def test_weighted_5_1_1_is_nginx_documented_sequence() -> None:
    # nginx commit 52327e0627f4 / ngx_http_upstream_round_robin.c comment: { a, a, b, a, c, a, a }
    a, b, c = ns = nodes(5, 1, 1)
    w = Weighted()
    assert picks(w, ns, 14) == [a, a, b, a, c, a, a] * 2


def test_weighted_90_10_exact_in_every_window_of_100() -> None:
    a, b = ns = nodes(90, 10)
    seq = picks(Weighted(), ns, 1000)
    for start in range(len(seq) - 100 + 1):
        window = Counter(seq[start:start + 100])
        assert (window[a], window[b]) == (90, 10), start
    total = Counter(seq)
    assert 873 <= total[a] <= 927 and 73 <= total[b] <= 127  # +-3% of 900/100
    # smooth: the 10% node is never picked twice in a row
    assert not any(x is b and y is b for x, y in zip(seq, seq[1:]))


def test_weighted_failover_order_is_by_descending_weight() -> None:
    ns = nodes(1, 5, 3)
    order = Weighted().order(ns)
    assert order[0] is ns[1]
    assert order == [ns[1], ns[2], ns[0]]


def test_weighted_over_a_subset_keeps_ratio_among_the_offered() -> None:
    a, b, c = ns = nodes(3, 1, 2)
    w = Weighted()
    picks(w, ns, 5)  # some state on every node
    seq = picks(w, [a, b], 400)  # c unavailable
    # the current weights left over from the first picks shift the phase by at most one pick
    got = Counter(seq)
    assert abs(got[a] - 300) <= 1 and got[a] + got[b] == 400
    again = Counter(picks(w, ns, 600))  # c back: its kept current weight only shifts the phase
    assert max(abs(again[a] - 300), abs(again[b] - 100), abs(again[c] - 200)) <= 1


# ------------------------------------------------------------ least_conn


def test_least_conn_picks_the_least_loaded_as_load_changes() -> None:
    a, b, c = ns = nodes(1, 1, 1)
    lc = LeastConn()
    a.active, b.active, c.active = 5, 2, 7
    assert lc.order(ns) == [b, a, c]
    b.active = 9
    assert lc.order(ns)[0] is a
    a.active = 8
    assert lc.order(ns) == [c, a, b]


def test_least_conn_follows_load_in_a_simulation() -> None:
    rng = random.Random(7)
    ns = nodes(1, 1, 1, 1)
    lc = LeastConn()
    for step in range(2000):
        pick = lc.order(ns)[0]
        assert pick.active == min(n.active for n in ns), step
        pick.active += 1
        if rng.random() < 0.5:
            # connections end unevenly: node 0 holds long-lived clients
            victim = rng.choice([n for n in ns[1:] if n.active] or [ns[0]])
            if victim.active:
                victim.active -= 1
    assert max(n.active for n in ns) - min(n.active for n in ns) <= 1


def test_least_conn_ties_rotate_instead_of_first_node() -> None:
    a, b, c = ns = nodes(1, 1, 1)
    lc = LeastConn()
    assert Counter(picks(lc, ns, 30)) == {a: 10, b: 10, c: 10}


def test_least_conn_respects_weights() -> None:
    a, b = ns = nodes(3, 1)
    lc = LeastConn()
    for _ in range(400):
        lc.order(ns)[0].active += 1
    assert (a.active, b.active) == (300, 100)
    a.active, b.active = 6, 3  # load 2 vs 3: a despite more connections
    assert lc.order(ns) == [a, b]


# ------------------------------------------------------------ ewma


def ewma_run(e: Ewma, clock: FakeClock, ns: list[FakeNode], latency: dict[str, float], seconds: int) -> list[str]:
    """One connection every 0.1 s, each handshake as slow as ``latency`` says."""
    seen: list[str] = []
    for _ in range(seconds * 10):
        clock.now += 0.1
        pick = e.order(ns)[0]
        seen.append(pick.url)
        e.observe(pick, latency[pick.url])
    return seen


def share(seen: list[str], url: str) -> float:
    return seen.count(url) / len(seen)


def test_ewma_prefers_the_faster_node_and_recovers_after_latency_changes() -> None:
    clock = FakeClock()
    a, b = ns = nodes(1, 1)
    e = Ewma(clock, random.Random(3))
    latency = {a.url: 0.005, b.url: 0.050}
    phase1 = ewma_run(e, clock, ns, latency, 60)
    assert share(phase1, a.url) > 0.95
    assert b.url in phase1[100:]  # the slower node is still probed now and then
    latency[a.url] = 0.500  # a turns slow: one slow handshake moves traffic away
    phase2 = ewma_run(e, clock, ns, latency, 60)
    assert phase2[1:10].count(a.url) == 0
    assert share(phase2, b.url) > 0.95
    latency[a.url] = 0.005  # a is fast again: back within a few decay times (10 s)
    phase3 = ewma_run(e, clock, ns, latency, 60)
    assert share(phase3[300:], a.url) > 0.95


def test_ewma_peak_is_taken_at_once_then_decays_with_time() -> None:
    clock = FakeClock()
    (a,) = nodes(1)
    e = Ewma(clock, random.Random(1))
    e.observe(a, 0.010)
    e.observe(a, 1.0)
    assert e.cost(a) == pytest.approx(1.0)
    clock.now += 10.0  # one decay time
    assert e.cost(a) == pytest.approx(1.0 / 2.718281828, rel=1e-6)


def test_ewma_cost_grows_with_active_connections() -> None:
    clock = FakeClock()
    a, b = ns = nodes(1, 1)
    e = Ewma(clock, random.Random(1))
    e.observe(a, 0.010)
    e.observe(b, 0.020)
    assert e.order(ns)[0] is a
    a.active = 3  # 0.010 * 4 > 0.020 * 1
    assert e.order(ns) == [b, a]


def test_ewma_unseen_node_is_tried_and_failure_is_penalised() -> None:
    clock = FakeClock()
    a, b = ns = nodes(1, 1)
    e = Ewma(clock, random.Random(1))
    e.observe(a, 0.200)
    assert e.order(ns)[0] is b  # never measured: the small default beats 200 ms
    e.observe(b, 0.001)
    e.failed(b)
    assert e.order(ns) == [a, b]


def test_ewma_power_of_two_never_picks_the_most_expensive() -> None:
    clock = FakeClock()
    ns = nodes(1, 1, 1, 1)
    e = Ewma(clock, random.Random(5))
    for n, lat in zip(ns, (0.01, 0.02, 0.03, 0.9)):
        e.observe(n, lat)
    seen = Counter(picks(e, ns, 400))
    assert seen[ns[3]] == 0
    assert len(seen) == 3  # not a full sort: the cheaper ones share the picks
    assert seen[ns[0]] > seen[ns[2]]


# ------------------------------------------------------------ consistent hash


KEYS = [f"user-{i}" for i in range(10_000)]


def placement(h: Strategy, ns: Sequence[FakeNode]) -> dict[str, str]:
    return {k: h.order(ns, k)[0].url for k in KEYS}


def test_hash_same_key_same_node() -> None:
    ns = nodes(1, 1, 1, 1, 1)
    h = strategy_for("hash:claim:sub", ns)
    for key in ("alice", "bob", "carol"):
        first = h.order(ns, key)
        assert all(h.order(ns, key) == first for _ in range(50))
    # ...and independent of the list order it is given
    assert h.order(list(reversed(ns)), "alice") == h.order(ns, "alice")
    # different keys reach different nodes
    assert len({h.order(ns, f"k{i}")[0].url for i in range(100)}) == 5


def test_hash_removing_one_node_of_5_moves_only_its_keys_and_adding_restores() -> None:
    ns = nodes(1, 1, 1, 1, 1)
    h = strategy_for("hash:claim:sub", ns)
    before = placement(h, ns)
    gone = ns[2]
    on_gone = {k for k, u in before.items() if u == gone.url}
    assert 0.15 <= len(on_gone) / len(KEYS) <= 0.25
    after = placement(h, [n for n in ns if n is not gone])
    moved = {k for k in KEYS if after[k] != before[k]}
    assert moved == on_gone  # keys on other nodes never move
    assert 0.15 <= len(moved) / len(KEYS) <= 0.25
    assert len({after[k] for k in moved}) == 4  # spread over the rest, not dumped on one
    assert placement(h, ns) == before


def test_hash_ring_is_stable_across_instances_and_lazy_building() -> None:
    ns = nodes(1, 2, 1)
    up_front = placement(strategy_for("hash:ip", ns), ns)
    assert placement(strategy_for("hash:ip", ns), ns) == up_front  # no per-process salt
    lazy = strategy_for("hash:ip")  # the old one-argument call
    assert placement(lazy, ns[:2]) == placement(strategy_for("hash:ip", ns[:2]), ns[:2])


def test_hash_placement_is_the_same_in_every_process() -> None:
    # Gateway workers are separate processes: a salted hash() would send one
    # user to different nodes depending on which worker accepted it.
    script = (
        "from tests.unit.upstream.test_balance import nodes, KEYS; from wsgateway.upstream.balance import strategy_for\n"
        "ns = nodes(1, 1, 1); h = strategy_for('hash:ip', ns)\n"
        "print([h.order(ns, k)[0].url[-6:-5] for k in KEYS[:300]])"
    )
    root = Path(__file__).resolve().parents[3]
    out = {
        subprocess.run([sys.executable, "-c", script], cwd=root, env={**os.environ, "PYTHONHASHSEED": seed},
                       capture_output=True, text=True, check=True).stdout
        for seed in ("1", "2")
    }
    assert len(out) == 1


def test_hash_weights_share_the_keys() -> None:
    a, b = ns = nodes(90, 10)
    share = Counter(placement(ConsistentHash("hash:ip", ns), ns).values())
    assert 0.85 <= share[a.url] / len(KEYS) <= 0.95


def test_hash_failover_walks_the_ring() -> None:
    ns = nodes(1, 1, 1, 1, 1)
    h = strategy_for("hash:header:X-Shard", ns)
    for key in KEYS[:200]:
        full = h.order(ns, key)
        without_first = h.order(full[1:], key)
        assert without_first == full[1:]  # next choice = next node on the ring


def test_hash_without_key_round_robins() -> None:
    ns = nodes(1, 1, 1)
    h = strategy_for("hash:claim:sub", ns)
    assert picks(h, ns, 6) == ns * 2


def test_hash_key_forms() -> None:
    kw = dict(peer_ip="203.0.113.9", claims={"sub": "alice", "org": 42}, headers={"x-shard": "s7"})
    assert hash_key("hash:ip", **kw) == "203.0.113.9"
    assert hash_key("hash:claim:sub", **kw) == "alice"
    assert hash_key("hash:claim:org", **kw) == "42"
    assert hash_key("hash:claim:tenant", **kw) is None
    assert hash_key("hash:claim:sub", peer_ip="1.2.3.4", claims=None, headers={}) is None
    assert hash_key("hash:header:X-Shard", **kw) == "s7"
    assert hash_key("hash:header:X-Shard", peer_ip="", claims=None, headers={"X-Shard": "s8"}) == "s8"
    assert hash_key("hash:header:X-Other", **kw) is None
    assert hash_key("hash:header:X-Shard", peer_ip="", claims=None, headers={"x-shard": ""}) is None
    assert hash_key("round_robin", **kw) is None
    assert hash_key("least_conn", **kw) is None


# ------------------------------------------------------------ strategy_for


@pytest.mark.parametrize(
    "balance, cls",
    [("round_robin", RoundRobin), ("weighted", Weighted), ("least_conn", LeastConn), ("ewma", Ewma),
     ("hash:ip", ConsistentHash), ("hash:claim:sub", ConsistentHash), ("hash:header:X-Shard", ConsistentHash)],
)
def test_strategy_for_names(balance: str, cls: type) -> None:
    s = strategy_for(balance, nodes(1, 1))
    assert isinstance(s, cls)
    assert s.name == balance


@pytest.mark.parametrize("balance", ["round_robbin", "hash:claim:", "hash:header:", "hash:", ""])
def test_strategy_for_unknown_raises(balance: str) -> None:
    with pytest.raises(ValueError):
        strategy_for(balance)


# ------------------------------------------------------------ zone / version filter


def labelled() -> list[FakeNode]:
    return [
        FakeNode("ws://a1", zone="a", version="v1"),
        FakeNode("ws://a2", zone="a", version="v2"),
        FakeNode("ws://b1", zone="b", version="v1"),
        FakeNode("ws://b2", zone="b", version="v2"),
        FakeNode("ws://x", zone=None, version=None),
    ]


def urls(ns: Sequence[FakeNode]) -> list[str]:
    return [n.url for n in ns]


def test_filter_nodes_zone_version_and_fallback() -> None:
    ns = labelled()
    assert filter_nodes(ns, zone=None, version=None) == (ns, False)
    assert filter_nodes(ns, zone="", version="") == (ns, False)
    assert (urls(filter_nodes(ns, zone="a", version=None)[0]), filter_nodes(ns, zone="a", version=None)[1]) == (
        ["ws://a1", "ws://a2"], False)
    got, fell = filter_nodes(ns, zone=None, version="v2")
    assert (urls(got), fell) == (["ws://a2", "ws://b2"], False)
    got, fell = filter_nodes(ns, zone="b", version="v1")
    assert (urls(got), fell) == (["ws://b1"], False)
    # zone a has no v1 left: the zone preference goes first, the version stays
    got, fell = filter_nodes([n for n in ns if n.url != "ws://a1"], zone="a", version="v1")
    assert (urls(got), fell) == (["ws://b1"], True)
    # nothing of that version anywhere: every node, and say so
    got, fell = filter_nodes(ns, zone="a", version="v9")
    assert (got, fell) == (ns, True)
    got, fell = filter_nodes(ns, zone="c", version=None)
    assert (got, fell) == (ns, True)
    assert filter_nodes([], zone="a", version="v1") == ([], False)


# ------------------------------------------------------------ every order() is a permutation


@settings(max_examples=300, deadline=None)
@given(
    balance=st.sampled_from(ALL_BALANCES),
    weights=st.lists(st.integers(1, 20), min_size=1, max_size=8),
    steps=st.lists(
        st.tuples(
            st.lists(st.booleans(), min_size=8, max_size=8),  # which configured nodes are offered
            st.one_of(st.none(), st.text(max_size=8)),  # hash key
            st.lists(st.integers(0, 50), min_size=8, max_size=8),  # active counts
            st.floats(0, 5),  # latency observed / clock step
            st.booleans(),  # failed instead of observed
        ),
        min_size=1,
        max_size=15,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_order_is_each_offered_node_once(
    balance: str, weights: list[int], steps: list[tuple[list[bool], str | None, list[int], float, bool]], seed: int
) -> None:
    configured = nodes(*weights)
    clock = FakeClock()
    s = strategy_for(balance, configured, clock=clock, rng=random.Random(seed))
    for offered_mask, key, active, latency, fail in steps:
        offered = [n for n, keep in zip(configured, offered_mask) if keep]
        for n, a in zip(configured, active):
            n.active = a
        clock.now += latency
        order = s.order(offered, key)
        assert len(order) == len(offered)
        assert {id(n) for n in order} == {id(n) for n in offered}
        if order and fail:
            s.failed(order[0])
        elif order:
            s.observe(order[0], latency)
