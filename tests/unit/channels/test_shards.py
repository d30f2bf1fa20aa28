"""Channel placement over [redis] shards: jump consistent hash of a stable digest (wsgateway.channels.shards)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from wsgateway.channels.shards import jump_hash, shard_of

CHANNELS = [f"room:{i}" for i in range(300)]


def test_jump_hash_spreads_keys_evenly() -> None:
    assert [jump_hash(k, 1) for k in range(5)] == [0, 0, 0, 0, 0]
    counts = Counter(jump_hash(k * 0x9E3779B97F4A7C15 % 2**64, 10) for k in range(20000))
    assert sorted(counts) == list(range(10))
    assert all(1600 <= n <= 2400 for n in counts.values()), counts


@given(key=st.integers(0, 2**64 - 1), buckets=st.integers(1, 64))
def test_adding_a_shard_moves_a_channel_only_to_the_new_shard(key: int, buckets: int) -> None:
    before, after = jump_hash(key, buckets), jump_hash(key, buckets + 1)
    assert 0 <= before < buckets
    assert after in (before, buckets)


def test_300_channels_spread_over_3_shards() -> None:
    counts = Counter(shard_of(c, 3) for c in CHANNELS)
    assert set(counts) == {0, 1, 2} and max(counts.values()) <= 150, counts


def test_adding_a_fourth_shard_moves_about_a_quarter() -> None:
    moved = [c for c in CHANNELS if shard_of(c, 3) != shard_of(c, 4)]
    assert all(shard_of(c, 4) == 3 for c in moved)
    assert 0.15 * len(CHANNELS) <= len(moved) <= 0.35 * len(CHANNELS), len(moved)


def test_placement_is_the_same_in_another_process() -> None:
    """Not Python's hash(), which is salted per process: every node must agree."""
    code = ("from wsgateway.channels.shards import shard_of; "
            f"print([shard_of(c, 3) for c in {CHANNELS[:50]!r}])")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345", "PYTHONPATH": "."})
    assert other.stdout.strip() == str([shard_of(c, 3) for c in CHANNELS[:50]])
