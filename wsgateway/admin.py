# -*- test-case-name: tests.test_admin -*-
"""
The admin port (SPEC section 6), as far as it goes so far: ``/healthz``
and ``/readyz``. Metrics, the dashboard and the token-protected
``/admin/*`` API come with the operations issue.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from wsgateway.health import eligible_nodes
from wsgateway.upstream import Upstream


class _JSON(Resource):
    isLeaf = True

    def answer(self, request: Request, status: int, body: dict[str, Any]) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body, indent=1).encode("utf-8") + b"\n"


class Healthz(_JSON):
    """200 while the process runs: for liveness probes."""

    def render_GET(self, request: Request) -> bytes:
        return self.answer(request, 200, {"status": "ok"})


class Readyz(_JSON):
    """
    200 ``ready`` when the gateway listens and every upstream has a node a
    new connection may use; else 503 ``unready``, or ``draining`` once a
    shutdown began. The body has every node's state (healthy, unhealthy,
    ejected, draining) and the reason of its last failure.
    """

    def __init__(
        self, upstreams: dict[str, Upstream[Any]], listening: Callable[[], bool], draining: Callable[[], bool], now: Callable[[], float]
    ) -> None:
        super().__init__()
        self._upstreams = upstreams
        self._listening = listening
        self._draining = draining
        self._now = now

    def render_GET(self, request: Request) -> bytes:
        now = self._now()
        upstreams = {}
        all_have_nodes = True
        for name, up in self._upstreams.items():
            usable = bool(eligible_nodes(up.nodes, now))
            all_have_nodes &= usable
            upstreams[name] = {"ready": usable, "nodes": up.snapshot()}
        if self._draining():
            status = "draining"
        elif self._listening() and all_have_nodes:
            status = "ready"
        else:
            status = "unready"
        return self.answer(request, 200 if status == "ready" else 503, {"status": status, "upstreams": upstreams})


def admin_site(
    upstreams: dict[str, Upstream[Any]], *, listening: Callable[[], bool], draining: Callable[[], bool], now: Callable[[], float]
) -> Site:
    root = Resource()
    root.putChild(b"healthz", Healthz())
    root.putChild(b"readyz", Readyz(upstreams, listening, draining, now))
    site = Site(root)
    site.displayTracebacks = False
    site.noisy = False
    return site
