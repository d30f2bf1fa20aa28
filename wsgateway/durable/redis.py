# -*- test-case-name: tests.integration.test_queue_redis -*-
"""
The Redis Streams queue store of durable delivery (docs/durable-delivery.md,
C{[queue] backend = redis}): L{RedisQueueStore}, a
L{wsgateway.interfaces.QueueStore} (the semantics of every operation are
documented there) shared by every gateway node of a cluster. The key
layout and the fields of an entry are in L{wsgateway.durable.redis_layout};
the link, the heartbeat and who delivers which node's entries in
L{wsgateway.durable.redis_node}.

Every operation is one Lua script (Redis >= 7.0, C{#!lua} flags): atomic,
one round trip, keys computed in the script (a single Redis; in a cluster
the prefix must be a hash tag, e.g. C{{wsgw}}). Appends of one reactor
turn go in one script (the group commit, L{wsgateway.durable.batching}:
up to C{max_batch_entries} and C{max_batch_bytes}; one C{append} call is
never split; scripts are sent without waiting for the ones in flight).
C{expire} and C{replay_dead()} move at most 1 000 entries per script;
C{purge} is one script (a snapshot), as long as the route's stream. Reads are
C{no-writes} scripts and C{ack} is C{allow-oom}, so delivery and acks go
on while Redis refuses writes for lack of memory. The scripts are in
L{wsgateway.durable.redis_scripts}.

Guarantees: the Deferred of C{append} fires once Redis ran the script, so
the entries survive a gateway C{kill -9}. They survive a Redis crash only
as far as Redis' persistence is configured: with C{appendonly yes} and
C{appendfsync always} Redis fsyncs before it answers; with C{everysec}
about a second of accepted entries can be lost; with persistence off, all
of them. A failover to a replica can lose what was not replicated yet.

Failures (more in L{wsgateway.durable.redis_node}): unlike SQLite's, a
failed C{append} that was already sent (timeout, connection lost) may
still have been stored, whole (the script runs in one go): appending
again can give a duplicate, never a loss. Appends beyond C{max_pending}
entries (or C{max_pending_bytes}) not yet answered are refused.

Timers: the heartbeat, the link and the group commit's flush run on
C{reactor} (Redis counts TTLs in real time); C{clock} gives the times
written into entries and read for retention and ages (tests inject a Clock).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from wsgateway.config.queue import QueueConfig
from wsgateway.config.redis import RedisConfig
from wsgateway.durable.batching import GroupCommit
from wsgateway.durable.entries import (
    DeadLetter,
    Entry,
    NewEntry,
    QueueFull,
    QueueUnavailable,
    in_conn_order,
    new_ulid,
)
from wsgateway.durable.redis_layout import encode, id_pairs, packed_entry, stream_entry, text, unpack
from wsgateway.durable.redis_node import RedisNode
from wsgateway.redis.link import Backoff
from wsgateway.redis.sentinel import locator_for
from wsgateway.redis.target import Locator, RedisTarget, parse_url

if TYPE_CHECKING:
    from wsgateway.interfaces import QueueStore as QueueStoreInterface

__all__ = ["RedisQueueStore"]

_CHUNK = 1000  # entries moved per script by expire and replay_dead(None): Redis is never blocked for long


class RedisQueueStore(Service):
    """
    The Redis store (see the module docstring), with C{"ROUTE/STREAM-ID"}
    string ids.

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
    backend = "RedisQueueStore"  # docs/admin-api.md; workers/aggregate.py tells a shared queue by it

    def __init__(
        self,
        target: RedisTarget | Locator | str,
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
        max_bytes: int | None = None,
        max_bytes_per_connection: int | None = None,
        min_replicas_ack: int = 0,
        on_failover: Any = None,
    ) -> None:
        self.target = parse_url(target) if isinstance(target, str) else target
        self.prefix = f"{prefix}:q"
        self.node_id = node_id
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
        self.max_bytes = max_bytes
        self.max_bytes_per_connection = max_bytes_per_connection
        self.stored_bytes: int | None = None  # the cluster's queue, as of this node's last append
        self._node = RedisNode(
            self.target, prefix=self.prefix, node_id=node_id, reactor=reactor, log=self.log, heartbeat=heartbeat,
            alive_ttl=self.alive_ttl, lease_ttl=self.lease_ttl, reply_timeout=reply_timeout,
            connect_timeout=connect_timeout, backoff=backoff, rng=rng or random.Random(),
            min_replicas_ack=min_replicas_ack, on_failover=on_failover,
        )
        self._commit: GroupCommit[str] = GroupCommit(
            self._write, clock=reactor, now=self._now, serial=False, max_entries=max_batch_entries,
            max_bytes=max_batch_bytes,
        )
        self._started = False
        self._stopping = False

    @classmethod
    def from_config(
        cls, queue_cfg: QueueConfig, redis_cfg: RedisConfig, *, node_id: str, reactor: Any,
        clock: IReactorTime | None = None, **options: Any,
    ) -> RedisQueueStore:
        """
        From a C{QueueConfig} and a C{RedisConfig}: on the first shard
        (docs/durable-delivery.md#redis): the queue is one set of keys
        whose scripts read and write across routes and owners, which a
        split over shards would break, and channels spread anyway.
        """
        locator = locator_for(redis_cfg, redis_cfg.targets[0], reactor=reactor, clock=clock or reactor,
                              timeout=options.get("connect_timeout", 3.0))
        return cls(
            locator, prefix=redis_cfg.prefix, node_id=node_id, reactor=reactor, clock=clock,
            min_replicas_ack=redis_cfg.min_replicas_ack,
            max_attempts=queue_cfg.max_attempts, retention=queue_cfg.retention, max_bytes=queue_cfg.max_bytes,
            max_bytes_per_connection=queue_cfg.max_bytes_per_connection, **options,
        )

    @property
    def token(self) -> str:
        """This process's own token: what its liveness key and the leases it holds contain."""
        return self._node.token

    @property
    def ready(self) -> bool:
        """Redis is connected now (operations are sent, not refused at once)."""
        return self._node.up

    @property
    def held(self) -> list[str]:
        """The owners whose leases this node held at its last heartbeat (itself, and the dead it adopted)."""
        return list(self._node.held)

    @property
    def transactions(self) -> int:
        return self._commit.transactions

    @property
    def appended(self) -> int:
        return self._commit.appended

    @property
    def errors(self) -> int:
        return self._node.errors

    @property
    def append_failed_at(self) -> float | None:
        return self._commit.failed_at

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
        return self._node.start()

    def stop(self) -> Deferred[None]:
        """Send what is buffered, wait for the answers, release this node's leases, disconnect."""
        if not self._started:
            return succeed(None)
        self._stopping = True
        self._node.stop_beating()
        self._commit.flush_now()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        try:
            await self._node.close()
        finally:
            self._started = self._stopping = False
            self.running = 0

    def startService(self) -> None:
        self.start()

    def stopService(self) -> Deferred[None]:
        return self.stop()

    # -- append (group commit: one script per reactor turn) --------------------

    def append(self, entries: Sequence[NewEntry]) -> Deferred[list[str]]:
        entries = list(entries)
        if not self._started or self._stopping:
            return fail(QueueUnavailable(f"{self._node.describe()}: the queue store is not running"))
        if not self._node.up:
            self._commit.failed_at = self._now()
            return self._node.refuse("redis down")
        size = sum(len(e.message) for e in entries)
        c = self._commit
        if c.queued and (c.queued + len(entries) > self.max_pending or c.queued_bytes + size > self.max_pending_bytes):
            self._commit.failed_at = self._now()
            return self._node.refuse("backlog: too many appends await redis")
        if not entries:
            return succeed([])
        return self._commit.add(entries)

    def _write(self, rows: list[NewEntry]) -> Deferred[list[str | QueueFull]]:
        """
        One group commit: C{rows} in one script; their C{"ROUTE/STREAM-ID"}
        ids, or a L{QueueFull} for those the caps refused (the script checks
        them against the totals it keeps: L{wsgateway.durable.redis_writes}).
        """
        now = self._now()
        ms = [str(max(1, round(t * 1000))) for t in (self.lease_ttl, self.alive_ttl)]
        caps = [str(self.max_bytes or 0), str(self.max_bytes_per_connection or 0)]
        args: list[Any] = [self.node_id, self.token, repr(float(now)), *ms, *caps]
        for e in rows:
            args += encode(e, now if e.first_seen is None else e.first_seen, new_ulid(now))

        def ids(reply: bytes) -> list[str | QueueFull]:
            *got, total = reply.split()
            self.stored_bytes = int(total)
            out: list[str | QueueFull] = []
            for e, i in zip(rows, got):
                if i == b"-":
                    out.append(QueueFull(f"connection {e.conn_key} would pass max_bytes_per_connection = "
                                         f"{self.max_bytes_per_connection}", whole=False))
                elif i == b"=":
                    out.append(QueueFull(f"the queue would pass max_bytes = {self.max_bytes}", whole=True))
                else:
                    out.append(f"{e.route}/{text(i)}")
            return out

        return self._node.call_replicated("append", args).addCallback(ids)

    # -- reads ---------------------------------------------------------------

    def pending(self, route: str | None = None, limit: int = 1000) -> Deferred[list[Entry]]:
        if limit <= 0:
            return succeed([])
        args: list[Any] = [self.token, str(limit)] + ([route] if route is not None else [])
        d = self._node.call("pending", args)
        return d.addCallback(lambda rows: in_conn_order([packed_entry(row) for row in rows]))

    def pending_for(self, conn_key: str, limit: int = 500) -> Deferred[list[Entry]]:
        if limit <= 0:
            return succeed([])
        d = self._node.call("pending_for", [self.token, conn_key, str(limit)])
        return d.addCallback(lambda rows: [packed_entry(row) for row in rows])

    def conn_keys(self, limit: int = 100) -> Deferred[list[tuple[str, str]]]:
        if limit <= 0:
            return succeed([])

        def pairs(members: list[bytes]) -> list[tuple[str, str]]:
            return [(str(r), str(c)) for r, c in (json.loads(m) for m in members)]

        return self._node.call("conn_keys", [self.token, str(limit)]).addCallback(pairs)

    def depth(self) -> Deferred[dict[str, dict[str, float]]]:
        now = self._now()  # depth: stream lengths, no scan; the age from the oldest stream entry's first_seen

        def table(rows: list[list[Any]]) -> dict[str, dict[str, float]]:
            out: dict[str, dict[str, float]] = {}
            for route, n, dead, first in rows:
                age = max(0.0, now - float(first)) if first else 0.0
                out[text(route)] = {"depth": int(n), "oldest_age": age, "dead": int(dead)}
            return out

        return self._node.call("depth", []).addCallback(table)

    def dead_letters(self, limit: int = 100, route: str | None = None) -> Deferred[list[DeadLetter]]:
        if limit <= 0:
            return succeed([])

        def letters(rows: list[bytes]) -> list[DeadLetter]:
            out = []
            for row in rows:
                r, *flat = unpack(row)
                f = dict(zip(flat[0::2], flat[1::2]))
                out.append(DeadLetter(stream_entry(r, f[b"id"], f[b"attempts"], flat), text(f[b"reason"]),
                                      float(f[b"dead"])))
            return out

        args: list[Any] = [str(limit)] + ([route] if route is not None else [])
        return self._node.call("dead_letters", args).addCallback(letters)

    # -- changes -------------------------------------------------------------

    def ack(self, ids: Sequence[str]) -> Deferred[int]:
        pairs = id_pairs(ids)
        if not pairs:
            return succeed(0)
        return self._node.call("ack", pairs).addCallback(int)

    def attempt_failed(self, ids: Sequence[str]) -> Deferred[list[str]]:
        pairs = id_pairs(ids)
        if not pairs:
            return succeed([])
        now = self._now()
        args = [repr(float(now)), str(self.max_attempts), repr(float(now - self.retention)), *pairs]
        return self._node.call("attempt_failed", args).addCallback(lambda moved: [text(m) for m in moved])

    def expire(self, now: float | None = None) -> Deferred[list[str]]:
        at = self._now() if now is None else now
        return Deferred.fromCoroutine(self._expire(at))

    async def _expire(self, at: float) -> list[str]:
        moved: list[str] = []
        while True:
            batch, more = await self._node.call(
                "expire", [self.token, repr(float(at)), repr(float(at - self.retention)), str(_CHUNK)]
            )
            moved += [text(m) for m in batch]
            if not more:
                return moved

    def replay_dead(self, ids: Sequence[str] | None = None) -> Deferred[int]:
        return Deferred.fromCoroutine(self._replay(ids))

    async def _replay(self, ids: Sequence[str] | None) -> int:
        now = repr(float(self._now()))
        if ids is not None:
            pairs = id_pairs(ids)
            if not pairs:
                return 0
            count, _ = await self._node.call("replay_dead", [now, str(_CHUNK), "ids", *pairs])
            return int(count)
        total = 0
        while True:
            count, more = await self._node.call("replay_dead", [now, str(_CHUNK), "all"])
            total += int(count)
            if not more:
                return total

    def purge(self, route: str | None = None, *, dead: bool = False) -> Deferred[int]:
        return self._node.call("purge", [route or "", "1" if dead else "0"]).addCallback(int)


if TYPE_CHECKING:

    def _is_a_queue_store(store: RedisQueueStore) -> QueueStoreInterface[str]:
        return store  # mypy checks the store against the interface here
