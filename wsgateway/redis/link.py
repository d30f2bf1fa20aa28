# -*- test-case-name: tests.unit.core.test_redislink -*-
"""
One Redis connection that stays up: L{RedisLink}.

The broker needs two (a pub/sub connection cannot run other commands), and
txredisapi's own connection functions do not fit a daemon that must start,
run and degrade gracefully without Redis (checked against txredisapi 1.6.0):

  - C{Connection()} (non-lazy) returns C{factory.deferred}, fired by
    C{RedisFactory.addConnection} only once the pool is full; with
    C{reconnect=True} nothing ever fails it, so while Redis is down it never
    fires. Whatever waits on it waits forever.
  - C{ConnectionHandler} sends each command through
    C{factory.getConnection()}, which waits on the pool's queue while no
    connection is up: during an outage every command queues, unbounded and
    forever (C{replyTimeout} starts only once a command is written).
  - C{SubscriberProtocol} keeps no record of its channels; after a
    reconnect the new protocol is subscribed to nothing.
  - Without C{replyTimeout} a command on a hung server waits forever; with
    it, the command fails with C{TimeoutError} and the connection is aborted.
    C{SUBSCRIBE} is sent with C{apply_timeout=False}.
  - The default C{charset="utf-8"} and C{convertNumbers=True} turn replies
    into C{str}, C{int} or C{float} whenever they look like one
    (C{b"007"} arrives as C{7}): payloads must be read with C{charset=None}
    and C{convertNumbers=False}.
  - Timers use the global reactor (C{LineReceiver.callLater}); and
    C{ClientService}, which the factory reconnects with, logs every retry.

So this module uses only txredisapi's protocols (RESP parsing, AUTH and
SELECT on connect, the commands and C{replyTimeout}) and does the
connecting itself: an endpoint, a jittered, capped backoff on the injected
clock, and C{up} telling at every moment whether commands can be sent. A
caller asks C{link.protocol} (None while down) and fails fast itself; nothing
is ever queued waiting for a connection.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgateway.backoff import equal_jitter, exponential
from wsgateway.redis.target import FixedLocator, Locator, RedisTarget

__all__ = ["Backoff", "CommandProtocol", "PubSubProtocol", "RedisLink"]


@dataclass(frozen=True)
class Backoff:
    """
    Reconnect delays: exponential from C{initial}, capped at C{maximum},
    with "equal jitter" (uniform in [d/2, d]) so nodes that lost Redis
    together do not come back in lockstep.
    """

    initial: float = 0.2
    maximum: float = 3.0
    factor: float = 2.0

    def delay(self, failures: int, rng: random.Random) -> float:
        base = exponential(failures - 1, initial=self.initial, maximum=self.maximum, factor=self.factor)
        return equal_jitter(base, rng)


class _LinkProtocol(txredisapi.RedisProtocol):
    """Tells its link when its connection is lost (SubscriberProtocol is a RedisProtocol too)."""

    link: RedisLink

    def connectionLost(self, why: Failure) -> None:
        try:
            super().connectionLost(why)  # fails every command still waiting
        finally:
            self.link._lost(self, why)


class CommandProtocol(_LinkProtocol):
    """Ordinary commands (PUBLISH, HSET...)."""


class PubSubProtocol(_LinkProtocol, txredisapi.SubscriberProtocol):
    """SUBSCRIBE / UNSUBSCRIBE / PING; messages go to the link's C{on_message}."""

    def messageReceived(self, pattern: bytes | None, channel: bytes, message: bytes) -> None:
        self.link.on_message(channel, message)


class _LinkFactory(Factory):
    # What BaseRedisProtocol.connectionMade asks of its factory when AUTH or
    # SELECT fails: it calls stopTrying(), drops the connection and reports
    # connectionError(msg). We keep retrying with backoff (the password may
    # be fixed on the server side) and log the message once.
    isLazy = False
    noisy = False

    def __init__(self, link: RedisLink) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> Any:
        p = self.link._build()
        p.factory = self
        return p

    def stopTrying(self) -> None:
        pass

    def connectionError(self, msg: str) -> None:
        self.link._refused(msg)


