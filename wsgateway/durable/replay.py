# -*- test-case-name: tests.unit.durable.test_durable_units -*-
"""
What a queued entry keeps of its client's upstream request, and the
request of a replay connection made from it (docs/durable-delivery.md): the path,
subprotocol and Origin as pseudo-headers, the identity headers, never
credentials; plus the headers that let an upstream dedupe, C{(conn id,
seq)}, on every upstream connection of an C{at_least_once} route. A
connection's L{QueueLink} holds what its entries are recorded with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from wsgateway.durable.entries import Entry

CONN_HEADER = "X-Wsgateway-Conn-Id"
SEQ_HEADER = "X-Wsgateway-Seq"
REPLAY_HEADER = "X-Wsgateway-Replay"

# Request parts a replay connection needs besides headers, kept in an
# entry's header list under names no HTTP header can have.
PATH_KEY = ":path"
PROTOCOL_KEY = ":subprotocol"
ORIGIN_KEY = ":origin"
# Never written to the queue file: credentials may be forwarded on a live
# connection (forward_auth) but are not identity to replay, and would sit on disk.
_NOT_STORED = frozenset({"authorization", "cookie"})


@dataclass
class QueueLink:
    """What a durable relay needs from the gateway: the store, identity to record, counters."""

    store: Any  # QueueStore or RedisQueueStore
    route: str
    conn_key: str
    headers: tuple[tuple[str, str], ...]  # identity for a replay connection (see stored_headers)
    claims: dict[str, Any] = field(default_factory=dict)
    trace_id: str | None = None
    on_delivered: Callable[[int], None] = lambda n: None
    on_failure: Callable[[str], None] = lambda what: None
    retry_initial: float = 0.1


def stored_headers(resource: str, headers: dict[str, str], protocol: str | None,
                   origin: str | None) -> tuple[tuple[str, str], ...]:
    """An upstream request as kept with each entry, credentials left out."""
    out = [(PATH_KEY, resource)]
    if protocol:
        out.append((PROTOCOL_KEY, protocol))
    if origin:
        out.append((ORIGIN_KEY, origin))
    own = {CONN_HEADER.lower(), SEQ_HEADER.lower(), REPLAY_HEADER.lower()}
    out += [(k, v) for k, v in headers.items() if k.lower() not in _NOT_STORED and k.lower() not in own]
    return tuple(out)


def replay_request(entries: Sequence[Entry], base: Callable[..., Any]) -> Any:
    """The UpstreamRequest of a replay connection for C{entries} (one connection's, in seq order)."""
    first = entries[0]
    path, protocol, origin = "/", None, None
    headers: dict[str, str] = {}
    for k, v in first.headers:
        if k == PATH_KEY:
            path = v
        elif k == PROTOCOL_KEY:
            protocol = v
        elif k == ORIGIN_KEY:
            origin = v
        else:
            headers[k] = v
    headers[REPLAY_HEADER] = "1"
    headers[CONN_HEADER] = first.conn_key
    headers[SEQ_HEADER] = str(first.seq)
    return base(resource=path, headers=headers, protocols=(protocol,) if protocol else (), origin=origin,
                trace_id=first.trace_id or "", quiet=True)


def consecutive(entries: Sequence[Entry]) -> list[Entry]:
    """The leading run of C{entries} whose seqs follow one another: what one replay connection may carry."""
    out = list(entries[:1])
    for e in entries[1:]:
        if e.seq != out[-1].seq + 1:
            break
        out.append(e)
    return out
