# -*- test-case-name: tests.test_config -*-
"""
The INI file -> a frozen L{GatewayConfig}, every problem reported at once.

The only module that knows the file format (docs/configuration.md). Each problem is
one line, C{PATH: [section] key: problem}, collected in file order and raised
together as one L{ConfigError}; C{wsgateway-check CONFIG} and
C{python -m wsgateway.config.loader CONFIG} print them and exit 1.

No reactor here: endpoint strings are checked with C{serverFromString(None, s)},
which parses (and for C{ssl:} loads the key and certificate) without binding.
A secret's value never appears in an error: values that came from C{env:} or
C{file:} are named by their source, never quoted.
"""

from __future__ import annotations

import configparser
import difflib
import ipaddress
import json
import os
import re
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Any, TypeVar
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from twisted.internet.endpoints import serverFromString

from wsgateway.auth.keys import load_api_keys
from wsgateway.endpoints import join_endpoint, split_endpoint
from wsgateway.routing.router import (
    PatternError,
    check_host,
    check_template,
    compile_pattern,
    template_fields,
)
from wsgateway.tls import check_listen

__all__ = [
    "AdminSection", "AuthConfig", "ConfigError", "DemoConfig", "FrozenMap", "GatewayConfig",
    "GatewaySection", "KNOWN_KEYS", "Limits", "LogConfig", "NodeConfig", "QueueConfig",
    "RedisConfig", "RouteConfig", "UpstreamConfig", "load", "main",
]

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


