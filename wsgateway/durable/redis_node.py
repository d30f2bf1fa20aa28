# -*- test-case-name: tests.integration.test_queue_redis -*-
"""
One gateway node's link to the Redis of its queue store
(L{wsgateway.durable.redis.RedisQueueStore}): the
connection, running the Lua scripts over it, and the heartbeat that keeps
the node's liveness and leases (which owners' entries it delivers).

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

Failures: while Redis is down every script fails at once with
L{QueueUnavailable}; a hung Redis fails them after C{reply_timeout}; an
error reply (OOM, READONLY, MISCONF...) fails them too. Nothing waits for
Redis to come back. The link reconnects with backoff
(L{wsgateway.redis.link}).

Timers: the heartbeat and the link run on C{reactor}, not on the store's
C{clock}: Redis counts TTLs in real time.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgateway.durable.entries import QueueUnavailable
from wsgateway.durable.redis_layout import text
from wsgateway.durable.redis_scripts import SCRIPTS
from wsgateway.redis.link import Backoff, CommandProtocol, RedisLink
from wsgateway.redis.scripts import eval_script, send
from wsgateway.redis.target import Locator, RedisTarget

__all__ = ["RedisNode"]


class RedisNode:
    """
    The link of node C{node_id} to C{target}, keys under C{prefix}. C{log}
    is the store's logger (its lines keep the store's namespace). The
    other arguments are the store's.
    """

    def __init__(
        self,
        target: RedisTarget | Locator,
        *,
        prefix: str,
        node_id: str,
        reactor: Any,
        log: Logger,
        heartbeat: float,
        alive_ttl: float,
        lease_ttl: float,
        reply_timeout: float,
        connect_timeout: float,
        backoff: Backoff,
        rng: random.Random,
        min_replicas_ack: int = 0,
        on_failover: Any = None,
    ) -> None:
        self.prefix = prefix
        self.min_replicas_ack = min_replicas_ack
        self.reply_timeout = reply_timeout
        self.node_id = node_id
        # Unique per process: a restarted node (or a second process with the
        # same node id) must not renew a lease it did not take.
        self.token = f"{node_id} {os.urandom(8).hex()}"
        self.log = log
        self.heartbeat = heartbeat
        self.alive_ttl = alive_ttl
        self.lease_ttl = lease_ttl
        self._link = RedisLink(
            target, reactor=reactor, clock=reactor, protocol=CommandProtocol, reply_timeout=reply_timeout,
            connect_timeout=connect_timeout, backoff=backoff, rng=rng,
            on_up=self._up, on_down=self._down, on_failure=self._failed,
            on_failover=on_failover or self._failed_over,
        )
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = reactor
        self._beating = False
        self._busy = 0  # scripts sent and not answered yet
        self._idle: list[Deferred[None]] = []
        self._first: Deferred[None] | None = None
        self._state: bool | None = None  # Redis up (True) / down (False), for logging once per change
        self.held: list[str] = []  # the owners whose leases this node held at its last heartbeat
        self._waiting = False  # our own lease is held by another process
        self.stopping = False
        self.errors = 0

    def describe(self) -> str:
        return self._link.describe()

    @property
    def link(self) -> RedisLink:
        return self._link

    @property
    def up(self) -> bool:
        return bool(self._link.up)

    def start(self) -> Deferred[None]:
        """Connect and heartbeat; fires after the first heartbeat ran or the first connection attempt failed."""
        self._first = Deferred()
        d = self._first
        self._link.start()
        self._beat.start(self.heartbeat, now=False)
        return d

    def stop_beating(self) -> None:
        """The first step of a stop: no more heartbeats, and C{start}'s Deferred fires if it has not."""
        self.stopping = True
        if self._beat.running:
            self._beat.stop()
        self._fire_first()

    async def close(self) -> None:
        """Once every script sent is answered: release this node's leases, disconnect."""
        try:
            await self._when_idle()
            if self._link.up:
                try:
                    await self.call("release", [self.node_id, self.token])
                except QueueUnavailable:
                    pass  # the leases expire by themselves
            await self._link.stop()
        finally:
            self.stopping = False
            self.held = []

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
                      target=self.describe(), node=self.node_id)
        self._heartbeat()

    def _failed_over(self, old: str, new: str) -> None:
        self.log.warn("queue: redis failover followed: the master is now {new} (was {old})", new=new, old=old)

    def _down(self, why: Failure) -> None:
        self._went_down(why.getErrorMessage())

    def _failed(self, why: Failure | str) -> None:
        self._went_down(why if isinstance(why, str) else why.getErrorMessage())
        self._fire_first()

    def _went_down(self, why: str) -> None:
        if self._state is False or self.stopping:
            return
        self._state = False
        self.log.warn("queue: redis down: {target} ({why}); queue operations fail until it is back",
                      target=self.describe(), why=why)

    def _heartbeat(self) -> None:
        if self._beating or self.stopping or not self._link.up:
            return
        self._beating = True
        ms = [str(max(1, round(t * 1000))) for t in (self.alive_ttl, self.lease_ttl)]
        d = self.call("heartbeat", [self.node_id, self.token, *ms])

        def update(owners: list[bytes]) -> None:
            now = [text(o) for o in owners]
            for o in now:
                if o not in self.held and o != self.node_id:
                    self.log.warn("queue: node {owner} is dead; delivering its entries", owner=o)
            for o in self.held:
                if o not in now and o != self.node_id:
                    self.log.info("queue: no longer delivering the entries of {owner} (back, or all delivered)",
                                  owner=o)
            waiting = self.node_id not in now
            if waiting and not self._waiting:
                self.log.warn("queue: another process holds node {node}'s lease; its entries wait for it",
                              node=self.node_id)
            self._waiting = waiting
            self.held = now

        def done(_: object) -> None:
            self._beating = False
            self._fire_first()

        d.addCallbacks(update, lambda f: None)
        d.addBoth(done)

    # -- sending -----------------------------------------------------------

    def call(self, name: str, args: Sequence[Any]) -> Deferred[Any]:
        """Run one script; L{QueueUnavailable} at once while Redis is down, or on any error reply."""
        if self._link.protocol is None:
            return self._error(Failure(QueueUnavailable(f"{self.describe()}: redis down")))
        self._busy += 1

        def answered(result: Any) -> Any:
            self._busy -= 1
            if not self._busy:
                idle, self._idle = self._idle, []
                for w in idle:
                    w.callback(None)
            if isinstance(result, Failure):
                return self._error(result)
            return result

        return eval_script(self._link, SCRIPTS[name], [], [self.prefix, *args]).addBoth(answered)

    def call_replicated(self, name: str, args: Sequence[Any]) -> Deferred[Any]:
        """
        L{call}, then, with C{min_replicas_ack = N}, C{WAIT N} on the same
        connection: the answer comes only once N replicas have the write
        (Redis replicates asynchronously: without it a failover can lose a
        write the client was told about). Fewer within the reply timeout, or
        the connection gone meanwhile: L{QueueUnavailable}, and the write
        counts as not confirmed (it may still be there: at least once).
        """
        n = self.min_replicas_ack
        if n <= 0:
            return self.call(name, args)
        proto = self._link.protocol

        def wait(result: Any) -> Deferred[Any]:
            if proto is None or self._link.protocol is not proto:
                return self.refuse("the connection changed before the replicas confirmed the write")
            timeout_ms = max(1, int(self.reply_timeout * 1000 / 2))

            def counted(acks: Any) -> Any:
                if int(acks) < n:
                    return self.refuse(f"{int(acks)} of min_replicas_ack = {n} replicas confirmed the write "
                                       f"within {timeout_ms} ms")
                return result

            return send(proto, "WAIT", n, timeout_ms).addCallback(counted)

        return self.call(name, args).addCallback(wait)

    def _error(self, f: Failure) -> Deferred[Any]:
        if not f.check(QueueUnavailable):
            f = Failure(QueueUnavailable(f"{self.describe()}: {f.getErrorMessage()}"))
        self.errors += 1
        if self.errors & (self.errors - 1) == 0:  # the 1st, 2nd, 4th, 8th...: no flood while Redis refuses
            self.log.warn("queue: {why} ({count} errors so far)", why=f.getErrorMessage(), count=self.errors)
        return fail(f)

    def refuse(self, why: str) -> Deferred[Any]:
        """Fail an operation without sending it (counted as an error)."""
        self.errors += 1
        return fail(QueueUnavailable(f"{self.describe()}: {why}"))
