# -*- test-case-name: tests.unit.config.test_config -*-
"""The [limits] section: connection counts, message size, timeouts, keepalive, rate and write buffer."""

from __future__ import annotations

from dataclasses import dataclass

from wsgateway.config.reader import Reader, Section
from wsgateway.config.values import Bad, Value, duration, integer, size

__all__ = ["LimitsConfig", "read_limits"]


@dataclass(frozen=True)
class LimitsConfig:
    max_connections: int = 10000  # 0 = unlimited
    max_connections_per_ip: int = 256  # 0 = unlimited
    max_pending_handshakes: int = 1024  # not yet upgraded, whole gateway; the oldest beyond it are dropped
    max_message_size: int = 1024 * 1024  # 0 = unlimited
    handshake_timeout: float = 5.0
    idle_timeout: float = 600.0  # 0 = off
    ping_interval: float = 25.0  # 0 = off
    ping_timeout: float = 10.0
    messages_per_second: float = 0.0  # 0 = off
    write_buffer: int = 1024 * 1024
    close_timeout: float = 5.0  # a close handshake, and the lingering close of a client that broke a rule


# Each connection may hold this much in each direction: far beyond it, a few slow clients take all the memory.
MAX_WRITE_BUFFER = 64 * 1024 * 1024


def _write_buffer(v: Value) -> int:
    n = size(positive=True)(v)
    if n > MAX_WRITE_BUFFER:
        raise Bad(f"at most 64M: it is held for each connection and direction, so {v.shown()} would let a few slow "
                  "clients exhaust the memory")
    return n


def read_limits(reader: Reader, sec: Section) -> LimitsConfig:
    d = LimitsConfig()
    return LimitsConfig(
        max_connections=sec.get("max_connections", integer(0), d.max_connections),
        max_connections_per_ip=sec.get("max_connections_per_ip", integer(0), d.max_connections_per_ip),
        max_pending_handshakes=sec.get("max_pending_handshakes", integer(1), d.max_pending_handshakes),
        max_message_size=sec.get("max_message_size", size(), d.max_message_size),
        handshake_timeout=sec.get("handshake_timeout", duration(positive=True), d.handshake_timeout),
        idle_timeout=sec.get("idle_timeout", duration(), d.idle_timeout),
        ping_interval=sec.get("ping_interval", duration(), d.ping_interval),
        ping_timeout=sec.get("ping_timeout", duration(positive=True), d.ping_timeout),
        messages_per_second=sec.get("messages_per_second", duration(what="rate", example="a number, e.g. 50"),
                                    d.messages_per_second),
        close_timeout=sec.get("close_timeout", duration(positive=True), d.close_timeout),
        write_buffer=sec.get("write_buffer", _write_buffer, d.write_buffer),
    )
