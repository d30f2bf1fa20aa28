# -*- test-case-name: tests.integration.test_workers -*-
"""
One worker process of ``[gateway] workers = N`` (N > 1).

The parent (``wsgateway.workers.parent``) binds every ``[gateway] listen`` socket
and starts each worker (``main`` here, ``--id N CONFIG``) with:

- the listening sockets as file descriptors 3, 4, ... in ``listen`` order;
- its stdin a pipe from the parent, which is never written: EOF on it means
  the parent is gone (even ``kill -9``), and the worker then drains and exits
  like on SIGTERM, so no worker outlives its parent. (A pipe, not Linux's
  ``PR_SET_PDEATHSIG``: portable, and the worker chooses an orderly exit.)
- its stdout a pipe the parent copies into its own log, line by line, so one
  process owns the log file (rotation, SIGUSR1); stderr a pipe the parent
  logs as warnings (a crash's traceback);
- ``WSGATEWAY_WORKER`` in its environment: a JSON ``WorkerSetup``.

The worker runs the ordinary ``GatewayService`` (routes, upstreams, health
checks, auth, broker, SIGHUP reload, the SIGTERM drain) with three changes,
all made here: it adopts the sockets instead of binding them (for ``ssl:``
it wraps the adopted socket in its own reloadable TLS, so a certificate
renewal is picked up by every worker on SIGHUP), its node id ends in
``/wN`` (logs, presence), and instead of the admin port it serves the same
admin resources on a private unix socket the parent reads: ``/metrics``,
``/readyz``, ``/dashboard.json`` and ``/admin/*`` behind a token only the
parent knows.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from dataclasses import dataclass, replace
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet import main as _main
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import IProtocolFactory, IReactorThreads, IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from wsgateway.config.loader import GatewayConfig

ENV = "WSGATEWAY_WORKER"
FIRST_FD = 3  # the parent maps listen[i] to this + i


@dataclass(frozen=True)
class WorkerSetup:
    """What the parent tells a worker; everything else comes from the config file."""

    id: int
    node_id: str  # the gateway's, without the worker's suffix
    listen: tuple[str, ...]  # the parent's [gateway] listen: what the inherited sockets are, in fd order
    workers: int
    control: str  # path of the private unix socket the parent reads
    token: str  # bearer token of /admin/* on that socket
    # the parent's [admin] max_body: a body the parent took is one its worker takes
    max_body: int = 65536

    @property
    def node(self) -> str:
        """This worker's node id in logs and presence, e.g. ``gw-1/w2``."""
        return f"{self.node_id}/w{self.id}"

    def to_env(self) -> str:
        return json.dumps({**self.__dict__, "listen": list(self.listen)})

    @classmethod
    def from_env(cls, text: str) -> WorkerSetup:
        data = json.loads(text)
        return cls(**{**data, "listen": tuple(data["listen"])})

    def adapt(self, config: GatewayConfig) -> GatewayConfig:
        """
        ``config`` as this worker runs it: the parent's listen addresses (a
        file edited since the parent started must not change which socket is
        which), the worker's node id and queue file, and no admin port or demo backend (the
        parent serves those once). Applied at start and to every SIGHUP
        reload, so a reload never sees these as changed.
        """
        gateway = replace(config.gateway, node_id=self.node, listen=self.listen, workers=self.workers)
        # One SQLite queue file per worker: each delivers only what it queued
        # itself, and a restarted worker N finds its own file again.
        suffix = f".w{self.id}"
        path = config.queue.path if config.queue.path.endswith(suffix) else config.queue.path + suffix  # adapted once
        queue = replace(config.queue, path=path)
        return replace(config, gateway=gateway, admin=None, demo=None, queue=queue)

    def listener(self, index: int, desc: str, factory: IProtocolFactory, reactor: Any) -> tuple[Service, Any]:
        """The service adopting inherited socket ``index`` (``desc``); and its ReloadableServerTLS for ssl:."""
        from wsgateway import tls

        reloadable = None
        if tls.is_ssl(desc):
            from twisted.protocols.tls import TLSMemoryBIOFactory

            reloadable = tls.ReloadableServerTLS(tls.parse_listen(desc), reactor)
            factory = TLSMemoryBIOFactory(reloadable, False, factory)
        return AdoptedPort(reactor, FIRST_FD + index, desc, factory), reloadable

    def control_service(self, view: Any, registry: Any, reactor: Any) -> Service:
        """The private admin site the parent reads (``view``: the GatewayService)."""
        from wsgateway.ops.admin import admin_site
        from wsgateway.ops.dashboard import DashboardJSON
        from wsgateway.ops.exposition import MetricsResource, worker_registry

        # its descriptor gauges labelled with its number: the parent keeps them apart rather than summing them
        metrics = MetricsResource(worker_registry(registry, self.id))
        site = admin_site(view, token=self.token, access_log=False, max_body=self.max_body,  # the parent asks every few seconds
                          extra={b"metrics": metrics, b"dashboard.json": DashboardJSON(view)})
        service = StreamServerEndpointService(UNIXServerEndpoint(reactor, self.control, mode=0o600), site)
        service._raiseSynchronously = True
        return service


