# -*- test-case-name: tests.integration.test_admin -*-
"""
The JSON plumbing of the admin ports (one process's, L{wsgateway.ops.admin},
and the parent's of worker processes, L{wsgateway.workers.admin}): JSON
answers, request bodies with their size limit, L{Refused} for an answer
other than 200, and the root whose unknown paths are an escaped 404.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web import pages
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

__all__ = ["MAX_BODY", "JSONResource", "Refused", "Root", "json_body", "read_body"]

MAX_BODY = 64 * 1024  # admin requests are tiny JSON documents


class JSONResource(Resource):
    isLeaf = True

    def answer(self, request: Request, status: int, body: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body, indent=1).encode("utf-8") + b"\n"

    def error(self, request: Request, status: int, message: str) -> bytes:
        return self.answer(request, status, {"error": message})


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def read_body(request: Request) -> bytes:
    """The request's body as it came; 413 over MAX_BODY."""
    data = request.content.read(MAX_BODY + 1) if request.content is not None else b""
    if len(data) > MAX_BODY:
        raise Refused(413, "request body too large")
    return data


def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; 400 for anything else, 413 over MAX_BODY."""
    data = read_body(request)
    try:
        body = json.loads(data or b"{}")
    except ValueError:
        raise Refused(400, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise Refused(400, "the body must be a JSON object")
    return body


class Root(Resource):
    """The admin port's root: an unknown path is Twisted's escaped 404 page
    (``Resource``'s own default is deprecated for not escaping HTML)."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return pages.notFound()
