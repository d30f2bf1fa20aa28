# -*- test-case-name: tests.integration.test_queue_redis -*-
"""
How L{wsgateway.durable.redis.RedisQueueStore} lays out a queue in Redis,
and how an entry is written to and read from a stream entry. The Lua
scripts (L{wsgateway.durable.redis_scripts}) keep this layout; this module
encodes their arguments and decodes their replies.

Key layout (C{P} = C{{prefix}:q}, C{prefix} from C{[redis] prefix}):

  - C{P:s:ROUTE}: stream, the route's entries. Consumer group C{gw}; each
    entry sits in the pending list (PEL) of exactly one consumer, named
    after the node that enqueued it (its owner). Fields: C{node}, C{eid}
    (ULID), C{conn}, C{seq}, C{bin}, C{msg} (raw bytes), C{claims} and
    C{headers} (JSON), C{trace} ("" for None, else "=" + id),
    C{first} / C{enq} (C{repr} of the float), C{n}, C{ck}.
  - C{P:n}: counter; C{n} of each entry: the global append order, across
    routes (C{pending} merges routes by it, C{conn_keys} orders by it).
  - C{P:a:ROUTE}: hash stream id -> attempts (only entries that failed).
  - C{P:c:CONN}: sorted set, a connection's entries ("ROUTE/ID", score
    C{seq}): C{pending_for} without a scan.
  - C{P:o:NODE}: sorted set, a node's connections (C{ck} = JSON
    C{[route, conn]}, score = C{n} of the connection's first entry: the
    first appended, and after removals the first by C{seq}):
    C{conn_keys} without a scan. Connection keys are meant to be unique in
    the cluster; if two nodes shared one, each would still read only the
    entries it holds.
  - C{P:d:ROUTE}: stream, the route's dead letters (the entry's fields plus
    C{id}, C{attempts}, C{reason}, C{dead}); C{P:x:ROUTE}: hash entry
    stream id -> dead letter stream id, for C{replay_dead(ids)}.
  - C{P:routes}, C{P:nodes}: sets of the routes and of the owners in use.
  - C{P:alive:NODE}: liveness, this process's token, TTL C{alive_ttl}
    (3 x heartbeat), refreshed every C{heartbeat}.
  - C{P:lease:NODE}: who delivers NODE's entries: the token of one
    process, taken with C{SET NX PX}, renewed every heartbeat while held.

Ids: C{Entry.id} is the string C{"ROUTE/STREAM-ID"} (a stream id alone
does not say which stream; the route is everything before the last "/").
C{replay_dead} appends a new stream entry, so a replayed entry gets a new
C{id}; its C{entry_id} (ULID, for the upstream to dedupe on) never
changes. Depth, dead letters, C{replay_dead} and C{purge} are
cluster-wide; reads and C{expire} see only the entries this node holds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from wsgateway.durable.entries import Entry, NewEntry

__all__ = ["encode", "id_pairs", "packed_entry", "stream_entry", "text", "unpack"]


def text(b: bytes) -> str:
    return b.decode("utf-8")


def unpack(data: bytes) -> list[bytes]:
    """What the scripts' C{pack} made: C{LEN:BYTES} after C{LEN:BYTES}."""
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        colon = data.index(b":", pos)
        start = colon + 1
        end = start + int(data[pos:colon])
        out.append(data[start:end])
        pos = end
    return out


def packed_entry(data: bytes) -> Entry:
    items = unpack(data)
    return stream_entry(items[0], items[1], items[2], items[3:])


def stream_entry(route: bytes, sid: bytes, attempts: bytes | int, flat: Sequence[bytes]) -> Entry:
    f = dict(zip(flat[0::2], flat[1::2]))
    trace = f.get(b"trace", b"")
    r = text(route)
    return Entry(
        id=f"{r}/{text(sid)}",
        entry_id=text(f[b"eid"]),
        route=r,
        conn_key=text(f[b"conn"]),
        seq=int(f[b"seq"]),
        binary=f[b"bin"] == b"1",
        message=bytes(f[b"msg"]),
        claims=json.loads(f[b"claims"]),
        headers=tuple((str(n), str(v)) for n, v in json.loads(f[b"headers"])),
        trace_id=text(trace[1:]) if trace else None,
        attempts=int(attempts),
        first_seen=float(f[b"first"]),
        enqueued_at=float(f[b"enq"]),
    )


def id_pairs(ids: Sequence[str]) -> list[str]:
    """C{"ROUTE/ID"} ids -> C{[route, id, route, id...]}, duplicates dropped (C{IN} semantics)."""
    out: list[str] = []
    for i in dict.fromkeys(ids):
        route, slash, sid = str(i).rpartition("/")
        if slash:
            out += [route, sid]
    return out


def encode(e: NewEntry, first: float, eid: str) -> list[Any]:
    """One entry's 11 script arguments (the order the append script reads them in)."""
    return [
        e.route,
        e.conn_key,
        str(int(e.seq)),
        json.dumps([e.route, e.conn_key]),
        eid,
        b"1" if e.binary else b"0",
        repr(float(first)),
        b"" if e.trace_id is None else "=" + e.trace_id,
        json.dumps(dict(e.claims), separators=(",", ":")),
        json.dumps([list(h) for h in e.headers], separators=(",", ":")),
        bytes(e.message),
    ]
