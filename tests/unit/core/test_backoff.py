"""wsgateway.backoff: pure, the delays every retry loop of the gateway takes."""

from __future__ import annotations

import random

import pytest

from wsgateway.backoff import equal_jitter, exponential, full_jitter


def test_exponential_doubles_from_initial_up_to_the_cap() -> None:
    delays = [exponential(n, initial=0.5, maximum=30.0) for n in range(8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_exponential_with_another_factor() -> None:
    assert [exponential(n, initial=0.2, maximum=3.0, factor=3.0) for n in range(4)] == pytest.approx(
        [0.2, 0.6, 1.8, 3.0])


@pytest.mark.parametrize("attempt", [64, 65, 1000, 10**9])
def test_exponential_never_overflows(attempt: int) -> None:
    assert exponential(attempt, initial=0.1, maximum=2.0) == 2.0


def test_a_negative_attempt_counts_as_the_first() -> None:
    assert exponential(-1, initial=0.2, maximum=3.0) == 0.2


def test_full_jitter_spans_zero_to_the_delay() -> None:
    rng = random.Random(3)
    delays = [full_jitter(4.0, rng) for _ in range(500)]
    assert all(0.0 <= d <= 4.0 for d in delays)
    assert min(delays) < 0.5 and max(delays) > 3.5


def test_equal_jitter_spans_half_to_the_delay() -> None:
    rng = random.Random(3)
    delays = [equal_jitter(4.0, rng) for _ in range(500)]
    assert all(2.0 <= d <= 4.0 for d in delays)
    assert min(delays) < 2.2 and max(delays) > 3.8


def test_the_same_seed_gives_the_same_delays() -> None:
    a, b = random.Random(11), random.Random(11)
    assert [full_jitter(1.0, a) for _ in range(5)] == [full_jitter(1.0, b) for _ in range(5)]


def test_each_caller_keeps_its_delays() -> None:
    # the sequences the callers had before they shared this module
    from wsgateway.redis.link import Backoff
    from wsgateway.upstream.pool import backoff_delay

    rng, ref = random.Random(5), random.Random(5)
    for attempt in range(12):
        assert backoff_delay(attempt, 0.1, 2.0, rng) == ref.uniform(0, min(2.0, 0.1 * (2**attempt)))
    b = Backoff(initial=0.2, maximum=3.0, factor=2.0)
    for failures in range(1, 12):
        base = min(3.0, 0.2 * 2.0 ** (failures - 1))
        assert b.delay(failures, rng) == base / 2 + ref.uniform(0.0, base / 2)
    restart = [exponential(deaths - 1, initial=0.5, maximum=30.0) for deaths in range(1, 9)]
    assert restart == [min(30.0, 0.5 * 2 ** (d - 1)) for d in range(1, 9)]