class AdoptedPort(Service):
    """
    Listens on a socket the parent bound (``reactor.adoptStreamPort``).
    Every worker accepts from the same socket: the kernel hands each new
    connection to one of them. Stopping closes this worker's copy only.
    """

    log = Logger()

    def __init__(self, reactor: Any, fd: int, desc: str, factory: IProtocolFactory) -> None:
        self.reactor = reactor
        self.fd = fd
        self.desc = desc
        self.factory = factory
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        # The socket's family as the kernel has it (AF_INET, AF_INET6, AF_UNIX).
        probe = socket.socket(fileno=self.fd)
        try:
            family = probe.family
            probe.setblocking(False)  # adoptStreamPort needs it (the flag is shared with every copy)
        finally:
            probe.detach()
        self.port = self.reactor.adoptStreamPort(self.fd, family, self.factory)
        os.close(self.fd)  # the port holds its own duplicate

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


@implementer(IReadDescriptor)
class ParentWatch:
    """Calls ``gone()`` once when the pipe from the parent (stdin) reaches EOF: the parent has exited."""

    def __init__(self, reactor: Any, fd: int, gone: Any) -> None:
        self.reactor = reactor
        self.fd = fd
        self.gone = gone
        os.set_blocking(fd, False)
        reactor.addReader(self)

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> Any:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        return None if data else _main.CONNECTION_DONE  # the reactor then calls connectionLost

    def connectionLost(self, reason: Any) -> None:
        self.gone()

    def logPrefix(self) -> str:
        return "ParentWatch"


log = Logger(namespace="wsgateway.workers.child")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="wsgateway.workers.child",
        description="One worker of a wsgateway with [gateway] workers > 1. Started by the wsgateway parent "
                    "process (twistd wsgateway), never by hand.",
    )
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("config")
    args = parser.parse_args(argv)
    text = os.environ.pop(ENV, None)
    if text is None:
        print(f"wsgateway.workers.child: {ENV} is not set: workers are started by twistd wsgateway "
              "([gateway] workers > 1), not by hand", file=sys.stderr)
        return 2
    setup = WorkerSetup.from_env(text)

    from wsgateway.config import loader as _config

    try:
        config = setup.adapt(_config.load(args.config))
    except _config.ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 1

    from twisted.logger import globalLogBeginner

    from wsgateway.ops import logs

    observer = logs.observer_factory(level=config.log.level, fmt=config.log.format, file="-", node_id=setup.node,
                                     twistd_logfile=None, daemon=False, worker=setup.id)()
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    from twisted.internet import reactor

    from wsgateway._compat import autobahn
    from wsgateway.service import GatewayService

    autobahn.install()  # as tap.makeService does for one process
    service = GatewayService(config, reactor, config_path=args.config, role=setup)
    stopping: list[str] = []

    def stop(why: str) -> None:
        if stopping:
            return  # a second SIGTERM (systemd signals the whole group, and the parent forwards its own)
        stopping.append(why)
        log.info("worker {worker}: {why}: stopping", worker=setup.id, why=why)
        if reactor.running:
            reactor.stop()

    def on_signal(number: int, frame: Any) -> None:
        IReactorThreads(reactor).callFromThread(stop, signal.Signals(number).name)

    # Our own handlers, not the reactor's: one stop however many signals come.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ParentWatch(reactor, 0, lambda: stop("the parent process is gone"))
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    try:
        service.privilegedStartService()
        service.startService()
    except Exception:
        log.failure("worker {worker} could not start", worker=setup.id)
        return 1
    # Every reactor has the keyword (ReactorBase.run); IReactorCore.run, the
    # type of twisted.internet.reactor, does not declare it.
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]
    if stopping == ["the parent process is gone"]:
        try:
            os.rmdir(os.path.dirname(setup.control))  # the parent's private folder, once the last worker left it
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
