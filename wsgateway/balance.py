# -*- test-case-name: tests.test_upstream -*-
"""
Node-picking strategies. Pure: no reactor, no I/O.

A strategy turns the nodes that may take a new connection into the order in
which a handshake tries them: the first is the pick, the rest are the
failover candidates for retries, so a retry never goes back to a node that
has just failed while another one is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

T = TypeVar("T")


class Strategy(Protocol):
    name: str

    def order(self, nodes: Sequence[T]) -> list[T]:
        """All of ``nodes``, the preferred one first."""


class RoundRobin:
    """Each new connection starts one node further along the list."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def order(self, nodes: Sequence[T]) -> list[T]:
        n = len(nodes)
        if n == 0:
            return []
        start = self._next % n
        self._next = start + 1
        return [*nodes[start:], *nodes[:start]]


def strategy_for(name: str) -> Strategy:
    # The other strategies of SPEC's ``balance`` key are added by the
    # upstream-balancing issue; until then they share round robin's order.
    return RoundRobin()
