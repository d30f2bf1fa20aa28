# -*- test-case-name: tests.unit.relay.test_relay -*-
"""The client's message rate limit (``[limits] messages_per_second``), as the client scanner's per-message check."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

from wsgateway import codes
from wsgateway.handshake.admission import TokenBucket

# What the client scanner stops on when the message rate is exceeded: the
# same path as a too-big message (close to the client, 1001 upstream).
RATE_LIMITED = (codes.POLICY_VIOLATION, codes.REASON_RATE_LIMIT)


def rate_limiter(
    messages_per_second: float, clock: IReactorTime
) -> Callable[[], tuple[int, str] | None] | None:
    """
    The client scanner's per-message check: None (no check at all) when the
    limit is off, else a closure over a fresh bucket, so the hot path does
    no attribute lookups and allocates nothing.
    """
    if messages_per_second <= 0:
        return None
    seconds = clock.seconds
    # burst = 2x rate (docs/configuration.md); at least one message, or a rate under 0.5/s
    # would refuse every message
    take = TokenBucket(messages_per_second, max(2.0 * messages_per_second, 1.0), seconds()).take

    def admit() -> tuple[int, str] | None:
        return None if take(seconds()) else RATE_LIMITED

    return admit
