# -*- test-case-name: tests.test_queue_redis -*-
"""
The Redis Streams queue store of durable delivery (docs/durable-delivery.md,
C{[queue] backend = redis}): L{RedisQueueStore}, with the interface and
the semantics of L{wsgateway.durable.sqlite.QueueStore}, shared by every
gateway node of a cluster.

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

Ownership: a node delivers the entries of the owners whose lease it holds.
Normally that is itself only: it takes its own lease when none is held.
When a node dies (no heartbeat: its liveness key expires after
3 x heartbeat, and its lease too), the first survivor whose heartbeat
finds it so takes its lease (C{SET NX}: exactly one wins) and from then
on its C{pending}, C{pending_for} and C{conn_keys} include the dead node's
entries, in the same order per connection (they stay in the dead
consumer's PEL, so the whole of each connection moves at once; moving
them into the adopter's PEL with XCLAIM would mix owners and make the
way back a scan). When the dead node comes back under the same node id,
its adopter sees its liveness key at its next heartbeat and releases the
lease; the node takes it at its own next heartbeat. A graceful C{stop}
releases the node's leases, so survivors adopt its entries at once.
Every read checks the leases in the same script that reads the entries
(fencing), so two nodes never get the same entry back, except when a
lease holder froze longer than the lease TTL with entries in hand:
delivery is at least once, and C{entry_id} is there to dedupe. Two
processes started with one node id are safe: only one holds the lease.

Every operation is one Lua script (Redis >= 7.0, C{#!lua} flags): atomic,
one round trip, keys computed in the script (a single Redis; in a cluster
the prefix must be a hash tag, e.g. C{{wsgw}}). Appends of one reactor
turn go in one script (up to C{max_batch_entries} and
C{max_batch_bytes}; one C{append} call is never split). C{expire} and
C{replay_dead()} move at most 1 000 entries per script; C{purge} is one
script (a snapshot), as long as the route's stream. Reads are
C{no-writes} scripts and C{ack} is C{allow-oom}, so delivery and acks go
on while Redis refuses writes for lack of memory. The scripts are in
L{wsgateway.durable.redis_scripts}.

Guarantees: the Deferred of C{append} fires once Redis ran the script, so
the entries survive a gateway C{kill -9}. They survive a Redis crash only
as far as Redis' persistence is configured: with C{appendonly yes} and
C{appendfsync always} Redis fsyncs before it answers; with C{everysec}
about a second of accepted entries can be lost; with persistence off, all
of them. A failover to a replica can lose what was not replicated yet.

Failures: while Redis is down every operation fails at once with
L{QueueUnavailable}; a hung Redis fails them after C{reply_timeout}; an
error reply (OOM, READONLY, MISCONF...) fails them too. Unlike SQLite's, a
failed C{append} that was already sent (timeout, connection lost) may
still have been stored, whole (the script runs in one go): appending
again can give a duplicate, never a loss. Nothing waits for
Redis to come back, and appends beyond C{max_pending} entries (or
C{max_pending_bytes}) not yet answered are refused. The link reconnects
with backoff (L{wsgateway.redislink}).

Timers: the heartbeat and the link run on C{reactor} (Redis counts TTLs
in real time); C{clock} gives the times written into entries and read
for retention and ages (tests inject a Clock).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from typing import Any

import txredisapi  # type: ignore[import-untyped]
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgateway.config.loader import QueueConfig, RedisConfig
from wsgateway.durable.entries import DeadLetter, Entry, NewEntry, QueueUnavailable, in_conn_order, new_ulid
from wsgateway.durable.redis_scripts import SCRIPTS
from wsgateway.redislink import Backoff, CommandProtocol, RedisLink, RedisTarget, parse_url

__all__ = ["RedisQueueStore"]

_CHUNK = 1000  # entries moved per script by expire and replay_dead(None): Redis is never blocked for long


# -- decoding ------------------------------------------------------------------


def _text(b: bytes) -> str:
    return b.decode("utf-8")


def _unpack(data: bytes) -> list[bytes]:
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


def _packed_entry(data: bytes) -> Entry:
    items = _unpack(data)
    return _entry(items[0], items[1], items[2], items[3:])


def _entry(route: bytes, sid: bytes, attempts: bytes | int, flat: Sequence[bytes]) -> Entry:
    f = dict(zip(flat[0::2], flat[1::2]))
    trace = f.get(b"trace", b"")
    r = _text(route)
    return Entry(
        id=f"{r}/{_text(sid)}",
        entry_id=_text(f[b"eid"]),
        route=r,
        conn_key=_text(f[b"conn"]),
        seq=int(f[b"seq"]),
        binary=f[b"bin"] == b"1",
        message=bytes(f[b"msg"]),
        claims=json.loads(f[b"claims"]),
        headers=tuple((str(n), str(v)) for n, v in json.loads(f[b"headers"])),
        trace_id=_text(trace[1:]) if trace else None,
        attempts=int(attempts),
        first_seen=float(f[b"first"]),
        enqueued_at=float(f[b"enq"]),
    )


def _pairs(ids: Sequence[str]) -> list[str]:
    """C{"ROUTE/ID"} ids -> C{[route, id, route, id...]}, duplicates dropped (C{IN} semantics)."""
    out: list[str] = []
    for i in dict.fromkeys(ids):
        route, slash, sid = str(i).rpartition("/")
        if slash:
            out += [route, sid]
    return out


def _encode(e: NewEntry, first: float, eid: str) -> list[Any]:
    """One entry's 11 script arguments (the order queue_redis_scripts._APPEND reads them in)."""
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


