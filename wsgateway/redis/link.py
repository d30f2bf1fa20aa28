# -*- test-case-name: tests.integration.test_broker -*-
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
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgateway.backoff import equal_jitter, exponential

__all__ = ["Backoff", "CommandProtocol", "PubSubProtocol", "RedisLink", "RedisTarget", "parse_url"]


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is, from a C{[redis] url}; C{describe()} never shows the password."""

    host: str | None = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # unix:///PATH
    tls: bool = False
    db: int | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        if self.path is not None:
            return f"unix://{self.path}"
        db = "" if self.db is None else f"/{self.db}"
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}{db}"

    def endpoint(self, reactor: Any, timeout: float) -> IStreamClientEndpoint:
        if self.path is not None:
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        assert self.host is not None
        endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if self.tls:
            endpoint = wrapClientTLS(optionsForClientTLS(self.host), endpoint)
        return endpoint


def parse_url(url: str) -> RedisTarget:
    """C{redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]}, C{rediss://...} (TLS) or C{unix:///PATH}."""
    parts = urlsplit(url)
    password = unquote(parts.password) if parts.password is not None else None
    username = unquote(parts.username) if parts.username else None
    if parts.scheme == "unix":
        return RedisTarget(host=None, port=0, path=parts.path, username=username, password=password)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError("must be redis://HOST[:PORT][/DB], rediss://HOST[:PORT][/DB] or unix:///PATH")
    db = parts.path.strip("/")
    return RedisTarget(
        host=parts.hostname, port=parts.port or 6379, tls=parts.scheme == "rediss",
        db=int(db) if db else None, username=username, password=password,
    )


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
    """

    log = Logger()

    def __init__(
        self,
        target: RedisTarget,
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
    ) -> None:
        self.target = target
        self._endpoint = target.endpoint(reactor, connect_timeout)
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
        d = self._endpoint.connect(_LinkFactory(self))
        self._connecting = d
        d.addCallbacks(self._connected, self._connect_failed)

    def _build(self) -> Any:
        t = self.target
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
        self._failures = 0
        self.up = True
        self._on_up(proto)

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
        self.log.debug("redis {target}: next attempt in {delay:.2f}s", target=self.target.describe(), delay=delay)
        self._retry = self._clock.callLater(delay, self._attempt)
