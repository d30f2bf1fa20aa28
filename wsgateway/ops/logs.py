# -*- test-case-name: tests.integration.test_daemon -*-
"""
Log observers for twistd: ``text`` for humans, ``json`` (one object per
line, docs/logs.md) for machines, both behind one level filter that can be
changed while running.

twistd owns log startup; ``tap.Options`` hands it ``observer_factory`` the
way ``twistd --logger`` would, so ``--logfile`` and stdout under systemd keep
working.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from datetime import datetime
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile
from zope.interface import implementer

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

# One predicate for the process, so a runtime change reaches every observer.
PREDICATE = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)

# Event keys that go into JSON lines as fields of their own.
FIELDS = (
    "conn_id",
    "route",
    "upstream",
    "node",
    "peer",
    "trace_id",
    "code",
    "closed_by",
    "status",
    "reason",
    "detail",
    "suppressed",
    "channel",
    "duration",
    "messages_in",
    "messages_out",
    "bytes_in",
    "bytes_out",
    "mirror_dropped",
    "dropped",
    "compressed",
)


# Whether debug and info lines are shown at all: a line on every connection
# costs an event built and run through the filter just to be dropped
# (about 2 % of the CPU of a handshake), so such lines check this first.
SHOWS_DEBUG = False
SHOWS_INFO = True
# The level in effect, whoever set it last (the file at start or on a reload
# that changed it, or PUT /admin/log-level): what a reload's line reports.
LEVEL = "info"


def set_level(level: str) -> None:
    global SHOWS_DEBUG, SHOWS_INFO, LEVEL
    LEVEL = level
    SHOWS_DEBUG = level == "debug"
    SHOWS_INFO = level in ("debug", "info")
    PREDICATE.setLogLevelForNamespace("", LEVELS[level])
    # Autobahn's per-frame debug chatter is never useful in a gateway's log.
    PREDICATE.setLogLevelForNamespace("autobahn", max(LEVELS[level], LogLevel.info, key=_order))


def level_after_reload(before: str, after: str) -> str:
    """
    The level a reload's line reports, ``before`` and ``after`` being the
    file's: the file's new level when it changed (the reload applies it),
    else the one in effect, naming the file's when they differ (a level set
    through PUT /admin/log-level survives such a reload).
    """
    if after != before or LEVEL == after:
        return after
    return f"{LEVEL} (set at runtime; the file says {after})"


def _order(level: LogLevel) -> int:
    return list(LEVELS.values()).index(level)


def rfc3339(when: float | None) -> str:
    """
    Local time with its offset as RFC 3339 wants it, ``+00:00`` not
    ``+0000`` (strftime's %z): Go's time.RFC3339, Loki and Vector reject the
    form without the colon.
    """
    moment = datetime.fromtimestamp(time.time() if when is None else when).astimezone()
    return moment.isoformat(timespec="microseconds")


@implementer(ILogObserver)
class JSONLinesObserver:
    """
    One JSON object per line with ``time``, ``level``, ``event``, ``node_id``
    and connection fields; a worker process (``[gateway] workers`` > 1) adds
    ``worker``, its number, and its node_id ends in ``/wN``.
    """

    def __init__(self, stream: IO[str], node_id: str, worker: int | None = None) -> None:
        self._stream = stream
        self._node_id = node_id
        self._worker = worker

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        out: dict[str, Any] = {
            "time": rfc3339(event.get("log_time")),
            # LogLevel's members are NamedConstants, not LogLevel instances
            "level": getattr(level, "name", str(level)),
            "event": formatEvent(event),
            "node_id": self._node_id,
            "logger": event.get("log_namespace", ""),
        }
        if self._worker is not None:
            out["worker"] = self._worker
        for key in FIELDS:
            if key in event:
                out[key] = event[key]
        failure = event.get("log_failure")
        if failure is not None:
            out["traceback"] = failure.getTraceback()
        self._stream.write(json.dumps(out, default=str) + "\n")
        self._stream.flush()


class ConnLogger:
    """
    A Logger for one connection's events: each carries the connection's
    fields (``conn_id``, ``trace_id``, ``route``, ``peer``), so every line
    about a connection can be joined to its access line and its trace.
    """

    __slots__ = ("_log", "_fields")

    def __init__(self, log: Logger, fields: dict[str, Any]) -> None:
        self._log = log
        self._fields = fields

    def _emit(self, level: LogLevel, fmt: str, kw: dict[str, Any]) -> None:
        self._log.emit(level, "{conn_id} " + fmt, **{**self._fields, **kw})

    def debug(self, fmt: str, **kw: Any) -> None:
        self._emit(LogLevel.debug, fmt, kw)

    def info(self, fmt: str, **kw: Any) -> None:
        self._emit(LogLevel.info, fmt, kw)

    def warn(self, fmt: str, **kw: Any) -> None:
        self._emit(LogLevel.warn, fmt, kw)

    def error(self, fmt: str, **kw: Any) -> None:
        self._emit(LogLevel.error, fmt, kw)


# twistd imports its --logger by dotted name, after our options were parsed:
# tap.Options stores the factory here and names ``configured_observer``.
_configured: Callable[[], ILogObserver] | None = None


def configure(factory: Callable[[], ILogObserver]) -> str:
    global _configured
    _configured = factory
    return f"{__name__}.configured_observer"


def configured_observer() -> ILogObserver:
    if _configured is None:
        raise RuntimeError("wsgateway logging was not configured")
    return _configured()


# The files observer_factory opened, for reopen().
_files: list[LogFile] = []
# Where the observer writes: the parent of worker processes writes their
# lines there too (relay), so one process owns the log file.
_stream: IO[str] | None = None


def relay(line: str) -> None:
    """
    Write one line another process formatted (a worker's, read from its
    stdout) where this process logs, as it is: the worker already applied
    its level filter and the same [log] format.
    """
    stream = _stream or sys.stdout
    stream.write(line + "\n")
    stream.flush()


@implementer(ILogObserver)
class _WorkerTagged:
    """Text format in a worker: the system column names the worker, e.g. ``[gw-1/w2 wsgateway.handshake.server#info]``."""

    def __init__(self, observer: ILogObserver, node_id: str) -> None:
        self._observer = observer
        self._node_id = node_id

    def __call__(self, event: dict[str, Any]) -> None:
        system = event.get("log_system")
        if system is None:  # what the text format shows without one
            level = event.get("log_level", LogLevel.info)
            system = f"{event.get('log_namespace', '-')}#{getattr(level, 'name', level)}"
        self._observer({**event, "log_system": f"{self._node_id} {system}"})


def reopen() -> int:
    """
    Reopen every log file this process writes (SIGUSR1, after logrotate has
    moved them away): new lines go to a new file at the configured path.
    Returns how many were reopened.
    """
    for f in _files:
        f.reopen()
    return len(_files)


def _mode_of(path: str) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o644


def observer_factory(
    *, level: str, fmt: str, file: str, node_id: str, twistd_logfile: str | None, daemon: bool,
    worker: int | None = None,
) -> Callable[[], ILogObserver]:
    """
    The observer for twistd: ``--logfile`` wins over ``[log] file``. A
    worker process (``worker``: its number) writes to its stdout, a pipe its
    parent reads (``relay``), and names itself in each line.
    """

    def make() -> ILogObserver:
        global _stream
        target = twistd_logfile or (file if file != "-" else None)
        if target is None and daemon:
            target = "twistd.log"  # a daemon has no stdout; twistd's own default
        stream: IO[str]
        if target is None or target == "-":
            stream = sys.stdout
        else:
            # Rotation is logrotate's (etc/logrotate.d/wsgateway), not
            # LogFile's own every 1 MB, which would rename the file under
            # logrotate's feet; SIGUSR1 reopens it (reopen above).
            # A file created here, at start or by reopen() after logrotate
            # moved the old one away, is 0644 as twistd's own log file: by
            # then twistd may have set the daemon's umask 0077, which made a
            # reopened file 0600. An existing file keeps its mode (LogFile
            # reads it), so an operator's 0640 survives rotation.
            logfile = LogFile.fromFullPath(target, rotateLength=None, defaultMode=_mode_of(target))
            _files.append(logfile)
            stream = logfile
        _stream = stream
        observer: ILogObserver
        if fmt == "json":
            observer = JSONLinesObserver(stream, node_id, worker)
        else:
            observer = textFileLogObserver(stream)
            if worker is not None:
                observer = _WorkerTagged(observer, node_id)
        set_level(level)
        return FilteringLogObserver(observer, [PREDICATE])

    return make
