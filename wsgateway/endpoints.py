# -*- test-case-name: tests.unit.config.test_config -*-
"""
Twisted's endpoint-string grammar (``tcp:8080:interface=127.0.0.1``,
``ssl:8443:privateKey=KEY``, backslash escapes), split and joined the way
``serverFromString`` reads it, and the listen backlog the gateway adds. Imports
nothing of ours: config validation, the TLS listeners and the worker parent
all read endpoint strings through it.
"""

from __future__ import annotations


def split_endpoint(desc: str) -> list[tuple[str | None, str]]:
    """Twisted's strports syntax: ':'-separated, key=value or positional, backslash escapes."""
    parts: list[tuple[str | None, str]] = []
    key: str | None = None
    current = ""
    chars = iter(desc)
    for char in chars:
        if char == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ValueError("ends with a lone backslash")
            current += escaped
        elif char == ":":
            parts.append((key, current))
            key, current = None, ""
        elif char == "=" and key is None:
            key, current = current, ""
        else:
            current += char
    parts.append((key, current))
    return parts


# Twisted listens with a backlog of 50. Thousands of clients reconnecting at
# once (a deploy, a network blip) overflow that, and the kernel drops their
# SYNs: they wait out retransmits of 1 s, 3 s, 7 s. 511 is nginx's default;
# the kernel caps it at net.core.somaxconn. backlog= in the string wins.
DEFAULT_BACKLOG = 511
_BACKLOG_KINDS = frozenset({"tcp", "tcp6", "ssl", "unix"})


def with_backlog(desc: str) -> str:
    """``desc`` with ``backlog=DEFAULT_BACKLOG`` when it listens on a socket with a queue and names none."""
    parts = split_endpoint(desc)
    kind = (parts[0][1] if parts[0][0] is None else "").lower()
    if kind in _BACKLOG_KINDS and not any(k == "backlog" for k, _ in parts[1:]):
        return f"{desc}:backlog={DEFAULT_BACKLOG}"
    return desc


def join_endpoint(parts: list[tuple[str | None, str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")
    return ":".join(esc(v) if k is None else f"{esc(k)}={esc(v)}" for k, v in parts)
