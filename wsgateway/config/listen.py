# -*- test-case-name: tests.unit.config.test_config -*-
"""
The C{listen} keys of [gateway], [admin] and [demo]: endpoint strings, and listeners that clash.

No reactor here: endpoint strings are checked with C{serverFromString(None, s)}, which
parses (and for C{ssl:} loads the key and certificate) without binding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.endpoints import serverFromString

from wsgateway.config.reader import Listener, Reader, Section
from wsgateway.config.values import Bad, Value, check_ip, list_of
from wsgateway.endpoints import join_endpoint, split_endpoint
from wsgateway.tls import check_listen

__all__ = ["check_endpoint", "listen_key", "report_clashes"]


def check_endpoint(reader: Reader, desc: str) -> tuple[str, tuple[Any, ...]]:
    """Validate one endpoint string -> (it with absolute paths, what it binds)."""
    try:
        parts = split_endpoint(desc)
    except ValueError as e:
        raise Bad(f"invalid endpoint {desc!r}: {e}") from None
    kind = (parts[0][1] if parts[0][0] is None else "").lower()
    # Paths in endpoint strings are relative to the INI's folder too.
    path_keys = {"ssl": ("privateKey", "certKey", "extraCertChain", "dhParameters"), "unix": ("address",)}
    for i, (key, value) in enumerate(parts[1:], start=1):
        is_path = key in path_keys.get(kind, ()) or (kind == "unix" and key is None and i == 1)
        if is_path and value:
            parts[i] = (key, reader.abspath(value))
    if kind == "ssl" and not any(k == "privateKey" for k, _ in parts):
        raise Bad(f"invalid endpoint {desc!r}: ssl needs privateKey=KEY.pem (and certKey=CERT.pem)")
    resolved = join_endpoint(parts) if parts != split_endpoint(desc) else desc
    if kind == "ssl":
        # The daemon builds ssl: listeners itself (wsgateway.tls, reloadable
        # on SIGHUP): check them with that same code, whose messages name
        # the file and the problem (missing, not PEM, key not matching).
        try:
            check_listen(resolved)
        except ValueError as e:
            raise Bad(f"invalid endpoint {desc!r}: {e}") from None
    try:
        serverFromString(None, resolved)  # parses (loads ssl files), never binds
    except Exception as e:
        raise Bad(f"invalid endpoint {desc!r}: {e}") from None
    identity: tuple[Any, ...] = (kind, resolved)
    if kind in ("tcp", "tcp6", "ssl"):
        kw = {k: val for k, val in parts if k is not None}
        positional = [val for k, val in parts[1:] if k is None]
        port_text = kw.get("port", positional[0] if positional else "")
        if not port_text.isdigit() or int(port_text) > 65535:
            raise Bad(f"invalid endpoint {desc!r}: port must be 0-65535")
        interface = kw.get("interface", "")
        if interface:
            check_ip(interface, Bad(f"invalid endpoint {desc!r}: interface must be an IP address"))
        identity = ("inet", int(port_text), interface)
    elif kind == "unix":
        identity = ("unix", next((val for k, val in parts[1:] if k in (None, "address")), ""))
    return resolved, identity


def listen_key(reader: Reader, sec: Section) -> Callable[[Value], tuple[str, ...]]:
    """The C{listen} key: one or more endpoint strings."""
    def parse(v: Value) -> tuple[str, ...]:
        checked = list_of(lambda w: (w.text, *check_endpoint(reader, w.text)))(v)
        if not checked:
            raise Bad("needs at least one endpoint, e.g. tcp:8080")
        reader.listeners.extend(Listener(sec, f"[{sec.name}] listen", d, i) for d, _, i in checked)
        return tuple(resolved for _, resolved, _ in checked)
    return parse


def _clash(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    if a[0] != b[0] or a[1] != b[1] or a[0] not in ("inet", "unix") or a[1] == 0:
        return False
    return a[0] == "unix" or a[2] == b[2] or bool({a[2], b[2]} & {"", "0.0.0.0", "::"})


def report_clashes(listeners: Sequence[Listener]) -> None:
    for j, b in enumerate(listeners):
        for a in listeners[:j]:
            if _clash(a.identity, b.identity):
                mine, other = (b, a) if b.section else (a, b)
                if mine.section:
                    mine.section.error("listen", f"{mine.desc!r} clashes with {other.desc!r} in {other.where}")
                break
