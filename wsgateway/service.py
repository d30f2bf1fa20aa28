# -*- test-case-name: tests.integration.test_daemon -*-
"""
The service tree: listeners, the demo backend, SIGHUP reloads and an
ordered, graceful stop.
"""

from __future__ import annotations

import random
import signal
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import autobahn
from autobahn.websocket import USES_NVX
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.logger import Logger

from wsgateway import runtime, sdnotify, tls
from wsgateway.channels.broker import make_broker
from wsgateway.channels.history import HistoryRules
from wsgateway.config.loader import ConfigError, GatewayConfig, load
from wsgateway.config.routes import RouteConfig
from wsgateway.connections import LiveConnections
from wsgateway.durable.entries import Entry
from wsgateway.durable.queue import make_queue
from wsgateway.handshake.admission import ConnectionLimiter
from wsgateway.handshake.chain import HandshakeChain
from wsgateway.handshake.server import GatewayServerFactory
from wsgateway.listening import ListeningService, SingleProcess
from wsgateway.ops import dashboard, logs
from wsgateway.ops.admin import admin_site
from wsgateway.ops.jsonapi import AdminFactory
from wsgateway.ops.exposition import MetricsResource
from wsgateway.ops.heap import heap_trim_service
from wsgateway.ops.metrics import BrokerMetrics, GatewayMetrics
from wsgateway.ops.stats import GatewayStats
from wsgateway.ops.tracing import make_tracer
from wsgateway.signals import on_signal, restore_signal
from wsgateway.upstream.leg import UpstreamProtocol
from wsgateway.upstream.pool import Upstream
from wsgateway.version import version

if TYPE_CHECKING:
    from wsgateway.interfaces import ProcessRole

# The 1001s of a shutdown are spread over this fraction of shutdown_timeout
# (see drain_schedule); the rest of it is for the last close handshakes.
DRAIN_SPREAD = 0.5


def drain_schedule(count: int, *, shutdown_timeout: float, rng: random.Random) -> list[float]:
    """
    When each of ``count`` connections gets its 1001, in seconds after
    drain_grace: uniformly at random over the first half of
    shutdown_timeout. Clients told all at once reconnect all at once, to
    whichever nodes are left (a thundering herd); spread out, they arrive
    as a steady stream. Envoy's "gradual" drain strategy does the same over
    its drain time. The second half leaves the last ones told time to finish
    their close handshake before whatever remains is cut off.
    """
    spread = max(shutdown_timeout, 0.0) * DRAIN_SPREAD
    return [rng.uniform(0.0, spread) if spread else 0.0 for _ in range(count)]


