# -*- test-case-name: tests.unit.config.test_config -*-
"""The [limits] section: connection counts, message size, timeouts, keepalive, rate and write buffer."""

from __future__ import annotations

from dataclasses import dataclass

from wsgateway.config.reader import Reader, Section
from wsgateway.config.values import duration, integer, size

__all__ = ["LimitsConfig", "read_limits"]


@dataclass(frozen=True)
class LimitsConfig:
    max_connections: int = 10000  # 0 = unlimited
    max_connections_per_ip: int = 256  # 0 = unlimited
    max_message_size: int = 1024 * 1024  # 0 = unlimited
    handshake_timeout: float = 5.0
    idle_timeout: float = 600.0  # 0 = off
    ping_interval: float = 25.0  # 0 = off
    ping_timeout: float = 10.0
    messages_per_second: float = 0.0  # 0 = off
    write_buffer: int = 1024 * 1024


def read_limits(reader: Reader, sec: Section) -> LimitsConfig:
    d = LimitsConfig()
    return LimitsConfig(
        max_connections=sec.get("max_connections", integer(0), d.max_connections),
        max_connections_per_ip=sec.get("max_connections_per_ip", integer(0), d.max_connections_per_ip),
        max_message_size=sec.get("max_message_size", size(), d.max_message_size),
        handshake_timeout=sec.get("handshake_timeout", duration(positive=True), d.handshake_timeout),
        idle_timeout=sec.get("idle_timeout", duration(), d.idle_timeout),
        ping_interval=sec.get("ping_interval", duration(), d.ping_interval),
        ping_timeout=sec.get("ping_timeout", duration(positive=True), d.ping_timeout),
        messages_per_second=sec.get("messages_per_second", duration(what="rate", example="a number, e.g. 50"),
                                    d.messages_per_second),
        write_buffer=sec.get("write_buffer", size(positive=True), d.write_buffer),
    )
