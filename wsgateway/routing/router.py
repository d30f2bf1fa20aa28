# -*- test-case-name: tests.unit.routing.test_routing -*-
"""
Route precedence, host and header matching: L{Router.match} picks the route
of a handshake. Pure Python and reactor-free; config validation uses
L{check_host} so a bad route is reported before anything listens.

Path patterns are L{wsgateway.routing.patterns}, templates and the upstream
path L{wsgateway.routing.templates}.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import Any

from wsgateway.routing.patterns import (
    REST,
    PathPattern,
    PatternError,
    RouteMatch,
    compile_pattern,
)


# ------------------------------------------------------------------- hosts

# RFC 1035 labels, plus "_" (service names, and what nginx accepts). ASCII
# only: an IDN arrives as its A-label ("xn--..."), never as Unicode.
_LABEL = r"[A-Za-z0-9_-]{1,63}"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_PORT = re.compile(r"[0-9]{1,5}")
_MAX_NAME = 254  # 253 and the optional final dot


def _ipv6(literal: str) -> str | None:
    # a zone id ("%eth0") is local to the sender: no route can name it
    if "%" in literal:
        return None
    try:
        return IPv6Address(literal).compressed
    except ValueError:
        return None


def split_host(value: str) -> tuple[str, int | None] | None:
    """
    A Host header as (host, port): the host lower case, without the final
    dot, an IPv6 literal without its brackets and in its compressed form.
    None when the value is not C{host[:port]}: a DNS name (dot-separated
    labels of letters, digits, C{-}, C{_}) or an IPv4 address, or a
    bracketed IPv6 literal; the port 1-65535. Anything else (a list, a
    path, a second name after a space, an unbracketed IPv6 address) is a
    value that a proxy, a suffix test and an upstream could each read
    differently, so it names no host at all.
    """
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        host = _ipv6(value[1:end]) if end > 0 else None
        rest = value[end + 1 :]
    else:
        name, colon, port_text = value.partition(":")
        if len(name) > _MAX_NAME or not _DNS_NAME.fullmatch(name):
            return None
        host = name.lower().rstrip(".")
        rest = colon + port_text
    if host is None:
        return None
    if not rest:
        return host, None
    if rest[0] != ":" or not _PORT.fullmatch(rest, 1):
        return None
    port = int(rest[1:])
    return (host, port) if 0 < port < 65536 else None


def _hostname(value: str) -> str | None:
    parsed = split_host(value)
    return parsed[0] if parsed is not None else None


@dataclass(frozen=True)
class _HostRule:
    exact: str | None = None  # as split_host() gives it
    suffix: str | None = None  # ".example.com" for *.example.com

    def accepts(self, host: str | None) -> bool:
        if self.exact is None and self.suffix is None:
            return True
        if host is None:
            return False
        if self.exact is not None:
            return host == self.exact
        assert self.suffix is not None
        # ``host`` passed split_host, so what precedes the suffix is whole labels
        return len(host) > len(self.suffix) and host.endswith(self.suffix)


def _host_rule(host: str | None) -> _HostRule:
    if host is None or not host.strip():
        return _HostRule()
    value = host.strip().lower()
    if any(c.isspace() or c in "/?#@" for c in value):
        raise PatternError(f"host {host!r} is not a host name")
    if value.startswith("["):
        literal = _ipv6(value[1:-1]) if value.endswith("]") else None
        if literal is None:
            raise PatternError(f"host {host!r}: unbalanced '[' or not an IPv6 address "
                               "(write an IPv6 host as [::1], without port)")
        return _HostRule(exact=literal)
    if value.count(":") == 1:
        raise PatternError(f"host {host!r} must not include a port")
    if value.count(":") > 1:
        literal = _ipv6(value)  # a bare IPv6 literal
        if literal is None:
            raise PatternError(f"host {host!r} is not a host name")
        return _HostRule(exact=literal)
    if value.endswith("."):
        value = value[:-1]
    if "*" in value:
        suffix = value[1:]
        if not value.startswith("*.") or "*" in suffix or len(suffix) < 2 or ".." in suffix or suffix.endswith("."):
            raise PatternError(f"host {host!r}: a wildcard must be a leading '*.' as in '*.example.com'")
        if not _DNS_NAME.fullmatch(suffix[1:]):
            raise PatternError(f"host {host!r} is not a host name")
        return _HostRule(suffix=suffix)
    # the same grammar as a Host header's: a rule no request can match is a typo
    if not value or len(value) > _MAX_NAME or not _DNS_NAME.fullmatch(value):
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
        hostname = _hostname(host) if host else None
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