class ConfigError(Exception):
    """Every problem found, each a full line C{PATH: [section] key: problem}."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors: list[str] = list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


class FrozenMap(Mapping[K, V]):
    """A read-only, hashable mapping that keeps insertion order."""

    __slots__ = ("_data",)

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._data: dict[K, V] = dict(items)

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self._data) == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


# ------------------------------------------------------------- the values
# Defaults live on the dataclasses (docs/configuration.md), so Limits() etc. are the
# documented defaults and tests elsewhere can build configs by hand.


@dataclass(frozen=True)
class GatewaySection:
    node_id: str = field(default_factory=socket.gethostname)
    listen: tuple[str, ...] = ("tcp:8080",)
    allowed_origins: tuple[str, ...] = ()  # () = any Origin
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    workers: int = 1
    shutdown_timeout: float = 10.0
    drain_grace: float = 2.0


@dataclass(frozen=True)
class AdminSection:
    listen: tuple[str, ...] = ("tcp:9090:interface=127.0.0.1",)
    token: str | None = None  # None = /admin/* disabled


@dataclass(frozen=True)
class Limits:
    max_connections: int = 10000  # 0 = unlimited
    max_connections_per_ip: int = 256  # 0 = unlimited
    max_message_size: int = 1024 * 1024  # 0 = unlimited
    handshake_timeout: float = 5.0
    idle_timeout: float = 600.0  # 0 = off
    ping_interval: float = 25.0  # 0 = off
    ping_timeout: float = 10.0
    messages_per_second: float = 0.0  # 0 = off
    write_buffer: int = 1024 * 1024


@dataclass(frozen=True)
class AuthConfig:
    algorithms: tuple[str, ...] = ("HS256",)  # () = no JWTs, API keys only
    secret: str | None = None
    public_key_file: str | None = None
    jwks_file: str | None = None
    jwks_url: str | None = None
    jwks_refresh: float = 300.0
    jwks_ca: str | None = None
    api_keys_file: str | None = None
    api_key_header: str = "X-API-Key"
    issuer: str | None = None
    audience: str | None = None
    leeway: float = 30.0
    query_param: str = "access_token"  # "" = tokens are not taken from the query
    subprotocol_prefix: str = "bearer."  # "" = tokens are not taken from subprotocols
    forward_claims: tuple[tuple[str, str], ...] = (("sub", "X-User-Id"), ("roles", "X-User-Roles"))


@dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "wsgw"


@dataclass(frozen=True)
class QueueConfig:
    path: str = "var/queue.sqlite"  # load() makes it absolute (relative to the INI's folder)
    backend: str = "sqlite"
    max_attempts: int = 20
    retention: float = 86400.0


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "json"
    file: str = "-"  # "-" = stdout, else an absolute path


@dataclass(frozen=True)
class DemoConfig:
    listen: tuple[str, ...] = ("tcp:8081:interface=127.0.0.1",)


@dataclass(frozen=True)
class NodeConfig:
    url: str  # as written in the file
    scheme: str  # "ws" | "wss"
    host: str  # without IPv6 brackets
    port: int
    path: str  # "" if the URL has none
    weight: int = 1
    zone: str | None = None
    version: str | None = None
    labels: Mapping[str, str] = field(default_factory=FrozenMap)  # every label, weight/zone/version included


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    nodes: tuple[NodeConfig, ...]
    balance: str = "round_robin"
    zone: str | None = None
    version_header: str | None = None
    connect_timeout: float = 3.0
    retries: int = 2
    backoff_initial: float = 0.1
    backoff_max: float = 2.0
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    health_check: str = "none"
    health_interval: float = 5.0
    health_timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    reconnect_buffer: int = 1024 * 1024


@dataclass(frozen=True)
class RouteConfig:
    name: str
    path: str
    host: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    mode: str = "proxy"
    upstream: str | None = None
    strip_prefix: bool = False
    upstream_path: str | None = None
    auth: str = "none"  # load() resolves the default: "required" when [auth] exists
    roles: tuple[str, ...] = ()
    forward_auth: bool = False
    allowed_origins: tuple[str, ...] | None = None  # None = inherit [gateway]
    mirror: str | None = None
    delivery: str = "at_most_once"
    on_upstream_close: str = "close"
    channel: str | None = None
    client_publish: bool = True
    slow_consumer: str = "close"
    subscribe: tuple[str, ...] = ()


@dataclass(frozen=True)
class GatewayConfig:
    path: str
    gateway: GatewaySection = field(default_factory=GatewaySection)
    admin: AdminSection | None = None
    limits: Limits = field(default_factory=Limits)
    auth: AuthConfig | None = None
    redis: RedisConfig | None = None
    queue: QueueConfig = field(default_factory=QueueConfig)
    log: LogConfig = field(default_factory=LogConfig)
    demo: DemoConfig | None = None
    routes: tuple[RouteConfig, ...] = ()
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=FrozenMap)


KNOWN_KEYS: Mapping[str, tuple[str, ...]] = FrozenMap({
    "gateway": ("node_id", "listen", "allowed_origins", "trusted_proxies", "workers", "shutdown_timeout",
                "drain_grace"),
    "admin": ("listen", "token"),
    "limits": ("max_connections", "max_connections_per_ip", "max_message_size", "handshake_timeout",
               "idle_timeout", "ping_interval", "ping_timeout", "messages_per_second", "write_buffer"),
    "auth": ("algorithms", "secret", "public_key_file", "jwks_file", "jwks_url", "jwks_refresh", "jwks_ca",
             "api_keys_file", "api_key_header", "issuer", "audience", "leeway", "query_param",
             "subprotocol_prefix", "forward_claims"),
    "redis": ("url", "prefix"),
    "queue": ("path", "backend", "max_attempts", "retention"),
    "log": ("level", "format", "file"),
    "demo": ("listen",),
    "route": ("path", "host", "headers", "mode", "upstream", "strip_prefix", "upstream_path", "auth", "roles",
              "forward_auth", "allowed_origins", "mirror", "delivery", "on_upstream_close", "channel",
              "client_publish", "slow_consumer", "subscribe"),
    "upstream": ("nodes", "balance", "zone", "version_header", "connect_timeout", "retries", "backoff_initial",
                 "backoff_max", "tls_ca", "tls_cert", "tls_key", "health_check", "health_interval",
                 "health_timeout", "healthy_threshold", "unhealthy_threshold", "reconnect_buffer"),
})

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
# RFC 7518 section 3.2: an HMAC key at least as long as the hash output.
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
BALANCE_STRATEGIES = ("round_robin", "weighted", "least_conn", "ewma", "hash:ip", "hash:claim:NAME",
                      "hash:header:NAME")

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: header names
_HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
_INTEGER = re.compile(r"[+-]?\d+")
_SIZE = re.compile(r"(\d+)\s*([kmg]?)", re.IGNORECASE)
_BOOLEANS = {"yes": True, "true": True, "on": True, "1": True, "no": False, "false": False, "off": False, "0": False}
# Headers the gateway sets or strips itself; a claim must not be forwarded as one.
_RESERVED_HEADERS = frozenset(("host", "connection", "upgrade", "keep-alive", "te", "trailer", "transfer-encoding",
                               "content-length", "proxy-authorization", "proxy-connection", "authorization",
                               "cookie", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                               "x-request-id", "traceparent", "tracestate", "x-wsgateway-replay"))


# ------------------------------------------------------- reading one value


class _Bad(Exception):
    """A value is wrong; each argument is one problem."""


@dataclass(frozen=True)
class _Value:
    text: str
    origin: str | None  # "env:NAME" / "file:PATH" when indirect; such text is never quoted

    def shown(self) -> str:
        return repr(self.text) if self.origin is None else f"(the value of {self.origin})"


def _choice(*choices: str) -> Callable[[_Value], str]:
    def parse(v: _Value) -> str:
        text = v.text.lower()
        if text in choices:
            return text
        raise _Bad(f"{v.shown()} is not one of {' | '.join(choices)}{_did_you_mean(text, choices)}")
    return parse


def _did_you_mean(word: str, choices: Iterable[str], fmt: str = "'{}'") -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {fmt.format(close[0])}?)" if close else ""


def _text(v: _Value) -> str:
    if not v.text:
        raise _Bad("must not be empty")
    return v.text


def _optional(parse: Callable[[_Value], T]) -> Callable[[_Value], T | None]:
    return lambda v: parse(v) if v.text else None


def _word(v: _Value) -> str:
    if not v.text or any(c.isspace() for c in v.text):
        raise _Bad("must be one word, without whitespace")
    return v.text


def _header_name(v: _Value) -> str:
    if not _TOKEN.fullmatch(v.text):
        raise _Bad(f"{v.shown()} is not a valid HTTP header name")
    return v.text


def _bool(v: _Value) -> bool:
    try:
        return _BOOLEANS[v.text.lower()]
    except KeyError:
        raise _Bad(f"{v.shown()} is not a boolean: use yes/no, true/false, on/off or 1/0") from None


def _int(minimum: int) -> Callable[[_Value], int]:
    def parse(v: _Value) -> int:
        if not _INTEGER.fullmatch(v.text):
            raise _Bad(f"{v.shown()} is not a whole number")
        number = int(v.text)
        if number < minimum:
            raise _Bad("must not be negative" if minimum == 0 else f"must be at least {minimum}")
        return number
    return parse


def _duration(positive: bool = False, what: str = "duration", example: str = "seconds, e.g. 2.5",
              ) -> Callable[[_Value], float]:
    def parse(v: _Value) -> float:
        if not _NUMBER.fullmatch(v.text):
            hint = " (seconds, without a unit)" if re.fullmatch(r"[\d.]+\s*[a-z]+", v.text, re.I) else ""
            raise _Bad(f"invalid {what} {v.shown()}: expected {example}{hint if what == 'duration' else ''}")
        seconds = float(v.text)
        if seconds < 0:
            raise _Bad("must not be negative")
        if positive and seconds == 0:
            raise _Bad("must be greater than 0")
        return seconds
    return parse


def _size(positive: bool = False) -> Callable[[_Value], int]:
    def parse(v: _Value) -> int:
        match = _SIZE.fullmatch(v.text)
        if match is None:
            hint = ""
            short = re.fullmatch(r"(\d+)\s*([kmg])i?b", v.text, re.I)
            if short:
                hint = f" (did you mean '{short.group(1)}{short.group(2).upper()}'?)"
            raise _Bad(f"invalid size {v.shown()}: expected bytes with an optional K, M or G suffix "
                       f"(1M = 1048576){hint}")
        size = int(match.group(1)) * 1024 ** " kmg".index(match.group(2).lower() or " ")
        if positive and size == 0:
            raise _Bad("must be greater than 0")
        return size
    return parse


def _list(item: Callable[[_Value], T]) -> Callable[[_Value], tuple[T, ...]]:
    def parse(v: _Value) -> tuple[T, ...]:
        out: list[T] = []
        problems: list[str] = []
        for word in v.text.split():
            try:
                out.append(item(_Value(word, v.origin)))
            except _Bad as e:
                problems.extend(e.args)
        if problems:
            raise _Bad(*problems)
        return tuple(out)
    return parse


def _origin(v: _Value) -> str:
    bad = _Bad(f"invalid origin {v.shown()}: expected scheme://host[:port] or scheme://*.domain[:port]")
    match = re.fullmatch(r"([a-z][a-z0-9+.-]*)://(\[[0-9a-f:.]+\]|[^:/\[\]]+)(?::(\d{1,5}))?", v.text.lower())
    if match is None:
        raise bad
    scheme, host, port = match.groups()
    if host.startswith("["):
        _ip(host[1:-1], bad)
    elif not _HOSTNAME.fullmatch(host.removeprefix("*.")) or host.endswith("."):
        raise bad
    if port is not None and not 0 < int(port) < 65536:
        raise bad
    if port is not None and (scheme, int(port)) in (("http", 80), ("https", 443)):
        port = None  # browsers never send the default port
    return f"{scheme}://{host}" + (f":{port}" if port else "")


def _ip(text: str, bad: Exception) -> None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise bad from None


def _network(v: _Value) -> IPv4Network | IPv6Network:
    try:
        return ipaddress.ip_network(v.text, strict=False)
    except ValueError:
        raise _Bad(f"{v.shown()} is not an IP network (CIDR such as 10.0.0.0/8, or an address)") from None


def _pairs(what: str, check_name: Callable[[str], bool]) -> Callable[[_Value], tuple[str, str]]:
    def parse(v: _Value) -> tuple[str, str]:
        name, sep, value = v.text.partition("=")
        if not sep or not name or not value or not check_name(name):
            raise _Bad(f"{v.shown()} is not {what}")
        return name, value
    return parse


def _is_token(text: str) -> bool:
    return _TOKEN.fullmatch(text) is not None


def _forward_claim(v: _Value) -> tuple[str, str]:
    claim, sep, header = v.text.rpartition("=")  # header names never hold '=', claim names (URLs) may
    if not sep or not claim or not _TOKEN.fullmatch(header):
        raise _Bad(f"{v.shown()} is not claim=Header-Name")
    if header.lower() in _RESERVED_HEADERS or header.lower().startswith(("sec-websocket-", "proxy-")):
        raise _Bad(f"header {header!r} is set by the gateway itself or hop-by-hop: pick another name")
    return claim, header


def _template(captures: Sequence[str]) -> Callable[[_Value], str]:
    def parse(v: _Value) -> str:
        try:
            check_template(v.text, captures)
        except PatternError as e:
            raise _Bad(f"bad template {v.shown()}: {e}") from None
        return v.text
    return parse


def _upstream_path(captures: Sequence[str]) -> Callable[[_Value], str]:
    def parse(v: _Value) -> str:
        if not v.text.startswith("/"):
            raise _Bad("must start with '/'")
        return _template(captures)(v)
    return parse


def _health_check(v: _Value) -> str:
    text = v.text
    if text.lower() in ("none", "tcp"):
        return text.lower()
    kind, _, path = text.partition(":")
    if kind.lower() in ("http", "ws") and path.startswith("/") and not any(c.isspace() for c in path):
        return f"{kind.lower()}:{path}"
    raise _Bad(f"{v.shown()} is not one of none | tcp | http:/PATH | ws:/PATH")


def _balance(v: _Value) -> str:
    text = v.text
    if text in BALANCE_STRATEGIES[:5]:
        return text
    for prefix, check in (("hash:claim:", lambda s: bool(s) and not any(c.isspace() for c in s)),
                          ("hash:header:", lambda s: bool(_TOKEN.fullmatch(s)))):
        if text.startswith(prefix):
            if check(text[len(prefix):]):
                return text
            raise _Bad(f"{v.shown()}: {prefix}NAME needs a valid NAME")
    raise _Bad(f"{v.shown()} is not one of {' | '.join(BALANCE_STRATEGIES)}"
               f"{_did_you_mean(text, BALANCE_STRATEGIES[:5])}")


# ------------------------------------------------------------- the loader


class _Section:
    """One section's raw values; problems are recorded against [name] key."""

    def __init__(self, loader: _Loader, index: int, name: str, items: Mapping[str, str]) -> None:
        self.loader = loader
        self.index = index
        self.name = name
        self.items = dict(items)
        self.keys = list(items)
        self.failed: set[str] = set()
        self._values: dict[str, _Value | None] = {}

    def error(self, key: str | None, problem: str) -> None:
        position = self.keys.index(key) if key in self.items else len(self.keys)
        where = f"[{self.name}] {key}" if key else f"[{self.name}]"
        self.loader.record((self.index, position), f"{where}: {problem}")
        if key:
            self.failed.add(key)

    def has(self, key: str) -> bool:
        return key in self.items

    def ok(self, *keys: str) -> bool:
        return not self.failed.intersection(keys)

    def value(self, key: str) -> _Value | None:
        if key not in self._values:
            self._values[key] = self.loader.resolve(self, key, self.items[key])
        return self._values[key]

    def get(self, key: str, parse: Callable[[_Value], T], default: T) -> T:
        if key not in self.items:
            return default
        v = self.value(key)
        if v is None:
            return default
        try:
            return parse(v)
        except _Bad as e:
            for problem in e.args:
                self.error(key, problem)
            return default


