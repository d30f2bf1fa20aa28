# -*- test-case-name: tests.unit.config.test_config -*-
"""The [log] section: the level, format and file of the daemon's log."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, get_args

from wsgateway.config.reader import Reader, Section
from wsgateway.config.values import Bad, Value, one_of

__all__ = ["LOG_LEVELS", "LogConfig", "LogFormat", "LogLevelName", "read_log"]

LogLevelName = Literal["debug", "info", "warn", "error", "critical"]
LogFormat = Literal["json", "text"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevelName)


@dataclass(frozen=True)
class LogConfig:
    level: LogLevelName = "info"
    format: LogFormat = "json"
    file: str = "-"  # "-" = stdout, else an absolute path


def read_log(reader: Reader, sec: Section) -> LogConfig:
    d = LogConfig()

    def level(v: Value) -> LogLevelName:
        return "warn" if v.text.lower() == "warning" else one_of(LogLevelName)(v)

    def file(v: Value) -> str:
        if v.text == "-":
            return "-"
        full = reader.path_value(v)
        if not os.path.isdir(os.path.dirname(full)):
            raise Bad(f"folder {os.path.dirname(full)!r} does not exist")
        return full

    return LogConfig(level=sec.get("level", level, d.level), format=sec.get("format", one_of(LogFormat), d.format),
                     file=sec.get("file", file, d.file))
