# -*- test-case-name: tests.unit.config.test_config -*-
"""
The [route:NAME] sections: which requests a route matches (path pattern, host, headers),
what it does with them (proxy to an upstream, or broadcast on a channel), who may use
it (auth, roles, origins) and how messages are delivered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from wsgateway.config.reader import NOT_A_KEY, Reader, Section
from wsgateway.config.values import (
    Bad,
    Value,
    boolean,
    did_you_mean,
    duration,
    integer,
    is_token,
    list_of,
    one_of,
    optional,
    origin,
    pairs,
    unique,
    word,
)
from wsgateway.routing.patterns import PatternError, compile_pattern
from wsgateway.routing.router import check_host
from wsgateway.routing.templates import check_template, template_fields

__all__ = ["Delivery", "OnUpstreamClose", "RouteAuth", "RouteConfig", "RouteMode", "SlowConsumer", "read_route"]

RouteMode = Literal["proxy", "broadcast"]
RouteAuth = Literal["required", "optional", "none"]
Delivery = Literal["at_most_once", "at_least_once"]
OnUpstreamClose = Literal["close", "reconnect"]
SlowConsumer = Literal["close", "drop_oldest"]
# permessage-deflate (docs/protocol.md#compression): passed through on proxy
# routes, negotiated by the gateway itself on broadcast routes; off declines it
Compression = Literal["passthrough", "off"]


@dataclass(frozen=True)
class RouteConfig:
    name: str = field(metadata=NOT_A_KEY)  # the NAME of [route:NAME]
    path: str
    host: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    mode: RouteMode = "proxy"
    upstream: str | None = None
    strip_prefix: bool = False
    upstream_path: str | None = None
    auth: RouteAuth = "none"  # load() resolves the default: "required" when [auth] exists
    roles: tuple[str, ...] = ()
    forward_auth: bool = False
    allowed_origins: tuple[str, ...] | None = None  # None = inherit [gateway]
    mirror: str | None = None
    delivery: Delivery = "at_most_once"
    on_upstream_close: OnUpstreamClose = "close"
    channel: str | None = None
    client_publish: bool = True
    slow_consumer: SlowConsumer = "close"
    subscribe: tuple[str, ...] = ()
    compression: Compression = "passthrough"
    # channel history (docs/protocol.md#channel-history-and-recovery): broadcast routes only
    history_size: int = 0
    history_ttl: float = 300.0

    @property
    def compressed(self) -> bool:
        """
        Whether the route may negotiate permessage-deflate. Declined where an
        upstream connection after the first would need the same compression
        parameters, which nothing guarantees (docs/protocol.md#compression):
        at_least_once (replayed on a new connection), on_upstream_close =
        reconnect, and a mirror (a second upstream reading the client's frames).
        """
        return (self.compression == "passthrough" and self.delivery == "at_most_once"
                and self.on_upstream_close == "close" and not self.mirror)


# Keys that mean something in one mode only: set away from their default in the other mode, they are an error.
_PROXY_ONLY = ("upstream", "strip_prefix", "upstream_path", "forward_auth", "mirror", "delivery", "on_upstream_close",
               "subscribe")
_BROADCAST_ONLY = ("channel", "client_publish", "history_size", "history_ttl")


def _template(captures: Sequence[str]) -> Callable[[Value], str]:
    def parse(v: Value) -> str:
        try:
            check_template(v.text, captures)
        except PatternError as e:
            raise Bad(f"bad template {v.shown()}: {e}") from None
        return v.text
    return parse


# Beyond this a recovery is a burst no slow-consumer bound would let
# through, and each channel's history a sizeable Redis stream.
MAX_HISTORY_SIZE = 10000


def _history_size(v: Value) -> int:
    n = integer(0)(v)
    if n > MAX_HISTORY_SIZE:
        raise Bad(f"at most {MAX_HISTORY_SIZE} messages per channel")
    return n


def _upstream_path(captures: Sequence[str]) -> Callable[[Value], str]:
    def parse(v: Value) -> str:
        if not v.text.startswith("/"):
            raise Bad("must start with '/'")
        return _template(captures)(v)
    return parse


def read_route(reader: Reader, sec: Section, name: str, upstreams: Sequence[str], has_auth: bool,
               seen: dict[tuple[Any, ...], str]) -> RouteConfig:
    """[route:NAME]; C{seen} maps each route's (path, host, headers) to its name, to find shadowed routes."""
    d = RouteConfig(name, "")
    if not sec.has("path"):
        sec.error(None, "missing required key 'path'")

    def pattern(v: Value) -> tuple[str, tuple[str, ...], bool]:
        try:
            compiled = compile_pattern(v.text)
        except PatternError as e:
            raise Bad(f"bad path pattern {v.shown()}: {e}") from None
        return compiled.source, compiled.captures, compiled.has_rest

    no_pattern: tuple[str, tuple[str, ...], bool] = (d.path, (), False)
    path, captures, has_rest = sec.get("path", pattern, no_pattern)

    def host(v: Value) -> str | None:
        try:
            check_host(v.text)
        except PatternError as e:
            raise Bad(str(e)) from None
        return v.text or None

    def upstream_name(v: Value) -> str | None:
        if v.text and v.text not in upstreams:
            raise Bad(f"no section [upstream:{v.text}]{did_you_mean(v.text, upstreams, '[upstream:{}]')}")
        return v.text or None

    values: dict[str, Any] = dict(
        host=sec.get("host", host, d.host),
        headers=sec.get("headers", unique(list_of(pairs("Name=value", is_token)), "header", 0), d.headers),
        mode=sec.get("mode", one_of(RouteMode), d.mode),
        upstream=sec.get("upstream", upstream_name, d.upstream),
        strip_prefix=sec.get("strip_prefix", boolean, d.strip_prefix),
        upstream_path=sec.get("upstream_path", optional(_upstream_path(captures)), d.upstream_path),
        auth=sec.get("auth", one_of(RouteAuth), "required" if has_auth else d.auth),
        roles=sec.get("roles", list_of(word), d.roles),
        forward_auth=sec.get("forward_auth", boolean, d.forward_auth),
        allowed_origins=sec.get("allowed_origins", lambda v: list_of(origin)(v) or None, d.allowed_origins),
        mirror=sec.get("mirror", upstream_name, d.mirror),
        delivery=sec.get("delivery", one_of(Delivery), d.delivery),
        on_upstream_close=sec.get("on_upstream_close", one_of(OnUpstreamClose), d.on_upstream_close),
        channel=sec.get("channel", optional(_template(captures)), d.channel),
        client_publish=sec.get("client_publish", boolean, d.client_publish),
        slow_consumer=sec.get("slow_consumer", one_of(SlowConsumer), d.slow_consumer),
        subscribe=sec.get("subscribe", list_of(_template(captures)), d.subscribe),
        compression=sec.get("compression", one_of(Compression), d.compression),
        history_size=sec.get("history_size", _history_size, d.history_size),
        history_ttl=sec.get("history_ttl", duration(positive=True), d.history_ttl),
    )
    mode = values["mode"]
    if sec.ok("mode"):
        wrong, right = (_PROXY_ONLY, "proxy") if mode == "broadcast" else (_BROADCAST_ONLY, "broadcast")
        for key in wrong:
            if values[key] != getattr(d, key):
                sec.error(key, f"only applies to mode = {right}")
        if mode == "proxy" and values["upstream"] is None and sec.ok("upstream"):
            sec.error("upstream", "required with mode = proxy: name an [upstream:NAME] section")
        if mode == "broadcast" and values["channel"] is None and sec.ok("channel"):
            sec.error("channel", "required with mode = broadcast, e.g. channel = room:{room}")
        if mode == "proxy" and values["slow_consumer"] != d.slow_consumer and not values["subscribe"]:
            sec.error("slow_consumer", "only applies to broadcast routes and routes with subscribe")
    if values["delivery"] == "at_least_once" and values["compression"] == "passthrough" and sec.has("compression"):
        # stored messages are replayed on a new upstream connection, whose
        # compression context is new: they must be stored uncompressed
        sec.error("compression", "at_least_once routes decline compression: set compression = off or remove it")
    if values["mirror"] and values["mirror"] == values["upstream"]:
        sec.error("mirror", "is the route's own upstream")
    if values["strip_prefix"] and not has_rest and sec.ok("path"):
        sec.error("strip_prefix", "needs a path ending in /**")
    if values["strip_prefix"] and values["upstream_path"]:
        sec.error("strip_prefix", "cannot be combined with upstream_path")
    auth = values["auth"]
    if auth != "none" and not has_auth:
        sec.error("auth", f"auth = {auth} needs an [auth] section")
    if auth == "none" and sec.ok("auth"):
        if values["roles"]:
            sec.error("roles", "needs auth = required or optional")
        for key in ("upstream_path", "channel", "subscribe"):
            templates = values[key] if isinstance(values[key], tuple) else (values[key] or "",)
            if any(f.startswith("claims.") for t in templates for f in template_fields(t)):
                sec.error(key, "uses {claims.NAME} but the route has auth = none")
    if path and sec.ok("path", "host", "headers"):
        identity = (path, (values["host"] or "").lower(), frozenset((n.lower(), v) for n, v in values["headers"]))
        if identity in seen:
            sec.error("path", f"same path, host and headers as [route:{seen[identity]}]: this route would never match")
        seen.setdefault(identity, name)
    return RouteConfig(name=name, path=path, **values)
