# -*- test-case-name: tests.integration.test_admin -*-
"""
The admin port (docs/admin-api.md): ``/healthz``, ``/readyz``, ``/metrics``,
the dashboard at ``/``, and the bearer-token ``/admin/*`` JSON API.

Every resource reads the gateway through a ``GatewayView`` at request time,
never a copy taken at startup: a SIGHUP reload swaps routes and upstreams.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from wsgateway import codes
from wsgateway.config.routes import RouteConfig
from wsgateway.durable.entries import QueueUnavailable
from wsgateway.ops.jsonapi import CHALLENGE, MAX_BODY, AdminSite, JSONResource, Refused, Root, bearer_ok, json_body
from wsgateway.ops.logs import LEVELS
from wsgateway.ops.queueadmin import QueueAdmin
from wsgateway.ops.stats import C2U, U2C, GatewayStats
from wsgateway.upstream.health import eligible_nodes
from wsgateway.upstream.pool import Upstream

__all__ = ["CLOSED_BY_OPERATOR", "AdminAPI", "GatewayView", "Healthz", "JSONResource", "Readyz", "admin_site",
           "readiness", "routes_view", "upstreams_view"]

# the reason of the 1001 that POST /admin/connections/ID/close sends
CLOSED_BY_OPERATOR = "closed by the gateway's operator"


class GatewayView(Protocol):
    """What the admin port needs of the running gateway (GatewayService provides it)."""

    @property
    def routes(self) -> Sequence[RouteConfig]: ...

    @property
    def upstreams(self) -> Mapping[str, Upstream[Any]]: ...

    stats: GatewayStats
    draining: bool
    broker: Any  # broker.InProcessBroker | broker.RedisBroker

    def listening(self) -> bool: ...

    def now(self) -> float: ...

    def set_log_level(self, level: str) -> None: ...


class Healthz(JSONResource):
    """200 while the process runs: for liveness probes."""

    def render_GET(self, request: Request) -> bytes:
        return self.answer(request, 200, {"status": "ok"})


def upstreams_view(view: GatewayView) -> dict[str, Any]:
    now = view.now()
    return {
        name: {"ready": bool(eligible_nodes(up.nodes, now)), "balance": up.config.balance, "nodes": up.snapshot()}
        for name, up in view.upstreams.items()
    }


def routes_view(view: GatewayView) -> list[dict[str, Any]]:
    active = view.stats.active()
    traffic = view.stats.traffic()
    out = []
    for r in view.routes:
        t = traffic.get(r.name)
        out.append({
            "name": r.name,
            "path": r.path,
            "host": r.host,
            "mode": r.mode,
            "upstream": r.upstream,
            "auth": r.auth,
            "connections": active.get(r.name, 0),
            "messages": {C2U: t.messages[C2U] if t else 0, U2C: t.messages[U2C] if t else 0},
            "bytes": {C2U: t.bytes[C2U] if t else 0, U2C: t.bytes[U2C] if t else 0},
        })
    return out


class Readyz(JSONResource):
    """
    200 ``ready`` when the gateway listens and every upstream has a node a
    new connection may use; else 503 ``unready``, or ``draining`` once a
    shutdown began. The body has every node's state (healthy, unhealthy,
    ejected, draining) and the reason of its last failure.
    """

    def __init__(self, view: GatewayView) -> None:
        super().__init__()
        self.view = view

    def render_GET(self, request: Request) -> bytes:
        status, upstreams = readiness(self.view)
        body: dict[str, Any] = {"status": status, "broker": "up" if self.view.broker.ready else "down"}
        shards = self.view.broker.shard_states()
        if shards:  # each Redis shard (the one Redis, without shards): "up" or "down"
            body["redis"] = {name: "up" if up else "down" for name, up in shards.items()}
        body["upstreams"] = upstreams
        return self.answer(request, 200 if status in ("ready", "degraded") else 503, body)


def readiness(view: GatewayView) -> tuple[str, dict[str, Any]]:
    """The gateway's status as /readyz (and the dashboard) report it, with ``upstreams_view``."""
    upstreams = upstreams_view(view)
    if view.draining:
        status = "draining"
    elif not (view.listening() and all(u["ready"] for u in upstreams.values())):
        status = "unready"
    elif not view.broker.ready:
        # proxying works, broadcast does not (Redis is away): still 200,
        # so a load balancer keeps sending the proxied traffic
        status = "degraded"
    else:
        status = "ready"
    return status, upstreams


