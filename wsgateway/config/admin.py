# -*- test-case-name: tests.unit.config.test_admin_section -*-
"""The [admin] section: the admin API's listeners, bearer token and the bounds of its port."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from wsgateway.config.listen import listen_key
from wsgateway.config.reader import Reader, Section
from wsgateway.config.values import Bad, Value, integer, size
from wsgateway.endpoints import split_endpoint

__all__ = ["MIN_PUBLIC_TOKEN", "AdminConfig", "loopback_only", "read_admin"]

# A token that answers on a network must resist guessing: 32 characters of
# `openssl rand -hex 32` or `token_urlsafe` are well over 128 bits.
MIN_PUBLIC_TOKEN = 32


@dataclass(frozen=True)
class AdminConfig:
    listen: tuple[str, ...] = ("tcp:9090:interface=127.0.0.1",)
    token: str | None = None  # None = /admin/* disabled
    max_connections: int = 64
    max_body: int = 64 * 1024


def loopback_only(desc: str) -> bool:
    """
    Whether the endpoint string ``desc`` (already checked) can be reached from
    this host only: a unix socket, or tcp/tcp6/ssl bound to 127.0.0.0/8 or ::1.
    No interface means every interface; a kind we cannot judge counts as public.
    """
    parts = split_endpoint(desc)
    kind = (parts[0][1] if parts[0][0] is None else "").lower()
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    named = {k: v for k, v in parts[1:] if k is not None}
    positional = [v for k, v in parts[1:] if k is None]
    # Twisted reads tcp:PORT:INTERFACE positionally too (tcp6 and ssl take other
    # positionals there, and name their interface)
    interface = named.get("interface", positional[1] if kind == "tcp" and len(positional) > 1 else "")
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def read_admin(reader: Reader, sec: Section) -> AdminConfig:
    d = AdminConfig()

    def token(v: Value) -> str | None:
        if not v.text:
            return None
        if not all(33 <= ord(c) < 127 for c in v.text):
            raise Bad("must be printable ASCII without spaces (it is sent as 'Authorization: Bearer TOKEN')")
        return v.text

    config = AdminConfig(
        listen=sec.get("listen", listen_key(reader, sec), d.listen),
        token=sec.get("token", token, d.token),
        max_connections=sec.get("max_connections", integer(1), d.max_connections),
        max_body=sec.get("max_body", size(positive=True), d.max_body),
    )
    if config.token is not None and len(config.token) < MIN_PUBLIC_TOKEN and sec.ok("listen"):
        public = [desc for desc in config.listen if not loopback_only(desc)]
        if public:
            # never the token itself, nor its length: it may have come from env: or file:
            sec.error("token", f"shorter than {MIN_PUBLIC_TOKEN} characters while the admin port listens beyond "
                               f"loopback ({public[0]!r}): use a longer one (e.g. the output of 'openssl rand -hex "
                               f"32'), or bind [admin] listen to 127.0.0.1, ::1 or a unix: socket")
    return config
