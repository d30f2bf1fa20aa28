# -*- test-case-name: tests.unit.ops.test_admin_guard -*-
"""
The JSON plumbing of the admin ports (one process's, L{wsgateway.ops.admin},
and the parent's of worker processes, L{wsgateway.workers.admin}): JSON
answers, request bodies with their size limit, L{Refused} for an answer
other than 200, and the root whose unknown paths are an escaped 404.

And what keeps an admin port bounded whatever an unauthenticated peer sends
(docs/configuration.md):

- L{AdminSite} / L{AdminRequest}: a request is judged when its head is
  complete, before any byte of its body: a body needs the bearer token (401)
  and must fit C{[admin] max_body} (413, or as soon as a chunked body passes
  it). A body is held in memory, never in Twisted's temporary file.
- L{AdminFactory} / L{AdminConnection}: at most C{[admin] max_connections}
  connections (beyond: 503 and closed), and a deadline per request that no
  byte restarts: from the connection's start, or the end of the previous
  answer, to a complete request head and body.
"""

from __future__ import annotations

import hmac
import json
from io import BytesIO
from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http, pages
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from wsgateway.ops import logs

__all__ = ["CHALLENGE", "LINGER", "MAX_BODY", "MAX_CONNECTIONS", "REQUEST_DEADLINE", "AdminConnection",
           "AdminFactory", "AdminRequest", "AdminSite", "JSONResource", "Refused", "Root", "bearer_ok",
           "json_body", "read_body"]

MAX_BODY = 64 * 1024  # admin requests are tiny JSON documents
MAX_CONNECTIONS = 64
# An admin request is a few hundred bytes: a peer that has not sent a whole
# one within this is a slowloris, or an idle keep-alive worth closing anyway.
REQUEST_DEADLINE = 10.0
# After an early 401/413, what the peer still sends is read and dropped for
# this long, so its kernel does not answer our close with a reset that loses
# the answer (nginx's lingering close); then the connection goes.
LINGER = 2.0
CHALLENGE = b'Bearer realm="wsgateway-admin"'


class JSONResource(Resource):
    isLeaf = True

    def answer(self, request: Request, status: int, body: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body, indent=1).encode("utf-8") + b"\n"

    def error(self, request: Request, status: int, message: str) -> bytes:
        return self.answer(request, status, {"error": message})


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bearer_ok(headers: Headers, token: bytes) -> bool:
    """Whether ``headers`` carry ``Authorization: Bearer TOKEN``, compared in constant time."""
    scheme, _, value = (headers.getRawHeaders(b"authorization") or [b""])[0].partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), token)


def read_body(request: Request) -> bytes:
    """The request's body as it came; 413 over the port's max_body."""
    limit = request.max_body if isinstance(request, AdminRequest) else MAX_BODY
    data = request.content.read(limit + 1) if request.content is not None else b""
    if len(data) > limit:
        raise Refused(413, "request body too large")
    return data


