# -*- test-case-name: tests.integration.test_jwks -*-
"""
``[auth] jwks_url``: an OAuth 2.0 / OpenID Connect provider's key set,
fetched over verified HTTPS with Twisted's Agent (never blocking the
reactor), cached, refreshed every ``jwks_refresh``, and refetched when a
token names a ``kid`` the cache lacks — at most once per
``UNKNOWN_KID_INTERVAL``, so a stream of made-up kids cannot make the
gateway hammer the provider.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, ResponseDone
from twisted.web.http_headers import Headers

from wsgateway.auth.keys import KeySet
from wsgateway.tls import trust_root

UNKNOWN_KID_INTERVAL = 10.0  # seconds between refetches caused by unknown kids
FETCH_TIMEOUT = 10.0
MAX_DOCUMENT = 1024 * 1024  # a key set is a few KiB; anything this big is wrong


class _Body(Protocol):
    """Collects a response body up to a limit, aborting beyond it."""

    def __init__(self, done: Deferred[bytes], limit: int) -> None:
        self.done = done
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            # IResponse.deliverBody connects this protocol to an IPushProducer
            # (TransportProxyProducer), not the ITransport Protocol declares
            cast(IPushProducer, self.transport).stopProducing()
            if not self.done.called:
                self.done.errback(ValueError(f"document larger than {self.limit} bytes"))
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


class JwksFetcher(Service):
    """Keeps ``keys`` (a KeySet, or None before the first good fetch) current."""

    log = Logger()

    def __init__(
        self,
        url: str,
        *,
        reactor: Any,
        clock: IReactorTime,
        refresh: float,
        ca_path: str | None = None,
        on_keys: Callable[[KeySet], None] | None = None,
        agent: Any = None,
    ) -> None:
        self.url = url
        self.clock = clock
        self.refresh_interval = refresh
        self.on_keys = on_keys
        self.keys: KeySet | None = None
        self._agent = agent or Agent(
            reactor, contextFactory=BrowserLikePolicyForHTTPS(trust_root(ca_path)), connectTimeout=FETCH_TIMEOUT
        )
        self._loop = LoopingCall(self._scheduled)
        self._loop.clock = clock
        self._inflight: Deferred[bool] | None = None
        self._waiters: list[Deferred[bool]] = []
        self._last_kid_fetch = float("-inf")

    def startService(self) -> None:
        super().startService()
        # Not awaited: an unreachable provider must not hold up startup;
        # tokens get 401 "no key loaded yet" until the first fetch lands.
        self._loop.start(self.refresh_interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._inflight is not None:
            self._inflight.cancel()

    def _scheduled(self) -> None:
        self.fetch()  # never errbacks; the result is only for waiters

    def fetch(self) -> Deferred[bool]:
        """
        Fetch now; fires True when new keys are in place, False when the
        fetch failed (never errbacks). Callers during a fetch share it.
        """
        waiter: Deferred[bool] = Deferred()
        # before the fetch starts: one that fails at once settles synchronously
        self._waiters.append(waiter)
        if self._inflight is None:
            d: Deferred[bool] = Deferred.fromCoroutine(self._fetch())
            # marked before the callbacks, which run at once if it already failed
            self._inflight = d
            d.addTimeout(FETCH_TIMEOUT, self.clock)  # cancels the request itself
            d.addErrback(self._failed)
            d.addCallback(self._settled)
        return waiter

    async def refresh_for_unknown_kid(self) -> bool:
        """The Authenticator's hook: refetch unless one was done too recently."""
        if self._inflight is None:
            # only a fetch this starts counts against the limit: one already
            # in flight (the first, at start) is joined for free
            now = self.clock.seconds()
            if now - self._last_kid_fetch < UNKNOWN_KID_INTERVAL:
                return False
            self._last_kid_fetch = now
        return bool(await self.fetch())

    async def _fetch(self) -> bool:
        response = await self._agent.request(
            b"GET", self.url.encode("ascii"), Headers({b"Accept": [b"application/jwk-set+json, application/json"]})
        )
        done: Deferred[bytes] = Deferred()
        response.deliverBody(_Body(done, MAX_DOCUMENT))
        body = await done
        if response.code != 200:
            raise ValueError(f"HTTP {response.code}")
        keys = KeySet(json.loads(body))
        if not len(keys):
            raise ValueError("no signing keys in the document")
        self.keys = keys
        if self.on_keys is not None:
            self.on_keys(keys)
        self.log.info("loaded {count} keys from {url}: kids {kids}", count=len(keys), url=self.url, kids=keys.kids)
        return True

    def _failed(self, f: Failure) -> bool:
        self.log.warn(
            "could not fetch the JWKS from {url}: {error}; keeping {state} and retrying",
            url=self.url,
            error=f.getErrorMessage() or repr(f.value),
            state="the cached keys" if self.keys is not None else "no keys (tokens are refused)",
        )
        return False

    def _settled(self, result: bool) -> None:
        self._inflight = None
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(result)
