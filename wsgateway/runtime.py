# -*- test-case-name: tests.integration.test_reload -*-
"""
What new connections use, built whole from one config: the router, the
upstreams with their health checks, and the authenticator. The service
builds one at start and, on SIGHUP, builds the next one completely before
anything is swapped in (``GatewayService.reload``), so a file that fails
half-way changes nothing.

An upstream whose config (and TLS files) did not change keeps its
``Upstream`` object, with its health state, ejections, balancer state and
connection counts, and its health checker keeps running. Open connections
hold the objects they were made with and never see a reload.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint

from wsgateway.auth.jwks import JwksFetcher
from wsgateway.auth.keys import load_api_keys, load_jwks_file, load_public_key
from wsgateway.auth.verifier import Authenticator, TokenVerifier
from wsgateway.config.auth import AuthConfig
from wsgateway.config.loader import GatewayConfig
from wsgateway.config.upstreams import UpstreamConfig
from wsgateway.routing.router import Router
from wsgateway.tls import trust_root
from wsgateway.upstream.checker import HealthChecker
from wsgateway.upstream.probes import make_probe
from wsgateway.upstream.leg import UpstreamConnector, UpstreamProtocol
from wsgateway.upstream.pool import ConnectObserver, Node, Upstream, UpstreamRequest


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
                        trust, cert = trust_root(up.tls_ca), _client_certificate(up)
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
        version: int
        try:
            version = ipaddress.ip_address(cfg.host).version
        except ValueError:
            version = 0  # a host name
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


def _authenticator(
    cfg: AuthConfig, reactor: Any, previous: Authenticator | None
) -> tuple[Authenticator, list[Service]]:
    """
    The [auth] keys, loaded here (config.py has already checked that they
    load), and the services they need (a JWKS fetcher). On a reload with
    the same ``jwks_url``, the keys fetched so far serve until the new
    fetcher's first fetch lands, so a provider that is down at that moment
    does not lock everyone out.
    """
    api_keys = load_api_keys(cfg.api_keys_file) if cfg.api_keys_file else None
    if cfg.jwks_url:
        cached = None
        if previous is not None and previous.cfg.jwks_url == cfg.jwks_url:
            cached = previous.verifier.keys
        verifier = TokenVerifier(cfg, keys=cached)
        fetcher = JwksFetcher(
            cfg.jwks_url, reactor=reactor, clock=reactor, refresh=cfg.jwks_refresh, ca_path=cfg.jwks_ca,
            on_keys=lambda keys: setattr(verifier, "keys", keys),
        )
        fetcher.keys = cached
        return Authenticator(cfg, verifier, api_keys, fetcher.refresh_for_unknown_kid), [fetcher]
    if cfg.jwks_file:
        verifier = TokenVerifier(cfg, keys=load_jwks_file(cfg.jwks_file))
    else:
        verifier = TokenVerifier(cfg, public_key=load_public_key(cfg.public_key_file) if cfg.public_key_file else None)
    return Authenticator(cfg, verifier, api_keys), []


def _fingerprint(cfg: UpstreamConfig) -> tuple[Any, ...]:
    """An upstream is unchanged when its config and the bytes of its TLS files are."""
    digests: list[str | None] = []
    for path in (cfg.tls_ca, cfg.tls_cert, cfg.tls_key):
        if path:
            with open(path, "rb") as f:
                digests.append(hashlib.sha256(f.read()).hexdigest())
        else:
            digests.append(None)
    return (cfg, *digests)


@dataclass(eq=False)
class Wiring:
    """One config's objects for new connections, and the services they need running."""

    config: GatewayConfig
    router: Router
    upstreams: dict[str, Upstream[UpstreamProtocol]]
    checkers: dict[str, HealthChecker] = field(default_factory=dict)  # upstreams with active checks
    auth: Authenticator | None = None
    auth_services: list[Service] = field(default_factory=list)
    fingerprints: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def kept_from(self, previous: Wiring) -> list[str]:
        """Names of the upstreams whose objects came from ``previous``."""
        return [n for n, up in self.upstreams.items() if previous.upstreams.get(n) is up]

    def services(self) -> list[Service]:
        return [*self.checkers.values(), *self.auth_services]


