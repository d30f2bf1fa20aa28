# -*- test-case-name: tests.unit.config.test_config -*-
"""The [demo] section: where the built-in demo backend (wsgateway.dev.demo) listens."""

from __future__ import annotations

from dataclasses import dataclass

from wsgateway.config.listen import listen_key
from wsgateway.config.reader import Reader, Section

__all__ = ["DemoConfig", "read_demo"]


@dataclass(frozen=True)
class DemoConfig:
    listen: tuple[str, ...] = ("tcp:8081:interface=127.0.0.1",)


def read_demo(reader: Reader, sec: Section) -> DemoConfig:
    return DemoConfig(listen=sec.get("listen", listen_key(reader, sec), DemoConfig().listen))
