# -*- test-case-name: tests.unit.config.test_config -*-
"""The [gateway] section: this server's node id, listeners, origins, proxies, workers and shutdown."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

from wsgateway.config.listen import listen_key
from wsgateway.config.reader import Reader, Section
from wsgateway.config.values import (
    INTEGER,
    Bad,
    Value,
    duration,
    integer,
    list_of,
    network,
    origin,
)

__all__ = ["ServerConfig", "read_gateway"]


@dataclass(frozen=True)
class ServerConfig:
    node_id: str = field(default_factory=socket.gethostname)
    listen: tuple[str, ...] = ("tcp:8080",)
    allowed_origins: tuple[str, ...] = ()  # () = any Origin
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    workers: int = 1
    shutdown_timeout: float = 10.0
    drain_grace: float = 2.0


def read_gateway(reader: Reader, sec: Section) -> ServerConfig:
    d = ServerConfig()

    def workers(v: Value) -> int:
        if v.text.lower() == "auto":
            return os.cpu_count() or 1
        if not INTEGER.fullmatch(v.text):
            raise Bad(f"{v.shown()} is not a whole number or auto")
        return integer(1)(v)

    def node_id(v: Value) -> str:
        if any(c.isspace() or not c.isprintable() for c in v.text):
            raise Bad("must not contain whitespace")
        return v.text or socket.gethostname()

    def proxy(v: Value) -> IPv4Network | IPv6Network:
        net = network(v)
        if net.prefixlen == 0:
            # every address would be believed about X-Forwarded-For: per-IP limits and logs at the client's word
            raise Bad(f"{v.shown()} trusts every address: list the proxies' own addresses or networks")
        return net

    return ServerConfig(
        node_id=sec.get("node_id", node_id, d.node_id),
        listen=sec.get("listen", listen_key(reader, sec), d.listen),
        allowed_origins=sec.get("allowed_origins", list_of(origin), d.allowed_origins),
        trusted_proxies=sec.get("trusted_proxies", list_of(proxy), d.trusted_proxies),
        workers=sec.get("workers", workers, d.workers),
        shutdown_timeout=sec.get("shutdown_timeout", duration(), d.shutdown_timeout),
        drain_grace=sec.get("drain_grace", duration(), d.drain_grace),
    )