class AdminAPI(Resource):
    """
    ``/admin/*``: every request needs ``Authorization: Bearer TOKEN``,
    compared in constant time; 401 otherwise (with no hint which part was
    wrong). Without a configured token this tree is not mounted at all.
    A request with a body was already checked by L{AdminSite} before its
    body was read; the check here covers every request.
    """

    log = Logger()
    isLeaf = True  # dispatches on request.postpath itself

    def __init__(self, view: GatewayView, token: str) -> None:
        super().__init__()
        self.view = view
        self._token = token.encode()
        self._handlers: dict[tuple[bytes, tuple[bytes, ...]], Callable[[Request, tuple[bytes, ...]], Any]] = {}
        self.route(b"GET", (b"routes",), lambda req, _: routes_view(self.view))
        self.route(b"GET", (b"upstreams",), lambda req, _: upstreams_view(self.view))
        self.route(b"GET", (b"connections",), self._connections)
        self.route(b"POST", (b"connections", b"*", b"close"), self._close_connection)
        self.route(b"PUT", (b"log-level",), self._log_level)
        self.route(b"POST", (b"upstreams", b"*", b"drain"), self._drain)
        self.route(b"POST", (b"upstreams", b"*", b"undrain"), self._undrain)
        self.route(b"POST", (b"publish",), self._publish)
        self.route(b"GET", (b"history",), self._history)
        self.route(b"GET", (b"channels",), lambda req, _: self.view.broker.channels())
        self.route(b"GET", (b"channels", b"*"), self._channel)
        queue = QueueAdmin(view, self.log)
        self.route(b"GET", (b"queue",), queue.show)
        self.route(b"POST", (b"queue", b"replay"), queue.replay)
        self.route(b"POST", (b"queue", b"purge"), queue.purge)

    def route(self, method: bytes, path: tuple[bytes, ...], handler: Callable[[Request, tuple[bytes, ...]], Any]) -> None:
        """Add an endpoint; ``*`` in ``path`` matches one segment, handed to the handler."""
        self._handlers[(method, path)] = handler

    def render(self, request: Request) -> bytes | int:  # int: NOT_DONE_YET
        leaf = JSONResource()
        if not self._authorized(request):
            request.setHeader(b"www-authenticate", CHALLENGE)
            return leaf.error(request, 401, "a valid admin bearer token is required")
        segments = tuple(s for s in request.postpath or () if s)
        found = self._find(request.method, segments)
        if found is None:
            known = any(self._find(m, segments) for m in (b"GET", b"PUT", b"POST"))
            if known:
                return leaf.error(request, 405, "method not allowed")
            return leaf.error(request, 404, "no such admin endpoint")
        handler, args = found
        try:
            result = handler(request, args)
        except Refused as e:
            return leaf.error(request, e.status, e.message)
        if not isinstance(result, Deferred):
            return leaf.answer(request, 200, result)

        def done(value: Any) -> None:
            if not request.finished and not request._disconnected:
                request.write(leaf.answer(request, 200, value))
                request.finish()

        def failed(f: Failure) -> None:
            e = f.value
            if isinstance(e, Refused):
                status, message = e.status, e.message
            else:
                status, message = 503, "queue unavailable" if f.check(QueueUnavailable) else "broker unavailable"
            if not isinstance(e, Refused):
                self.log.info("admin request failed: {error}", error=f.getErrorMessage())
            if not request.finished and not request._disconnected:
                request.write(leaf.error(request, status, message))
                request.finish()

        result.addCallbacks(done, failed)
        return NOT_DONE_YET

    def _authorized(self, request: Request) -> bool:
        return bearer_ok(request.requestHeaders, self._token)

    def _find(
        self, method: bytes, segments: tuple[bytes, ...]
    ) -> tuple[Callable[[Request, tuple[bytes, ...]], Any], tuple[bytes, ...]] | None:
        for (m, pattern), handler in self._handlers.items():
            if m != method or len(pattern) != len(segments):
                continue
            args = []
            for want, got in zip(pattern, segments):
                if want == b"*":
                    args.append(got)
                elif want != got:
                    break
            else:
                return handler, tuple(args)
        return None

    def _connections(self, request: Request, _: tuple[bytes, ...]) -> Any:
        route = request.args.get(b"route", [None])[0]
        now = self.view.now()
        return [
            {
                "conn_id": c.conn_id,
                "route": c.route,
                "upstream": c.upstream,
                "node": c.node,
                "peer": c.peer,
                "trace_id": c.trace_id,
                "subject": c.subject,
                "age": round(now - c.started, 3),
                "messages": {C2U: c.relay.messages_c2u, U2C: c.relay.messages_u2c},
                "bytes": {C2U: c.relay.bytes_c2u, U2C: c.relay.bytes_u2c},
            }
            for c in self.view.stats.connections(route.decode() if route else None)
        ]

    def _close_connection(self, request: Request, args: tuple[bytes, ...]) -> Any:
        """Close one open connection as a shutdown does: 1001 to the client, then its upstream's close."""
        conn_id = args[0].decode("utf-8", "replace")
        conn = next((c for c in self.view.stats.connections() if c.conn_id == conn_id), None)
        if conn is None:
            raise Refused(404, "no such connection")
        self.log.info("{conn_id} closed through the admin API", conn_id=conn_id, route=conn.route,
                      trace_id=conn.trace_id or None)
        conn.relay.drain(codes.GOING_AWAY, CLOSED_BY_OPERATOR)
        return {"conn_id": conn_id, "closing": True, "code": codes.GOING_AWAY}

    def _log_level(self, request: Request, _: tuple[bytes, ...]) -> Any:
        body = json_body(request)
        level = body.get("level")
        if level not in LEVELS:
            raise Refused(400, f"level must be one of {', '.join(LEVELS)}")
        # logged before the switch, so raising the level still leaves a trace of it
        self.log.info("log level set to {new_level} through the admin API", new_level=level)
        self.view.set_log_level(level)
        return {"level": level}

    def _node(self, request: Request, name: bytes) -> Any:
        up = self.view.upstreams.get(name.decode("utf-8", "replace"))
        if up is None:
            raise Refused(404, "no such upstream")
        node_url = json_body(request).get("node")
        node = next((n for n in up.nodes if n.url == node_url), None)
        if node is None:
            raise Refused(404, f"no such node in upstream {up.name}")
        return up, node

    def _drain(self, request: Request, args: tuple[bytes, ...]) -> Any:
        up, node = self._node(request, args[0])
        up.drain(node.url)
        self.log.info("node {node} of {upstream} drained through the admin API", node=node.url, upstream=up.name)
        return {"upstream": up.name, "node": node.url, "draining": True, "active": node.active}

    def _undrain(self, request: Request, args: tuple[bytes, ...]) -> Any:
        up, node = self._node(request, args[0])
        up.undrain(node.url)
        self.log.info("node {node} of {upstream} back in service", node=node.url, upstream=up.name)
        return {"upstream": up.name, "node": node.url, "draining": False, "active": node.active}

    def _publish(self, request: Request, _: tuple[bytes, ...]) -> Any:
        """docs/protocol.md#broadcast-channels: ``{"channel": "...", "message": "...", "binary": false}``; binary messages in base64."""
        body = json_body(request)
        channel, message, binary = body.get("channel"), body.get("message"), body.get("binary", False)
        if not isinstance(channel, str) or not channel or not isinstance(message, str) or not isinstance(binary, bool):
            raise Refused(400, 'expected {"channel": "...", "message": "...", "binary": false}')
        if binary:
            try:
                payload = base64.b64decode(message, validate=True)
            except ValueError:
                raise Refused(400, "a binary message must be base64") from None
        else:
            payload = message.encode("utf-8", "surrogatepass")
        if not self.view.broker.ready_for(channel):
            raise Refused(503, "broker unavailable")
        d = self.view.broker.publish(channel, payload, binary, origin=None)
        return d.addCallback(lambda position: published(channel, len(payload), position))

    def _history(self, request: Request, _: tuple[bytes, ...]) -> Any:
        """docs/admin-api.md#channels: ``?channel=NAME&since=OFFSET``, what the channel's history keeps after OFFSET."""
        channel = request.args.get(b"channel", [b""])[0].decode("utf-8", "replace")
        since = request.args.get(b"since", [b"0"])[0]
        if not channel:
            raise Refused(400, "expected ?channel=NAME[&since=OFFSET]")
        if not since.isdigit() or len(since) > 16:
            raise Refused(400, "since must be an offset: a whole number, 0 for everything kept")

        def answer(window: Any) -> Any:
            if window is None:
                raise Refused(404, f"channel {channel!r} keeps no history: no broadcast route with history_size "
                                   "produces its name")
            return history_view(channel, window)

        return self.view.broker.history(channel, int(since)).addCallback(answer)

    def _channel(self, request: Request, args: tuple[bytes, ...]) -> Any:
        """Who is on a channel, across the cluster (presence)."""
        name = args[0].decode("utf-8", "replace")  # twisted.web has percent-decoded the segment
        return self.view.broker.presence(name).addCallback(
            lambda entries: {"channel": name, "connections": list(entries)}
        )


