# -*- test-case-name: tests.test_daemon -*-
"""
The service tree: listeners, the demo backend, and an ordered, graceful stop.
"""

from __future__ import annotations

import ipaddress
import random
import signal
import threading
from collections.abc import Sequence
from typing import Any

import autobahn
from autobahn.websocket import USES_NVX
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger

from wsgateway import dashboard, logs, tls
from wsgateway.admin import admin_site
from wsgateway.auth import Authenticator, TokenVerifier, load_api_keys, load_jwks_file, load_public_key
from wsgateway.config import AuthConfig, GatewayConfig, RouteConfig, UpstreamConfig
from wsgateway.jwks import JwksFetcher
from wsgateway.limits import ConnectionLimiter
from wsgateway.metrics import GatewayMetrics, MetricsResource
from wsgateway.proxy import GatewayServerFactory, UpstreamConnector, UpstreamProtocol
from wsgateway.relay import Relay
from wsgateway.routing import Router
from wsgateway.stats import GatewayStats
from wsgateway.tracing import make_tracer
from wsgateway.health import HealthChecker, make_probe
from wsgateway.upstream import Node, Upstream, UpstreamRequest

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


def _trust_root(cfg: UpstreamConfig) -> Any:
    if not cfg.tls_ca:
        return None  # optionsForClientTLS then uses the platform's trust store
    with open(cfg.tls_ca, "rb") as f:
        pem = f.read()
    marker = b"-----BEGIN CERTIFICATE-----"
    certs = [ssl.Certificate.loadPEM(marker + part) for part in pem.split(marker)[1:]]
    return ssl.trustRootFromCertificates(certs)


def _client_certificate(cfg: UpstreamConfig) -> Any:
    if not (cfg.tls_cert and cfg.tls_key):
        return None
    with open(cfg.tls_cert, "rb") as c, open(cfg.tls_key, "rb") as k:
        return ssl.PrivateCertificate.loadPEM(c.read() + b"\n" + k.read())


class UpstreamEndpoints:
    """Client endpoints per node: plain TCP for IP literals, TLS verified against tls_ca by host name."""

    def __init__(self, reactor: Any, upstreams: dict[str, UpstreamConfig]) -> None:
        self._reactor = reactor
        self._tls: dict[str, Any] = {}
        self._cache: dict[tuple[str, float], IStreamClientEndpoint] = {}
        for up in upstreams.values():
            trust = None
            cert = None
            for node in up.nodes:
                if node.scheme == "wss":
                    if trust is None and cert is None:
                        trust, cert = _trust_root(up), _client_certificate(up)
                    kwargs: dict[str, Any] = {}
                    if trust is not None:
                        kwargs["trustRoot"] = trust
                    if cert is not None:
                        kwargs["clientCertificate"] = cert
                    self._tls[node.url] = ssl.optionsForClientTLS(node.host, **kwargs)

    def __call__(self, node: Node, timeout: float) -> IStreamClientEndpoint:
        # Endpoints hold no connection state: one per node and timeout serves every attempt.
        key = (node.url, timeout)
        ep = self._cache.get(key)
        if ep is None:
            ep = self._cache[key] = self._build(node, timeout)
        return ep

    def _build(self, node: Node, timeout: float) -> IStreamClientEndpoint:
        cfg = node.config
        try:
            version = ipaddress.ip_address(cfg.host).version
        except ValueError:
            version = 0
        ep: IStreamClientEndpoint
        if version == 4:
            ep = TCP4ClientEndpoint(self._reactor, cfg.host, cfg.port, timeout=timeout)
        elif version == 6:
            ep = TCP6ClientEndpoint(self._reactor, cfg.host, cfg.port, timeout=timeout)
        else:
            ep = HostnameEndpoint(self._reactor, cfg.host, cfg.port, timeout=timeout)
        tls = self._tls.get(node.url)
        if tls is not None:
            ep = wrapClientTLS(tls, ep)
        return ep


def _authenticator(cfg: AuthConfig, reactor: Any, parent: MultiService) -> Authenticator:
    """The [auth] keys, loaded once here (config.py has already checked that they load)."""
    api_keys = load_api_keys(cfg.api_keys_file) if cfg.api_keys_file else None
    if cfg.jwks_url:
        verifier = TokenVerifier(cfg)
        fetcher = JwksFetcher(
            cfg.jwks_url, reactor=reactor, clock=reactor, refresh=cfg.jwks_refresh, ca_path=cfg.jwks_ca,
            on_keys=lambda keys: setattr(verifier, "keys", keys),
        )
        fetcher.setServiceParent(parent)
        return Authenticator(cfg, verifier, api_keys, fetcher.refresh_for_unknown_kid)
    if cfg.jwks_file:
        verifier = TokenVerifier(cfg, keys=load_jwks_file(cfg.jwks_file))
    else:
        verifier = TokenVerifier(cfg, public_key=load_public_key(cfg.public_key_file) if cfg.public_key_file else None)
    return Authenticator(cfg, verifier, api_keys)