class _Loader:
    def __init__(self, path: str, environ: Mapping[str, str]) -> None:
        self.path = path
        self.base = os.path.dirname(os.path.abspath(path))
        self.environ = environ
        self._errors: list[tuple[tuple[int, int], int, str]] = []
        self.listeners: list[_Listener] = []

    def record(self, order: tuple[int, int], line: str) -> None:
        self._errors.append((order, len(self._errors), f"{self.path}: {line}"))

    def errors(self) -> list[str]:
        return [line for _, _, line in sorted(self._errors)]

    # -- values

    def resolve(self, sec: _Section, key: str, raw: str) -> _Value | None:
        text = raw.strip()
        if text.startswith("env:"):
            name = text[4:].strip()
            if not _ENV_NAME.fullmatch(name):
                sec.error(key, f"bad environment variable name after 'env:': {name!r}")
            elif name not in self.environ:
                sec.error(key, f"environment variable {name} is not set")
            else:
                return _Value(self.environ[name].strip(), f"env:{name}")
            return None
        if text.startswith("file:"):
            given = text[5:].strip()
            try:
                with open(self.abspath(given), encoding="utf-8") as f:
                    return _Value(f.read().rstrip("\r\n"), f"file:{given}")
            except OSError as e:
                sec.error(key, f"cannot read {self._describe(given)}: {e.strerror or e}")
            except UnicodeDecodeError:
                sec.error(key, f"{self._describe(given)} is not UTF-8 text")
            return None
        return _Value(text, None)

    def abspath(self, given: str) -> str:
        return os.path.normpath(os.path.join(self.base, given))

    def _describe(self, given: str) -> str:
        full = self.abspath(given)
        return repr(given) if given == full else f"{given!r} ({full})"

    def path_value(self, v: _Value) -> str:
        if not v.text:
            raise _Bad("must not be empty")
        return self.abspath(v.text)

    def readable(self, v: _Value) -> str:
        """A file that must exist at start; returns its absolute path."""
        full = self.path_value(v)
        try:
            with open(full, "rb"):
                pass
        except OSError as e:
            raise _Bad(f"cannot read {self._describe(v.text)}: {e.strerror or e}") from None
        return full

    def pem(self, v: _Value, kind: str) -> str:
        """An existing PEM file holding C{kind}: certs, cert, key or public key."""
        full = self.readable(v)
        with open(full, "rb") as f:
            data = f.read()
        try:
            if kind == "certificates":
                x509.load_pem_x509_certificates(data)
            elif kind == "certificate":
                x509.load_pem_x509_certificate(data)
            else:
                serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            what = "an unencrypted PEM private key" if kind == "key" else f"PEM {kind}"
            detail = "encrypted keys are not supported" if "encrypted" in str(e) else f"not {what}"
            raise _Bad(f"{self._describe(v.text)}: {detail}") from None
        return full

    # -- endpoints

    def endpoint(self, desc: str) -> tuple[str, tuple[Any, ...]]:
        """Validate one endpoint string -> (it with absolute paths, what it binds)."""
        try:
            parts = split_endpoint(desc)
        except ValueError as e:
            raise _Bad(f"invalid endpoint {desc!r}: {e}") from None
        kind = (parts[0][1] if parts[0][0] is None else "").lower()
        # Paths in endpoint strings are relative to the INI's folder too.
        path_keys = {"ssl": ("privateKey", "certKey", "extraCertChain", "dhParameters"), "unix": ("address",)}
        for i, (key, value) in enumerate(parts[1:], start=1):
            is_path = key in path_keys.get(kind, ()) or (kind == "unix" and key is None and i == 1)
            if is_path and value:
                parts[i] = (key, self.abspath(value))
        if kind == "ssl" and not any(k == "privateKey" for k, _ in parts):
            raise _Bad(f"invalid endpoint {desc!r}: ssl needs privateKey=KEY.pem (and certKey=CERT.pem)")
        resolved = join_endpoint(parts) if parts != split_endpoint(desc) else desc
        if kind == "ssl":
            # The daemon builds ssl: listeners itself (wsgateway.tls, reloadable
            # on SIGHUP): check them with that same code, whose messages name
            # the file and the problem (missing, not PEM, key not matching).
            try:
                check_listen(resolved)
            except ValueError as e:
                raise _Bad(f"invalid endpoint {desc!r}: {e}") from None
        try:
            serverFromString(None, resolved)  # type: ignore[arg-type]  # parses (loads ssl files), never binds
        except Exception as e:
            raise _Bad(f"invalid endpoint {desc!r}: {e}") from None
        identity: tuple[Any, ...] = (kind, resolved)
        if kind in ("tcp", "tcp6", "ssl"):
            kw = {k: val for k, val in parts if k is not None}
            positional = [val for k, val in parts[1:] if k is None]
            port_text = kw.get("port", positional[0] if positional else "")
            if not port_text.isdigit() or int(port_text) > 65535:
                raise _Bad(f"invalid endpoint {desc!r}: port must be 0-65535")
            interface = kw.get("interface", "")
            if interface:
                _ip(interface, _Bad(f"invalid endpoint {desc!r}: interface must be an IP address"))
            identity = ("inet", int(port_text), interface)
        elif kind == "unix":
            identity = ("unix", next((val for k, val in parts[1:] if k in (None, "address")), ""))
        return resolved, identity


