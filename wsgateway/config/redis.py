# -*- test-case-name: tests.unit.config.test_config -*-
"""The [redis] section: the Redis server behind channels across processes and the redis queue backend."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from wsgateway.config.reader import Reader, Section
from wsgateway.config.values import Bad, Value, word

__all__ = ["RedisConfig", "read_redis"]


@dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "wsgw"


def read_redis(reader: Reader, sec: Section) -> RedisConfig:
    d = RedisConfig()

    def url(v: Value) -> str:
        # Never quote the URL: it may carry a password.
        usage = "must be redis://HOST[:PORT][/DB], rediss://HOST[:PORT][/DB] or unix:///PATH"
        try:
            parts = urlsplit(v.text)
        except ValueError:
            raise Bad(usage) from None
        if parts.scheme in ("redis", "rediss"):
            try:
                parts.port
            except ValueError:
                raise Bad(f"{usage}: bad port") from None
            if not parts.hostname or not re.fullmatch(r"(/\d*)?", parts.path) or parts.query or parts.fragment:
                raise Bad(usage)
        elif parts.scheme != "unix" or parts.netloc or not parts.path.startswith("/"):
            raise Bad(usage)
        return v.text

    return RedisConfig(url=sec.get("url", url, d.url), prefix=sec.get("prefix", word, d.prefix))
