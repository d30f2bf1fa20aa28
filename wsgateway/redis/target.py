# -*- test-case-name: tests.unit.core.test_redislink -*-
"""
Where a Redis is: L{RedisTarget} (from a C{[redis] url}: L{parse_url}) and
the L{Locator} a L{wsgateway.redis.link.RedisLink} asks before each
connection attempt: L{FixedLocator} for a url, or
L{wsgateway.redis.sentinel.SentinelLocator} for a master behind Sentinel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS

__all__ = ["FixedLocator", "Locator", "RedisTarget", "parse_url"]


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is, from a C{[redis] url}; C{describe()} never shows the password."""

    host: str | None = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # unix:///PATH
    tls: bool = False
    db: int | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        if self.path is not None:
            return f"unix://{self.path}"
        db = "" if self.db is None else f"/{self.db}"
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}{db}"

    @property
    def address(self) -> tuple[str | None, int, str | None]:
        return self.host, self.port, self.path

    def endpoint(self, reactor: Any, timeout: float) -> IStreamClientEndpoint:
        if self.path is not None:
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        assert self.host is not None
        endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if self.tls:
            endpoint = wrapClientTLS(optionsForClientTLS(self.host), endpoint)
        return endpoint


def parse_url(url: str) -> RedisTarget:
    """C{redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]}, C{rediss://...} (TLS) or C{unix:///PATH}."""
    parts = urlsplit(url)
    password = unquote(parts.password) if parts.password is not None else None
    username = unquote(parts.username) if parts.username else None
    if parts.scheme == "unix":
        return RedisTarget(host=None, port=0, path=parts.path, username=username, password=password)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError("must be redis://HOST[:PORT][/DB], rediss://HOST[:PORT][/DB] or unix:///PATH")
    db = parts.path.strip("/")
    return RedisTarget(
        host=parts.hostname, port=parts.port or 6379, tls=parts.scheme == "rediss",
        db=int(db) if db else None, username=username, password=password,
    )


class Locator(Protocol):
    """Where the Redis to command is, asked before each connection attempt (wsgateway.redissentinel)."""

    # a connection must find a master there (ROLE), and a failover moves it
    follows_master: bool

    def locate(self) -> Deferred[RedisTarget]: ...

    def describe(self) -> str: ...


class FixedLocator:
    """One address, from a url: nothing to ask."""

    follows_master = False

    def __init__(self, target: RedisTarget) -> None:
        self.target = target

    def locate(self) -> Deferred[RedisTarget]:
        return succeed(self.target)

    def describe(self) -> str:
        return self.target.describe()
