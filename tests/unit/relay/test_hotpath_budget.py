# -*- test-case-name: tests.test_hotpath_budget -*-
"""
A regression guard for the relay's per-read hot path that counts instead of
timing (issue 8, item 4).

``Relay.client_data`` / ``upstream_data`` and ``FrameScanner.feed`` run once
per socket read. A change that adds one function call or one surviving
allocation per relayed message costs throughput in every bench/ scenario,
but is far too small for a timing test to see reliably on a CI machine. So
for fixed workloads this module counts, per relayed message:

- Python-level function calls (``sys.setprofile`` "call" events),
- C-level calls (``sys.setprofile`` "c_call" events: builtins, C methods),
- blocks allocated during the workload and still alive after it
  (``tracemalloc``): a per-message leak shows up as ~1 block per message.

Each count is compared with a bound recorded below. The counts are exact
and deterministic (the same on every run on the same interpreter): no
timing, no sockets, no reactor. A bound that is exceeded fails with the
measured value and the bound; if the extra work is intended, re-measure
(``.venv/bin/python tests/test_hotpath_budget.py`` prints today's counts),
update the bound in ``BOUNDS`` and check bench/.

The transports are L{StringTransport}s whose ``write`` is a C method
(``deque(maxlen=1).append``): the counts are then the relay's own, not a
test double's, and what is written is not kept (which would look like a
leak). The leg protocols are driven exactly as a transport drives them:
``relay.client_leg.dataReceived`` / ``relay.upstream_leg.dataReceived``.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet import task
from twisted.internet.testing import StringTransport

from wsgateway.relay.codec import OP_BINARY, OP_TEXT, encode_frame
from wsgateway.relay.frames import FrameScanner
from wsgateway.relay.relay import Relay

MESSAGES = 2000  # relayed messages in the measured part of each workload
WARMUP = 100  # relayed first, unmeasured: first-use caches, int/float objects
STEP = 0.001  # clock advance per read (1000 reads/s; the rate limiter's refill path)

# the defaults (etc/wsgateway.ini, the production sample; etc/development.ini keeps them)
MAX_MESSAGE_SIZE = 1 << 20  # max_message_size = 1M
WRITE_BUFFER = 1 << 20  # write_buffer = 1M

# -- test doubles ------------------------------------------------------------


class SinkTransport(StringTransport):
    """
    A StringTransport (registerProducer, pauseProducing, resumeProducing,
    loseConnection...) whose ``write`` keeps only the last chunk written and
    is one C call: no Python frame of the test's own in the counts.
    """

    bufferSize = 65536  # like twisted.internet.abstract.FileDescriptor

    def __init__(self) -> None:
        super().__init__()
        self.last: deque[bytes] = deque(maxlen=1)
        self.write = self.last.append  # type: ignore[method-assign]

    def unregisterProducer(self) -> None:
        # like Twisted's TCP and TLS transports: a no-op without a producer
        self.producer = None
        self.streaming = None


# -- workloads -----------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    direction: str  # "client" (client -> upstream) or "upstream" (upstream -> client)
    reads: tuple[bytes, ...]  # one unit: these reads relay `per_unit` messages
    per_unit: int
    relay_options: dict[str, Any] = field(default_factory=dict)

    def units(self, messages: int) -> int:
        """Units for at least ``messages`` messages (exactly, for MESSAGES)."""
        return -(-messages // self.per_unit)


def _split(frame: bytes, parts: int) -> tuple[bytes, ...]:
    size = -(-len(frame) // parts)
    return tuple(frame[k : k + size] for k in range(0, len(frame), size))


_PAYLOAD_64 = b"x" * 64
_MASKED_64 = encode_frame(OP_TEXT, _PAYLOAD_64, mask=True)
_UNMASKED_64 = encode_frame(OP_TEXT, _PAYLOAD_64, mask=False)
_MASKED_64K = encode_frame(OP_BINARY, bytes(range(256)) * 256, mask=True)

_RATE_LIMITED = {"messages_per_second": 1000}  # = 1 message per STEP: never refused

WORKLOADS = {
    w.name: w
    for w in (
        Workload("a", "one 64 B masked text message per client read", "client", (_MASKED_64,), 1),
        Workload("b", "16 64 B masked text messages per client read", "client", (_MASKED_64 * 16,), 16),
        Workload("c", "one 64 B unmasked text message per upstream read", "upstream", (_UNMASKED_64,), 1),
        Workload("d", "a 64 KiB masked message in 4 client reads", "client", _split(_MASKED_64K, 4), 1),
        Workload("e", "(a) with the per-message rate limiter on", "client", (_MASKED_64,), 1, _RATE_LIMITED),
    )
}


@dataclass
class Setup:
    relay: Relay
    client: SinkTransport
    upstream: SinkTransport
    clock: task.Clock
    feed: Callable[[bytes], None]
    reads: list[bytes]  # the measured part, in order
    scanner: FrameScanner
    sink: SinkTransport


def build(
    workload: Workload,
    *,
    on_message: Callable[[], tuple[int, str] | None] | None = None,
) -> Setup:
    """
    A relay for ``workload``, warmed up, and the reads of its measured part.

    ``on_message`` replaces the client scanner by one with that per-message
    callback (only to show that the guard fails when work is added).
    """
    clock = task.Clock()
    client, upstream = SinkTransport(), SinkTransport()
    options: dict[str, Any] = dict(
        clock=clock,
        max_message_size=MAX_MESSAGE_SIZE,
        write_buffer=WRITE_BUFFER,
        idle_timeout=0,
        ping_interval=0,
        ping_timeout=0,
        messages_per_second=0,
    )
    options.update(workload.relay_options)
    relay = Relay(client, upstream, **options)
    if on_message is not None:
        relay.c2u = FrameScanner(
            masked=True,
            max_message_size=MAX_MESSAGE_SIZE,
            on_control=relay._from_client,
            on_message=on_message,
        )
    if workload.direction == "client":
        feed, scanner, sink = relay.client_leg.dataReceived, relay.c2u, upstream
    else:
        feed, scanner, sink = relay.upstream_leg.dataReceived, relay.u2c, client
    setup = Setup(relay, client, upstream, clock, feed, [], scanner, sink)
    _drive(setup, list(workload.reads) * workload.units(WARMUP))
    setup.reads = list(workload.reads) * workload.units(MESSAGES)
    return setup


def _drive(s: Setup, reads: list[bytes]) -> None:
    clock, feed = s.clock, s.feed
    for chunk in reads:
        clock.rightNow += STEP
        feed(chunk)


# -- counting ------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    calls: float  # Python-level calls per relayed message
    c_calls: float  # C-level calls per relayed message
    blocks: int  # blocks allocated during MESSAGES messages and alive after them


def _profile(s: Setup, reads: list[bytes]) -> tuple[int, int]:
    """("call", "c_call") events while ``reads`` are fed, the harness's own included."""
    calls = c_calls = 0

    def profiler(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls, c_calls
        if event == "call":
            calls += 1
        elif event == "c_call":
            c_calls += 1

    clock, feed = s.clock, s.feed
    previous = sys.getprofile()
    sys.setprofile(profiler)
    try:
        for chunk in reads:
            clock.rightNow += STEP
            feed(chunk)
    finally:
        sys.setprofile(previous)
    return calls, c_calls


def count_calls(s: Setup) -> tuple[float, float]:
    """Python calls and C calls per relayed message in the measured part."""
    # The harness's own events (the c_call of the final sys.setprofile) are
    # measured with no reads and taken off: the counts are the relay's alone.
    base_calls, base_c_calls = _profile(s, [])
    calls, c_calls = _profile(s, s.reads)
    return (calls - base_calls) / MESSAGES, (c_calls - base_c_calls) / MESSAGES


def count_live_blocks(s: Setup) -> int:
    """Net blocks allocated while the measured part ran and still alive after it."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start(1)
    try:
        gc.collect()
        before = tracemalloc.take_snapshot()
        _drive(s, s.reads)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        if started:
            tracemalloc.stop()
    own = [tracemalloc.Filter(False, tracemalloc.__file__)]  # the snapshots themselves
    stats = after.filter_traces(own).compare_to(before.filter_traces(own), "traceback")
    return sum(stat.count_diff for stat in stats)


def measure(s: Setup) -> Counts:
    calls, c_calls = count_calls(s)
    return Counts(calls, c_calls, count_live_blocks(s))


# -- the budget ------------------------------------------------------------------

# Measured on CPython 3.11.7 (this venv), Twisted 26.10.0, commit 05fc122:
#
#   scenario                      Python calls/msg   C calls/msg   live blocks after 2000 msgs
#   (a) 64 B, 1 per client read        4                3              3
#   (b) 64 B, 16 per client read       0.25             0.1875         4
#   (c) 64 B, 1 per upstream read      5                3              3
#   (d) 64 KiB in 4 client reads      16               13              3
#   (e) (a) + rate limiter             7                3              4
#
# What they are, per read: (a) client_data, feed, the in_frame property and
# Clock.seconds (the activity time); len() twice and the transport's write.
# (b) the same once per 16 messages. (c) adds leg_for's closure in front of
# upstream_data. (d) four reads of (a)'s calls plus one Struct.unpack_from
# for the 64-bit length. (e) adds the limiter's admit(), TokenBucket.take and
# a second Clock.seconds. The live blocks are a constant (the relay's
# counters as new int objects, the sink's deque block), not per message.
#
# Bound = measured + 10 %, rounded up to 0.01. Deliberately not "at least
# +1 call": the counts are exact, so the margin only has to absorb interpreter
# or Twisted differences, and a whole call of slack would let exactly the
# regression this guard is for (one more call per read in (a), (c) or (e))
# through. With 10 % one more call (Python or C) per read fails every
# scenario. Live blocks: a constant 16 per workload (under 0.01 per message)
# for all scenarios: a leak of one block per message gives ~2000.
BOUNDS: dict[str, tuple[float, float]] = {
    #     Python  C calls (per message)
    "a": (4.4, 3.3),
    "b": (0.28, 0.21),
    "c": (5.5, 3.3),
    "d": (17.6, 14.3),
    "e": (7.7, 3.3),
}
LIVE_BLOCKS_BOUND = 16

_HINT = "if this is intended, re-measure and update the bound (and check bench/)"


def check_budget(scenario: str, counts: Counts) -> None:
    """Raise AssertionError naming every count over its bound, measured vs bound."""
    calls_bound, c_calls_bound = BOUNDS[scenario]
    failures = []
    if counts.calls > calls_bound:
        failures.append(
            f"relay hot path: {counts.calls:g} Python calls per message in scenario "
            f"{scenario}, bound {calls_bound:g}; {_HINT}"
        )
    if counts.c_calls > c_calls_bound:
        failures.append(
            f"relay hot path: {counts.c_calls:g} C calls per message in scenario "
            f"{scenario}, bound {c_calls_bound:g}; {_HINT}"
        )
    if counts.blocks > LIVE_BLOCKS_BOUND:
        failures.append(
            f"relay hot path: {counts.blocks} allocated blocks still alive after {MESSAGES} "
            f"messages ({counts.blocks / MESSAGES:g} per message) in scenario {scenario}, "
            f"bound {LIVE_BLOCKS_BOUND}: a per-message leak?; {_HINT}"
        )
    if failures:
        raise AssertionError(
            "\n".join(failures)
            + "\n(.venv/bin/python tests/test_hotpath_budget.py prints today's counts)"
        )


# -- tests -----------------------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(WORKLOADS))
def test_hot_path_within_budget(scenario: str) -> None:
    workload = WORKLOADS[scenario]
    s = build(workload)
    warmed = s.scanner.messages
    counts = measure(s)

    # the workload really was relayed, untouched and without a close
    assert s.scanner.error is None
    assert s.relay.closed_by is None
    assert s.scanner.messages - warmed == 2 * MESSAGES  # the profiled run and the traced one
    assert s.sink.last[0] is workload.reads[-1]  # forwarded as the very object read
    other = s.client if s.sink is s.upstream else s.upstream
    assert not other.last
    assert s.clock.getDelayedCalls() == []

    check_budget(scenario, counts)


def test_counts_are_exact() -> None:
    """The same relay and reads measured twice give the same counts: nothing here is sampled."""
    s = build(WORKLOADS["a"])
    assert count_calls(s) == count_calls(s)


def _no_check() -> None:
    return None


def _calls_a_helper() -> None:
    return _no_check()


@pytest.mark.parametrize(
    ("on_message", "extra"),
    [
        # one Python function per message, no more: the smallest regression
        (_no_check, 1),
        # a per-message callback that calls a helper
        (_calls_a_helper, 2),
    ],
    ids=["one-extra-call", "callback-calling-a-helper"],
)
def test_guard_detects_one_more_call_per_message(
    on_message: Callable[[], None], extra: int
) -> None:
    """
    Scenario (a)'s workload, but with a client scanner whose on_message is
    ``extra`` more Python calls per message: the guard must fail, saying
    how many calls it measured and what the bound is.
    """
    baseline = measure(build(WORKLOADS["a"]))
    counts = measure(build(WORKLOADS["a"], on_message=on_message))

    assert counts.calls == baseline.calls + extra
    assert counts.c_calls == baseline.c_calls
    with pytest.raises(AssertionError) as failed:
        check_budget("a", counts)
    message = str(failed.value)
    assert (
        f"relay hot path: {baseline.calls + extra:g} Python calls per message in scenario a, "
        f"bound {BOUNDS['a'][0]:g}; if this is intended, re-measure and update the bound "
        "(and check bench/)"
    ) in message
    assert "C calls" not in message
    assert "blocks" not in message


def test_guard_detects_a_per_message_leak() -> None:
    """A per-message callback that keeps one new object per message fails the leak check."""
    kept: list[object] = []

    def leaky() -> None:
        kept.append(object())
        return None

    counts = measure(build(WORKLOADS["a"], on_message=leaky))
    assert counts.blocks >= MESSAGES
    with pytest.raises(AssertionError, match=r"allocated blocks still alive after 2000 messages"):
        check_budget("a", counts)


if __name__ == "__main__":
    # Today's counts and the bounds the rule above gives, for re-measuring.
    import math

    print(f"{'':3}{'Python/msg':>12}{'bound':>8}{'C/msg':>10}{'bound':>8}{'blocks':>8}")
    for name in sorted(WORKLOADS):
        c = measure(build(WORKLOADS[name]))
        print(
            f"{name:3}{c.calls:12g}{math.ceil(round(c.calls * 110, 6)) / 100:8g}"
            f"{c.c_calls:10g}{math.ceil(round(c.c_calls * 110, 6)) / 100:8g}{c.blocks:8d}"
        )
