# -*- test-case-name: tests.unit.config.test_config -*-
"""The [admin] section: the admin API's listeners and bearer token."""

from __future__ import annotations

from dataclasses import dataclass

from wsgateway.config.listen import listen_key
from wsgateway.config.reader import Reader, Section
from wsgateway.config.values import Bad, Value

__all__ = ["AdminConfig", "read_admin"]


@dataclass(frozen=True)
class AdminConfig:
    listen: tuple[str, ...] = ("tcp:9090:interface=127.0.0.1",)
    token: str | None = None  # None = /admin/* disabled


def read_admin(reader: Reader, sec: Section) -> AdminConfig:
    d = AdminConfig()

    def token(v: Value) -> str | None:
        if not v.text:
            return None
        if not all(33 <= ord(c) < 127 for c in v.text):
            raise Bad("must be printable ASCII without spaces (it is sent as 'Authorization: Bearer TOKEN')")
        return v.text

    return AdminConfig(
        listen=sec.get("listen", listen_key(reader, sec), d.listen),
        token=sec.get("token", token, d.token),
    )
