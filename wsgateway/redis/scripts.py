# -*- test-case-name: tests.integration.test_history -*-
"""Lua scripts sent by SHA1 on a L{wsgateway.redis.link.RedisLink}, their text only when Redis lacks it."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import txredisapi
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from wsgateway.redis.link import RedisLink

__all__ = ["LuaScript", "Script", "eval_script", "send"]


@dataclass(frozen=True)
class LuaScript:
    """A script sent by its SHA1 (EVALSHA), its text only when Redis has not cached it yet."""

    text: bytes
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.text).hexdigest())


class Script(Protocol):
    @property
    def text(self) -> bytes: ...

    @property
    def sha(self) -> str: ...


def eval_script(link: RedisLink, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Deferred[Any]:
    """
    Run C{script} on the link's current connection; fails at once while
    the link is down (nothing waits for a connection). A Redis that
    restarted (or ran SCRIPT FLUSH) answers NOSCRIPT: the text is sent once,
    which caches it again.
    """
    full = [len(keys), *keys, *args]

    def noscript(f: Failure) -> Any:
        again = link.protocol
        if again is not None and f.check(txredisapi.ResponseError) and str(f.value).startswith("NOSCRIPT"):
            return send(again, "EVAL", script.text, *full)
        return f

    proto = link.protocol
    if proto is None:
        return fail(ConnectionError(f"{link.describe()}: redis down"))
    return send(proto, "EVALSHA", script.sha, *full).addErrback(noscript).addErrback(link.check)


def send(proto: Any, *command: Any) -> Deferred[Any]:
    try:
        d: Deferred[Any] = proto.execute_command(*command)
    except Exception as e:  # txredisapi raises at once on a closed connection
        return fail(e)
    return d
