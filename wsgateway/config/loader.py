# -*- test-case-name: tests.unit.config.test_config -*-
"""
The INI file -> a frozen L{GatewayConfig}, every problem reported at once.

The config package is the only code that knows the file format (docs/configuration.md),
split as Synapse splits synapse/config/: one module per INI area (C{gateway}, C{admin},
C{limits}, C{auth}, C{redis}, C{queue}, C{log}, C{demo}, C{routes} for [route:NAME],
C{upstreams} for [upstream:NAME]), on top of C{values} (the value parsers), C{reader}
(one file and one section being read) and C{listen} (endpoint strings). This module reads
the sections in file order, runs the checks that span sections and builds the whole
config. Each problem is one line, C{PATH: [section] key: problem}, collected in file
order and raised together as one L{ConfigError}; C{wsgateway-check CONFIG} and
C{python -m wsgateway.config CONFIG} (L{wsgateway.config.check}) print them and exit 1.

Naming: a section's dataclass is its section's name plus C{Config} (C{[limits]} ->
C{LimitsConfig}, C{[route:NAME]} -> C{RouteConfig}), except C{[gateway]}'s, which is
C{ServerConfig} (Synapse's name for its own core section) because C{GatewayConfig} is the
whole file. A section's keys are its dataclass's fields (L{KNOWN_KEYS}), and each default
is written once, on the dataclass (docs/configuration.md), so C{LimitsConfig()} etc. are
the documented defaults and tests elsewhere can build configs by hand.

No reactor here (L{wsgateway.config.listen} parses endpoint strings without binding).
A secret's value never appears in an error: values that came from C{env:} or
C{file:} are named by their source, never quoted.
"""

from __future__ import annotations

import configparser
import difflib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wsgateway.config.admin import AdminConfig, read_admin
from wsgateway.config.auth import AuthConfig, read_auth
from wsgateway.config.demo import DemoConfig, read_demo
from wsgateway.config.gateway import ServerConfig, read_gateway
from wsgateway.config.limits import LimitsConfig, read_limits
from wsgateway.config.listen import check_endpoint, report_clashes
from wsgateway.config.log import LogConfig, read_log
from wsgateway.config.queue import QueueConfig, read_queue
from wsgateway.config.reader import Listener, Reader, Section, ini_keys
from wsgateway.config.redis import RedisConfig, read_redis
from wsgateway.config.routes import RouteConfig, read_route
from wsgateway.config.upstreams import UpstreamConfig, read_upstream
from wsgateway.config.values import NAME, FrozenMap, did_you_mean

__all__ = [
    "KNOWN_KEYS", "SECTIONS", "WORKER_LISTEN_KINDS", "AdminConfig", "AuthConfig", "ConfigError", "DemoConfig",
    "FrozenMap", "GatewayConfig", "LimitsConfig", "LogConfig", "QueueConfig", "RedisConfig",
    "RouteConfig", "ServerConfig", "UpstreamConfig", "load",
]


