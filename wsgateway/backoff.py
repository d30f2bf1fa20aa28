# -*- test-case-name: tests.unit.core.test_backoff -*-
"""
Exponential backoff, written once for every retry loop: the Redis links,
upstream connect retries, the replay passes of durable delivery and the
restarts of dead workers.

Pure: no clock, no I/O; randomness comes from the caller's C{rng}, so tests
pin the delays with a seeded C{random.Random}.

  - L{exponential}: C{initial * factor ** attempt}, capped at C{maximum};
  - L{full_jitter}: uniform in [0, d] (AWS architecture blog, "Exponential
    Backoff And Jitter"): callers that retry one request each;
  - L{equal_jitter}: uniform in [d/2, d]: never retries at once, yet nodes
    that lost a server together do not come back in lockstep.
"""

from __future__ import annotations

import random

__all__ = ["equal_jitter", "exponential", "full_jitter"]

# factor ** attempt overflows a float after ~1000 doublings; by 64 every
# caller's cap has long been reached.
MAX_EXPONENT = 64


def exponential(attempt: int, *, initial: float, maximum: float, factor: float = 2.0) -> float:
    """The delay before retry C{attempt} (0 for the first): C{min(maximum, initial * factor ** attempt)}."""
    return min(maximum, initial * factor ** min(max(attempt, 0), MAX_EXPONENT))


def full_jitter(delay: float, rng: random.Random) -> float:
    """Uniform in [0, C{delay}]."""
    return rng.uniform(0, delay)


def equal_jitter(delay: float, rng: random.Random) -> float:
    """Uniform in [C{delay}/2, C{delay}]."""
    return delay / 2 + rng.uniform(0.0, delay / 2)