class RedisLink:
    """
    Keeps one connection to Redis up until C{stop()}. C{on_up(protocol)}
    runs each time a connection is ready for commands (after AUTH and
    SELECT), C{on_down(reason)} when a ready one is lost and C{on_failure}
    for each attempt that failed (to log the first one).

    With a L{Locator} that follows a master (Sentinel), each attempt first
    asks where the master is, a connection counts as up only once C{ROLE}
    says master there, C{on_failover(old, new)} runs when it comes up at
    another address than last time, and L{verify} (the owner's heartbeat)
    and L{check} (an error reply) drop a connection to a server that is no
    longer the master.
    """

    log = Logger()

    def __init__(
        self,
        target: RedisTarget | Locator,
        *,
        reactor: Any,
        clock: IReactorTime,
        protocol: type[CommandProtocol] | type[PubSubProtocol],
        reply_timeout: float,
        connect_timeout: float,
        backoff: Backoff,
        rng: random.Random,
        on_up: Callable[[Any], object],
        on_down: Callable[[Failure], object],
        on_failure: Callable[[Failure | str], object],
        on_message: Callable[[bytes, bytes], object] = lambda channel, message: None,
        on_failover: Callable[[str, str], object] = lambda old, new: None,
    ) -> None:
        self.locator: Locator = FixedLocator(target) if isinstance(target, RedisTarget) else target
        # the last address located (a url's at once; a master's once the sentinels answered)
        self.target: RedisTarget | None = target if isinstance(target, RedisTarget) else None
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._clock = clock
        self._protocol_class = protocol
        self.reply_timeout = reply_timeout
        self._backoff = backoff
        self._rng = rng
        self._on_up = on_up
        self._on_down = on_down
        self._on_failure = on_failure
        self.on_message = on_message
        self.up = False
        self._proto: Any = None  # the current connection's protocol, ready or not
        self._failures = 0  # in a row, including connections dropped before they were ready
        self._retry: IDelayedCall | None = None
        self._connecting: Deferred[Any] | None = None
        self._running = False
        self._stop_waiters: list[Deferred[None]] = []
        self.on_failover = on_failover
        self._master: RedisTarget | None = None  # where the last connection came up (a master follower)
        self._verifying = False

    def describe(self) -> str:
        return self.locator.describe()

    @property
    def protocol(self) -> Any:
        """The ready protocol, or None while down."""
        return self._proto if self.up else None

    def start(self) -> None:
        """Start connecting; returns at once, whether Redis is there or not."""
        if self._running:
            return
        self._running = True
        self._attempt()

    def stop(self) -> Deferred[None]:
        """Stop reconnecting and close the connection; fires once it is closed."""
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._connecting is not None:
            self._connecting.cancel()
        if self._proto is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stop_waiters.append(waiter)
        transport = self._proto.transport
        transport.loseConnection()
        # A hung server may never take the last bytes: do not wait on it for long.
        abort = self._clock.callLater(self.reply_timeout, transport.abortConnection)

        def closed(result: None) -> None:
            if abort.active():
                abort.cancel()
            return result

        return waiter.addBoth(closed)

    # -- the connection's life --------------------------------------------

    def _attempt(self) -> None:
        self._retry = None

        def located(target: RedisTarget) -> Deferred[Any]:
            self.target = target
            connecting: Deferred[Any] = target.endpoint(self._reactor, self._connect_timeout).connect(
                _LinkFactory(self))
            return connecting

        d = self.locator.locate().addCallback(located)
        self._connecting = d
        d.addCallbacks(self._connected, self._connect_failed)

    def _build(self) -> Any:
        t = self.target
        assert t is not None
        kwargs: dict[str, Any] = dict(
            charset=None, replyTimeout=self.reply_timeout, password=t.password, dbid=t.db, convertNumbers=False
        )
        if t.username is not None:
            kwargs["username"] = t.username
        p = self._protocol_class(**kwargs)
        p.link = self
        p.callLater = self._clock.callLater  # replyTimeout on our clock, not the global reactor
        self._proto = p
        # Fires inside makeConnection when there is no AUTH or SELECT to do.
        p.whenConnected().addCallback(self._ready)
        return p

    def _connected(self, proto: Any) -> None:
        self._connecting = None
        if not self._running:
            proto.transport.loseConnection()

    def _ready(self, proto: Any) -> None:
        if proto is not self._proto or not self._running or self.up:
            return
        if not self.locator.follows_master:
            self._went_up(proto)
            return

        def role(reply: Any) -> None:
            if proto is not self._proto or not self._running or self.up:
                return
            if isinstance(reply, list) and reply and reply[0] in (b"master", "master"):
                self._went_up(proto)
            else:  # a replica, or a master being demoted: ask the sentinels again
                self._on_failure(f"{self._where()} is not the master (ROLE: {_role_name(reply)})")
                proto.transport.loseConnection()

        try:
            proto.execute_command("ROLE").addCallbacks(role, lambda f: proto.transport.loseConnection())
        except Exception:  # lost meanwhile: _lost follows
            pass

    def _went_up(self, proto: Any) -> None:
        self._failures = 0
        self.up = True
        if self.locator.follows_master and self.target is not None:
            old, self._master = self._master, self.target
            if old is not None and old.address != self.target.address:
                self.on_failover(old.describe(), self.target.describe())
        self._on_up(proto)

    def _where(self) -> str:
        return self.target.describe() if self.target is not None else self.describe()

    def verify(self) -> None:
        """
        A master follower that is up asks where the master is now and drops
        its connection when that moved (a failover the connection did not
        see: the old master demoted to a replica, or cut off from the
        sentinels but still reachable from here).
        """
        if not self.up or not self.locator.follows_master or self._verifying:
            return
        self._verifying = True
        connected = self._proto

        def compare(target: RedisTarget) -> None:
            if self._proto is connected and self.up and self.target is not None \
                    and target.address != self.target.address:
                self.log.info("redis {what}: the master moved to {new}; reconnecting",
                              what=self.describe(), new=target.describe())
                connected.transport.loseConnection()

        def done(_: object) -> None:
            self._verifying = False

        self.locator.locate().addCallbacks(compare, lambda f: None).addBoth(done)

    def check(self, failure: Failure) -> Failure:
        """An errback for commands: a READONLY reply means this server is a replica now; reconnect."""
        if self.locator.follows_master and failure.check(txredisapi.ResponseError) \
                and str(failure.value).startswith("READONLY") and self._proto is not None:
            self._proto.transport.loseConnection()
        return failure

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if not self._running:
            return
        self._failures += 1
        self._on_failure(failure)
        self._schedule()

    def _refused(self, msg: str) -> None:
        self._on_failure(msg)

    def _lost(self, proto: Any, why: Failure) -> None:
        if proto is not self._proto:
            return
        self._proto = None
        was_up, self.up = self.up, False
        if not self._running:
            waiters, self._stop_waiters = self._stop_waiters, []
            for w in waiters:
                w.callback(None)
            return
        if was_up:
            self._on_down(why)
        else:
            # dropped before it was ready (AUTH or SELECT refused, a server
            # still loading...): counts as a failed attempt, so no tight loop
            self._failures += 1
            self._on_failure(why)
        self._schedule()

    def _schedule(self) -> None:
        delay = self._backoff.delay(max(self._failures, 1), self._rng)
        self.log.debug("redis {target}: next attempt in {delay:.2f}s", target=self.describe(), delay=delay)
        self._retry = self._clock.callLater(delay, self._attempt)


def _role_name(reply: Any) -> str:
    if isinstance(reply, list) and reply:
        first = reply[0]
        return first.decode("ascii", "replace") if isinstance(first, bytes) else str(first)
    return repr(reply)
