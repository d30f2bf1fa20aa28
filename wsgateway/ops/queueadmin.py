# -*- test-case-name: tests.integration.test_queue_admin -*-
"""
The durable queue's admin endpoints (docs/admin-api.md, docs/durable-delivery.md):
``GET /admin/queue``, ``POST /admin/queue/replay`` and ``POST /admin/queue/purge``,
mounted by L{wsgateway.ops.admin.AdminAPI}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Request

from wsgateway.ops.jsonapi import Refused, json_body

__all__ = ["QueueAdmin"]


class QueueAdmin:
    """
    The handlers, each C{(request, path args)} as L{wsgateway.ops.admin.AdminAPI.route}
    takes them. C{view.queue} is read at request time (absent without an
    at_least_once route). C{log} is the admin API's, so every change made
    through it is logged under one namespace.
    """

    def __init__(self, view: Any, log: Logger) -> None:
        self.view = view
        self.log = log

    def _delivery(self) -> Any:
        queue = getattr(self.view, "queue", None)
        if queue is None:
            raise Refused(404, "no route has delivery = at_least_once: the durable queue is not in use")
        return queue

    def show(self, request: Request, _: tuple[bytes, ...]) -> Any:
        """Depth and oldest age per route, dead letters (oldest 100, or ?route=, ?limit=)."""
        queue = self._delivery()
        route = request.args.get(b"route", [None])[0]
        try:
            limit = max(0, min(int(request.args.get(b"limit", [b"100"])[0]), 10000))
        except ValueError:
            raise Refused(400, "limit must be a number") from None
        name = route.decode("utf-8", "replace") if route else None
        store = queue.store

        async def read() -> dict[str, Any]:
            depth = await store.depth()
            dead = await store.dead_letters(limit, name)
            routes = {r: v for r, v in depth.items() if name is None or r == name}
            return {
                "backend": store.backend,
                "depth": int(sum(v["depth"] for v in routes.values())),
                "dead": int(sum(v["dead"] for v in routes.values())),
                "routes": {r: {"depth": int(v["depth"]), "oldest_age": round(v["oldest_age"], 3), "dead": int(v["dead"])}
                           for r, v in sorted(routes.items())},
                "live_connections": len(queue.live),
                "delivered": queue.deliverer.delivered if queue.deliverer is not None else 0,
                "failures": queue.failures,
                "dead_letters": [_dead_letter(d) for d in dead],
            }

        return Deferred.fromCoroutine(read())

    def replay(self, request: Request, _: tuple[bytes, ...]) -> Any:
        """
        ``{}``: deliver what is queued now (no waiting for the next pass);
        ``{"dead": true}`` (optionally with ``"route"`` or ``"ids"``): put
        dead letters back in the queue first, with fresh attempts.
        """
        queue = self._delivery()
        body = json_body(request)
        route, ids, dead = body.get("route"), body.get("ids"), body.get("dead", False)
        bad_ids = ids is not None and not (isinstance(ids, list) and all(isinstance(i, (int, str)) for i in ids))
        if (route is not None and not isinstance(route, str)) or not isinstance(dead, bool) or bad_ids:
            raise Refused(400, 'expected {"dead": true, "route": "...", "ids": [...]} (all optional)')
        store = queue.store

        async def run() -> dict[str, Any]:
            moved = 0
            if dead or ids is not None:
                chosen = ids
                if chosen is None and route is not None:
                    chosen = [d.entry.id for d in await store.dead_letters(1_000_000, route)]
                moved = await store.replay_dead(chosen)
                self.log.info("{n} dead letters put back in the queue through the admin API", n=moved)
            if queue.deliverer is not None:
                queue.deliverer.kick()
            return {"replayed": moved, "delivering": True}

        return Deferred.fromCoroutine(run())

    def purge(self, request: Request, _: tuple[bytes, ...]) -> Any:
        """``{"route": "..."}`` or ``{"all": true}``; ``"dead": true`` purges dead letters instead."""
        queue = self._delivery()
        body = json_body(request)
        route, everything, dead = body.get("route"), body.get("all", False), body.get("dead", False)
        if not isinstance(dead, bool) or not isinstance(everything, bool) or (route is None) != everything \
                or route is not None and not isinstance(route, str):
            raise Refused(400, 'expected {"route": "..."} or {"all": true}, and optionally "dead": true')
        d = queue.store.purge(route, dead=dead)

        def done(n: int) -> dict[str, Any]:
            self.log.warn("purged {n} {what} of {scope} through the admin API", n=n,
                          what="dead letters" if dead else "queued entries", scope=route or "every route")
            if queue.deliverer is not None:
                queue.deliverer.kick()  # its pass refreshes wsgateway_queue_depth
            return {"purged": n, "dead": dead, "route": route}

        return d.addCallback(done)


def _dead_letter(d: Any) -> dict[str, Any]:
    e = d.entry
    return {"id": e.id, "entry_id": e.entry_id, "route": e.route, "conn_id": e.conn_key, "seq": e.seq,
            "binary": e.binary, "bytes": len(e.message), "attempts": e.attempts, "first_seen": e.first_seen,
            "reason": d.reason, "dead_at": d.dead_at}