class GatewayService(MultiService):
    """
    Root of the tree. Children start in order (demo backend, then the
    listeners); stopping is sequenced by hand because MultiService stops
    its children all at once: listeners first, then the drain, then the rest.
    """

    log = Logger()

    def __init__(
        self, config: GatewayConfig, reactor: Any, *, config_path: str | None = None, rng: random.Random | None = None,
        role: ProcessRole | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        # the one process, or a worker of N (wsgateway.workers.child: the
        # parent's sockets, node id ".../wN", no admin port or demo backend)
        self.role: ProcessRole = role or SingleProcess()
        config = self.role.adapt(config)
        # what SIGHUP re-reads (tap.py passes it absolute: twistd may chdir)
        self.config_path = config_path or config.path
        self._rng = rng or random.Random()  # the drain's jitter
        # reads routes, upstreams and stats through self at each scrape
        self.metrics = GatewayMetrics(self, upstreams=config.upstreams)
        # routes, upstreams (with their health checks) and auth: what a reload replaces
        self._wiring = runtime.build(config, reactor, observer=self.metrics)
        self.config = config
        self.router = self._wiring.router
        self.upstreams: dict[str, Upstream[UpstreamProtocol]] = self._wiring.upstreams
        self.auth = self._wiring.auth
        for svc in self._wiring.services():
            svc.setServiceParent(self)
        # one limiter for every listener: max_connections is for the whole gateway
        self.limiter = ConnectionLimiter(config.limits.max_connections, config.limits.max_connections_per_ip)
        self.stats = GatewayStats()
        self.tracer = make_tracer()
        # channels: in process, or shared through Redis; a child before the
        # listeners, so it starts first and stops after the drain
        self.broker = make_broker(config.redis, config.gateway.node_id, reactor=reactor,
                                  observer=BrokerMetrics(self.metrics))
        self.broker.history_rules = HistoryRules.of(config.routes)
        self.broker.setServiceParent(self)
        # the durable queue, when a route is at_least_once: also before the
        # listeners, so it is closed only after the drain. It replays through
        # the current config's upstreams and knows nothing else of ours.
        self.queue = make_queue(config, reactor, self.metrics, replay=self._replay)
        if self.queue is not None:
            self.queue.setServiceParent(self)
        # every open connection, whichever listener took it
        self.live = LiveConnections(clock=reactor, limiter=self.limiter, stats=self.stats, tracer=self.tracer,
                                    broker=self.broker, queue=self.queue)
        self.chain = self._chain(self._wiring)
        self.factories: list[GatewayServerFactory] = []
        self.listeners: list[Any] = []
        self.tls: list[tls.ReloadableServerTLS] = []  # one per ssl: listener, for reload()
        self._previous_sighup: Any = None
        self._previous_sigusr1: Any = None
        self.draining = False
        self.notifier = sdnotify.Notifier()  # READY=1, RELOADING=1, STOPPING=1 to systemd ($NOTIFY_SOCKET)
        if config.admin is not None:
            # the dashboard at / (and /demo with the demo backend)
            pages = dashboard.resources(self, config.gateway.listen if config.demo is not None else None)
            site = admin_site(
                self, token=config.admin.token or None, max_body=config.admin.max_body,
                extra={b"metrics": MetricsResource(self.metrics.registry), **pages},
            )
            # one cap for all the admin addresses, apart from the client listeners'
            guarded = AdminFactory(site, clock=reactor, max_connections=config.admin.max_connections)
            for desc in config.admin.listen:
                ListeningService(serverFromString(reactor, desc), guarded, kind="admin",
                                 desc=desc).setServiceParent(self)
        control = self.role.control_service(self, self.metrics.registry, reactor)
        if control is not None:
            # what a parent reads to serve the admin port for all workers
            control.setServiceParent(self)
        heap_trim_service(reactor).setServiceParent(self)  # RSS back down after a burst (ops/heap.py)
        if config.demo is not None:
            from wsgateway.dev.demo import DemoFactory

            for desc in config.demo.listen:
                ListeningService(serverFromString(reactor, desc), DemoFactory(reactor=reactor), kind="demo",
                                 desc=desc).setServiceParent(self)
        for index, desc in enumerate(config.gateway.listen):
            factory = GatewayServerFactory(self.chain, self.live, reactor=reactor, clock=reactor,
                                           secure=desc.split(":", 1)[0] in ("ssl", "tls"))
            self.factories.append(factory)
            listener, reloadable = self.role.listener(index, desc, factory, reactor)
            if reloadable is not None:
                self.tls.append(reloadable)
            listener.setServiceParent(self)
            self.listeners.append(listener)

    def _chain(self, wiring: runtime.Wiring) -> HandshakeChain:
        return HandshakeChain(wiring.config, wiring.router, wiring.upstreams, wiring.auth, live=self.live,
                              queue=self.queue)

    def _replay(self, route: str, entries: list[Entry]) -> Deferred[bool]:
        """The durable queue's replay connections, through the upstreams new connections use."""
        return self.chain.replay(route, entries)

    # -- what the admin port reads (admin.GatewayView) ----------------------

    @property
    def routes(self) -> Sequence[RouteConfig]:
        return self.config.routes

    def listening(self) -> bool:
        return bool(self.listeners) and all(svc.running for svc in self.listeners)

    def now(self) -> float:
        return float(self.reactor.seconds())

    def set_log_level(self, level: str) -> None:
        logs.set_level(level)

    def startService(self) -> None:
        self.log.info(
            "wsgateway node {node_id} starting: wsgateway {version}, Autobahn {autobahn} (NVX acceleration {nvx}), "
            "{routes} routes, {upstreams} upstreams, listening on {listen}",
            node_id=self.config.gateway.node_id,
            version=version(),
            autobahn=autobahn.__version__,
            nvx="active" if USES_NVX else "NOT active",
            routes=len(self.config.routes),
            upstreams=len(self.config.upstreams),
            listen=" ".join(self.config.gateway.listen),
        )
        if not USES_NVX:
            self.log.warn("Autobahn's NVX acceleration is not active: handshakes will cost more CPU")
        if not self.config.gateway.allowed_origins:
            self.log.warn(
                "[gateway] allowed_origins is not set: any web page may open WebSockets here with its "
                "visitors' cookies (cross-site WebSocket hijacking); list your sites' origins"
            )
        # Before the listeners start: once the gateway listens, SIGHUP reloads
        # (twistd installs no SIGHUP handler, and the default one kills the process).
        self._previous_sighup = on_signal("SIGHUP", self.reactor, self.reload)
        # SIGUSR1 (logrotate's postrotate) reopens the log file; its default
        # action would end the process, and twistd handles it only for a log
        # file of its own making, not for our --logger.
        self._previous_sigusr1 = on_signal("SIGUSR1", self.reactor, self.reopen_logs)
        # A file size limit (systemd's LimitFSIZE=, ulimit -f) reached by the
        # queue or a log file must fail that write (EFBIG, handled like a full
        # disk), not kill the daemon, which is SIGXFSZ's default action.
        if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        super().startService()
        sdnotify.ready_when(self.notifier, [s.when_bound() for s in self if isinstance(s, ListeningService)],
                            self.reactor)

    def reopen_logs(self) -> None:
        count = logs.reopen()
        self.log.info("SIGUSR1: reopened {count} log file(s)", count=count)

    def reload(self) -> None:
        """
        SIGHUP's work (docs/operations.md#signals-and-lifecycle), run in the reactor thread: re-read
        the INI (``reload_config``), then the certificate files of every
        ssl: listener (each keeps its old certificate if its files are bad).
        Open connections are never touched.
        """
        if self.draining:
            self.log.info("SIGHUP during the shutdown drain: nothing reloaded")
            return
        self.notifier.reloading()
        ok = config_ok = self.reload_config()
        for reloadable in self.tls:
            ok = reloadable.reload() and ok  # logs its own outcome, never raises
        self.metrics.reload_result(ok)  # wsgateway_config_reloads_total{result}
        self.notifier.reloaded(config_ok=config_ok, certificates_ok=ok)

    def reload_config(self) -> bool:
        """
        Re-read the config file. A valid one replaces routes, upstreams,
        auth keys, limits, origins and the log level for new connections,
        all in this one reactor turn: everything is built first, then the
        references are swapped, so a failure changes nothing. Settings bound
        at start (listeners, the admin port, the log format...) keep their
        running values, with a warning naming them. An invalid file is
        rejected whole: each problem is logged, the old config stays.
        """
        path = self.config_path
        try:
            new = self.role.adapt(load(path))
        except ConfigError as e:
            for line in e.errors:
                self.log.error("{problem}", problem=line)
            self.log.error(
                "reload of {path} rejected: {count} error(s), each logged above; still running the previous "
                "configuration. Fix the file, then send SIGHUP again",
                path=path, count=len(e.errors),
            )
            return False
        running = self._wiring.config
        restart = runtime.restart_needed(running, new)
        if self.queue is None and any(r.delivery == "at_least_once" for r in new.routes):
            # the queue is opened at start: until a restart these routes queue nothing
            restart.append("delivery = at_least_once (the durable queue opens at start)")
        effective = runtime.keep_running_values(running, new)
        try:
            built = runtime.build(effective, self.reactor, self._wiring, observer=self.metrics)
            chain = self._chain(built)
        except Exception:
            self.log.failure("reload of {path} rejected: the new configuration could not be built; still running "
                             "the previous one", path=path)
            return False
        previous = self._swap(built, chain)
        if restart:
            self.log.warn(
                "reload of {path}: {keys} changed, which takes a restart; still using the running value(s)",
                path=path, keys=", ".join(restart),
            )
        kept = built.kept_from(previous)
        self.log.info(
            "reloaded {path}: {routes} routes, {upstreams} upstreams ({kept} kept as they were, {fresh} new or "
            "changed, {removed} removed); log level {in_effect}",
            path=path,
            routes=len(effective.routes),
            upstreams=len(built.upstreams),
            kept=len(kept),
            fresh=len(built.upstreams) - len(kept),
            removed=len([n for n in previous.upstreams if n not in built.upstreams]),
            in_effect=logs.level_after_reload(running.log.level, effective.log.level),
        )
        if effective.log.level != running.log.level:
            # after the line above, so a reload to "warn" still leaves a trace
            # of itself. Only on a change in the file: a level set through
            # the admin API survives reloads that do not touch it.
            logs.set_level(effective.log.level)
        return True

    def _swap(self, built: runtime.Wiring, chain: HandshakeChain) -> runtime.Wiring:
        """Make ``built`` what new connections use; returns what it replaced. Nothing here can fail half-way."""
        previous = self._wiring
        keep = set(map(id, built.services()))
        for svc in previous.services():
            if id(svc) not in keep:
                svc.disownServiceParent()  # stops it: a replaced health checker or JWKS fetcher
        for svc in built.services():
            if svc.parent is None:
                svc.setServiceParent(self)  # starts it: the service is running
        limits = built.config.limits
        self.limiter.configure(limits.max_connections, limits.max_connections_per_ip)
        self.chain = chain
        for factory in self.factories:
            factory.reconfigure(chain)
        self._wiring = built
        self.config = built.config
        self.router = built.router
        self.upstreams = built.upstreams
        self.auth = built.auth
        self.broker.history_rules = HistoryRules.of(built.config.routes)
        return previous

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    def _relays(self) -> list[Any]:
        """Every open connection: relays and broadcast sessions (both have drain, client, upstream)."""
        return self.live.open_connections()

    async def _drain(self, timeout: float) -> None:
        """
        1001 to every open connection, each at its own moment
        (``drain_schedule``); ``Relay.drain`` lets through what a client
        sent before it saw the close. Whatever is still open ``timeout``
        seconds from now is cut off.
        """
        relays = self._relays()
        delays = drain_schedule(len(relays), shutdown_timeout=timeout, rng=self._rng)
        calls = [self.reactor.callLater(delay, relay.drain) for relay, delay in zip(relays, delays)]
        told = set(relays)
        deadline = self.reactor.seconds() + timeout
        while self.reactor.seconds() < deadline:
            live = self._relays()
            if not live:
                break
            for relay in live:
                if relay not in told:
                    # its handshake was in flight when the listeners stopped
                    told.add(relay)
                    relay.drain()
            await deferLater(self.reactor, 0.05)
        for call in calls:
            if call.active():
                call.cancel()
        for relay in self._relays():
            relay.client.abortConnection()
            if relay.upstream is not None:  # None while reconnecting
                relay.upstream.abortConnection()

    async def _stop(self) -> None:
        # /readyz says draining from here on (the admin port stays up till the end)
        self.draining = True
        self.notifier.stopping()
        # 1. stop accepting
        await gatherResults([svc.stopService() for svc in self.listeners], consumeErrors=True)
        gw = self.config.gateway
        open_now = len(self._relays())
        if open_now:
            self.log.info(
                "draining {n} connections: 1001 to each at a random moment {grace} to {last} s from now; "
                "whatever is still open {end} s from now is cut off",
                n=open_now, grace=gw.drain_grace, last=gw.drain_grace + gw.shutdown_timeout * DRAIN_SPREAD,
                end=gw.drain_grace + gw.shutdown_timeout,
            )
            await deferLater(self.reactor, gw.drain_grace)
            # 2. tell everyone, spread out, then give them shutdown_timeout to finish
            await self._drain(gw.shutdown_timeout)
        # 3. the rest (demo backend)
        rest = [svc for svc in self if svc not in self.listeners]
        await DeferredList([Deferred.fromCoroutine(_maybe(svc.stopService())) for svc in rest])
        self.tracer.shutdown()  # flushes spans still batched for export
        self.running = 0
        # Last, so a SIGHUP during the drain still reloads instead of killing us.
        if self._previous_sighup is not None:
            restore_signal("SIGHUP", self._previous_sighup)
            self._previous_sighup = None
        if self._previous_sigusr1 is not None:
            restore_signal("SIGUSR1", self._previous_sigusr1)
            self._previous_sigusr1 = None
        # twistd re-raises the stopping signal at exit (so SIGTERM ends in
        # status -15); after an orderly drain docs/operations.md#signals-and-lifecycle wants status 0.
        if getattr(self.reactor, "_exitSignal", None) is not None:
            self.reactor._exitSignal = None


async def _maybe(result: Any) -> None:
    if isinstance(result, Deferred):
        await result