def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; 400 for anything else, 413 over the port's max_body."""
    data = read_body(request)
    try:
        body = json.loads(data or b"{}")
    except ValueError:
        raise Refused(400, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise Refused(400, "the body must be a JSON object")
    return body


class Root(Resource):
    """The admin port's root: an unknown path is Twisted's escaped 404 page
    (``Resource``'s own default is deprecated for not escaping HTML)."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return pages.notFound()


def early_answer(status: int, message: str) -> bytes:
    """
    A whole HTTP answer in bytes, for a request refused before Twisted has
    parsed its request line into the Request (so its own writer cannot be used).
    """
    body = json.dumps({"error": message}, indent=1).encode("utf-8") + b"\n"
    head = [b"HTTP/1.1 %d %s" % (status, http.RESPONSES.get(status, b"Error")),
            b"Content-Type: application/json", b"Cache-Control: no-store",
            b"Content-Length: %d" % len(body), b"Connection: close"]
    if status == 401:
        head.append(b"WWW-Authenticate: " + CHALLENGE)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class AdminRequest(Request):
    """
    A request of an admin port. Twisted calls ``gotLength`` once the head is
    complete and before any byte of the body (``tests/unit/compat`` checks
    it), ``handleContentChunk`` with each piece of the body, then
    ``requestReceived``: the body is judged at the first and counted at the second.
    """

    max_body = MAX_BODY
    _received = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:
        site = getattr(self.channel, "site", None)
        token = site.token if isinstance(site, AdminSite) else None
        self.max_body = site.max_body if isinstance(site, AdminSite) else MAX_BODY
        # never Twisted's temporary file (bodies over 100 kB): what is kept is at most max_body
        self.content = BytesIO()
        if length == 0:
            return
        # the token first: a peer without it learns nothing, not even the limit
        if token is not None and not bearer_ok(self.requestHeaders, token):
            self._refuse(401, "a valid admin bearer token is required")
        elif length is not None and length > self.max_body:
            self._refuse(413, "request body too large")

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.max_body:  # chunked: refused as soon as it passes
            self._refuse(413, "request body too large")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return  # answered already; the connection is lingering
        guard = self._guard()
        if guard is not None:
            guard.request_read()
            self.notifyFinish().addBoth(lambda _: guard.request_done())
        super().requestReceived(command, path, version)

    def _guard(self) -> AdminConnection | None:
        return self.transport if isinstance(self.transport, AdminConnection) else None

    def _refuse(self, status: int, message: str) -> None:
        self._refused = True
        # Twisted answers "Expect: 100-continue" just after gotLength: no
        # invitation to send what is refused
        self.requestHeaders.removeHeader(b"expect")
        answer = early_answer(status, message)
        guard = self._guard()
        if guard is not None:
            guard.refuse(answer)
        else:  # a bare transport (no AdminFactory): answer and close, no lingering
            assert self.transport is not None
            self.transport.write(answer)
            self.transport.loseConnection()


class AdminSite(Site):
    """
    A Site whose requests are L{AdminRequest}s: ``token`` (None: no
    ``/admin/*``, so a body needs none) and ``max_body`` bound what a peer
    may send; ``access_log`` False: no access line per request.
    """

    requestFactory = AdminRequest
    _log = Logger()

    def __init__(self, resource: IResource, *, token: str | None, max_body: int = MAX_BODY,
                 access_log: bool = True, reactor: IReactorTime | None = None) -> None:
        super().__init__(resource, reactor=reactor)
        self.token = token.encode() if token else None
        self.max_body = max_body
        self.access_log = access_log
        self.displayTracebacks = False
        self.noisy = False

    def log(self, request: http.Request) -> None:
        # Twisted's Site writes each request as an unstructured info line
        # (through the legacy log), so every /metrics scrape and dashboard
        # poll filled the log; a debug line of the same text instead.
        if self.access_log and logs.SHOWS_DEBUG:
            self._log.debug("{access}", access=self._logFormatter(self._logDateTime or "-", request))


class AdminConnection(ProtocolWrapper):
    """
    One admin connection: the HTTP channel's transport, with the request
    deadline and the lingering close after an early refusal.
    """

    log = Logger()
    factory: AdminFactory

    def __init__(self, factory: AdminFactory, wrapped: Any) -> None:
        super().__init__(factory, wrapped)
        self._timer: IDelayedCall | None = None
        self._handling = 0  # requests read whose answer is not finished
        self._refused = False
        self._lost = False
        self._raw: ITransport | None = None

    def makeConnection(self, transport: Any) -> None:
        self._raw = transport
        super().makeConnection(transport)
        if not self._lost:
            self._arm(self.factory.deadline, self._expired)

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: read and dropped
        super().dataReceived(data)

    def write(self, data: bytes) -> None:
        if not self._refused:  # after an early answer, nothing else of the channel's
            super().write(data)

    def writeSequence(self, data: Any) -> None:
        if not self._refused:
            super().writeSequence(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._cancel()
        super().connectionLost(reason)

    # -- what AdminRequest tells it

    def request_read(self) -> None:
        """A whole request is in: no deadline while it is answered."""
        self._handling += 1
        self._cancel()

    def request_done(self) -> None:
        """An answer is finished: the next request has the deadline from now."""
        self._handling -= 1
        if self._handling == 0 and not (self._lost or self._refused):
            self._arm(self.factory.deadline, self._expired)

    def refuse(self, answer: bytes) -> None:
        """Answer now, then read and drop whatever comes for ``linger`` seconds."""
        if self._refused:
            return
        self._refused = True
        # the HTTP parser stops at the end of the line it is on
        self.disconnecting = 1
        assert self._raw is not None
        self._raw.write(answer)
        self._arm(self.factory.linger, self._close)

    # -- timers

    def _expired(self) -> None:
        self.log.debug("admin connection from {peer} closed: no whole request within {deadline}s",
                       peer=str(self._raw.getPeer() if self._raw else None), deadline=self.factory.deadline)
        self._close()

    def _close(self) -> None:
        self._timer = None
        self.disconnecting = 1
        assert self._raw is not None
        self._raw.loseConnection()
        # a peer that reads nothing would keep a graceful close waiting forever
        self._arm(self.factory.linger, self._abort)

    def _abort(self) -> None:
        self._timer = None
        abort = getattr(self._raw, "abortConnection", None)
        if abort is not None:
            abort()

    def _arm(self, delay: float, call: Any) -> None:
        self._cancel()
        self._timer = self.factory.clock.callLater(delay, call)

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class _Busy(Protocol):
    """A connection beyond the cap: 503 at once, then closed (aborted if it lingers)."""

    def __init__(self, clock: IReactorTime, linger: float) -> None:
        self._clock = clock
        self._linger = linger
        self._abort: IDelayedCall | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(early_answer(503, "too many admin connections"))
        self.transport.loseConnection()
        self._abort = self._clock.callLater(self._linger, self._abort_now)

    def _abort_now(self) -> None:
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._abort is not None and self._abort.active():
            self._abort.cancel()


class AdminFactory(WrappingFactory[AdminConnection]):
    """
    What an admin port listens with (one for all its listen addresses):
    ``site`` behind the connection cap and the request deadline.
    """

    protocol = AdminConnection
    log = Logger()
    noisy = False

    def __init__(self, site: Site, *, clock: IReactorTime, max_connections: int = MAX_CONNECTIONS,
                 deadline: float = REQUEST_DEADLINE, linger: float = LINGER) -> None:
        super().__init__(site)
        self.clock = clock
        self.max_connections = max_connections
        self.deadline = deadline
        self.linger = linger
        self._warned: float | None = None

    def buildProtocol(self, addr: IAddress | None) -> Protocol:  # type: ignore[override]  # _Busy beyond the cap
        if len(self.protocols) >= self.max_connections:
            now = self.clock.seconds()
            if self._warned is None or now - self._warned >= 60:
                # once a minute at most: a flood must not become a log flood
                self._warned = now
                self.log.warn("admin port: {limit} connections open ([admin] max_connections): more get 503",
                              limit=self.max_connections)
            return _Busy(self.clock, self.linger)
        return super().buildProtocol(addr)
