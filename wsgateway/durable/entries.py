"""
What a durable queue holds (docs/durable-delivery.md), shared by both stores
(L{wsgateway.durable.sqlite} on SQLite, L{wsgateway.durable.redis} on Redis
Streams; their interface is L{wsgateway.interfaces.QueueStore}) and by the
relays and the admin API, which must not pay for importing a store's
driver (sqlite3 alone is 0.7 MiB of a gateway that queues nothing).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

EntryId: TypeAlias = "int | str"  # what a store names an entry by: see QueueStore in wsgateway.interfaces


class QueueUnavailable(Exception):
    """The queue file cannot be read or written now (read-only, disk full, I/O error)."""


class QueueFull(QueueUnavailable):
    """
    An append refused by C{[queue] max_bytes} (C{whole}: the queue as a
    whole) or C{max_bytes_per_connection} (that client's share). A
    L{QueueUnavailable} so every caller that handles one still refuses the
    message; the durable relay tells the client 1013 "queue full" instead of 1011.
    """

    def __init__(self, message: str, *, whole: bool) -> None:
        super().__init__(message)
        self.whole = whole


@dataclass(frozen=True)
class NewEntry:
    """What the gateway hands to C{append}: one client message it could not forward."""

    route: str
    conn_key: str  # identifies the client connection
    seq: int  # order of the message within its connection
    message: bytes
    binary: bool = False
    claims: Mapping[str, Any] = field(default_factory=dict)
    headers: Sequence[tuple[str, str]] = ()  # identity headers to replay, in order
    trace_id: str | None = None
    first_seen: float | None = None  # when the gateway got it; None = now


@dataclass(frozen=True)
class Entry:
    id: EntryId  # the SQLite row id; a "ROUTE/STREAM-ID" string in the Redis store
    entry_id: str
    route: str
    conn_key: str
    seq: int
    binary: bool
    message: bytes
    claims: dict[str, Any]
    headers: tuple[tuple[str, str], ...]
    trace_id: str | None
    attempts: int
    first_seen: float
    enqueued_at: float


@dataclass(frozen=True)
class DeadLetter:
    entry: Entry
    reason: str  # "max_attempts" | "retention"
    dead_at: float


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_ulid(now: float | None = None) -> str:
    """A ULID: 48-bit milliseconds then 80 random bits, Crockford base32 (26 characters)."""
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    n = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(n >> (5 * i)) & 31] for i in reversed(range(26)))


def in_conn_order(entries: list[Entry]) -> list[Entry]:
    """Keep the id order overall, but sort each connection's entries by seq within its own positions."""
    slots: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        slots.setdefault(e.conn_key, []).append(i)
    out = list(entries)
    for positions in slots.values():
        for pos, e in zip(positions, sorted((entries[p] for p in positions), key=lambda e: (e.seq, e.id))):
            out[pos] = e
    return out