class GatewayService(MultiService):
    """
    Root of the tree. Children start in order (demo backend, then the
    listeners); stopping is sequenced by hand because MultiService stops
    its children all at once: listeners first, then the drain, then the rest.
    """

    log = Logger()

    def __init__(self, config: GatewayConfig, reactor: Any, *, rng: random.Random | None = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self._rng = rng or random.Random()  # the drain's jitter
        self.router = Router(config.routes)
        endpoints = UpstreamEndpoints(reactor, dict(config.upstreams))
        connector = UpstreamConnector(reactor, endpoints)
        # reads routes, upstreams and stats through self at each scrape
        self.metrics = GatewayMetrics(self, upstreams=config.upstreams)
        self.upstreams: dict[str, Upstream[UpstreamProtocol]] = {
            name: Upstream(cfg, reactor, connector.connect, observer=self.metrics)
            for name, cfg in config.upstreams.items()
        }
        for up in self.upstreams.values():
            if up.config.health_check != "none":
                probe = make_probe(
                    up.config.health_check,
                    endpoints=endpoints,
                    ws_connect=lambda node, path, timeout, c=connector: c.connect(
                        node, UpstreamRequest(resource=path, headers={}), timeout
                    ),
                    timeout=up.config.health_timeout,
                )
                HealthChecker(up.config, up.nodes, reactor, probe).setServiceParent(self)
        self.auth = _authenticator(config.auth, reactor, self) if config.auth is not None else None
        # one limiter for every listener: max_connections is for the whole gateway
        self.limiter = ConnectionLimiter(config.limits.max_connections, config.limits.max_connections_per_ip)
        self.stats = GatewayStats()
        self.tracer = make_tracer()
        self.factories: list[GatewayServerFactory] = []
        self.listeners: list[Any] = []
        self.tls: list[tls.ReloadableServerTLS] = []  # one per ssl: listener, for reload()
        self._previous_sighup: Any = None
        self.draining = False
        if config.admin is not None:
            # the dashboard at / (and /demo with the demo backend)
            pages = dashboard.resources(self, config.gateway.listen if config.demo is not None else None)
            site = admin_site(
                self, token=config.admin.token or None,
                extra={b"metrics": MetricsResource(self.metrics.registry), **pages},
            )
            for desc in config.admin.listen:
                strports.service(desc, site, reactor=reactor).setServiceParent(self)
        if config.demo is not None:
            from wsgateway.demo import DemoFactory

            for desc in config.demo.listen:
                strports.service(desc, DemoFactory(reactor=reactor), reactor=reactor).setServiceParent(self)
        for desc in config.gateway.listen:
            factory = GatewayServerFactory(
                config,
                self.router,
                self.upstreams,
                reactor=reactor,
                clock=reactor,
                secure=desc.split(":", 1)[0] in ("ssl", "tls"),
                auth=self.auth,
                limiter=self.limiter,
                stats=self.stats,
                tracer=self.tracer,
            )
            self.factories.append(factory)
            if tls.is_ssl(desc):
                # built by wsgateway.tls, not strports: its certificate can be swapped on SIGHUP
                listener, reloadable = tls.server_service(desc, factory, reactor)
                self.tls.append(reloadable)
            else:
                listener = strports.service(desc, factory, reactor=reactor)
            listener.setServiceParent(self)
            self.listeners.append(listener)

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
            "wsgateway node {node_id} starting: Autobahn {autobahn} (NVX acceleration {nvx}), {routes} routes, "
            "{upstreams} upstreams, listening on {listen}",
            node_id=self.config.gateway.node_id,
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
        self._previous_sighup = _on_signal("SIGHUP", self.reactor, self.reload)
        super().startService()

    def reload(self) -> None:
        """
        SIGHUP's work, run in the reactor thread. For now it re-reads the
        certificate files of every ssl: listener (new connections get the new
        certificate, open ones are untouched; a bad file keeps the old one).
        Re-reading the whole INI (SPEC section 9) is to be added here.
        """
        if not self.tls:
            self.log.info("SIGHUP: no ssl: listener, nothing to reload")
            return
        self.log.info("SIGHUP: reloading the TLS certificates of {n} ssl: listener(s)", n=len(self.tls))
        ok = True
        for reloadable in self.tls:
            ok = reloadable.reload() and ok  # logs its own outcome, never raises
        self.metrics.reload_result(ok)

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    def _relays(self) -> list[Relay]:
        return [r for f in self.factories for r in f.relays]

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
            await _sleep(self.reactor, 0.05)
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
            await _sleep(self.reactor, gw.drain_grace)
            # 2. tell everyone, spread out, then give them shutdown_timeout to finish
            await self._drain(gw.shutdown_timeout)
        # 3. the rest (demo backend)
        rest = [svc for svc in self if svc not in self.listeners]
        await DeferredList([Deferred.fromCoroutine(_maybe(svc.stopService())) for svc in rest])
        self.tracer.shutdown()  # flushes spans still batched for export
        self.running = 0
        # Last, so a SIGHUP during the drain still reloads instead of killing us.
        if self._previous_sighup is not None:
            _restore_signal("SIGHUP", self._previous_sighup)
            self._previous_sighup = None
        # twistd re-raises the stopping signal at exit (so SIGTERM ends in
        # status -15); after an orderly drain SPEC section 9 wants status 0.
        if getattr(self.reactor, "_exitSignal", None) is not None:
            self.reactor._exitSignal = None


def _on_signal(name: str, reactor: Any, work: Any) -> Any:
    """
    Call C{work()} in the reactor thread each time signal C{name} arrives;
    returns the handler it replaced (None when it installed nothing).

    The way twistd rotates its log on SIGUSR1: the Python-level handler runs
    between two bytecodes of whatever the reactor thread was doing, so it
    only queues the work with C{callFromThread}, which is safe there and
    wakes the reactor up.
    """
    signum = getattr(signal, name, None)
    if signum is None or threading.current_thread() is not threading.main_thread():
        return None  # no such signal here (Windows), or not the main thread (signal.signal would fail)

    def handler(number: int, frame: Any) -> None:
        reactor.callFromThread(work)

    previous = signal.signal(signum, handler)
    return signal.SIG_DFL if previous is None else previous  # None: a handler not set from Python


def _restore_signal(name: str, previous: Any) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(getattr(signal, name), previous)


async def _maybe(result: Any) -> None:
    if isinstance(result, Deferred):
        await result


def _sleep(reactor: Any, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