@dataclass(frozen=True)
class _Listener:
    section: _Section | None  # None: a default, not written in the file
    where: str
    desc: str
    identity: tuple[Any, ...]


def _pem(loader: _Loader, kind: str) -> Callable[[_Value], str]:
    return lambda v: loader.pem(v, kind)


def _clash(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    if a[0] != b[0] or a[1] != b[1] or a[0] not in ("inet", "unix") or a[1] == 0:
        return False
    return a[0] == "unix" or a[2] == b[2] or bool({a[2], b[2]} & {"", "0.0.0.0", "::"})


def _report_clashes(listeners: Sequence[_Listener]) -> None:
    for j, b in enumerate(listeners):
        for a in listeners[:j]:
            if _clash(a.identity, b.identity):
                mine, other = (b, a) if b.section else (a, b)
                if mine.section:
                    mine.section.error("listen", f"{mine.desc!r} clashes with {other.desc!r} in {other.where}")
                break


def _endpoints(loader: _Loader, sec: _Section) -> Callable[[_Value], tuple[str, ...]]:
    """The C{listen} key: one or more endpoint strings."""
    def parse(v: _Value) -> tuple[str, ...]:
        checked = _list(lambda w: (w.text, *loader.endpoint(w.text)))(v)
        if not checked:
            raise _Bad("needs at least one endpoint, e.g. tcp:8080")
        loader.listeners.extend(_Listener(sec, f"[{sec.name}] listen", d, i) for d, _, i in checked)
        return tuple(resolved for _, resolved, _ in checked)
    return parse


# ----------------------------------------------------------- the sections


def _gateway(loader: _Loader, sec: _Section) -> GatewaySection:
    d = GatewaySection(node_id="")

    def workers(v: _Value) -> int:
        if v.text.lower() == "auto":
            return os.cpu_count() or 1
        if not _INTEGER.fullmatch(v.text):
            raise _Bad(f"{v.shown()} is not a whole number or auto")
        return _int(1)(v)

    def node_id(v: _Value) -> str:
        if any(c.isspace() or not c.isprintable() for c in v.text):
            raise _Bad("must not contain whitespace")
        return v.text or socket.gethostname()

    return GatewaySection(
        node_id=sec.get("node_id", node_id, socket.gethostname()),
        listen=sec.get("listen", _endpoints(loader, sec), d.listen),
        allowed_origins=sec.get("allowed_origins", _list(_origin), d.allowed_origins),
        trusted_proxies=sec.get("trusted_proxies", _list(_network), d.trusted_proxies),
        workers=sec.get("workers", workers, d.workers),
        shutdown_timeout=sec.get("shutdown_timeout", _duration(), d.shutdown_timeout),
        drain_grace=sec.get("drain_grace", _duration(), d.drain_grace),
    )


# Listen kinds a parent process can bind and hand to its workers (wsgateway.workers.parent).
WORKER_LISTEN_KINDS = ("tcp", "tcp6", "ssl")


def _check_workers(sec: _Section, gateway: GatewaySection, routes: Sequence[RouteConfig], has_redis: bool) -> None:
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


def _admin(loader: _Loader, sec: _Section) -> AdminSection:
    def token(v: _Value) -> str | None:
        if not v.text:
            return None
        if not all(33 <= ord(c) < 127 for c in v.text):
            raise _Bad("must be printable ASCII without spaces (it is sent as 'Authorization: Bearer TOKEN')")
        return v.text

    return AdminSection(
        listen=sec.get("listen", _endpoints(loader, sec), AdminSection().listen),
        token=sec.get("token", token, None),
    )


def _limits(loader: _Loader, sec: _Section) -> Limits:
    d = Limits()
    return Limits(
        max_connections=sec.get("max_connections", _int(0), d.max_connections),
        max_connections_per_ip=sec.get("max_connections_per_ip", _int(0), d.max_connections_per_ip),
        max_message_size=sec.get("max_message_size", _size(), d.max_message_size),
        handshake_timeout=sec.get("handshake_timeout", _duration(positive=True), d.handshake_timeout),
        idle_timeout=sec.get("idle_timeout", _duration(), d.idle_timeout),
        ping_interval=sec.get("ping_interval", _duration(), d.ping_interval),
        ping_timeout=sec.get("ping_timeout", _duration(positive=True), d.ping_timeout),
        messages_per_second=sec.get("messages_per_second", _duration(what="rate", example="a number, e.g. 50"),
                                    d.messages_per_second),
        write_buffer=sec.get("write_buffer", _size(positive=True), d.write_buffer),
    )


def _algorithm(v: _Value) -> str:
    if v.text.lower() == "none":
        raise _Bad("'none' is never accepted")
    known = HMAC_ALGORITHMS + ASYMMETRIC_ALGORITHMS
    if v.text in known:
        return v.text
    upper = {a.upper(): a for a in known}
    hint = f" (did you mean '{upper[v.text.upper()]}'?)" if v.text.upper() in upper else ""
    raise _Bad(f"unknown algorithm {v.shown()}{hint}; known: {' '.join(known)}")


def _key_family(algorithm: str) -> str:
    return {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "EdDSA"}[algorithm[:2]]


def _https(v: _Value) -> str:
    try:
        parts = urlsplit(v.text)
        ok = parts.scheme == "https" and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok:
        raise _Bad("must be an https:// URL")
    return v.text


def _auth(loader: _Loader, sec: _Section) -> AuthConfig:
    d = AuthConfig()
    algorithms = tuple(dict.fromkeys(sec.get("algorithms", _list(_algorithm), ())))
    secret = sec.get("secret", _optional(_text), None)
    public_key_file = sec.get("public_key_file", _optional(loader.readable), None)
    jwks_file = sec.get("jwks_file", _optional(loader.readable), None)
    jwks_url = sec.get("jwks_url", _optional(_https), None)
    jwks_ca = sec.get("jwks_ca", _optional(_pem(loader, "certificates")), None)
    api_keys_file = sec.get("api_keys_file", _optional(loader.readable), None)
    sources = [k for k, val in (("public_key_file", public_key_file), ("jwks_file", jwks_file),
                                ("jwks_url", jwks_url)) if val]
    # Cross-checks only on values that parsed, so one mistake is not reported three times.
    if sec.ok("algorithms", "secret", "public_key_file", "jwks_file", "jwks_url", "api_keys_file"):
        algorithms = _check_jwt_keys(sec, algorithms, secret, sources)
        if not algorithms and not api_keys_file and not secret and not sources:
            sec.error(None, "nothing to authenticate with: set secret, public_key_file, jwks_file, jwks_url "
                            "or api_keys_file")
        if public_key_file and sec.ok("public_key_file", "algorithms"):
            _check_public_key(sec, public_key_file, algorithms)
        if jwks_file and sec.ok("jwks_file"):
            _check_jwks(sec, jwks_file)
        if api_keys_file and sec.ok("api_keys_file"):
            try:
                load_api_keys(api_keys_file)
            except (ValueError, OSError) as e:
                sec.error("api_keys_file", f"{os.path.basename(api_keys_file)!r} {e}")
    if jwks_ca and not jwks_url and sec.ok("jwks_url"):
        sec.error("jwks_ca", "set, but jwks_url is not")
    return AuthConfig(
        algorithms=algorithms,
        secret=secret,
        public_key_file=public_key_file,
        jwks_file=jwks_file,
        jwks_url=jwks_url,
        jwks_refresh=sec.get("jwks_refresh", _duration(positive=True), d.jwks_refresh),
        jwks_ca=jwks_ca,
        api_keys_file=api_keys_file,
        api_key_header=sec.get("api_key_header", _header_name, d.api_key_header),
        issuer=sec.get("issuer", _optional(_text), None),
        audience=sec.get("audience", _optional(_text), None),
        leeway=sec.get("leeway", _duration(), d.leeway),
        query_param=sec.get("query_param", lambda v: _word(v) if v.text else "", d.query_param),
        subprotocol_prefix=sec.get("subprotocol_prefix", lambda v: _header_name(v) if v.text else "",
                                   d.subprotocol_prefix),
        forward_claims=sec.get("forward_claims", _unique(_list(_forward_claim), "header", 1), d.forward_claims),
    )


def _check_jwt_keys(sec: _Section, algorithms: tuple[str, ...], secret: str | None,
                    sources: list[str]) -> tuple[str, ...]:
    """The algorithms/key rules of [auth]; returns the algorithms with the default applied."""
    if not sec.has("algorithms"):
        # the documented default HS256 goes with a secret; asymmetric keys need an explicit list;
        # neither: no JWTs at all, API keys only.
        if secret is not None:
            algorithms = ("HS256",)
        elif sources:
            sec.error(sources[0], "needs an explicit 'algorithms' list, e.g. algorithms = RS256")
            return algorithms
    hmac = [a for a in algorithms if a in HMAC_ALGORITHMS]
    asym = [a for a in algorithms if a not in HMAC_ALGORITHMS]
    if hmac and asym:
        sec.error("algorithms", f"{hmac[0]} and {asym[0]} cannot be mixed: an HMAC secret must never "
                                "verify an asymmetric token")
    elif hmac:
        need = max(_HMAC_MIN_BYTES[a] for a in hmac)
        if secret is None:
            sec.error("algorithms", f"{hmac[0]} needs 'secret'")
        elif len(secret.encode()) < need:
            sec.error("secret", f"too short for {hmac[-1]}: use at least {need} bytes (RFC 7518 section 3.2)")
        for k in sources:
            sec.error(k, "set, but only HS* algorithms are listed: a key file is for asymmetric algorithms")
    elif asym:
        if not sources:
            sec.error("algorithms", f"{asym[0]} needs one of public_key_file, jwks_file, jwks_url")
        elif len(sources) > 1:
            sec.error(sources[1], f"set only one of public_key_file, jwks_file, jwks_url ({sources[0]} is set too)")
        if secret is not None:
            sec.error("secret", "set, but no HS* algorithm is listed")
    else:  # "algorithms =" : JWTs switched off
        for k in (["secret"] if secret is not None else []) + sources:
            sec.error(k, "set, but algorithms is empty (no JWTs accepted)")
    return algorithms


def _check_public_key(sec: _Section, path: str, algorithms: Sequence[str]) -> None:
    with open(path, "rb") as f:
        data = f.read()
    key: Any
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = x509.load_pem_x509_certificate(data).public_key()
        except ValueError:
            sec.error("public_key_file", f"{os.path.basename(path)!r} is not a PEM public key or certificate")
            return
    family = ("RSA" if isinstance(key, rsa.RSAPublicKey) else "EC" if isinstance(key, ec.EllipticCurvePublicKey)
              else "EdDSA" if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)) else "other")
    for a in algorithms:
        if a in HMAC_ALGORITHMS:
            continue
        if _key_family(a) != family:
            sec.error("public_key_file", f"holds a {family} key, which cannot verify {a}")
        elif a in _EC_CURVES and key.curve.name != _EC_CURVES[a]:
            sec.error("public_key_file", f"holds a {key.curve.name} key, but {a} needs {_EC_CURVES[a]}")