# -- the store -------------------------------------------------------------------


class RedisQueueStore(Service):
    """
    The Redis store (see the module docstring); the interface of
    L{QueueStore}, with C{"ROUTE/STREAM-ID"} string ids.

    C{target}: a C{[redis] url} or a L{RedisTarget}; C{prefix}: C{[redis]
    prefix}; C{node_id}: this gateway node (the owner of what it appends).
    C{heartbeat} (s): how often the liveness key and the held leases are
    renewed and dead owners looked for; C{alive_ttl} and C{lease_ttl}
    (default 3 x heartbeat): how long a silent node counts as alive, and
    keeps its leases. C{reply_timeout}, C{connect_timeout}, C{backoff}:
    the link's. C{max_pending} entries (C{max_pending_bytes} of messages)
    may await Redis's answer before appends are refused;
    C{max_batch_entries} / C{max_batch_bytes} cap one append script.
    """

    log = Logger()

    def __init__(
        self,
        target: RedisTarget | str,
        *,
        prefix: str = "wsgw",
        node_id: str,
        reactor: Any,
        clock: IReactorTime | None = None,
        max_attempts: int = 20,
        retention: float = 86400.0,
        heartbeat: float = 1.0,
        alive_ttl: float | None = None,
        lease_ttl: float | None = None,
        reply_timeout: float = 5.0,
        connect_timeout: float = 3.0,
        backoff: Backoff = Backoff(),
        max_pending: int = 10000,
        max_pending_bytes: int = 64 * 1024 * 1024,
        max_batch_entries: int = 1000,
        max_batch_bytes: int = 8 * 1024 * 1024,
        rng: random.Random | None = None,
    ) -> None:
        self.target = parse_url(target) if isinstance(target, str) else target
        self.prefix = f"{prefix}:q"
        self.node_id = node_id
        # Unique per process: a restarted node (or a second process with the
        # same node id) must not renew a lease it did not take.
        self.token = f"{node_id} {os.urandom(8).hex()}"
        self._reactor = reactor
        timer: Any = clock if clock is not None else reactor
        self._now = timer.seconds
        self.max_attempts = max_attempts
        self.retention = retention
        self.heartbeat = heartbeat
        self.alive_ttl = alive_ttl if alive_ttl is not None else 3 * heartbeat
        self.lease_ttl = lease_ttl if lease_ttl is not None else 3 * heartbeat
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.max_batch_entries = max_batch_entries
        self.max_batch_bytes = max_batch_bytes
        self._link = RedisLink(
            self.target, reactor=reactor, clock=reactor, protocol=CommandProtocol, reply_timeout=reply_timeout,
            connect_timeout=connect_timeout, backoff=backoff, rng=rng or random.Random(),
            on_up=self._up, on_down=self._down, on_failure=self._failed,
        )
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = reactor
        self._beating = False
        self._buffer: list[tuple[list[NewEntry], Deferred[list[str]]]] = []
        self._flush_call: Any = None
        self._queued = 0  # entries buffered or sent and not answered yet
        self._queued_bytes = 0
        self._busy = 0  # scripts sent and not answered yet
        self._idle: list[Deferred[None]] = []
        self._first: Deferred[None] | None = None
        self._state: bool | None = None  # Redis up (True) / down (False), for logging once per change
        self._held: list[str] = []
        self._waiting = False  # our own lease is held by another process
        self._started = False
        self._stopping = False
        # Counters, for metrics and tests (reactor thread only).
        self.transactions = 0  # append scripts run
        self.appended = 0
        self.errors = 0
        self.append_failed_at: float | None = None  # clock time of the last failed append (as QueueStore)

    @classmethod
    def from_config(
        cls, queue_cfg: QueueConfig, redis_cfg: RedisConfig, *, node_id: str, reactor: Any,
        clock: IReactorTime | None = None, **options: Any,
    ) -> RedisQueueStore:
        """From a C{QueueConfig} and a C{RedisConfig}."""
        return cls(
            redis_cfg.url, prefix=redis_cfg.prefix, node_id=node_id, reactor=reactor, clock=clock,
            max_attempts=queue_cfg.max_attempts, retention=queue_cfg.retention, **options,
        )

    @property
    def ready(self) -> bool:
        """Redis is connected now (operations are sent, not refused at once)."""
        return self._link.up

    @property
    def held(self) -> list[str]:
        """The owners whose leases this node held at its last heartbeat (itself, and the dead it adopted)."""
        return list(self._held)

    # -- lifecycle -------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Connect and heartbeat. Fires after the first heartbeat ran (the own
        lease is taken) or the first connection attempt failed (logged;
        operations fail until Redis is there): it never waits for Redis.
        """
        if self._started:
            return succeed(None)
        self._started = True
        self.running = 1
        self._first = Deferred()
        d = self._first
        self._link.start()
        self._beat.start(self.heartbeat, now=False)
        return d

    def stop(self) -> Deferred[None]:
        """Send what is buffered, wait for the answers, release this node's leases, disconnect."""
        if not self._started:
            return succeed(None)
        self._stopping = True
        if self._beat.running:
            self._beat.stop()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush()
        self._fire_first()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        try:
            await self._when_idle()
            if self._link.up:
                try:
                    await self._call("release", [self.node_id, self.token])
                except QueueUnavailable:
                    pass  # the leases expire by themselves
            await self._link.stop()
        finally:
            self._started = self._stopping = False
            self.running = 0
            self._held = []

    def startService(self) -> None:
        self.start()

    def stopService(self) -> Deferred[None]:
        return self.stop()

    def _when_idle(self) -> Deferred[None]:
        if not self._busy:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def _fire_first(self) -> None:
        first, self._first = self._first, None
        if first is not None:
            first.callback(None)

    # -- Redis coming and going ----------------------------------------------

    def _up(self, proto: Any) -> None:
        back = self._state is False
        self._state = True
        self.log.info("queue: redis {what}: {target}, node {node}", what="back" if back else "up",
                      target=self.target.describe(), node=self.node_id)
        self._heartbeat()

    def _down(self, why: Failure) -> None:
        self._went_down(why.getErrorMessage())

    def _failed(self, why: Failure | str) -> None:
        self._went_down(why if isinstance(why, str) else why.getErrorMessage())
        self._fire_first()

    def _went_down(self, why: str) -> None:
        if self._state is False or self._stopping:
            return
        self._state = False
        self.log.warn("queue: redis down: {target} ({why}); queue operations fail until it is back",
                      target=self.target.describe(), why=why)

    def _heartbeat(self) -> None:
        if self._beating or self._stopping or not self._link.up:
            return
        self._beating = True
        ms = [str(max(1, round(t * 1000))) for t in (self.alive_ttl, self.lease_ttl)]
        d = self._call("heartbeat", [self.node_id, self.token, *ms])

        def update(owners: list[bytes]) -> None:
            now = [_text(o) for o in owners]
            for o in now:
                if o not in self._held and o != self.node_id:
                    self.log.warn("queue: node {owner} is dead; delivering its entries", owner=o)
            for o in self._held:
                if o not in now and o != self.node_id:
                    self.log.info("queue: no longer delivering the entries of {owner} (back, or all delivered)",
                                  owner=o)
            waiting = self.node_id not in now
            if waiting and not self._waiting:
                self.log.warn("queue: another process holds node {node}'s lease; its entries wait for it",
                              node=self.node_id)
            self._waiting = waiting
            self._held = now

        def done(_: object) -> None:
            self._beating = False
            self._fire_first()

        d.addCallbacks(update, lambda f: None)
        d.addBoth(done)

    # -- sending -----------------------------------------------------------

    def _call(self, name: str, args: Sequence[Any]) -> Deferred[Any]:
        """Run one script; L{QueueUnavailable} at once while Redis is down, or on any error reply."""
        proto = self._link.protocol
        if proto is None:
            return self._error(Failure(QueueUnavailable(f"{self.target.describe()}: redis down")))
        script = SCRIPTS[name]
        full = [self.prefix, *args]
        self._busy += 1

        def noscript(f: Failure) -> Any:
            # Redis restarted (or SCRIPT FLUSH): send the text once, which caches it again.
            again = self._link.protocol
            if again is not None and f.check(txredisapi.ResponseError) and str(f.value).startswith("NOSCRIPT"):
                return _send(again, "EVAL", script.text, 0, *full)
            return f

        def answered(result: Any) -> Any:
            self._busy -= 1
            if not self._busy:
                idle, self._idle = self._idle, []
                for w in idle:
                    w.callback(None)
            if isinstance(result, Failure):
                return self._error(result)
            return result

        d = _send(proto, "EVALSHA", script.sha, 0, *full)
        d.addErrback(noscript)
        d.addBoth(answered)
        return d

    def _error(self, f: Failure) -> Deferred[Any]:
        if not f.check(QueueUnavailable):
            f = Failure(QueueUnavailable(f"{self.target.describe()}: {f.getErrorMessage()}"))
        self.errors += 1
        if self.errors & (self.errors - 1) == 0:  # the 1st, 2nd, 4th, 8th...: no flood while Redis refuses
            self.log.warn("queue: {why} ({count} errors so far)", why=f.getErrorMessage(), count=self.errors)
        return fail(f)

    def _refuse(self, why: str) -> Deferred[Any]:
        self.errors += 1
        return fail(QueueUnavailable(f"{self.target.describe()}: {why}"))

    # -- append (one script per reactor turn) ---------------------------------

    def append(self, entries: Sequence[NewEntry]) -> Deferred[list[str]]:
        """
        Store C{entries} (in this order, all or none); fires with their ids
        once Redis ran the script, or fails with L{QueueUnavailable}: at
        once while Redis is down or too much awaits its answer.
        """
        entries = list(entries)
        if not self._started or self._stopping:
            return fail(QueueUnavailable(f"{self.target.describe()}: the queue store is not running"))
        if not self._link.up:
            self.append_failed_at = self._now()
            return self._refuse("redis down")
        size = sum(len(e.message) for e in entries)
        if self._queued and (self._queued + len(entries) > self.max_pending
                             or self._queued_bytes + size > self.max_pending_bytes):
            self.append_failed_at = self._now()
            return self._refuse("backlog: too many appends await redis")
        if not entries:
            return succeed([])
        self._queued += len(entries)
        self._queued_bytes += size

        def cancel(d: Deferred[list[str]]) -> None:
            # Only while still buffered: once sent, Redis may have stored them.
            for i, (_, waiter) in enumerate(self._buffer):
                if waiter is d:
                    del self._buffer[i]
                    self._queued -= len(entries)
                    self._queued_bytes -= size
                    return

        d: Deferred[list[str]] = Deferred(cancel)
        self._buffer.append((entries, d))
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        self._flush_call = None
        batch: list[tuple[list[NewEntry], Deferred[list[str]]]] = []
        count = size = 0
        for entries, d in self._buffer:
            n, b = len(entries), sum(len(e.message) for e in entries)
            if batch and (count + n > self.max_batch_entries or size + b > self.max_batch_bytes):
                self._write(batch, count, size)
                batch, count, size = [], 0, 0
            batch.append((entries, d))
            count, size = count + n, size + b
        self._buffer = []
        if batch:
            self._write(batch, count, size)

    def _write(self, batch: list[tuple[list[NewEntry], Deferred[list[str]]]], count: int, size: int) -> None:
        now = self._now()
        ms = [str(max(1, round(t * 1000))) for t in (self.lease_ttl, self.alive_ttl)]
        args: list[Any] = [self.node_id, self.token, repr(float(now)), *ms]
        routes: list[str] = []
        for entries, _ in batch:
            for e in entries:
                args += _encode(e, now if e.first_seen is None else e.first_seen, new_ulid(now))
                routes.append(e.route)

        def written(reply: bytes) -> None:
            ids = reply.split()
            self.append_failed_at = None
            self.transactions += 1
            self.appended += len(ids)
            full = [f"{r}/{_text(i)}" for r, i in zip(routes, ids)]
            at = 0
            for entries, d in batch:
                d.callback(full[at : at + len(entries)])
                at += len(entries)

        def failed(f: Failure) -> None:
            self.append_failed_at = self._now()
            for _, d in batch:
                d.errback(f)

        def settle(result: object) -> object:
            self._queued -= count
            self._queued_bytes -= size
            return result

        d = self._call("append", args)
        d.addBoth(settle)
        d.addCallbacks(written, failed)

    # -- reads ---------------------------------------------------------------

    def pending(self, route: str | None = None, limit: int = 1000) -> Deferred[list[Entry]]:
        """The oldest C{limit} entries this node delivers (of C{route}, or all), in delivery order."""
        if limit <= 0:
            return succeed([])
        args: list[Any] = [self.token, str(limit)] + ([route] if route is not None else [])
        d = self._call("pending", args)
        return d.addCallback(lambda rows: in_conn_order([_packed_entry(row) for row in rows]))

    def pending_for(self, conn_key: str, limit: int = 500) -> Deferred[list[Entry]]:
        """The oldest C{limit} entries of one client connection (if this node delivers them), by C{seq}."""
        if limit <= 0:
            return succeed([])
        d = self._call("pending_for", [self.token, conn_key, str(limit)])
        return d.addCallback(lambda rows: [_packed_entry(row) for row in rows])

    def conn_keys(self, limit: int = 100) -> Deferred[list[tuple[str, str]]]:
        """C{(route, conn_key)} of the connections this node delivers, the one with the oldest entry first."""
        if limit <= 0:
            return succeed([])

        def pairs(members: list[bytes]) -> list[tuple[str, str]]:
            return [(str(r), str(c)) for r, c in (json.loads(m) for m in members)]

        return self._call("conn_keys", [self.token, str(limit)]).addCallback(pairs)

    def depth(self) -> Deferred[dict[str, dict[str, float]]]:
        """
        C{{route: {"depth": n, "oldest_age": seconds, "dead": n}}}, for the
        whole cluster (stream lengths, no scan). C{oldest_age} counts from
        the C{first_seen} of the route's oldest stream entry.
        """
        now = self._now()

        def table(rows: list[list[Any]]) -> dict[str, dict[str, float]]:
            out: dict[str, dict[str, float]] = {}
            for route, n, dead, first in rows:
                age = max(0.0, now - float(first)) if first else 0.0
                out[_text(route)] = {"depth": int(n), "oldest_age": age, "dead": int(dead)}
            return out

        return self._call("depth", []).addCallback(table)

    def dead_letters(self, limit: int = 100, route: str | None = None) -> Deferred[list[DeadLetter]]:
        """The oldest C{limit} dead letters (of C{route}, or all), in the order they died."""
        if limit <= 0:
            return succeed([])

        def letters(rows: list[bytes]) -> list[DeadLetter]:
            out = []
            for row in rows:
                r, *flat = _unpack(row)
                f = dict(zip(flat[0::2], flat[1::2]))
                out.append(DeadLetter(_entry(r, f[b"id"], f[b"attempts"], flat), _text(f[b"reason"]),
                                      float(f[b"dead"])))
            return out

        args: list[Any] = [str(limit)] + ([route] if route is not None else [])
        return self._call("dead_letters", args).addCallback(letters)

    # -- changes -------------------------------------------------------------

    def ack(self, ids: Sequence[str]) -> Deferred[int]:
        """Remove delivered entries (whoever delivers them now); fires with how many were removed."""
        pairs = _pairs(ids)
        if not pairs:
            return succeed(0)
        return self._call("ack", pairs).addCallback(int)

    def attempt_failed(self, ids: Sequence[str]) -> Deferred[list[str]]:
        """
        Count one more failed delivery attempt for C{ids}; those that reach
        C{max_attempts}, or are older than C{retention}, move to the dead
        letters. Fires with the ids moved.
        """
        pairs = _pairs(ids)
        if not pairs:
            return succeed([])
        now = self._now()
        args = [repr(float(now)), str(self.max_attempts), repr(float(now - self.retention)), *pairs]
        return self._call("attempt_failed", args).addCallback(lambda moved: [_text(m) for m in moved])

    def expire(self, now: float | None = None) -> Deferred[list[str]]:
        """Move every entry this node delivers that is older than C{retention} to the dead letters."""
        at = self._now() if now is None else now
        return Deferred.fromCoroutine(self._expire(at))

    async def _expire(self, at: float) -> list[str]:
        moved: list[str] = []
        while True:
            batch, more = await self._call(
                "expire", [self.token, repr(float(at)), repr(float(at - self.retention)), str(_CHUNK)]
            )
            moved += [_text(m) for m in batch]
            if not more:
                return moved

    def replay_dead(self, ids: Sequence[str] | None = None) -> Deferred[int]:
        """
        Put dead letters (C{ids}: their C{entry.id}, or all when None) back
        in the queue of their owner, with zero attempts, a fresh retention
        window, the same C{entry_id} and a new C{id}. Fires with how many.
        """
        return Deferred.fromCoroutine(self._replay(ids))

    async def _replay(self, ids: Sequence[str] | None) -> int:
        now = repr(float(self._now()))
        if ids is not None:
            pairs = _pairs(ids)
            if not pairs:
                return 0
            count, _ = await self._call("replay_dead", [now, str(_CHUNK), "ids", *pairs])
            return int(count)
        total = 0
        while True:
            count, more = await self._call("replay_dead", [now, str(_CHUNK), "all"])
            total += int(count)
            if not more:
                return total

    def purge(self, route: str | None = None, *, dead: bool = False) -> Deferred[int]:
        """
        Delete the entries (C{dead}: the dead letters) of C{route}, or of
        all routes, whichever node holds them; fires with how many.
        """
        return self._call("purge", [route or "", "1" if dead else "0"]).addCallback(int)


def _send(proto: Any, *command: Any) -> Deferred[Any]:
    try:
        d: Deferred[Any] = proto.execute_command(*command)
    except Exception as e:  # txredisapi raises at once on a closed connection
        return fail(e)
    return d
