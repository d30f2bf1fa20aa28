# -*- test-case-name: tests.unit.upstream.test_health -*-
"""
Health probes (docs/configuration.md ``health_check``): L{make_probe} builds
the C{tcp}, C{http:/path} or C{ws:/path} probe of one node; the
L{wsgateway.upstream.checker.HealthChecker} runs it on schedule.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from wsgateway.config.upstreams import NodeConfig
from wsgateway.relay.transport import transport_of
from wsgateway.upstream.errors import describe_error

__all__ = ["ProbeFailed", "make_probe"]


class ProbeFailed(Exception):
    """A probe's answer said unhealthy; C{str()} is the short reason, e.g. C{http: status 503}."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _cancelled(e: BaseException) -> bool:
    return isinstance(e, (CancelledError, error.ConnectingCancelledError))


class _StatusLine(Protocol):
    """Sends one request, fires C{status} with the status code of the answer, then closes."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._buffer = b""
        self.status: Deferred[int] = Deferred(self._abort)

    def _abort(self, _: Deferred[int]) -> None:
        if self.transport is not None:
            transport_of(self).abortConnection()

    def connectionMade(self) -> None:
        transport_of(self).write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self.status.called:
            return
        self._buffer += data
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > 8192:
                self._done(ProbeFailed("http: bad status line"))
            return
        parts = self._buffer[:end].rstrip(b"\r").split(None, 2)
        if len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and len(parts[1]) == 3 and parts[1].isdigit():
            self._done(int(parts[1]))
        else:
            self._done(ProbeFailed("http: bad status line"))

    def _done(self, result: int | Exception) -> None:
        transport_of(self).loseConnection()
        if isinstance(result, Exception):
            self.status.errback(result)
        else:
            self.status.callback(result)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.status.called:
            e = reason.value if reason is not None else None
            text = ("connection closed before the status line"
                    if e is None or isinstance(e, (error.ConnectionDone, error.ConnectionLost))
                    else describe_error(e))
            self.status.errback(ProbeFailed(f"http: {text}"))


class _Once(Factory):
    """Hands out one prepared protocol."""

    noisy = False

    def __init__(self, proto: Protocol) -> None:
        self._proto = proto

    def buildProtocol(self, addr: Any) -> Protocol:
        self._proto.factory = self
        return self._proto


def _host_header(cfg: NodeConfig) -> str:
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return f"{host}:{cfg.port}"


# A masked client Close frame with code 1000 (RFC 6455 5.5.1), so an
# upstream sees a normal close after a ws probe rather than a 1006.
def _close_frame() -> bytes:
    mask = os.urandom(4)
    payload = (1000).to_bytes(2, "big")
    return b"\x88\x82" + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def make_probe(
    kind: str,
    *,
    endpoints: Callable[[Any, float], IStreamClientEndpoint],
    ws_connect: Callable[[Any, str, float], Deferred[Any]] | None = None,
    timeout: float,
) -> Callable[[Any], Deferred[None]]:
    """
    The probe for a C{health_check} value: C{tcp}, C{http:/path} or
    C{ws:/path}. Each probe fires None when healthy and fails with
    L{ProbeFailed} (reason prefixed with the kind) otherwise; cancelling it
    aborts its connection. C{endpoints(node, timeout)} gives the node's client
    endpoint (TLS included for wss nodes); C{ws_connect(node, path, timeout)}
    opens a WebSocket leg and fires with its protocol. The path is used as
    written, not joined to the node URL's path.
    """
    name, _, path = kind.partition(":")

    async def connect(node: Any, proto: Protocol) -> None:
        try:
            await endpoints(node, timeout).connect(_Once(proto))
        except Exception as e:
            if _cancelled(e):
                raise CancelledError() from None
            raise ProbeFailed(f"{name}: {describe_error(e)}") from None

    async def tcp(node: Any) -> None:
        proto = Protocol()
        await connect(node, proto)
        transport_of(proto).loseConnection()

    async def http(node: Any) -> None:
        request = (f"GET {path} HTTP/1.1\r\nHost: {_host_header(node.config)}\r\n"
                   "User-Agent: wsgateway-health\r\nAccept: */*\r\nConnection: close\r\n\r\n").encode("ascii")
        proto = _StatusLine(request)
        await connect(node, proto)
        status = await proto.status
        if not 200 <= status < 300:
            raise ProbeFailed(f"http: status {status}")

    async def ws(node: Any) -> None:
        assert ws_connect is not None
        try:
            proto = await ws_connect(node, path, timeout)
        except Exception as e:
            if _cancelled(e):
                raise CancelledError() from None
            raise ProbeFailed(f"ws: {describe_error(e)}") from None
        transport = getattr(proto, "transport", None)
        if transport is not None:
            transport.write(_close_frame())
            transport.loseConnection()

    probes = {"tcp": tcp, "http": http, "ws": ws}
    wants_path = name in ("http", "ws")
    if name not in probes or (path.startswith("/") if wants_path else bool(path)) is not wants_path:
        raise ValueError(f"not a health check: {kind!r}")
    if name == "ws" and ws_connect is None:
        raise ValueError("ws health checks need ws_connect")
    run = probes[name]
    return lambda node: Deferred.fromCoroutine(run(node))