def _check_jwks(sec: _Section, path: str) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (ValueError, OSError) as e:
        sec.error("jwks_file", f"{os.path.basename(path)!r} is not JSON: {e}")
        return
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list) or not keys or not all(isinstance(k, dict) and "kty" in k for k in keys):
        sec.error("jwks_file", f"{os.path.basename(path)!r} is not a JWKS document "
                               "(an object with a non-empty \"keys\" list of JWKs)")


def _unique(parse: Callable[[_Value], tuple[tuple[str, str], ...]], what: str,
            index: int) -> Callable[[_Value], tuple[tuple[str, str], ...]]:
    def check(v: _Value) -> tuple[tuple[str, str], ...]:
        pairs = parse(v)
        seen: set[str] = set()
        for pair in pairs:
            if pair[index].lower() in seen:
                raise _Bad(f"{what} {pair[index]!r} appears twice")
            seen.add(pair[index].lower())
        return pairs
    return check


def _redis(loader: _Loader, sec: _Section) -> RedisConfig:
    def url(v: _Value) -> str:
        # Never quote the URL: it may carry a password.
        usage = "must be redis://HOST[:PORT][/DB], rediss://HOST[:PORT][/DB] or unix:///PATH"
        try:
            parts = urlsplit(v.text)
        except ValueError:
            raise _Bad(usage) from None
        if parts.scheme in ("redis", "rediss"):
            try:
                parts.port
            except ValueError:
                raise _Bad(f"{usage}: bad port") from None
            if not parts.hostname or not re.fullmatch(r"(/\d*)?", parts.path) or parts.query or parts.fragment:
                raise _Bad(usage)
        elif parts.scheme != "unix" or parts.netloc or not parts.path.startswith("/"):
            raise _Bad(usage)
        return v.text

    return RedisConfig(url=sec.get("url", url, RedisConfig().url), prefix=sec.get("prefix", _word, "wsgw"))


