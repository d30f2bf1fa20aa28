# -*- test-case-name: tests.unit.routing.test_routing -*-
"""
Route precedence, host and header matching: L{Router.match} picks the route
of a handshake. Pure Python and reactor-free; config validation uses
L{check_host} so a bad route is reported before anything listens.

Path patterns are L{wsgateway.routing.patterns}, templates and the upstream
path L{wsgateway.routing.templates}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wsgateway.routing.patterns import (
    REST,
    PathPattern,
    PatternError,
    RouteMatch,
    compile_pattern,
)



# ------------------------------------------------------------------- hosts


def _strip_port(value: str) -> str:
    """Host header -> lower-case host name without port, brackets or final dot."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        # A malformed literal is kept whole so it cannot match a real host.
        host = value[1:end] if end != -1 else value
    elif value.count(":") == 1:
        host = value.partition(":")[0]
    else:
        # A bare name, or an unbracketed IPv6 literal (which cannot carry a port).
        host = value
    return host[:-1] if host.endswith(".") else host


@dataclass(frozen=True)
class _HostRule:
    exact: str | None = None  # normalised host
    suffix: str | None = None  # ".example.com" for *.example.com

    def accepts(self, host: str | None) -> bool:
        if self.exact is None and self.suffix is None:
            return True
        if host is None:
            return False
        if self.exact is not None:
            return host == self.exact
        assert self.suffix is not None
        return len(host) > len(self.suffix) and host.endswith(self.suffix)


def _host_rule(host: str | None) -> _HostRule:
    if host is None or not host.strip():
        return _HostRule()
    value = host.strip().lower()
    if any(c.isspace() or c in "/?#@" for c in value):
        raise PatternError(f"host {host!r} is not a host name")
    if value.startswith("["):
        if not value.endswith("]") or len(value) < 3:
            raise PatternError(f"host {host!r}: unbalanced '[' (write an IPv6 host as [::1], without port)")
        return _HostRule(exact=value[1:-1])
    if value.count(":") == 1:
        raise PatternError(f"host {host!r} must not include a port")
    if value.count(":") > 1:
        return _HostRule(exact=value)  # a bare IPv6 literal
    if value.endswith("."):
        value = value[:-1]
    if "*" in value:
        suffix = value[1:]
        if not value.startswith("*.") or "*" in suffix or len(suffix) < 2 or ".." in suffix or suffix.endswith("."):
            raise PatternError(f"host {host!r}: a wildcard must be a leading '*.' as in '*.example.com'")
        return _HostRule(suffix=suffix)
    if not value or ".." in value or value.startswith("."):
        raise PatternError(f"host {host!r} is not a host name")
    return _HostRule(exact=value)


def check_host(host: str | None) -> None:
    """Validate a route's C{host} value; raises L{PatternError}."""
    _host_rule(host)


@dataclass(frozen=True)
class _Entry:
    pattern: PathPattern
    host: _HostRule
    headers: tuple[tuple[str, str], ...]  # (lower-case name, exact value)
    route: Any


class Router:
    """
    Picks the most specific route for a handshake.

    Routes are sorted once by L{PathPattern.specificity} (stable, so equally
    specific routes keep their file order), which makes the first route that
    matches the winner.
    """

    def __init__(self, routes: Sequence[Any]) -> None:
        entries = [
            _Entry(
                pattern=compile_pattern(route.path),
                host=_host_rule(route.host),
                headers=tuple((name.strip().lower(), value) for name, value in (route.headers or ())),
                route=route,
            )
            for route in routes
        ]
        entries.sort(key=lambda e: e.pattern.specificity, reverse=True)
        self._entries: tuple[_Entry, ...] = tuple(entries)

    @property
    def routes(self) -> tuple[Any, ...]:
        """The routes in the order they are tried (most specific first)."""
        return tuple(e.route for e in self._entries)

    def match(self, path: str, host: str | None, headers: Mapping[str, str]) -> RouteMatch | None:
        """
        @param path: the raw request target; a C{?query} is ignored.
        @param host: the Host header, port allowed; L{None} if absent.
        @param headers: request headers with lower-case names.
        """
        path = path.partition("?")[0]
        if not path.startswith("/"):
            return None
        parts = path[1:].split("/")
        hostname = _strip_port(host) if host else None
        for entry in self._entries:
            if not entry.host.accepts(hostname):
                continue
            if entry.headers and not all(headers.get(name) == value for name, value in entry.headers):
                continue
            found = entry.pattern.match_segments(parts)
            if found is not None:
                rest = found.pop(REST, "")
                return RouteMatch(entry.route, found, rest)
        return None
