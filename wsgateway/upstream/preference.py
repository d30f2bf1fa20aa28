# -*- test-case-name: tests.unit.upstream.test_balance -*-
"""
The ``zone`` / ``version_header`` preference (docs/configuration.md
``[upstream:NAME]``): which nodes a balancing strategy
(L{wsgateway.upstream.balance}) chooses from. Pure: no reactor, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

__all__ = ["PlacedNode", "filter_nodes"]


class PlacedNode(Protocol):
    """What the filter reads of a node (``pool.Node`` provides it)."""

    @property
    def zone(self) -> str | None: ...

    @property
    def version(self) -> str | None: ...


N = TypeVar("N", bound=PlacedNode)


def filter_nodes(nodes: Sequence[N], *, zone: str | None, version: str | None) -> tuple[list[N], bool]:
    """
    The nodes a strategy should choose from, and whether a preference had to
    be dropped (the caller logs that).

    Nodes matching both the ``zone`` and the ``version`` (each only when
    given); if none, the zone preference goes first, since another zone is
    only slower while another version may not speak the client's API: nodes
    of that version in any zone; if none either, all of ``nodes``.
    """
    zone = zone or None
    version = version or None
    if not nodes or (zone is None and version is None):
        return list(nodes), False
    both = [n for n in nodes if (zone is None or n.zone == zone) and (version is None or n.version == version)]
    if both:
        return both, False
    if zone is not None and version is not None:
        same_version = [n for n in nodes if n.version == version]
        if same_version:
            return same_version, True
    return list(nodes), True