def _queue(loader: _Loader, sec: _Section | None, has_redis: bool) -> QueueConfig:
    d = QueueConfig()
    if sec is None:
        return QueueConfig(path=loader.abspath(d.path))
    backend = sec.get("backend", _choice("sqlite", "redis"), d.backend)
    if backend == "redis" and not has_redis:
        sec.error("backend", "backend = redis needs a [redis] section")
    return QueueConfig(
        path=sec.get("path", loader.path_value, loader.abspath(d.path)),
        backend=backend,
        max_attempts=sec.get("max_attempts", _int(1), d.max_attempts),
        retention=sec.get("retention", _duration(positive=True), d.retention),
    )


def _log(loader: _Loader, sec: _Section) -> LogConfig:
    def level(v: _Value) -> str:
        return "warn" if v.text.lower() == "warning" else _choice(*LOG_LEVELS)(v)

    def file(v: _Value) -> str:
        if v.text == "-":
            return "-"
        full = loader.path_value(v)
        if not os.path.isdir(os.path.dirname(full)):
            raise _Bad(f"folder {os.path.dirname(full)!r} does not exist")
        return full

    return LogConfig(level=sec.get("level", level, "info"), format=sec.get("format", _choice("json", "text"), "json"),
                     file=sec.get("file", file, "-"))


