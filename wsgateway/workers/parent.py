# -*- test-case-name: tests.integration.test_workers -*-
"""
``[gateway] workers = N`` (N > 1): the twistd process becomes a parent that
binds every ``[gateway] listen`` socket, starts N worker processes
(``wsgateway.workers.child``) sharing them, and looks after them. It never accepts
a client connection itself: the kernel hands each new connection to one of
the workers waiting on the shared socket.

The parent:

- binds ``tcp:``, ``tcp6:`` and ``ssl:`` listeners (for ``ssl:`` only the
  TCP socket: each worker does TLS itself, with its own reloadable
  certificate) before twistd drops privileges, so ports below 1024 work
  with ``--uid``;
- starts each worker with the sockets as inherited file descriptors, a pipe
  whose EOF tells the worker that the parent is gone (so ``kill -9`` of the
  parent leaves no orphan serving clients), and its stdout and stderr as
  pipes whose lines go into the parent's log (one writer per log file);
- restarts a worker that dies, after 0.5 s, doubling up to 30 s while
  replacements keep dying within 10 s of their start (a bad file on disk, a
  port the worker cannot adopt), each restart logged with the reason;
- SIGHUP: re-validates the file (logging what is wrong, if anything) and
  forwards SIGHUP to every worker, which reloads exactly as a single process
  does; SIGUSR1 reopens the log file (only the parent writes it);
- SIGTERM: ``/readyz`` says draining, the parent closes its copies of the
  listening sockets and sends SIGTERM to every worker, which stops accepting
  (the sockets are then closed for good: new connections are refused) and
  drains with its 1001 jitter; the parent waits up to drain_grace +
  shutdown_timeout + 5 s, kills what is left, and exits 0;
- serves the admin port once: ``/healthz`` is its own, the rest is merged
  from the workers (``wsgateway.workers.aggregate``), which each serve their admin
  resources on a private unix socket in a 0700 temporary folder.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import tempfile
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.process_collector import ProcessCollector
from twisted.application.service import MultiService
from twisted.internet import error
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from wsgateway import runtime, sdnotify
from wsgateway.config.loader import ConfigError, GatewayConfig, load
from wsgateway.endpoints import DEFAULT_BACKLOG, split_endpoint
from wsgateway.listening import LISTENING, ListeningService, cannot_listen
from wsgateway.ops import logs
from wsgateway.ops.jsonapi import AdminFactory
from wsgateway.ops.metrics import register_build_info
from wsgateway.signals import on_signal, restore_signal
from wsgateway.workers import aggregate
from wsgateway.workers.admin import parent_site
from wsgateway.workers.child import WorkerSetup
from wsgateway.workers.pool import WorkerPool, WorkerSlot
from wsgateway.version import version

STOP_MARGIN = 5.0  # beyond drain_grace + shutdown_timeout, before stragglers are killed
REFRESH = 5.0  # seconds between background scrapes of the workers' counters
READY_POLL = 0.1  # seconds between asking the workers whether they all serve yet (READY=1 for systemd)


def bind(desc: str) -> socket.socket:
    """Bind and listen on one ``tcp:``, ``tcp6:`` or ``ssl:`` entry, as Twisted's endpoint would."""
    parts = split_endpoint(desc)
    kind = parts[0][1].lower()
    kw = {k: v for k, v in parts[1:] if k is not None}
    positional = [v for k, v in parts[1:] if k is None]
    port = int(kw.get("port", positional[0] if positional else "0"))
    interface = kw.get("interface", "::" if kind == "tcp6" else "")
    backlog = int(kw.get("backlog", DEFAULT_BACKLOG))
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's tcp.Port
        sock.bind((interface, port))
        sock.listen(backlog)
        sock.setblocking(False)  # the workers' adoptStreamPort needs it
    except OSError as e:
        sock.close()
        raise error.CannotListenError(interface, port, e) from None
    return sock

