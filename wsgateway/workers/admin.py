# -*- test-case-name: tests.integration.test_workers -*-
"""
The admin port of a gateway with worker processes (``[gateway] workers`` > 1),
served once, by the parent (``wsgateway.workers.parent.WorkerParent``): the same
paths as one process's, answered from the workers' private sockets.

- ``/healthz``: the parent's own;
- ``/readyz``: ready when every worker is (each worker's status and pid
  under ``workers``), draining once SIGTERM came;
- ``/metrics``: every worker's, merged (``wsgateway.workers.aggregate``);
- ``/`` and ``/dashboard.json``: the dashboard, routes and nodes merged;
- ``/admin/*`` (the same token): reads merged (connections each carry their
  ``worker``), changes (log level, node drain) sent to every worker, a
  connection's close answered by the worker that holds it, ``publish``
  and channel reads to one worker (the broker spans them).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from wsgateway.ops import dashboard, logs
from wsgateway.ops.admin import AdminAPI, AdminOff, Healthz
from wsgateway.ops.jsonapi import MAX_BODY, AdminSite, JSONResource, Refused, Root, read_body
from wsgateway.ops.logs import LEVELS
from wsgateway.workers import aggregate

if TYPE_CHECKING:
    from wsgateway.interfaces import WorkerParentView, WorkerSlotView


class _Async(JSONResource):
    """A JSON resource whose answer is built by a coroutine ``build`` -> (status, body)."""

    log = Logger()

    def __init__(self, parent: WorkerParentView) -> None:
        super().__init__()
        self.parent = parent

    # each subclass defines it: the coroutine that makes (status, body)
    build: Callable[[Request], Coroutine[Any, Any, tuple[int, Any]]]

    def render_GET(self, request: Request) -> Any:
        def done(result: tuple[int, Any]) -> None:
            if not request.finished and not request._disconnected:
                request.write(self.answer(request, *result))
                request.finish()

        def failed(f: Failure) -> None:
            self.log.failure("admin request {uri} failed", f, uri=request.uri)
            if not request.finished and not request._disconnected:
                request.write(self.error(request, 500, "internal error"))
                request.finish()

        Deferred.fromCoroutine(self.build(request)).addCallbacks(done, failed)
        return NOT_DONE_YET


class ParentReadyz(_Async):
    async def build(self, request: Request) -> tuple[int, Any]:
        body = await self.parent.readiness()
        return (200 if body["status"] in ("ready", "degraded") else 503), body


class ParentDashboard(_Async):
    async def build(self, request: Request) -> tuple[int, Any]:
        request.setHeader(b"x-content-type-options", b"nosniff")
        ready = await self.parent.readiness()
        views = [body for _, body in await self.parent.views(b"/dashboard.json") if isinstance(body, dict)]
        routes = aggregate.merge_routes([v["routes"] for v in views])
        return 200, dashboard.merge_worker_views(ready, views, routes, self.parent.config)


class ParentMetrics(Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, parent: WorkerParentView) -> None:
        super().__init__()
        self.parent = parent

    def render_GET(self, request: Request) -> Any:
        def done(answer: tuple[bytes, str]) -> None:
            body, content_type = answer
            if not request.finished and not request._disconnected:
                request.setHeader(b"content-type", content_type.encode("ascii"))
                request.setHeader(b"cache-control", b"no-store")
                request.write(body)
                request.finish()

        def failed(f: Failure) -> None:
            self.log.failure("metrics scrape failed", f)
            if not request.finished and not request._disconnected:
                request.setResponseCode(500)
                request.finish()

        Deferred.fromCoroutine(self.parent.metrics(request.getHeader(b"accept"))).addCallbacks(done, failed)
        return NOT_DONE_YET


class ParentAdminAPI(AdminAPI):
    """
    ``/admin/*`` for all the workers (same token check as a single process):
    reads are merged, changes reach every worker, publishes and channel
    reads go to one worker (the broker spans them; only Redis can, see
    config.py's check).
    """

    def __init__(self, parent: WorkerParentView, token: str) -> None:
        super().__init__(parent, token)  # type: ignore[arg-type]  # only the token check and dispatch are used
        self.parent = parent
        self._handlers.clear()
        self.route(b"GET", (b"routes",), self._routes)
        self.route(b"GET", (b"upstreams",), self._upstreams)
        self.route(b"GET", (b"connections",), self._connections)
        self.route(b"POST", (b"connections", b"*", b"close"), self._to_owner)
        self.route(b"PUT", (b"log-level",), self._log_level)
        self.route(b"POST", (b"upstreams", b"*", b"drain"), self._to_all)
        self.route(b"POST", (b"upstreams", b"*", b"undrain"), self._to_all)
        self.route(b"POST", (b"publish",), self._to_one)
        self.route(b"GET", (b"history",), self._to_one)
        self.route(b"GET", (b"channels",), self._to_one)
        self.route(b"GET", (b"channels", b"*"), self._to_one)
        self.route(b"GET", (b"queue",), self._queue)
        self.route(b"POST", (b"queue", b"replay"), self._queue_change)
        self.route(b"POST", (b"queue", b"purge"), self._queue_change)

    def _run(self, work: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(work)

    def _routes(self, request: Request, _: Any) -> Deferred[Any]:
        async def work() -> Any:
            return aggregate.merge_routes([b for _, b in await self._views(request) if isinstance(b, list)])
        return self._run(work())

    def _upstreams(self, request: Request, _: Any) -> Deferred[Any]:
        async def work() -> Any:
            return aggregate.merge_upstreams([b for _, b in await self._views(request) if isinstance(b, dict)])
        return self._run(work())

    def _connections(self, request: Request, _: Any) -> Deferred[Any]:
        async def work() -> Any:
            return [{**c, "worker": slot.id} for slot, b in await self._views(request) if isinstance(b, list)
                    for c in b]
        return self._run(work())

    async def _views(self, request: Request) -> list[tuple[WorkerSlotView, Any]]:
        views = await self.parent.views(request.uri)
        if not any(b is not None for _, b in views):
            raise Refused(503, "no worker answered")
        return views

    def _log_level(self, request: Request, _: Any) -> Deferred[Any]:
        body = read_body(request)
        try:
            level = json.loads(body or b"{}").get("level")
        except (ValueError, AttributeError):
            level = None
        if level not in LEVELS:
            raise Refused(400, f"level must be one of {', '.join(LEVELS)}")
        self.log.info("log level set to {new_level} through the admin API", new_level=level)
        logs.set_level(level)
        return self._to_all(request, _, body)

    def _to_all(self, request: Request, _: Any, body: bytes | None = None) -> Deferred[Any]:
        """The same request to every worker: the first worker's answer, with ``active`` summed for a node."""
        data = body if body is not None else read_body(request)

        async def work() -> Any:
            answers = [a for _, a in await self.parent.ask_all(request.method, request.uri, data) if a is not None]
            if not answers:
                raise Refused(503, "no worker answered")
            status, first = _decode(answers[0])
            if status != 200:
                raise Refused(status, first.get("error", "refused") if isinstance(first, dict) else "refused")
            if isinstance(first, dict) and "active" in first:
                first["active"] = sum(_decode(a)[1].get("active", 0) for a in answers if a[0] == 200)
            return first
        return self._run(work())

    def _to_owner(self, request: Request, _: Any) -> Deferred[Any]:
        """A connection is one worker's: the request to every worker, the answer of the one that has it."""
        data = read_body(request)

        async def work() -> Any:
            answers = [_decode(a) for _, a in await self.parent.ask_all(request.method, request.uri, data)
                       if a is not None]
            if not answers:
                raise Refused(503, "no worker answered")
            status, body = next((a for a in answers if a[0] == 200), answers[0])
            if status != 200:
                raise Refused(status, body.get("error", "refused") if isinstance(body, dict) else "refused")
            return body
        return self._run(work())

    def _queue(self, request: Request, _: Any) -> Deferred[Any]:
        """Each worker has its own queue file: depths summed, dead letters listed with their worker."""
        async def work() -> Any:
            views = [(slot, b) for slot, b in await self._views(request) if isinstance(b, dict)]
            if not views:
                raise Refused(404, "no route has delivery = at_least_once: the durable queue is not in use")
            return aggregate.merge_queue([(slot.id, b) for slot, b in views])
        return self._run(work())

    def _queue_change(self, request: Request, _: Any) -> Deferred[Any]:
        """Replay or purge on every worker's queue; the counts summed."""
        data = read_body(request)

        async def work() -> Any:
            answers = [_decode(a) for _, a in await self.parent.ask_all(request.method, request.uri, data)
                       if a is not None]
            if not answers:
                raise Refused(503, "no worker answered")
            refused = [(st, b) for st, b in answers if st != 200]
            if refused:
                st, b = refused[0]
                raise Refused(st, b.get("error", "refused") if isinstance(b, dict) else "refused")
            first = dict(answers[0][1])
            for key in ("replayed", "purged"):
                if key in first:
                    first[key] = sum(b.get(key, 0) for _, b in answers)
            return first
        return self._run(work())

    def _to_one(self, request: Request, _: Any) -> Deferred[Any]:
        data = read_body(request) if request.method == b"POST" else None

        async def work() -> Any:
            for slot in self.parent.slots:
                answer = await self.parent.ask(slot, request.method, request.uri, data)
                if answer is not None:
                    status, body = _decode(answer)
                    if status != 200:
                        raise Refused(status, body.get("error", "refused") if isinstance(body, dict) else "refused")
                    return body
            raise Refused(503, "no worker answered")
        return self._run(work())


def _decode(answer: tuple[int, bytes]) -> tuple[int, Any]:
    try:
        return answer[0], json.loads(answer[1])
    except ValueError:
        return answer[0], None


def parent_site(parent: WorkerParentView, token: str | None, *, max_body: int = MAX_BODY) -> Site:
    """
    The admin port of a gateway with workers: the same paths as one
    process's, and the same bounds (listen with it behind an
    L{wsgateway.ops.jsonapi.AdminFactory}).
    """
    root = Root()
    root.putChild(b"healthz", Healthz())
    root.putChild(b"readyz", ParentReadyz(parent))
    root.putChild(b"metrics", ParentMetrics(parent))
    root.putChild(b"dashboard.json", ParentDashboard(parent))
    listen = parent.config.gateway.listen if parent.config.demo is not None else None
    for name, resource in dashboard.pages(listen).items():
        root.putChild(name, resource)
    root.putChild(b"admin", ParentAdminAPI(parent, token) if token else AdminOff())
    return AdminSite(root, token=token, max_body=max_body)