def _node(number: int, line: str) -> NodeConfig:
    url, *labels = line.split()
    where = f"node {number} {url!r}"
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise _Bad(f"{where}: {e}") from None
    if "@" in parts.netloc:
        raise _Bad(f"node {number}: credentials in the URL are not supported")
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss"):
        raise _Bad(f"{where}: scheme must be ws:// or wss://")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise _Bad(f"{where}: port must be 1-65535")
    port = port or (443 if scheme == "wss" else 80)
    host = parts.hostname or ""
    if ":" in host:
        _ip(host, _Bad(f"{where}: bad IPv6 address"))
    elif not _HOSTNAME.fullmatch(host):
        raise _Bad(f"{where}: needs a host name or IP address")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise _Bad(f"{where}: no query or fragment allowed")
    found: dict[str, str] = {}
    for label in labels:
        key, sep, value = label.partition("=")
        if not sep or not _NAME.fullmatch(key) or not value:
            raise _Bad(f"{where}: label {label!r} is not key=value (one node per line)")
        if key in found:
            raise _Bad(f"{where}: label {key!r} given twice")
        found[key] = value
    weight = found.get("weight", "1")
    if not weight.isdigit() or int(weight) < 1:
        raise _Bad(f"{where}: weight must be a whole number of at least 1")
    return NodeConfig(url=url, scheme=scheme, host=host, port=port, path=parts.path, weight=int(weight),
                      zone=found.get("zone"), version=found.get("version"), labels=FrozenMap(found))


def _nodes(v: _Value) -> tuple[NodeConfig, ...]:
    nodes: list[NodeConfig] = []
    problems: list[str] = []
    for number, line in enumerate((ln for ln in v.text.splitlines() if ln.strip()), start=1):
        try:
            node = _node(number, line)
        except _Bad as e:
            problems.extend(e.args)
            continue
        if any((n.scheme, n.host, n.port, n.path) == (node.scheme, node.host, node.port, node.path) for n in nodes):
            problems.append(f"node {number} {node.url!r} is listed twice")
        nodes.append(node)
    if problems:
        raise _Bad(*problems)
    if not nodes:
        raise _Bad("needs at least one node, one per line: URL then key=value labels")
    return tuple(nodes)


def _upstream(loader: _Loader, sec: _Section, name: str) -> UpstreamConfig:
    d = UpstreamConfig(name, ())
    if not sec.has("nodes"):
        sec.error(None, "missing required key 'nodes'")
    nodes = sec.get("nodes", _nodes, ())
    zone = sec.get("zone", _optional(_word), None)
    if zone and nodes and not any(n.zone == zone for n in nodes):
        sec.error("zone", f"no node has the label zone={zone}")
    tls = {k: sec.get(k, _optional(_pem(loader, kind)), None)
           for k, kind in (("tls_ca", "certificates"), ("tls_cert", "certificate"), ("tls_key", "key"))}
    for k, other in (("tls_cert", "tls_key"), ("tls_key", "tls_cert")):
        if tls[k] and not sec.has(other):
            sec.error(k, f"needs {other} too (client certificate for mTLS)")
    for k in tls:
        if tls[k] and nodes and not any(n.scheme == "wss" for n in nodes):
            sec.error(k, "set, but no node uses wss://")
    if tls["tls_cert"] and tls["tls_key"]:
        _check_key_pair(sec, tls["tls_cert"], tls["tls_key"])
    backoff_initial = sec.get("backoff_initial", _duration(), d.backoff_initial)
    backoff_max = sec.get("backoff_max", _duration(), d.backoff_max)
    if backoff_max < backoff_initial and sec.ok("backoff_initial", "backoff_max"):
        sec.error("backoff_max", f"must not be less than backoff_initial ({backoff_initial:g})")
    return UpstreamConfig(
        name=name,
        nodes=nodes,
        balance=sec.get("balance", _balance, d.balance),
        zone=zone,
        version_header=sec.get("version_header", _optional(_header_name), None),
        connect_timeout=sec.get("connect_timeout", _duration(positive=True), d.connect_timeout),
        retries=sec.get("retries", _int(0), d.retries),
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
        tls_ca=tls["tls_ca"],
        tls_cert=tls["tls_cert"],
        tls_key=tls["tls_key"],
        health_check=sec.get("health_check", _health_check, d.health_check),
        health_interval=sec.get("health_interval", _duration(positive=True), d.health_interval),
        health_timeout=sec.get("health_timeout", _duration(positive=True), d.health_timeout),
        healthy_threshold=sec.get("healthy_threshold", _int(1), d.healthy_threshold),
        unhealthy_threshold=sec.get("unhealthy_threshold", _int(1), d.unhealthy_threshold),
        reconnect_buffer=sec.get("reconnect_buffer", _size(), d.reconnect_buffer),
    )


def _check_key_pair(sec: _Section, cert_path: str, key_path: str) -> None:
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        sec.error("tls_key", "does not match the certificate in tls_cert")


_PROXY_ONLY: Mapping[str, object] = FrozenMap({
    "upstream": None, "strip_prefix": False, "upstream_path": None, "forward_auth": False, "mirror": None,
    "delivery": "at_most_once", "on_upstream_close": "close", "subscribe": ()})
_BROADCAST_ONLY: Mapping[str, object] = FrozenMap({"channel": None, "client_publish": True})


def _route(loader: _Loader, sec: _Section, name: str, upstreams: Sequence[str], has_auth: bool,
           seen: dict[tuple[Any, ...], str]) -> RouteConfig:
    if not sec.has("path"):
        sec.error(None, "missing required key 'path'")

    def pattern(v: _Value) -> tuple[str, tuple[str, ...], bool]:
        try:
            compiled = compile_pattern(v.text)
        except PatternError as e:
            raise _Bad(f"bad path pattern {v.shown()}: {e}") from None
        return compiled.source, compiled.captures, compiled.has_rest

    path, captures, has_rest = sec.get("path", pattern, ("", (), False))

    def host(v: _Value) -> str | None:
        try:
            check_host(v.text)
        except PatternError as e:
            raise _Bad(str(e)) from None
        return v.text or None

    def upstream_name(v: _Value) -> str | None:
        if v.text and v.text not in upstreams:
            raise _Bad(f"no section [upstream:{v.text}]{_did_you_mean(v.text, upstreams, '[upstream:{}]')}")
        return v.text or None

    values: dict[str, Any] = dict(
        host=sec.get("host", host, None),
        headers=sec.get("headers", _unique(_list(_pairs("Name=value", _is_token)), "header", 0), ()),
        mode=sec.get("mode", _choice("proxy", "broadcast"), "proxy"),
        upstream=sec.get("upstream", upstream_name, None),
        strip_prefix=sec.get("strip_prefix", _bool, False),
        upstream_path=sec.get("upstream_path", _optional(_upstream_path(captures)), None),
        auth=sec.get("auth", _choice("required", "optional", "none"), "required" if has_auth else "none"),
        roles=sec.get("roles", _list(_word), ()),
        forward_auth=sec.get("forward_auth", _bool, False),
        allowed_origins=sec.get("allowed_origins", lambda v: _list(_origin)(v) or None, None),
        mirror=sec.get("mirror", upstream_name, None),
        delivery=sec.get("delivery", _choice("at_most_once", "at_least_once"), "at_most_once"),
        on_upstream_close=sec.get("on_upstream_close", _choice("close", "reconnect"), "close"),
        channel=sec.get("channel", _optional(_template(captures)), None),
        client_publish=sec.get("client_publish", _bool, True),
        slow_consumer=sec.get("slow_consumer", _choice("close", "drop_oldest"), "close"),
        subscribe=sec.get("subscribe", _list(_template(captures)), ()),
    )
    mode = values["mode"]
    if sec.ok("mode"):
        wrong, right = (_PROXY_ONLY, "proxy") if mode == "broadcast" else (_BROADCAST_ONLY, "broadcast")
        for key, default in wrong.items():
            if values[key] != default:
                sec.error(key, f"only applies to mode = {right}")
        if mode == "proxy" and values["upstream"] is None and sec.ok("upstream"):
            sec.error("upstream", "required with mode = proxy: name an [upstream:NAME] section")
        if mode == "broadcast" and values["channel"] is None and sec.ok("channel"):
            sec.error("channel", "required with mode = broadcast, e.g. channel = room:{room}")
        if mode == "proxy" and values["slow_consumer"] != "close" and not values["subscribe"]:
            sec.error("slow_consumer", "only applies to broadcast routes and routes with subscribe")
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


