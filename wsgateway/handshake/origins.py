# -*- test-case-name: tests.unit.handshake.test_origins -*-
"""
Which browser origins may open a WebSocket here: the defence against
cross-site WebSocket hijacking (a page on another site opening a socket with
the user's cookies). Pure, no reactor.
"""

from __future__ import annotations

from collections.abc import Iterable

_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def normalize(origin: str) -> str | None:
    """
    ``Scheme://host[:port]`` as browsers serialise it (lower case, default
    port dropped); None for anything that is not such an origin, ``null``
    included (sandboxed frames and file: pages send it).
    """
    text = origin.strip().lower()
    scheme, sep, rest = text.partition("://")
    if not sep or not scheme or not rest or "/" in rest or "@" in rest or any(c.isspace() for c in rest):
        return None
    if rest.startswith("["):
        inside, bracket, after = rest.partition("]")
        if not bracket or (after and not after.startswith(":")):
            return None
        host, port = inside + bracket, after[1:]
    else:
        host, _, port = rest.partition(":")
    if not host or (port and not port.isdigit()):
        return None
    if port == _DEFAULT_PORTS.get(scheme):
        port = ""
    return f"{scheme}://{host}" + (f":{port}" if port else "")


class OriginPolicy:
    """
    ``allowed`` holds normalised origins as config.py produces them; an entry
    ``scheme://*.domain[:port]`` admits every subdomain of ``domain`` at any
    depth but not ``domain`` itself (list that separately), which is how
    Centrifugo and most CORS middlewares read the wildcard.
    """

    __slots__ = ("_exact", "_suffixes", "configured")

    def __init__(self, allowed: Iterable[str] | None) -> None:
        self._exact: frozenset[str] = frozenset()
        self._suffixes: tuple[tuple[str, str, str], ...] = ()
        self.configured = allowed is not None and bool(tuple(allowed))
        if not self.configured:
            return
        exact = set()
        suffixes = []
        for entry in allowed or ():
            norm = normalize(entry)
            if norm is None:
                continue
            scheme, _, rest = norm.partition("://")
            if rest.startswith("*."):
                host, _, port = rest[2:].partition(":")
                suffixes.append((scheme, "." + host, port))
            else:
                exact.add(norm)
        self._exact = frozenset(exact)
        self._suffixes = tuple(suffixes)

    def allows(self, origin: str | None) -> bool:
        """
        True when no list is configured, or the request carries no Origin at
        all (not a browser: a browser always sends one on a WebSocket
        upgrade, so a hijacking page cannot leave it out), or it matches.
        """
        if not self.configured or origin is None:
            return True
        norm = normalize(origin)
        if norm is None:
            return False
        if norm in self._exact:
            return True
        scheme, _, rest = norm.partition("://")
        if rest.startswith("["):
            return False
        host, _, port = rest.partition(":")
        for s, suffix, p in self._suffixes:
            if s == scheme and p == port and host.endswith(suffix) and len(host) > len(suffix):
                return True
        return False
