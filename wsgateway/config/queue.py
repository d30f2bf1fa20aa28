# -*- test-case-name: tests.unit.config.test_config -*-
"""The [queue] section: the store behind at_least_once delivery (SQLite file or Redis) and its retries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from wsgateway.config.reader import Reader, Section
from wsgateway.config.values import duration, integer, one_of, size

__all__ = ["QueueBackend", "QueueConfig", "read_queue"]

QueueBackend = Literal["sqlite", "redis"]


@dataclass(frozen=True)
class QueueConfig:
    path: str = "var/queue.sqlite"  # load() makes it absolute (relative to the INI's folder)
    backend: QueueBackend = "sqlite"
    max_attempts: int = 20
    retention: float = 86400.0
    # docs/configuration.md: beyond these new messages are refused (the client closed with 1013 "queue full");
    # nothing stored is dropped to make room
    max_bytes: int = 1024 ** 3
    max_bytes_per_connection: int = 16 * 1024 ** 2


def read_queue(reader: Reader, sec: Section | None, has_redis: bool) -> QueueConfig:
    """[queue], or its defaults when the file has none (C{sec} None)."""
    d = QueueConfig()
    if sec is None:
        return QueueConfig(path=reader.abspath(d.path))
    backend = sec.get("backend", one_of(QueueBackend), d.backend)
    if backend == "redis" and not has_redis:
        sec.error("backend", "backend = redis needs a [redis] section")
    return QueueConfig(
        path=sec.get("path", reader.path_value, reader.abspath(d.path)),
        backend=backend,
        max_attempts=sec.get("max_attempts", integer(1), d.max_attempts),
        retention=sec.get("retention", duration(positive=True), d.retention),
        max_bytes=sec.get("max_bytes", size(positive=True), d.max_bytes),
        max_bytes_per_connection=sec.get("max_bytes_per_connection", size(positive=True),
                                         d.max_bytes_per_connection),
    )
