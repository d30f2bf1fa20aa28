"""
[admin] max_connections, max_body and the token length on a port beyond
loopback (docs/configuration.md; wsgateway.config.admin).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from wsgateway.config.admin import AdminConfig, loopback_only
from wsgateway.config.loader import ConfigError, GatewayConfig, load

BASE = """
[route:echo]
path = /echo
upstream = demo

[upstream:demo]
nodes = ws://127.0.0.1:9001
"""
LONG = "k" * 32
SHORT = "k" * 31


def load_text(folder: Path, text: str, environ: dict[str, str] | None = None) -> GatewayConfig:
    path = folder / "gw.ini"
    path.write_text(textwrap.dedent(text) + BASE)
    return load(str(path), environ or {})


def errors(folder: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(folder, text, environ)
    prefix = f"{folder / 'gw.ini'}: "
    assert all(line.startswith(prefix) for line in info.value.errors), info.value.errors
    return [line[len(prefix):] for line in info.value.errors]


def test_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, "[admin]\n")
    assert config.admin == AdminConfig()
    assert (config.admin.max_connections, config.admin.max_body) == (64, 64 * 1024)


def test_both_keys_are_read(tmp_path: Path) -> None:
    config = load_text(tmp_path, "[admin]\nmax_connections = 3\nmax_body = 1M\n")
    assert config.admin is not None
    assert (config.admin.max_connections, config.admin.max_body) == (3, 1024 * 1024)


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("max_connections", "0", "must be at least 1"),
    ("max_connections", "many", "is not a whole number"),
    ("max_body", "0", "must be greater than 0"),
    ("max_body", "64KB", "invalid size"),
])
def test_bad_values_name_the_key(tmp_path: Path, key: str, value: str, problem: str) -> None:
    found = errors(tmp_path, f"[admin]\n{key} = {value}\n")
    assert len(found) == 1 and found[0].startswith(f"[admin] {key}: ") and problem in found[0], found


@pytest.mark.parametrize("listen", [
    "tcp:9090",
    "tcp:9090:interface=0.0.0.0",
    "tcp:9090:interface=10.1.2.3",
    "tcp6:9090",
    "tcp6:9090:interface=\\:\\:",
    "tcp:9090:interface=127.0.0.1\n    tcp:9091:interface=192.168.1.5",
])
def test_a_short_token_beyond_loopback_is_an_error(tmp_path: Path, listen: str) -> None:
    found = errors(tmp_path, f"[admin]\nlisten = {listen}\ntoken = {SHORT}\n")
    assert len(found) == 1, found
    line = found[0]
    assert line.startswith("[admin] token: shorter than 32 characters while the admin port listens beyond loopback")
    assert "openssl rand -hex 32" in line and "127.0.0.1" in line  # what to do
    assert SHORT not in line


def test_a_short_token_from_the_environment_is_never_shown(tmp_path: Path) -> None:
    secret = "Zq9-short-secret"
    found = errors(tmp_path, "[admin]\nlisten = tcp:9090\ntoken = env:WSGW_ADMIN_TOKEN\n",
                   {"WSGW_ADMIN_TOKEN": secret})
    assert len(found) == 1 and found[0].startswith("[admin] token: ") and secret not in found[0]


@pytest.mark.parametrize("listen", [
    "tcp:9090:interface=127.0.0.1",
    "tcp:9090:interface=127.3.2.1",
    "tcp6:9090:interface=\\:\\:1",
    "unix:admin.sock",
    "",  # the default, 127.0.0.1
])
def test_a_short_token_on_loopback_only_is_fine(tmp_path: Path, listen: str) -> None:
    text = "[admin]\n" + (f"listen = {listen}\n" if listen else "") + f"token = {SHORT}\n"
    config = load_text(tmp_path, text)
    assert config.admin is not None and config.admin.token == SHORT


def test_a_long_token_may_listen_anywhere(tmp_path: Path) -> None:
    config = load_text(tmp_path, f"[admin]\nlisten = tcp:9090\ntoken = {LONG}\n")
    assert config.admin is not None and config.admin.token == LONG


def test_no_token_may_listen_anywhere(tmp_path: Path) -> None:
    assert load_text(tmp_path, "[admin]\nlisten = tcp:9090\n").admin is not None


@pytest.mark.parametrize(("desc", "local"), [
    ("tcp:1:interface=127.0.0.1", True),
    ("tcp:1:127.0.0.1", True),  # Twisted's positional interface
    ("tcp:1:interface=127.255.0.9", True),
    ("tcp6:1:interface=\\:\\:1", True),
    ("tcp6:1:interface=\\:\\:ffff\\:127.0.0.1", True),
    ("ssl:1:privateKey=k.pem:interface=127.0.0.1", True),
    ("unix:/run/admin.sock", True),
    ("unix:address=/run/admin.sock:mode=600", True),
    ("tcp:1", False),
    ("tcp:1:interface=", False),
    ("tcp:1:interface=0.0.0.0", False),
    ("tcp:1:interface=128.0.0.1", False),
    ("tcp6:1", False),
    ("tcp6:1:interface=\\:\\:", False),
    ("ssl:1:privateKey=k.pem", False),
    ("systemd:domain=INET:index=0", False),
])
def test_loopback_only(desc: str, local: bool) -> None:
    assert loopback_only(desc) is local