def published(channel: str, size: int, position: Any) -> dict[str, Any]:
    """The answer to a publish: with the message's offset and epoch on a channel with history."""
    out: dict[str, Any] = {"channel": channel, "published": True, "bytes": size}
    if position is not None:
        out["offset"], out["epoch"] = position.offset, position.epoch
    return out


def history_view(channel: str, window: Any) -> dict[str, Any]:
    """``GET /admin/history``: binary payloads in base64 (``data_b64``), text as it is."""
    messages = []
    for kept in window.messages:
        item: dict[str, Any] = {"offset": kept.offset}
        if kept.binary:
            item["data_b64"] = base64.b64encode(kept.payload).decode("ascii")
        else:
            item["data"] = kept.payload.decode("utf-8", "replace")
        messages.append(item)
    return {"channel": channel, "epoch": window.epoch, "offset": window.top, "messages": messages}


class AdminOff(JSONResource):
    """
    ``/admin/*`` when no ``[admin] token`` is set: a JSON 404 that says how
    to turn the API on, as every other ``/admin/*`` error is JSON, rather
    than Twisted's HTML page (which a script's JSON parser chokes on).
    """

    def render(self, request: Request) -> bytes:
        return self.error(request, 404, "the admin API is off: set [admin] token to enable it (docs/admin-api.md)")


def admin_site(view: GatewayView, *, token: str | None, extra: Mapping[bytes, Resource] | None = None,
               access_log: bool = True, max_body: int = MAX_BODY) -> Site:
    """
    The admin port's tree. ``extra`` mounts further top-level resources
    (``metrics``, the dashboard) built by their own modules. ``access_log``
    False: no access line per request (a worker's private port, which its
    parent asks every few seconds). ``max_body``: ``[admin] max_body``.
    Listen with it behind an L{wsgateway.ops.jsonapi.AdminFactory} (the
    connection cap and the request deadline).
    """
    root = Root()
    root.putChild(b"healthz", Healthz())
    root.putChild(b"readyz", Readyz(view))
    root.putChild(b"admin", AdminAPI(view, token) if token else AdminOff())
    for name, resource in (extra or {}).items():
        root.putChild(name, resource)
    return AdminSite(root, token=token, max_body=max_body, access_log=access_log)