class WorkerParent(MultiService):
    """The service twistd runs when ``[gateway] workers`` > 1 (see the module docstring)."""

    log = Logger()

    def __init__(self, config: GatewayConfig, reactor: Any, *, config_path: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.config_path = config_path or config.path
        self.draining = False
        self.sockets: list[socket.socket] = []
        self.control_dir = ""
        self._token = secrets.token_urlsafe(32)  # the workers' /admin/*: only the parent knows it
        # with a Redis queue every worker reports the whole cluster's depth and size: counted once
        self.aggregate = aggregate.MetricsAggregate(
            aggregate.REDIS_QUEUE_GAUGES if config.queue.backend == "redis" else frozenset())
        disable_created_metrics()
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        register_build_info(self.registry)  # the workers' too: merged as the maximum, one series
        self.reloads = Counter("wsgateway_config_reloads", "Configuration reloads (SIGHUP) by result.", ["result"],
                               registry=self.registry)
        for result in ("ok", "error"):
            self.reloads.labels(result)
        # the parent's own: a crash loop shows here (and in the log)
        self.restarts = Counter("wsgateway_worker_restarts",
                                "Workers that died while the gateway ran (each is replaced).", registry=self.registry)
        Gauge("wsgateway_workers_running", "Worker processes running now.",
              registry=self.registry).set_function(lambda: sum(s.alive for s in self.pool.slots))
        self.pool = WorkerPool(self)
        self._refresh = LoopingCall(self._background_scrape)
        self._refresh.clock = reactor
        self._previous_sighup: Any = None
        self._previous_sigusr1: Any = None
        # only the parent talks to systemd: the pool takes $NOTIFY_SOCKET out of the workers' environment
        self.notifier = sdnotify.Notifier()
        if config.admin is not None:
            site = parent_site(self, config.admin.token or None, max_body=config.admin.max_body)
            guarded = AdminFactory(site, clock=reactor, max_connections=config.admin.max_connections)
            for desc in config.admin.listen:
                # a ListeningService, as a single process's: one line if its port is taken
                ListeningService(serverFromString(reactor, desc), guarded, kind="admin",
                                 desc=desc).setServiceParent(self)
        if config.demo is not None:
            from wsgateway.dev.demo import DemoFactory

            for desc in config.demo.listen:
                ListeningService(serverFromString(reactor, desc), DemoFactory(reactor=reactor), kind="demo",
                                 desc=desc).setServiceParent(self)

    def setup(self, worker: int) -> WorkerSetup:
        gw = self.config.gateway
        return WorkerSetup(id=worker, node_id=gw.node_id, listen=gw.listen, workers=gw.workers,
                           control=os.path.join(self.control_dir, f"w{worker}.sock"), token=self._token,
                           **({"max_body": self.config.admin.max_body} if self.config.admin is not None else {}))

    # -- lifecycle -----------------------------------------------------------

    def privilegedStartService(self) -> None:
        # before twistd drops privileges (--uid): ports below 1024 need them
        self._bind()
        super().privilegedStartService()

    def _bind(self) -> None:
        if self.sockets:
            return
        try:
            for desc in self.config.gateway.listen:
                self.sockets.append(bind(desc))
        except Exception as e:
            for sock in self.sockets:
                sock.close()
            self.sockets = []
            cannot_listen(self.log, "gateway", desc, e)

    def startService(self) -> None:
        self._bind()
        self._adopt_orphaned_queues()
        gw = self.config.gateway
        # first, as a single process's "starting:" line: the version leads the log
        self.log.info("wsgateway node {node_id} starting: wsgateway {version}, {workers} worker processes sharing "
                      "{listen}", node_id=gw.node_id, version=version(), workers=gw.workers, listen=" ".join(gw.listen))
        for desc, sock in zip(gw.listen, self.sockets):
            # the parent binds the workers' sockets: it says where, as a single process does
            host, port = sock.getsockname()[:2]
            self.log.info(LISTENING, kind="gateway", endpoint=desc, address=f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        self.control_dir = tempfile.mkdtemp(prefix="wsgateway-")  # 0700: only our user reaches the workers
        self.pool.slots = [
            WorkerSlot(i, aggregate.WorkerClient(self.reactor, os.path.join(self.control_dir, f"w{i}.sock"),
                                                 self._token))
            for i in range(1, gw.workers + 1)
        ]
        self._previous_sighup = on_signal("SIGHUP", self.reactor, self.reload)
        self._previous_sigusr1 = on_signal("SIGUSR1", self.reactor, self.reopen_logs)
        super().startService()
        self.reactor.callWhenRunning(self.pool.start)
        self._refresh.start(REFRESH, now=False)
        Deferred.fromCoroutine(self._ready_when_serving()).addErrback(
            lambda f: self.log.failure("waiting for the workers to serve failed", f))

    async def _ready_when_serving(self) -> None:
        """
        READY=1 for systemd once every worker answers on its control socket:
        a worker does only after its GatewayService started, its listeners
        adopted. Not at bind time: the kernel would queue clients on sockets
        nobody accepts from yet. A worker that never comes up (a crash loop)
        leaves systemd's TimeoutStartSec to fail the start.
        """
        while not self.draining:
            answers = await self.ask_all(b"GET", b"/readyz")
            if answers and all(answer is not None for _, answer in answers):
                self.notifier.ready()
                return
            await deferLater(self.reactor, READY_POLL)

    def _adopt_orphaned_queues(self) -> None:
        if self.config.queue.backend == "sqlite":
            from wsgateway.durable.sqlite_file import adopt_orphans

            adopt_orphans(self.config.queue.path, self.config.gateway.workers)

    def reopen_logs(self) -> None:
        count = logs.reopen()
        self.log.info("SIGUSR1: reopened {count} log file(s)", count=count)

    def reload(self) -> None:
        """SIGHUP: check the file here (the workers each reload it, and log, themselves), then forward."""
        if self.draining:
            self.log.info("SIGHUP during the shutdown drain: nothing reloaded")
            return
        self.notifier.reloading()
        path = self.config_path
        try:
            new = load(path)
        except ConfigError as e:
            ok = False
            for line in e.errors:
                self.log.error("{problem}", problem=line)
            self.log.error("SIGHUP: {path} has {count} error(s), each logged above: the workers will reject it and "
                           "keep their running configuration (they still reload their TLS certificates)",
                           path=path, count=len(e.errors))
            self.reloads.labels("error").inc()
        else:
            self.log.info("SIGHUP: {path} checked, no errors", path=path)
            running = self.config
            restart = runtime.restart_needed(running, new)
            self.config = runtime.keep_running_values(running, new)
            if restart:
                self.log.warn("reload of {path}: {keys} changed, which takes a restart; still using the running "
                              "value(s)", path=path, keys=", ".join(restart))
            if self.config.log.level != running.log.level:
                logs.set_level(self.config.log.level)
            self.reloads.labels("ok").inc()
            ok = True
        sent = self.pool.signal_all("HUP")
        self.log.info("SIGHUP forwarded to {sent} worker(s); each logs its own reload", sent=sent)
        # READY=1 (with STATUS= when the file is bad) once forwarded: each worker reloads on its own, the
        # parent does not wait for them (a bad certificate shows only in the worker's log line)
        self.notifier.reloaded(config_ok=ok)

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.draining = True  # /readyz: draining
        self.notifier.stopping()
        if self._refresh.running:
            self._refresh.stop()
        # Our copies first: once every worker has closed its own too, the
        # socket is gone and new connections are refused, not left waiting.
        for sock in self.sockets:
            sock.close()
        gw = self.config.gateway
        self.log.info("stopping: SIGTERM to the workers; each drains its connections (1001 from {grace} s on, "
                      "cut off at {end} s)", grace=gw.drain_grace, end=gw.drain_grace + gw.shutdown_timeout)
        await self.pool.stop(gw.drain_grace + gw.shutdown_timeout + STOP_MARGIN)
        await DeferredList([Deferred.fromCoroutine(_maybe(svc.stopService())) for svc in self])
        self.running = 0
        shutil.rmtree(self.control_dir, ignore_errors=True)
        for name, previous in (("SIGHUP", self._previous_sighup), ("SIGUSR1", self._previous_sigusr1)):
            if previous is not None:
                restore_signal(name, previous)
        self._previous_sighup = self._previous_sigusr1 = None
        if getattr(self.reactor, "_exitSignal", None) is not None:
            self.reactor._exitSignal = None  # an orderly drain exits 0 (docs/operations.md#signals-and-lifecycle)
        self.log.info("all workers stopped")

    # -- asking the workers --------------------------------------------------

    @property
    def slots(self) -> list[WorkerSlot]:
        return self.pool.slots

    async def ask(self, slot: WorkerSlot, method: bytes, uri: bytes, body: bytes | None = None
                  ) -> tuple[int, bytes] | None:
        """One worker's answer, or None (not running, not answering in time)."""
        if not slot.alive:
            return None
        try:
            return await slot.client.request(method, uri, body)
        except Exception:
            return None

    async def ask_all(self, method: bytes, uri: bytes, body: bytes | None = None
                      ) -> list[tuple[WorkerSlot, tuple[int, bytes] | None]]:
        slots = list(self.pool.slots)
        answers = await gatherResults([Deferred.fromCoroutine(self.ask(s, method, uri, body)) for s in slots])
        return list(zip(slots, answers))

    async def scrape(self) -> None:
        """Every running worker's /metrics into the aggregate."""
        pids = {s.id: s.pid for s in self.pool.slots}
        for slot, answer in await self.ask_all(b"GET", b"/metrics"):
            pid = pids[slot.id]
            # only if it is still the process that answered (a dead one is retired for good)
            if answer is not None and answer[0] == 200 and pid is not None and slot.pid == pid:
                try:
                    self.aggregate.update(pid, answer[1].decode("utf-8", "replace"))
                except ValueError:
                    self.log.warn("worker {worker} answered /metrics with text that does not parse", worker=slot.id)

    def _background_scrape(self) -> Deferred[None]:
        # keeps each worker's last counters fresh, for when it dies; never stops the loop
        d = Deferred.fromCoroutine(self.scrape())
        d.addErrback(lambda f: self.log.failure("background scrape of the workers failed", f))
        return d

    async def metrics(self, accept: bytes | None = None) -> tuple[bytes, str]:
        """(body, content type) of every worker's /metrics, merged: OpenMetrics when ``accept`` asks for it."""
        await self.scrape()
        return self.aggregate.exposition(generate_latest(self.registry).decode(), accept)

    async def views(self, uri: bytes) -> list[tuple[WorkerSlot, Any]]:
        """Each worker's JSON at ``uri`` (None where it did not answer 200)."""
        out = []
        for slot, answer in await self.ask_all(b"GET", uri):
            body = None
            if answer is not None and answer[0] == 200:
                try:
                    body = json.loads(answer[1])
                except ValueError:
                    pass
            out.append((slot, body))
        return out

    async def readiness(self) -> dict[str, Any]:
        """/readyz for the whole gateway: ready when every worker is; the workers, each with its pid."""
        answers = await self.views(b"/readyz")
        workers, upstreams, broker_down = [], [], False
        for slot, body in answers:
            if isinstance(body, dict):
                status = body.get("status", "unready")
                upstreams.append(body.get("upstreams", {}))
                broker_down = broker_down or body.get("broker") == "down"
            else:
                status = "starting" if slot.alive else "down"
            workers.append({"id": slot.id, "pid": slot.pid, "status": status, "restarts": slot.restarts})
        status = aggregate.combine_status(self.draining, [w["status"] for w in workers])
        return {"status": status, "broker": "down" if broker_down else "up",
                "upstreams": aggregate.merge_upstreams(upstreams), "workers": workers}


async def _maybe(result: Any) -> None:
    if isinstance(result, Deferred):
        await result