def build(
    config: GatewayConfig,
    reactor: Any,
    previous: Wiring | None = None,
    *,
    observer: ConnectObserver | None = None,
) -> Wiring:
    """
    Everything ``config`` asks for, reusing from ``previous`` the upstreams
    that did not change. Starts nothing and changes nothing in ``previous``:
    the caller swaps the result in (or drops it) in one go. ``observer`` is
    handed to each new Upstream (metrics, ``upstream.ConnectObserver``).
    """
    fingerprints = {name: _fingerprint(cfg) for name, cfg in config.upstreams.items()}
    reused = {
        name
        for name in config.upstreams
        if previous is not None and previous.fingerprints.get(name) == fingerprints[name]
    }
    endpoints = UpstreamEndpoints(reactor, {n: c for n, c in config.upstreams.items() if n not in reused})
    connector = UpstreamConnector(reactor, endpoints)
    upstreams: dict[str, Upstream[UpstreamProtocol]] = {}
    checkers: dict[str, HealthChecker] = {}
    for name, cfg in config.upstreams.items():
        if name in reused:
            assert previous is not None
            upstreams[name] = previous.upstreams[name]
            if name in previous.checkers:
                checkers[name] = previous.checkers[name]
            continue
        up = upstreams[name] = Upstream(cfg, reactor, connector.connect, observer=observer)
        if cfg.health_check != "none":
            probe = make_probe(
                cfg.health_check,
                endpoints=endpoints,
                ws_connect=_ws_connect(connector),
                timeout=cfg.health_timeout,
            )
            checkers[name] = HealthChecker(cfg, up.nodes, reactor, probe)
    auth: Authenticator | None = None
    auth_services: list[Service] = []
    if config.auth is not None:
        auth, auth_services = _authenticator(config.auth, reactor, previous.auth if previous else None)
    return Wiring(
        config=config,
        router=Router(config.routes),
        upstreams=upstreams,
        checkers=checkers,
        auth=auth,
        auth_services=auth_services,
        fingerprints=fingerprints,
    )


def _ws_connect(connector: UpstreamConnector) -> Callable[[Node, str, float], Any]:
    return lambda node, path, timeout: connector.connect(node, UpstreamRequest(resource=path, headers={}), timeout)


# -- what a reload cannot change ----------------------------------------------

# (what the operator reads, how to get it from a config): these are bound at
# start (sockets, the log observer, the admin site) and need a restart.
RESTART_ONLY: tuple[tuple[str, Callable[[GatewayConfig], Any]], ...] = (
    ("[gateway] listen", lambda c: c.gateway.listen),
    ("[gateway] node_id", lambda c: c.gateway.node_id),
    ("[gateway] workers", lambda c: c.gateway.workers),
    ("[admin] listen", lambda c: c.admin.listen if c.admin else None),
    ("[admin] token", lambda c: c.admin.token if c.admin else None),
    ("[admin] max_connections", lambda c: c.admin.max_connections if c.admin else None),
    ("[admin] max_body", lambda c: c.admin.max_body if c.admin else None),
    ("[log] format", lambda c: c.log.format),
    ("[log] file", lambda c: c.log.file),
    ("[redis]", lambda c: c.redis),
    ("[queue]", lambda c: c.queue),
    ("[demo]", lambda c: c.demo),
)


def restart_needed(running: GatewayConfig, new: GatewayConfig) -> list[str]:
    """The restart-only settings that differ between ``running`` and ``new``."""
    return [label for label, value in RESTART_ONLY if value(running) != value(new)]


def keep_running_values(running: GatewayConfig, new: GatewayConfig) -> GatewayConfig:
    """``new`` with every restart-only setting as it is running, so the config the service holds is what it does."""
    return replace(
        new,
        gateway=replace(
            new.gateway,
            listen=running.gateway.listen,
            node_id=running.gateway.node_id,
            workers=running.gateway.workers,
        ),
        admin=running.admin,
        log=replace(new.log, format=running.log.format, file=running.log.file),
        redis=running.redis,
        queue=running.queue,
        demo=running.demo,
    )