class ConfigError(Exception):
    """Every problem found, each a full line C{PATH: [section] key: problem}."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors: list[str] = list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


@dataclass(frozen=True)
class GatewayConfig:
    path: str
    gateway: ServerConfig = field(default_factory=ServerConfig)
    admin: AdminConfig | None = None
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig | None = None
    redis: RedisConfig | None = None
    queue: QueueConfig = field(default_factory=QueueConfig)
    log: LogConfig = field(default_factory=LogConfig)
    demo: DemoConfig | None = None
    routes: tuple[RouteConfig, ...] = ()
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=FrozenMap)


# Every kind of section and its dataclass; [route:NAME] and [upstream:NAME] may appear many times, the rest once.
# The order is the one an unknown key's "it belongs in [...]" hint searches.
SECTIONS: Mapping[str, type] = FrozenMap({
    "gateway": ServerConfig, "admin": AdminConfig, "limits": LimitsConfig, "auth": AuthConfig, "redis": RedisConfig,
    "queue": QueueConfig, "log": LogConfig, "demo": DemoConfig, "route": RouteConfig, "upstream": UpstreamConfig,
})
_NAMED = ("route", "upstream")
_SINGLE = tuple(kind for kind in SECTIONS if kind not in _NAMED)
KNOWN_KEYS: Mapping[str, tuple[str, ...]] = FrozenMap({kind: ini_keys(cls) for kind, cls in SECTIONS.items()})

# Listen kinds a parent process can bind and hand to its workers (wsgateway.workers.parent).
WORKER_LISTEN_KINDS = ("tcp", "tcp6", "ssl")


def _check_workers(sec: Section, gateway: ServerConfig, routes: Sequence[RouteConfig], has_redis: bool) -> None:
    """``workers`` > 1: what separate processes cannot share."""
    count = gateway.workers
    shared = [r.name for r in routes if r.mode == "broadcast" or r.subscribe]
    if shared and not has_redis:
        names = ", ".join(f"[route:{name}]" for name in shared)
        sec.error("workers", f"{count} worker processes need a [redis] section for channels: {names} "
                             f"{'uses' if len(shared) == 1 else 'use'} broadcast or subscribe, and the in-process "
                             "broker cannot reach the clients of other workers; add [redis] or set workers = 1")
    if sec.ok("listen"):
        for desc in gateway.listen:
            if desc.split(":", 1)[0].strip().lower() not in WORKER_LISTEN_KINDS:
                sec.error("workers", f"listen entry {desc!r} cannot be shared with worker processes: with "
                                     f"workers > 1 use {', '.join(k + ':' for k in WORKER_LISTEN_KINDS)}")


def _section_kind(name: str) -> tuple[str, str] | str:
    """-> (kind, NAME) for a known section, else the problem."""
    if name in _SINGLE:
        return name, ""
    kind, sep, rest = name.partition(":")
    if kind in _NAMED:
        if not sep or not rest:
            return f"needs a name: [{kind}:NAME]"
        if not NAME.fullmatch(rest):
            return f"bad name {rest!r}: use letters, digits, '_', '.' and '-'"
        return kind, rest
    close = difflib.get_close_matches(kind if sep else name, [*_SINGLE, *_NAMED], n=1, cutoff=0.6)
    if close and close[0] in _NAMED:
        return f"unknown section (did you mean [{close[0]}:{rest or 'NAME'}]?)"
    return "unknown section" + (f" (did you mean [{close[0]}]?)" if close else "")


def _parse_ini(path: str) -> configparser.ConfigParser:
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: cannot read: not UTF-8 text"]) from None
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",),
                                       comment_prefixes=("#", ";"), strict=True,
                                       default_section="\n")  # so a [DEFAULT] section is just unknown
    try:
        parser.read_string(text, source=path)
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError([f"{path}: line {e.lineno}: a key before any [section] header"]) from None
    except configparser.DuplicateSectionError as e:
        raise ConfigError([f"{path}: line {e.lineno}: [{e.section}]: duplicate section"]) from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError([f"{path}: line {e.lineno}: [{e.section}] {e.option}: duplicate key"]) from None
    except configparser.ParsingError as e:
        # The offending text is not repeated: it might be a secret missing its '='.
        raise ConfigError([f"{path}: line {lineno}: cannot parse: expected 'key = value', a [section] header "
                           "or a comment" for lineno, _ in e.errors]) from None
    except configparser.Error as e:
        raise ConfigError([f"{path}: cannot parse: {type(e).__name__}"]) from None
    return parser


def _drop_unknown_keys(kind: str, sec: Section) -> None:
    for key in sec.keys:
        if key not in KNOWN_KEYS[kind]:
            homes = [k + (":NAME" if k in _NAMED else "") for k in KNOWN_KEYS if key in KNOWN_KEYS[k]]
            hint = f" (it belongs in [{homes[0]}])" if homes else did_you_mean(key, KNOWN_KEYS[kind])
            sec.error(key, f"unknown key {key!r}{hint}")
            del sec.items[key]


def load(path: str, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate the INI file; raise L{ConfigError} listing every problem found."""
    parser = _parse_ini(path)
    reader = Reader(path, os.environ if environ is None else environ)
    sections: list[tuple[str, str, Section]] = []
    for index, name in enumerate(parser.sections()):
        sec = Section(reader, index, name, parser[name])
        found = _section_kind(name)
        if isinstance(found, str):
            sec.error(None, found)
            continue
        sections.append((found[0], found[1], sec))
        _drop_unknown_keys(found[0], sec)
    kinds = {kind for kind, _, _ in sections}
    upstream_names = [name for kind, name, _ in sections if kind == "upstream"]
    single: dict[str, Any] = {}
    routes: list[RouteConfig] = []
    upstreams: dict[str, UpstreamConfig] = {}
    seen_routes: dict[tuple[Any, ...], str] = {}
    builders: dict[str, Callable[[Reader, Section], Any]] = {
        "gateway": read_gateway, "admin": read_admin, "limits": read_limits, "auth": read_auth, "redis": read_redis,
        "log": read_log, "demo": read_demo, "queue": lambda r, s: read_queue(r, s, "redis" in kinds),
    }
    for kind, name, sec in sections:
        if kind == "route":
            routes.append(read_route(reader, sec, name, upstream_names, "auth" in kinds, seen_routes))
        elif kind == "upstream":
            upstreams[name] = read_upstream(reader, sec, name)
        else:
            single[kind] = builders[kind](reader, sec)
    if "gateway" not in single:
        single["gateway"] = ServerConfig()
    by_kind = {kind: sec for kind, _, sec in sections}
    for kind, default in (("gateway", ServerConfig.listen), ("admin", AdminConfig.listen),
                          ("demo", DemoConfig.listen)):
        # A listener left at its default still takes part in the clash check.
        present = by_kind.get(kind)
        if (present is not None or kind == "gateway") and (present is None or not present.has("listen")):
            reader.listeners.extend(Listener(None, f"[{kind}] listen (default)", d, check_endpoint(reader, d)[1])
                                    for d in default)
    report_clashes(reader.listeners)
    if "gateway" in by_kind and single["gateway"].workers > 1:
        _check_workers(by_kind["gateway"], single["gateway"], routes, "redis" in kinds)
    if not routes and not any(kind == "route" for kind, _, _ in sections):
        reader.record((len(parser.sections()) + 1, 0), "[gateway]: no [route:NAME] section: nothing to serve")
    errors = reader.errors()
    if errors:
        raise ConfigError(errors)
    return GatewayConfig(
        path=path,
        gateway=single["gateway"],
        admin=single.get("admin"),
        limits=single.get("limits", LimitsConfig()),
        auth=single.get("auth"),
        redis=single.get("redis"),
        queue=single.get("queue") or read_queue(reader, None, False),
        log=single.get("log", LogConfig()),
        demo=single.get("demo"),
        routes=tuple(routes),
        upstreams=FrozenMap(upstreams),
    )