# ----------------------------------------------------------------- load()

_SINGLE = ("gateway", "admin", "limits", "auth", "redis", "queue", "log", "demo")


def _section_kind(name: str) -> tuple[str, str] | str:
    """-> (kind, NAME) for a known section, else the problem."""
    if name in _SINGLE:
        return name, ""
    kind, sep, rest = name.partition(":")
    if kind in ("route", "upstream"):
        if not sep or not rest:
            return f"needs a name: [{kind}:NAME]"
        if not _NAME.fullmatch(rest):
            return f"bad name {rest!r}: use letters, digits, '_', '.' and '-'"
        return kind, rest
    close = difflib.get_close_matches(kind if sep else name, [*_SINGLE, "route", "upstream"], n=1, cutoff=0.6)
    if close and close[0] in ("route", "upstream"):
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


def load(path: str, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate the INI file; raise L{ConfigError} listing every problem found."""
    parser = _parse_ini(path)
    loader = _Loader(path, os.environ if environ is None else environ)
    sections: list[tuple[str, str, _Section]] = []
    for index, name in enumerate(parser.sections()):
        sec = _Section(loader, index, name, parser[name])
        found = _section_kind(name)
        if isinstance(found, str):
            sec.error(None, found)
            continue
        sections.append((found[0], found[1], sec))
        for key in sec.keys:
            if key not in KNOWN_KEYS[found[0]]:
                homes = [k + (":NAME" if k in ("route", "upstream") else "") for k in KNOWN_KEYS
                         if key in KNOWN_KEYS[k]]
                hint = f" (it belongs in [{homes[0]}])" if homes else _did_you_mean(key, KNOWN_KEYS[found[0]])
                sec.error(key, f"unknown key {key!r}{hint}")
                del sec.items[key]
    kinds = {kind for kind, _, _ in sections}
    upstream_names = [name for kind, name, _ in sections if kind == "upstream"]
    single: dict[str, Any] = {}
    routes: list[RouteConfig] = []
    upstreams: dict[str, UpstreamConfig] = {}
    seen_routes: dict[tuple[Any, ...], str] = {}
    builders: dict[str, Callable[[_Loader, _Section], Any]] = {
        "gateway": _gateway, "admin": _admin, "limits": _limits, "auth": _auth, "redis": _redis, "log": _log,
        "demo": lambda ld, s: DemoConfig(listen=s.get("listen", _endpoints(ld, s), DemoConfig().listen)),
        "queue": lambda ld, s: _queue(ld, s, "redis" in kinds),
    }
    for kind, name, sec in sections:
        if kind == "route":
            routes.append(_route(loader, sec, name, upstream_names, "auth" in kinds, seen_routes))
        elif kind == "upstream":
            upstreams[name] = _upstream(loader, sec, name)
        else:
            single[kind] = builders[kind](loader, sec)
    if "gateway" not in single:
        single["gateway"] = GatewaySection()
    by_kind = {kind: sec for kind, _, sec in sections}
    for kind, default in (("gateway", GatewaySection.listen), ("admin", AdminSection.listen),
                          ("demo", DemoConfig.listen)):
        # A listener left at its default still takes part in the clash check.
        present = by_kind.get(kind)
        if (present is not None or kind == "gateway") and (present is None or not present.has("listen")):
            loader.listeners.extend(_Listener(None, f"[{kind}] listen (default)", d, loader.endpoint(d)[1])
                                    for d in default)
    _report_clashes(loader.listeners)
    if "gateway" in by_kind and single["gateway"].workers > 1:
        _check_workers(by_kind["gateway"], single["gateway"], routes, "redis" in kinds)
    if not routes and not any(kind == "route" for kind, _, _ in sections):
        loader.record((len(parser.sections()) + 1, 0), "[gateway]: no [route:NAME] section: nothing to serve")
    errors = loader.errors()
    if errors:
        raise ConfigError(errors)
    return GatewayConfig(
        path=path,
        gateway=single["gateway"],
        admin=single.get("admin"),
        limits=single.get("limits", Limits()),
        auth=single.get("auth"),
        redis=single.get("redis"),
        queue=single.get("queue") or _queue(loader, None, False),
        log=single.get("log", LogConfig()),
        demo=single.get("demo"),
        routes=tuple(routes),
        upstreams=FrozenMap(upstreams),
    )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def main(argv: list[str] | None = None) -> int:
    """C{wsgateway-check CONFIG}: 0 and a summary when valid, else 1 and one problem per line on stderr."""
    args = sys.argv[1:] if argv is None else list(argv)
    usage = "usage: wsgateway-check CONFIG\n\nValidate a wsgateway INI file without starting anything."
    if args and args[0] in ("-h", "--help"):
        print(usage)
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        print(usage.splitlines()[0], file=sys.stderr)
        return 1
    try:
        config = load(args[0])
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 1
    print(f"{args[0]}: OK, {_plural(len(config.routes), 'route')}, {_plural(len(config.upstreams), 'upstream')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
