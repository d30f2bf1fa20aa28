# -*- test-case-name: tests.unit.config.test_redis_config -*-
"""
The [redis] section: the Redis behind channels across processes and the
redis queue backend: one server (C{url}), a master found through Sentinel
(C{sentinels} + C{sentinel_master}), or several shards (C{shards}: urls, or
master names with C{sentinels}). docs/configuration.md#redis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from wsgateway.config.reader import NOT_A_KEY, Reader, Section
from wsgateway.config.values import Bad, Value, integer, list_of, text, word

__all__ = ["RedisConfig", "RedisShard", "read_redis"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class RedisShard:
    """One Redis the gateway commands: a url, or a master name to ask the sentinels for."""

    name: str  # for logs, metrics and /readyz: host:port/db of a url, the master name with Sentinel
    url: str | None = None
    master: str | None = None


@dataclass(frozen=True)
class RedisConfig:
    url: str = DEFAULT_URL
    prefix: str = "wsgw"
    sentinels: tuple[str, ...] = ()  # HOST:PORT of each sentinel
    sentinel_master: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    shards: tuple[str, ...] = ()
    min_replicas_ack: int = 0
    # what the keys above name, in shard order (the first also holds the durable queue)
    targets: tuple[RedisShard, ...] = field(default=(), metadata=NOT_A_KEY)

    def __post_init__(self) -> None:
        if not self.targets:  # built in code (tests, defaults): one shard from the keys
            object.__setattr__(self, "targets", _targets(self.url, self.sentinels, self.sentinel_master, self.shards))

    @property
    def sharded(self) -> bool:
        return len(self.targets) > 1


def _url_name(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}{parts.path if parts.path not in ('', '/') else '/0'}"


def _targets(url: str, sentinels: tuple[str, ...], master: str | None, shards: tuple[str, ...]) -> tuple[RedisShard,
                                                                                                          ...]:
    if sentinels:
        names = shards or ((master,) if master else ())
        return tuple(RedisShard(name=n, master=n) for n in names)
    return tuple(RedisShard(name=_url_name(u), url=u) for u in (shards or (url,)))


_USAGE = "must be redis://HOST[:PORT][/DB], rediss://HOST[:PORT][/DB] or unix:///PATH"


def _url(v: Value) -> str:
    # Never quote the URL: it may carry a password.
    try:
        parts = urlsplit(v.text)
    except ValueError:
        raise Bad(_USAGE) from None
    if parts.scheme in ("redis", "rediss"):
        try:
            parts.port
        except ValueError:
            raise Bad(f"{_USAGE}: bad port") from None
        if not parts.hostname or not re.fullmatch(r"(/\d*)?", parts.path) or parts.query or parts.fragment:
            raise Bad(_USAGE)
    elif parts.scheme != "unix" or parts.netloc or not parts.path.startswith("/"):
        raise Bad(_USAGE)
    return v.text


def _host_port(v: Value) -> str:
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})", v.text)
    if not m or not 0 < int(m[2]) < 65536:
        raise Bad(f"{v.shown()} is not HOST:PORT (a sentinel's address, e.g. 10.0.0.1:26379)")
    return v.text


def read_redis(reader: Reader, sec: Section) -> RedisConfig:
    d = RedisConfig()
    url = sec.get("url", _url, d.url)
    sentinels = sec.get("sentinels", list_of(_host_port), d.sentinels)
    master = sec.get("sentinel_master", word, None) or None
    sentinel_password = sec.get("sentinel_password", text, None) or None
    password = sec.get("password", text, None) or None
    shards = sec.get("shards", list_of(word if sec.has("sentinels") else _url), d.shards)
    min_acks = sec.get("min_replicas_ack", integer(0), d.min_replicas_ack)
    if sentinels and sec.has("url"):
        sec.error("sentinels", "cannot be combined with url: with Sentinel the master's address is asked of the "
                               "sentinels (remove url, or remove sentinels)")
    if sentinels and not master and not shards and sec.ok("sentinels"):
        sec.error("sentinel_master", "required with sentinels: the name the sentinels monitor (e.g. mymaster)")
    if not sec.has("sentinels"):
        for key in ("sentinel_master", "sentinel_password"):
            if sec.has(key) and sec.value(key) is not None:
                sec.error(key, "only applies with sentinels")
    if shards:
        if sec.has("url"):
            sec.error("shards", "cannot be combined with url: list every shard's url in shards")
        if master:
            sec.error("shards", "cannot be combined with sentinel_master: list every master name in shards")
        if len(set(shards)) != len(shards):
            sec.error("shards", "lists a shard twice")
    if password and sec.has("url") and urlsplit(url).password:
        sec.error("password", "the url carries a password already: keep one of them")
    return RedisConfig(
        url=url, prefix=sec.get("prefix", word, d.prefix), sentinels=sentinels, sentinel_master=master,
        sentinel_password=sentinel_password, password=password, shards=shards, min_replicas_ack=min_acks,
        targets=_targets(url, sentinels, master, shards),
    )
