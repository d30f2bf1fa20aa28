# -*- test-case-name: tests.unit.ops.test_dashboard -*-
"""
The admin port's static pages for people (the dashboard, the demo page):
one self-contained HTML document each, whose Content-Security-Policy allows
exactly its own inline script and style, by SHA-256 hash, and nothing else
but the connections it needs.
"""

from __future__ import annotations

import base64
import hashlib
import html

from twisted.web.resource import Resource
from twisted.web.server import Request

__all__ = ["StaticPage"]


def _sha256(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


class StaticPage(Resource):
    """A static page whose inline style and script are the only ones its CSP allows."""

    isLeaf = True

    def __init__(self, title: str, style: str, script: str, body: str, connect_src: str, body_attrs: str = "") -> None:
        super().__init__()
        self._html = (
            "<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n"
            f"<style>{style}</style>\n"
            f"</head><body{body_attrs}>\n{body}"
            f"<script>{script}</script>\n"
            "</body></html>\n"
        ).encode("utf-8")
        self.csp = (
            f"default-src 'none'; script-src {_sha256(script)}; style-src {_sha256(style)}; "
            f"connect-src {connect_src}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        ).encode("ascii")

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", self.csp)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"cache-control", b"no-store")
        return self._html
