# -*- test-case-name: tests.unit.config.test_config -*-
"""
The [upstream:NAME] sections: a pool of backend nodes (one URL and its labels per line),
how to balance, retry, health-check and reach them (mTLS), and the reconnect buffer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from wsgateway.config.reader import NOT_A_KEY, Reader, Section
from wsgateway.config.values import (
    HOSTNAME,
    NAME,
    TOKEN,
    Bad,
    FrozenMap,
    Value,
    check_ip,
    did_you_mean,
    duration,
    header_name,
    integer,
    optional,
    size,
    word,
)

__all__ = ["BALANCE_STRATEGIES", "NodeConfig", "UpstreamConfig", "read_upstream"]


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
    name: str = field(metadata=NOT_A_KEY)  # the NAME of [upstream:NAME]
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


BALANCE_STRATEGIES = ("round_robin", "weighted", "least_conn", "ewma", "hash:ip", "hash:claim:NAME",
                      "hash:header:NAME")


def _health_check(v: Value) -> str:
    text = v.text
    if text.lower() in ("none", "tcp"):
        return text.lower()
    kind, _, path = text.partition(":")
    if kind.lower() in ("http", "ws") and path.startswith("/") and not any(c.isspace() for c in path):
        return f"{kind.lower()}:{path}"
    raise Bad(f"{v.shown()} is not one of none | tcp | http:/PATH | ws:/PATH")


def _balance(v: Value) -> str:
    text = v.text
    if text in BALANCE_STRATEGIES[:5]:
        return text
    for prefix, check in (("hash:claim:", lambda s: bool(s) and not any(c.isspace() for c in s)),
                          ("hash:header:", lambda s: bool(TOKEN.fullmatch(s)))):
        if text.startswith(prefix):
            if check(text[len(prefix):]):
                return text
            raise Bad(f"{v.shown()}: {prefix}NAME needs a valid NAME")
    raise Bad(f"{v.shown()} is not one of {' | '.join(BALANCE_STRATEGIES)}"
              f"{did_you_mean(text, BALANCE_STRATEGIES[:5])}")


def _node(number: int, line: str) -> NodeConfig:
    url, *labels = line.split()
    where = f"node {number} {url!r}"
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise Bad(f"{where}: {e}") from None
    if "@" in parts.netloc:
        raise Bad(f"node {number}: credentials in the URL are not supported")
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss"):
        raise Bad(f"{where}: scheme must be ws:// or wss://")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise Bad(f"{where}: port must be 1-65535")
    port = port or (443 if scheme == "wss" else 80)
    host = parts.hostname or ""
    if ":" in host:
        check_ip(host, Bad(f"{where}: bad IPv6 address"))
    elif not HOSTNAME.fullmatch(host):
        raise Bad(f"{where}: needs a host name or IP address")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise Bad(f"{where}: no query or fragment allowed")
    found: dict[str, str] = {}
    for label in labels:
        key, sep, value = label.partition("=")
        if not sep or not NAME.fullmatch(key) or not value:
            raise Bad(f"{where}: label {label!r} is not key=value (one node per line)")
        if key in found:
            raise Bad(f"{where}: label {key!r} given twice")
        found[key] = value
    weight = found.get("weight", "1")
    if not weight.isdigit() or int(weight) < 1:
        raise Bad(f"{where}: weight must be a whole number of at least 1")
    return NodeConfig(url=url, scheme=scheme, host=host, port=port, path=parts.path, weight=int(weight),
                      zone=found.get("zone"), version=found.get("version"), labels=FrozenMap(found))


def _nodes(v: Value) -> tuple[NodeConfig, ...]:
    nodes: list[NodeConfig] = []
    problems: list[str] = []
    for number, line in enumerate((ln for ln in v.text.splitlines() if ln.strip()), start=1):
        try:
            node = _node(number, line)
        except Bad as e:
            problems.extend(e.args)
            continue
        if any((n.scheme, n.host, n.port, n.path) == (node.scheme, node.host, node.port, node.path) for n in nodes):
            problems.append(f"node {number} {node.url!r} is listed twice")
        nodes.append(node)
    if problems:
        raise Bad(*problems)
    if not nodes:
        raise Bad("needs at least one node, one per line: URL then key=value labels")
    return tuple(nodes)


def read_upstream(reader: Reader, sec: Section, name: str) -> UpstreamConfig:
    d = UpstreamConfig(name, ())
    if not sec.has("nodes"):
        sec.error(None, "missing required key 'nodes'")
    nodes = sec.get("nodes", _nodes, d.nodes)
    zone = sec.get("zone", optional(word), d.zone)
    if zone and nodes and not any(n.zone == zone for n in nodes):
        sec.error("zone", f"no node has the label zone={zone}")
    tls = {k: sec.get(k, optional(reader.pem(kind)), getattr(d, k))
           for k, kind in (("tls_ca", "certificates"), ("tls_cert", "certificate"), ("tls_key", "key"))}
    for k, other in (("tls_cert", "tls_key"), ("tls_key", "tls_cert")):
        if tls[k] and not sec.has(other):
            sec.error(k, f"needs {other} too (client certificate for mTLS)")
    for k in tls:
        if tls[k] and nodes and not any(n.scheme == "wss" for n in nodes):
            sec.error(k, "set, but no node uses wss://")
    if tls["tls_cert"] and tls["tls_key"]:
        _check_key_pair(sec, tls["tls_cert"], tls["tls_key"])
    backoff_initial = sec.get("backoff_initial", duration(), d.backoff_initial)
    backoff_max = sec.get("backoff_max", duration(), d.backoff_max)
    if backoff_max < backoff_initial and sec.ok("backoff_initial", "backoff_max"):
        sec.error("backoff_max", f"must not be less than backoff_initial ({backoff_initial:g})")
    return UpstreamConfig(
        name=name,
        nodes=nodes,
        balance=sec.get("balance", _balance, d.balance),
        zone=zone,
        version_header=sec.get("version_header", optional(header_name), d.version_header),
        connect_timeout=sec.get("connect_timeout", duration(positive=True), d.connect_timeout),
        retries=sec.get("retries", integer(0), d.retries),
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
        tls_ca=tls["tls_ca"],
        tls_cert=tls["tls_cert"],
        tls_key=tls["tls_key"],
        health_check=sec.get("health_check", _health_check, d.health_check),
        health_interval=sec.get("health_interval", duration(positive=True), d.health_interval),
        health_timeout=sec.get("health_timeout", duration(positive=True), d.health_timeout),
        healthy_threshold=sec.get("healthy_threshold", integer(1), d.healthy_threshold),
        unhealthy_threshold=sec.get("unhealthy_threshold", integer(1), d.unhealthy_threshold),
        reconnect_buffer=sec.get("reconnect_buffer", size(), d.reconnect_buffer),
    )


def _check_key_pair(sec: Section, cert_path: str, key_path: str) -> None:
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        sec.error("tls_key", "does not match the certificate in tls_cert")
