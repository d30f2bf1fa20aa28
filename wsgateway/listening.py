# -*- test-case-name: tests.unit.handshake.test_listening -*-
"""
A listening socket as a service (L{ListeningService}), and the
L{SingleProcess} role that builds one per C{[gateway] listen} entry when
there are no workers. The service says where it listens: once the
socket is bound, one info line ``KIND listening on ADDRESS (ENDPOINT)``, ``kind``
(gateway, admin, demo), ``endpoint`` (the configured string) and
``address`` (the bound host:port or unix path), so ``tcp:0`` works and
its port can be read from the log (docs/logs.md).
"""

from __future__ import annotations

import errno
import os
from typing import Any, NoReturn

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgateway import tls
from wsgateway.endpoints import with_backlog

# The line each bound listener logs; its fields are kind, endpoint and address
LISTENING = "{kind} listening on {address} ({endpoint})"


def describe(address: Any) -> str:
    """``host:port`` (``[v6]:port``) of an IPv4/IPv6 address, the path of a unix one."""
    port = getattr(address, "port", None)
    host = getattr(address, "host", None)
    if port is not None and host is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    if name is not None:
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return str(address)


# What to do about a socket that cannot be bound, by errno
_ADVICE = {
    errno.EADDRINUSE: "stop what holds the port or change [{section}] listen",
    errno.EACCES: "ports below 1024 need root (twistd --uid drops it after binding) or change [{section}] listen",
    errno.EADDRNOTAVAIL: "this host has no such address: change the interface in [{section}] listen",
}


def cannot_listen(log: Logger, kind: str, desc: str, error: BaseException | None) -> NoReturn:
    """
    Say in one line that ``desc`` cannot be bound at start, and why, then
    end the process with status 1: an operator's mistake (a port already
    taken), not a bug, so no traceback (twistd would log some 40 lines of
    it). SystemExit passes through twistd's start untouched.
    """
    socket_error = getattr(error, "socketError", error)  # CannotListenError wraps the OSError
    code = getattr(socket_error, "errno", None)
    reason = os.strerror(code).lower() if isinstance(code, int) else str(socket_error)
    section = kind if kind in ("gateway", "admin", "demo") else "gateway"
    advice = _ADVICE.get(code or 0, "check [{section}] listen").format(section=section)
    log.critical("cannot listen on {endpoint}: {reason}; {advice}", kind=kind, endpoint=desc, reason=reason,
                 advice=advice)
    raise SystemExit(1)


class ListeningService(Service):
    """
    Listens on ``endpoint`` with ``factory`` while running. As with
    ``strports.service``, a socket that cannot be bound at start aborts the
    start instead of only being logged.
    """

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, *, kind: str, desc: str) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.kind = kind
        self.desc = desc
        self.port: IListeningPort | None = None
        self._listening: Deferred[IListeningPort] | None = None
        self._waiting: list[Deferred[IListeningPort]] = []

    def when_bound(self) -> Deferred[IListeningPort]:
        """Fires with the port once the socket is bound (at once if it is); never, if it cannot be."""
        if self.port is not None:
            return succeed(self.port)
        d: Deferred[IListeningPort] = Deferred()
        self._waiting.append(d)
        return d

    def startService(self) -> None:
        super().startService()
        failed: list[Failure] = []
        starting = True

        def refused(f: Failure) -> None:
            self._listening = None
            if starting:
                failed.append(f)
            else:
                self.log.failure("cannot listen on {endpoint}", f, kind=self.kind, endpoint=self.desc)

        d = self._listening = self.endpoint.listen(self.factory)
        d.addCallbacks(self._bound, refused)
        starting = False
        if failed:
            # refused at once (TCP, unix, ssl bind synchronously): fatal, as strports makes it
            cannot_listen(self.log, self.kind, self.desc, failed[0].value)

    def _bound(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        self._listening = None
        address = describe(port.getHost())
        self.log.info(LISTENING, kind=self.kind, endpoint=self.desc, address=address)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(port)
        return port

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._listening is not None:
            self._listening.cancel()
            self._listening = None
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        stopped = port.stopListening()
        return stopped if stopped is not None else succeed(None)


class SingleProcess:
    """The L{ProcessRole} of a gateway without workers: it binds its own listeners."""

    def adapt(self, config: Any) -> Any:  # GatewayConfig
        return config

    def listener(self, index: int, desc: str, factory: Any, reactor: Any) -> tuple[Any, Any]:
        if tls.is_ssl(desc):
            # its endpoint built by wsgateway.tls: the certificate can be swapped on SIGHUP
            service, reloadable = tls.server_service(desc, factory, reactor)
            return ListeningService(service.endpoint, factory, kind="gateway", desc=desc), reloadable
        endpoint = serverFromString(reactor, with_backlog(desc))
        return ListeningService(endpoint, factory, kind="gateway", desc=desc), None

    def control_service(self, view: Any, registry: Any, reactor: Any) -> None:
        return None
