"""Tests for wsgateway.config: the INI file -> GatewayConfig, every error at once."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from wsgateway.config.admin import AdminConfig
from wsgateway.config.check import main
from wsgateway.config.demo import DemoConfig
from wsgateway.config.gateway import ServerConfig
from wsgateway.config.limits import LimitsConfig
from wsgateway.config.loader import KNOWN_KEYS, ConfigError, GatewayConfig, load
from wsgateway.config.log import LogConfig
from wsgateway.config.queue import QueueConfig
from wsgateway.config.values import FrozenMap
from wsgateway.dev.selfsigned import ensure

ROOT = Path(__file__).resolve().parents[3]
BAD = ROOT / "tests" / "data" / "bad"
# what `make run` starts, and what docs/deploy.md installs as /etc/wsgateway/wsgateway.ini
DEVELOPMENT = ROOT / "etc" / "development.ini"
SAMPLE = ROOT / "etc" / "wsgateway.ini"
SECRET = "s3cret-value-that-must-never-show-up-anywhere-0123456789"

BASE = """
[route:echo]
path = /echo
upstream = demo

[upstream:demo]
nodes = ws://127.0.0.1:9001
"""


def write(folder: Path, text: str, *, base: bool = True, name: str = "gw.ini") -> str:
    path = folder / name
    path.write_text(textwrap.dedent(text) + (BASE if base else ""))
    return str(path)


def cfg(folder: Path, text: str, *, base: bool = True, environ: dict[str, str] | None = None) -> GatewayConfig:
    return load(write(folder, text, base=base), environ or {})


def problems(folder: Path, text: str, *, base: bool = True, environ: dict[str, str] | None = None) -> list[str]:
    """The error lines without their 'PATH: ' prefix (which every line must have)."""
    path = write(folder, text, base=base)
    with pytest.raises(ConfigError) as info:
        load(path, environ or {})
    assert str(info.value) == "\n".join(info.value.errors)
    assert all(line.startswith(f"{path}: ") for line in info.value.errors), info.value.errors
    return [line[len(path) + 2:] for line in info.value.errors]


def one_problem(folder: Path, text: str, **kw: object) -> str:
    found = problems(folder, text, **kw)  # type: ignore[arg-type]
    assert len(found) == 1, found
    return found[0]


def run_check(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WSGW_")}
    environ.update(env or {})
    environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + environ["PYTHONPATH"] if environ.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "wsgateway.config", *args], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=60)


# ------------------------------------------- etc/development.ini, etc/wsgateway.ini


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """
    The development config in the checkout's layout, etc/development.ini
    beside var/tls/ holding the development certificate its TLS listener
    uses (what `make run` creates on first start; never committed).
    """
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "development.ini").write_text(DEVELOPMENT.read_text())
    assert ensure(tmp_path / "var" / "tls")
    return tmp_path


def test_development_config_loads(checkout: Path) -> None:
    example = checkout / "etc" / "development.ini"
    config = load(str(example), {})
    assert config.path == str(example)
    tls = checkout / "var" / "tls"
    assert config.gateway.listen == (
        "tcp:8080:interface=127.0.0.1",
        f"ssl:8443:interface=127.0.0.1:privateKey={tls}/key.pem:certKey={tls}/cert.pem",
    )
    assert config.admin == AdminConfig(listen=("tcp:9090:interface=127.0.0.1",), token=None)
    assert config.demo == DemoConfig(listen=("tcp:8081:interface=127.0.0.1",))
    assert (config.auth, config.redis) == (None, None)
    assert config.log.format == "text"
    assert [(r.name, r.path, r.upstream, r.upstream_path, r.auth) for r in config.routes] == [
        ("echo", "/echo", "demo", "/echo", "none"),
        ("chat", "/chat/{room}", "demo", "/chat/{room}", "none"),
        ("feed", "/feed/{name}", None, None, "none"),  # the demo page's channel history panel
    ]
    (node,) = config.upstreams["demo"].nodes
    assert (node.scheme, node.host, node.port, node.path) == ("ws", "127.0.0.1", 8081, "")


def test_production_sample_lists_every_key_of_every_section() -> None:
    text = SAMPLE.read_text()
    lines = [line.lstrip(";").strip() for line in text.splitlines()]
    for header in ("[gateway]", "[admin]", "[limits]", "[auth]", "[redis]", "[queue]", "[log]", "[demo]"):
        assert header in lines, header
    keys = {line.split("=", 1)[0].strip() for line in lines if "=" in line and not line.startswith("#")}
    for kind, known in KNOWN_KEYS.items():
        assert set(known) <= keys, (kind, set(known) - keys)


def test_production_sample_is_production_shaped(tmp_path: Path) -> None:
    # copied elsewhere, its paths still name /etc/wsgateway (the issue's
    # "../var/tls from /etc/wsgateway" failure): only the certificate moves here
    text = SAMPLE.read_text()
    assert "../" not in text and "var/tls" not in text
    tls = tmp_path / "tls"
    assert ensure(tls)
    copy = tmp_path / "elsewhere" / "wsgateway.ini"
    copy.parent.mkdir()
    copy.write_text(text.replace("/etc/wsgateway/tls/privkey.pem", f"{tls}/key.pem")
                    .replace("/etc/wsgateway/tls/fullchain.pem", f"{tls}/cert.pem"))
    config = load(str(copy), {})
    assert config.gateway.listen == (f"ssl:8443:privateKey={tls}/key.pem:certKey={tls}/cert.pem",)
    assert config.gateway.allowed_origins == ("https://app.example.com",)  # the placeholder: fails closed
    assert config.admin == AdminConfig(listen=("tcp:9090:interface=127.0.0.1",), token=None)
    assert (config.demo, config.auth, config.redis) == (None, None, None)
    assert config.log == LogConfig(level="info", format="json", file="-")
    assert [(r.name, r.path, r.upstream) for r in config.routes] == [("app", "/**", "app")]
    # the commented [queue] path is the unit's StateDirectory, not a folder under /etc
    assert ";path = /var/lib/wsgateway/queue.sqlite" in text.splitlines()


def test_development_config_check_script(checkout: Path) -> None:
    result = run_check("etc/development.ini", cwd=checkout)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "etc/development.ini: OK, 3 routes, 1 upstream\n"


def test_development_config_without_the_development_certificate(checkout: Path) -> None:
    (checkout / "var" / "tls" / "cert.pem").unlink()
    result = run_check("etc/development.ini", cwd=checkout)
    assert result.returncode == 1
    cert = checkout / "var" / "tls" / "cert.pem"
    assert result.stderr.startswith("etc/development.ini: [gateway] listen: invalid endpoint 'ssl:8443:")
    assert f"certKey {cert}: cannot read: No such file or directory" in result.stderr


# ---------------------------------------------------------------- defaults


def test_defaults(tmp_path: Path) -> None:
    config = cfg(tmp_path, "")
    assert config.gateway == ServerConfig(node_id=config.gateway.node_id)
    assert config.gateway.node_id  # the host name
    assert config.gateway.listen == ("tcp:8080",)
    assert (config.gateway.workers, config.gateway.shutdown_timeout, config.gateway.drain_grace) == (1, 10.0, 2.0)
    assert config.limits == LimitsConfig(max_connections=10000, max_connections_per_ip=256, max_message_size=1048576,
                                   handshake_timeout=5, idle_timeout=600, ping_interval=25, ping_timeout=10,
                                   messages_per_second=0, write_buffer=1048576)
    assert (config.admin, config.auth, config.redis, config.demo) == (None, None, None, None)
    assert config.queue == QueueConfig(path=str(tmp_path / "var" / "queue.sqlite"))
    assert config.log == LogConfig(level="info", format="json", file="-")
    (route,) = config.routes
    assert (route.mode, route.auth, route.delivery, route.on_upstream_close, route.slow_consumer) == (
        "proxy", "none", "at_most_once", "close", "close")
    assert (route.host, route.headers, route.allowed_origins, route.client_publish) == (None, (), None, True)
    up = config.upstreams["demo"]
    assert (up.balance, up.connect_timeout, up.retries, up.backoff_initial, up.backoff_max) == (
        "round_robin", 3.0, 2, 0.1, 2.0)
    assert (up.health_check, up.health_interval, up.health_timeout, up.healthy_threshold,
            up.unhealthy_threshold, up.reconnect_buffer) == ("none", 5.0, 2.0, 2, 3, 1048576)


def test_section_defaults_when_present_but_empty(tmp_path: Path) -> None:
    config = cfg(tmp_path, "[admin]\n[demo]\n[queue]\n[log]\n[limits]\n[redis]\n")
    assert config.admin == AdminConfig()
    assert config.demo == DemoConfig()
    assert config.redis is not None and (config.redis.url, config.redis.prefix) == ("redis://127.0.0.1:6379/0", "wsgw")
    assert config.queue.max_attempts == 20 and config.queue.retention == 86400


def test_auth_defaults(tmp_path: Path) -> None:
    auth = cfg(tmp_path, f"[auth]\nsecret = {SECRET}\n").auth
    assert auth is not None
    assert auth.algorithms == ("HS256",)
    assert (auth.jwks_refresh, auth.leeway, auth.query_param, auth.subprotocol_prefix, auth.api_key_header) == (
        300, 30, "access_token", "bearer.", "X-API-Key")
    assert auth.forward_claims == (("sub", "X-User-Id"), ("roles", "X-User-Roles"))


def test_config_is_frozen_hashable_and_comparable(tmp_path: Path) -> None:
    path = write(tmp_path, "[gateway]\nworkers = 2\n")
    first, second = load(path, {}), load(path, {})
    assert first == second and hash(first) == hash(second)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.gateway.workers = 3  # type: ignore[misc]
    assert isinstance(first.upstreams, FrozenMap)
    with pytest.raises(TypeError):
        first.upstreams["x"] = first.upstreams["demo"]  # type: ignore[index]
    assert {first.upstreams["demo"].nodes[0]}  # nodes are hashable: usable as dict keys


def test_importing_config_does_not_install_a_reactor(checkout: Path) -> None:
    # loading the example also checks its ssl: listener through wsgateway.tls
    code = ("import sys, wsgateway.config.loader as c; c.load('etc/development.ini', {}); "
            "assert 'wsgateway.tls' in sys.modules; "
            "assert 'twisted.internet.reactor' not in sys.modules")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    assert subprocess.run([sys.executable, "-c", code], cwd=checkout, env=env, timeout=60).returncode == 0


# ------------------------------------------------------------- value types


@pytest.mark.parametrize("text, size", [("0", 0), ("512", 512), ("1K", 1024), ("1k", 1024), ("2M", 2097152),
                                        ("1m", 1048576), ("1G", 1073741824), ("3 K", 3072)])
def test_sizes(tmp_path: Path, text: str, size: int) -> None:
    assert cfg(tmp_path, f"[limits]\nmax_message_size = {text}\n").limits.max_message_size == size


@pytest.mark.parametrize("text, message", [
    ("1X", "invalid size '1X'"),
    ("1.5M", "invalid size '1.5M'"),
    ("-1", "invalid size '-1'"),
    ("M", "invalid size 'M'"),
    ("1MB", "(did you mean '1M'?)"),
    ("", "invalid size ''"),
])
def test_bad_sizes(tmp_path: Path, text: str, message: str) -> None:
    line = one_problem(tmp_path, f"[limits]\nmax_message_size = {text}\n")
    assert line.startswith("[limits] max_message_size: ") and message in line


@given(number=st.integers(0, 10**6), suffix=st.sampled_from(["", "k", "K", "m", "M", "g", "G"]))
def test_size_property(number: int, suffix: str) -> None:
    from wsgateway.config.values import Value, size  # the parser alone: no file per example
    assert size()(Value(f"{number}{suffix}", None)) == number * 1024 ** " kmg".index(suffix.lower() or " ")


@pytest.mark.parametrize("text, seconds", [("0", 0.0), ("2.5", 2.5), (".5", 0.5), ("10", 10.0), ("3.", 3.0)])
def test_durations(tmp_path: Path, text: str, seconds: float) -> None:
    assert cfg(tmp_path, f"[limits]\nidle_timeout = {text}\n").limits.idle_timeout == seconds


@pytest.mark.parametrize("text, message", [
    ("5m", "invalid duration '5m': expected seconds, e.g. 2.5 (seconds, without a unit)"),
    ("abc", "invalid duration 'abc'"),
    ("inf", "invalid duration 'inf'"),
    ("nan", "invalid duration 'nan'"),
    ("-1", "must not be negative"),
])
def test_bad_durations(tmp_path: Path, text: str, message: str) -> None:
    assert one_problem(tmp_path, f"[limits]\nidle_timeout = {text}\n").startswith(f"[limits] idle_timeout: {message}")


@pytest.mark.parametrize("section, key", [("limits", "handshake_timeout"), ("limits", "ping_timeout"),
                                          ("upstream:demo", "connect_timeout"), ("upstream:demo", "health_interval"),
                                          ("upstream:demo", "health_timeout"), ("queue", "retention")])
def test_durations_that_must_be_positive(tmp_path: Path, section: str, key: str) -> None:
    text = f"[{section}]\n{key} = 0\n"
    if section.startswith("upstream"):
        text = BASE.replace("nodes =", f"{key} = 0\nnodes =")
    assert one_problem(tmp_path, text, base=not section.startswith("upstream")) == \
        f"[{section}] {key}: must be greater than 0"


@pytest.mark.parametrize("text, value", [("yes", True), ("No", False), ("true", True), ("FALSE", False),
                                         ("on", True), ("off", False), ("1", True), ("0", False)])
def test_booleans(tmp_path: Path, text: str, value: bool) -> None:
    route = cfg(tmp_path, BASE.replace("upstream = demo", f"upstream = demo\nforward_auth = {text}"),
                base=False).routes[0]
    assert route.forward_auth is value


def test_integers_and_ranges(tmp_path: Path) -> None:
    text = BASE.replace("nodes =", "retries = -1\nhealthy_threshold = 0\nunhealthy_threshold = 1.5\nnodes =")
    assert problems(tmp_path, "[limits]\nmax_connections = 0\nmax_connections_per_ip = x\n" + text, base=False) == [
        "[limits] max_connections_per_ip: 'x' is not a whole number",
        "[upstream:demo] retries: must not be negative",
        "[upstream:demo] healthy_threshold: must be at least 1",
        "[upstream:demo] unhealthy_threshold: '1.5' is not a whole number",
    ]


def test_workers(tmp_path: Path) -> None:
    assert cfg(tmp_path, "[gateway]\nworkers = auto\n").gateway.workers == (os.cpu_count() or 1)
    assert cfg(tmp_path, "[gateway]\nworkers = 4\n").gateway.workers == 4
    assert one_problem(tmp_path, "[gateway]\nworkers = 0\n") == "[gateway] workers: must be at least 1"


def test_lists_split_on_whitespace_and_newlines(tmp_path: Path) -> None:
    config = cfg(tmp_path, """
        [gateway]
        allowed_origins = https://App.Example.com:443  http://localhost:3000
            https://*.example.org
        trusted_proxies =
            10.0.0.0/8
            192.168.1.7   2001:db8::/32
    """)
    assert config.gateway.allowed_origins == ("https://app.example.com", "http://localhost:3000",
                                              "https://*.example.org")
    assert [str(n) for n in config.gateway.trusted_proxies] == ["10.0.0.0/8", "192.168.1.7/32", "2001:db8::/32"]


@pytest.mark.parametrize("origin", ["app.example.com", "https://app.example.com/", "https://a*.example.com",
                                    "https://x:99999", "*", "https://"])
def test_bad_origins(tmp_path: Path, origin: str) -> None:
    line = one_problem(tmp_path, f"[gateway]\nallowed_origins = {origin}\n")
    assert line.startswith(f"[gateway] allowed_origins: invalid origin {origin!r}")


def test_bad_trusted_proxy(tmp_path: Path) -> None:
    assert one_problem(tmp_path, "[gateway]\ntrusted_proxies = 10.0.0.0/33\n").startswith(
        "[gateway] trusted_proxies: '10.0.0.0/33' is not an IP network")


# ------------------------------------------------------------ env: and file:


def test_env_values(tmp_path: Path) -> None:
    config = cfg(tmp_path, "[admin]\ntoken = env:TOKEN\n[limits]\nmax_connections = env:MAXC\n",
                 environ={"TOKEN": "tok-123", "MAXC": " 77 "})
    assert config.admin is not None and config.admin.token == "tok-123"
    assert config.limits.max_connections == 77


def test_env_value_set_to_empty_disables_the_admin_token(tmp_path: Path) -> None:
    config = cfg(tmp_path, "[admin]\ntoken = env:TOKEN\n", environ={"TOKEN": ""})
    assert config.admin is not None and config.admin.token is None


def test_missing_env_var_and_bad_name(tmp_path: Path) -> None:
    assert problems(tmp_path, "[admin]\ntoken = env:NOPE\nlisten = env:1BAD\n") == [
        "[admin] token: environment variable NOPE is not set",
        "[admin] listen: bad environment variable name after 'env:': '1BAD'",
    ]


def test_environ_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSGW_TEST_TOKEN", "from-os")
    config = load(write(tmp_path, "[admin]\ntoken = env:WSGW_TEST_TOKEN\n"))
    assert config.admin is not None and config.admin.token == "from-os"


def test_file_values_are_relative_to_the_ini_and_lose_the_trailing_newline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    (conf / "secrets").mkdir(parents=True)
    (conf / "secrets" / "jwt").write_text(SECRET + "\n")
    (conf / "secrets" / "jwt").chmod(0o600)  # a secret file must be private (docs/configuration.md)
    (conf / "nodes.txt").write_text("ws://10.0.0.1:9001 weight=3\nws://10.0.0.2:9001\n")
    monkeypatch.chdir(tmp_path)  # not the INI's folder
    path = write(conf, """
        [auth]
        secret = file:secrets/jwt
        [route:echo]
        path = /echo
        upstream = demo
        [upstream:demo]
        nodes = file:nodes.txt
    """, base=False)
    config = load(path, {})
    assert config.auth is not None and config.auth.secret == SECRET
    assert [(n.host, n.weight) for n in config.upstreams["demo"].nodes] == [("10.0.0.1", 3), ("10.0.0.2", 1)]


def test_unreadable_file_value_names_the_file(tmp_path: Path) -> None:
    assert one_problem(tmp_path, "[admin]\ntoken = file:missing.txt\n") == (
        f"[admin] token: cannot read 'missing.txt' ({tmp_path / 'missing.txt'}): No such file or directory")


def test_file_value_that_is_not_text(tmp_path: Path) -> None:
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "bin").chmod(0o600)
    assert one_problem(tmp_path, "[admin]\ntoken = file:bin\n").endswith("is not UTF-8 text")


# --------------------------------------------------------- secrets in errors


def test_secret_values_never_appear_in_errors(tmp_path: Path) -> None:
    env = {"SECRET": SECRET, "SHORT": "short-" + SECRET[:8], "URL": f"redis://:{SECRET}@host:99999/0"}
    (tmp_path / "token").write_text(f"{SECRET} with spaces\n")
    (tmp_path / "token").chmod(0o600)
    found = problems(tmp_path, f"""
        [gateway]
        workers = env:SECRET
        [admin]
        token = file:token
        [limits]
        idle_timeout = env:SECRET
        max_message_size = env:SECRET
        [auth]
        algorithms = RS256
        secret = env:SHORT
        jwks_url = https://idp.example.com/jwks
        [redis]
        url = env:URL
        [route:secret]
        path = /s
        upstream = demo
        mode = env:SECRET
        forward_auth = env:SECRET
        upstream_path = env:SECRET
    """, environ=env)
    assert len(found) == 9, found
    assert "[route:secret] upstream_path: must start with '/'" in found
    text = "\n".join(found)
    assert SECRET not in text and SECRET[:8] not in text
    assert "[limits] idle_timeout: invalid duration (the value of env:SECRET)" in text
    assert "[auth] secret: set, but no HS* algorithm is listed" in text


def test_short_hmac_secret_is_rejected_without_showing_it(tmp_path: Path) -> None:
    line = one_problem(tmp_path, "[auth]\nsecret = hunter2\n")
    assert line == "[auth] secret: too short for HS256: use at least 32 bytes (RFC 7518 section 3.2)"
    assert "hunter2" not in line


def test_parse_errors_do_not_echo_the_line(tmp_path: Path) -> None:
    found = problems(tmp_path, f"[auth]\nsecret {SECRET}\n", base=False)
    assert found == ["line 2: cannot parse: expected 'key = value', a [section] header or a comment"]


# ------------------------------------------------------- paths and endpoints


def test_relative_paths_are_resolved_against_the_ini_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            tls: dict[str, Path]) -> None:
    conf = tmp_path / "conf"
    (conf / "keys").mkdir(parents=True)
    (conf / "logs").mkdir()
    (conf / "keys" / "api-keys").write_text("")
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (conf / "keys" / name).write_bytes(tls[name].read_bytes())
    for name in ("api-keys", "key.pem"):
        (conf / "keys" / name).chmod(0o600)  # secrets must be private (docs/configuration.md)
    monkeypatch.chdir(tmp_path)
    path = write(conf, """
        [auth]
        api_keys_file = keys/api-keys
        [queue]
        path = data/q.sqlite
        [log]
        file = logs/gw.log
        [route:echo]
        path = /echo
        upstream = demo
        [upstream:demo]
        nodes = wss://localhost:9443
        tls_ca = keys/ca.pem
        tls_cert = keys/cert.pem
        tls_key = ./keys/../keys/key.pem
    """, base=False)
    config = load(path, {})
    assert config.auth is not None and config.auth.api_keys_file == str(conf / "keys" / "api-keys")
    assert config.auth.algorithms == ()  # API keys only
    assert config.queue.path == str(conf / "data" / "q.sqlite")
    assert config.log.file == str(conf / "logs" / "gw.log")
    up = config.upstreams["demo"]
    assert (up.tls_ca, up.tls_cert, up.tls_key) == tuple(str(conf / "keys" / n) for n in ("ca.pem", "cert.pem",
                                                                                          "key.pem"))


def test_missing_files_that_must_exist(tmp_path: Path) -> None:
    found = problems(tmp_path, """
        [auth]
        api_keys_file = nope/keys
        [log]
        file = nope/gw.log
    """)
    assert found == [
        f"[auth] api_keys_file: cannot read 'nope/keys' ({tmp_path / 'nope' / 'keys'}): No such file or directory",
        f"[log] file: folder '{tmp_path / 'nope'}' does not exist",
    ]


def test_endpoints(tmp_path: Path, tls: dict[str, Path]) -> None:
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_bytes(tls[name].read_bytes())
    (tmp_path / "key.pem").chmod(0o600)
    config = cfg(tmp_path, """
        [gateway]
        listen = tcp:0:interface=127.0.0.1 ssl:0:privateKey=key.pem:certKey=cert.pem unix:gw.sock
        [admin]
        listen = tcp:9999:interface=\\:\\:1
    """)
    assert config.gateway.listen == ("tcp:0:interface=127.0.0.1",
                                     f"ssl:0:privateKey={tmp_path}/key.pem:certKey={tmp_path}/cert.pem",
                                     f"unix:{tmp_path}/gw.sock")
    assert config.admin is not None and config.admin.listen == ("tcp:9999:interface=\\:\\:1",)


def test_bad_endpoints(tmp_path: Path) -> None:
    found = problems(tmp_path, """
        [gateway]
        listen = tcp:8080:bogus=1 tcp:70000 tcp:80:interface=localhost ssl:8443:privateKey=none.pem
        [admin]
        listen =
    """)
    assert found[0] == ("[gateway] listen: invalid endpoint 'tcp:8080:bogus=1': "
                        "_parseTCP() got an unexpected keyword argument 'bogus'")
    assert found[1:3] == ["[gateway] listen: invalid endpoint 'tcp:70000': port must be 0-65535",
                          "[gateway] listen: invalid endpoint 'tcp:80:interface=localhost': "
                          "interface must be an IP address"]
    assert found[3].startswith("[gateway] listen: invalid endpoint 'ssl:8443:privateKey=none.pem': ")
    assert "No such file or directory" in found[3]
    assert found[4:] == ["[admin] listen: needs at least one endpoint, e.g. tcp:8080"]


def test_listeners_must_not_clash(tmp_path: Path) -> None:
    assert problems(tmp_path, """
        [gateway]
        listen = tcp:0:interface=127.0.0.1 tcp:0:interface=127.0.0.1 tcp:7000:interface=127.0.0.1
        [admin]
        listen = tcp:7000
        [demo]
        listen = unix:x.sock unix:./x.sock
    """) == [
        "[admin] listen: 'tcp:7000' clashes with 'tcp:7000:interface=127.0.0.1' in [gateway] listen",
        "[demo] listen: 'unix:./x.sock' clashes with 'unix:x.sock' in [demo] listen",
    ]
    # A default listener takes part too.
    assert problems(tmp_path, "[demo]\nlisten = tcp:8080:interface=127.0.0.1\n") == [
        "[demo] listen: 'tcp:8080:interface=127.0.0.1' clashes with 'tcp:8080' in [gateway] listen (default)"]
    # Different interfaces on one port are fine.
    cfg(tmp_path, "[gateway]\nlisten = tcp:7000:interface=127.0.0.1\n[admin]\nlisten = tcp:7000:interface=127.0.0.2\n")


# -------------------------------------------------------------------- auth


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    out = {}
    for name, key in (("rsa.pem", rsa.generate_private_key(65537, 2048)), ("p256.pem", ec.generate_private_key(
            ec.SECP256R1())), ("ed.pem", ed25519.Ed25519PrivateKey.generate())):
        out[name] = folder / name
        out[name].write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo))
    out["jwks.json"] = folder / "jwks.json"
    out["jwks.json"].write_text(json.dumps({"keys": [{"kty": "RSA", "kid": "1", "n": "AQAB", "e": "AQAB"}]}))
    out["bad.json"] = folder / "bad.json"
    out["bad.json"].write_text('{"keys": []}')
    return out


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    other = ca.issue_cert("other")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    other.private_key_pem.write_to_path(str(folder / "other-key.pem"))
    for path in folder.iterdir():
        path.chmod(0o600)  # trustme writes 0644; a private key must be private (docs/configuration.md)
    return {p.name: p for p in folder.iterdir()}


@pytest.mark.parametrize("algorithms, key", [("RS256 PS512", "rsa.pem"), ("ES256", "p256.pem"), ("EdDSA", "ed.pem")])
def test_asymmetric_keys(tmp_path: Path, keys: dict[str, Path], algorithms: str, key: str) -> None:
    auth = cfg(tmp_path, f"[auth]\nalgorithms = {algorithms}\npublic_key_file = {keys[key]}\n").auth
    assert auth is not None and auth.algorithms == tuple(algorithms.split())
    assert auth.public_key_file == str(keys[key]) and auth.secret is None


def test_jwks_sources(tmp_path: Path, keys: dict[str, Path], tls: dict[str, Path]) -> None:
    auth = cfg(tmp_path, f"[auth]\nalgorithms = RS256\njwks_file = {keys['jwks.json']}\n").auth
    assert auth is not None and auth.jwks_file == str(keys["jwks.json"])
    auth = cfg(tmp_path, f"[auth]\nalgorithms = RS256\njwks_url = https://idp.example.com/.well-known/jwks.json\n"
                         f"jwks_ca = {tls['ca.pem']}\njwks_refresh = 60\n").auth
    assert auth is not None and (auth.jwks_url, auth.jwks_refresh) == ("https://idp.example.com/.well-known/jwks.json",
                                                                       60)


@pytest.mark.parametrize("body, expected", [
    ("algorithms = HS256 RS256\nsecret = {secret}",
     ["[auth] algorithms: HS256 and RS256 cannot be mixed: an HMAC secret must never verify an asymmetric token"]),
    ("algorithms = none", ["[auth] algorithms: 'none' is never accepted"]),
    ("algorithms = hs256", ["[auth] algorithms: unknown algorithm 'hs256' (did you mean 'HS256'?); known: HS256 "
                            "HS384 HS512 RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 ES512 EdDSA"]),
    ("algorithms = HS512", ["[auth] algorithms: HS512 needs 'secret'"]),
    ("algorithms = HS512\nsecret = {secret}", ["[auth] secret: too short for HS512: use at least 64 bytes "
                                               "(RFC 7518 section 3.2)"]),
    ("algorithms = RS256", ["[auth] algorithms: RS256 needs one of public_key_file, jwks_file, jwks_url"]),
    ("public_key_file = {rsa}", ["[auth] public_key_file: needs an explicit 'algorithms' list, "
                                 "e.g. algorithms = RS256"]),
    ("algorithms = RS256\npublic_key_file = {rsa}\njwks_file = {jwks}",
     ["[auth] jwks_file: set only one of public_key_file, jwks_file, jwks_url (public_key_file is set too)"]),
    ("algorithms = RS256\npublic_key_file = {rsa}\nsecret = {secret}",
     ["[auth] secret: set, but no HS* algorithm is listed"]),
    ("secret = {secret}\njwks_file = {jwks}",
     ["[auth] jwks_file: set, but only HS* algorithms are listed: a key file is for asymmetric algorithms"]),
    ("algorithms = ES256\npublic_key_file = {rsa}", ["[auth] public_key_file: holds a RSA key, which cannot "
                                                     "verify ES256"]),
    ("algorithms = ES384\npublic_key_file = {p256}",
     ["[auth] public_key_file: holds a secp256r1 key, but ES384 needs secp384r1"]),
    ("algorithms = RS256\npublic_key_file = {jwks}",
     ["[auth] public_key_file: 'jwks.json' is not a PEM public key or certificate"]),
    ("algorithms = RS256\njwks_file = {bad}", ["[auth] jwks_file: 'bad.json' is not a JWKS document (an object "
                                               "with a non-empty \"keys\" list of JWKs)"]),
    ("algorithms = RS256\njwks_url = http://idp.example.com/jwks", ["[auth] jwks_url: must be an https:// URL"]),
    ("algorithms = RS256\npublic_key_file = {rsa}\njwks_ca = {rsa}",
     ["[auth] jwks_ca: {rsa!r}: not PEM certificates"]),
    ("algorithms = RS256\npublic_key_file = {rsa}\njwks_ca = {ca}", ["[auth] jwks_ca: set, but jwks_url is not"]),
    ("algorithms =\nsecret = {secret}", ["[auth] secret: set, but algorithms is empty (no JWTs accepted)"]),
    ("issuer = https://idp", ["[auth]: nothing to authenticate with: set secret, public_key_file, jwks_file, "
                              "jwks_url or api_keys_file"]),
    ("secret = {secret}0123456789\nforward_claims = sub=X-User-Id https://ex.com/roles=X-Roles tenant=Host",
     ["[auth] forward_claims: header 'Host' is set by the gateway itself or hop-by-hop: pick another name"]),
    ("secret = {secret}0123456789\nforward_claims = sub=X-Wsgateway-Conn-Id",
     ["[auth] forward_claims: header 'X-Wsgateway-Conn-Id' is set by the gateway itself or hop-by-hop: "
      "pick another name"]),
    ("secret = {secret}0123456789\nforward_claims = sub=X-A roles=x-a",
     ["[auth] forward_claims: header 'x-a' appears twice"]),
    ("secret = {secret}0123456789\nforward_claims = sub", ["[auth] forward_claims: 'sub' is not claim=Header-Name"]),
])
def test_auth_problems(tmp_path: Path, keys: dict[str, Path], tls: dict[str, Path], body: str,
                       expected: list[str]) -> None:
    fields = {"secret": "x" * 40, "rsa": str(keys["rsa.pem"]), "ca": tls["ca.pem"], "p256": keys["p256.pem"],
              "jwks": keys["jwks.json"], "bad": keys["bad.json"]}
    expected = [line.format(**fields) for line in expected]
    assert problems(tmp_path, "[auth]\n" + body.format(**fields) + "\n") == expected


def test_forward_claims_and_token_sources(tmp_path: Path) -> None:
    auth = cfg(tmp_path, f"""
        [auth]
        secret = {SECRET}
        forward_claims = sub=X-User-Id https://example.com/tenant=X-Tenant
        query_param =
        subprotocol_prefix =
        issuer = https://idp.example.com/
        audience = gateway
    """).auth
    assert auth is not None
    assert auth.forward_claims == (("sub", "X-User-Id"), ("https://example.com/tenant", "X-Tenant"))
    assert (auth.query_param, auth.subprotocol_prefix) == ("", "")
    assert (auth.issuer, auth.audience) == ("https://idp.example.com/", "gateway")
    assert cfg(tmp_path, f"[auth]\nsecret = {SECRET}\nforward_claims =\n").auth.forward_claims == ()  # type: ignore


# ------------------------------------------------------------------ routes


def test_auth_default_per_route(tmp_path: Path) -> None:
    routes = """
        [route:a]
        path = /a
        upstream = demo
        [route:b]
        path = /b
        upstream = demo
        auth = optional
        [route:c]
        path = /c
        upstream = demo
        auth = none
        [upstream:demo]
        nodes = ws://127.0.0.1:9001
    """
    config = cfg(tmp_path, f"[auth]\nsecret = {SECRET}\n" + textwrap.dedent(routes), base=False)
    assert [r.auth for r in config.routes] == ["required", "optional", "none"]
    assert problems(tmp_path, routes.replace("auth = none", "auth = required"), base=False) == [
        "[route:b] auth: auth = optional needs an [auth] section",
        "[route:c] auth: auth = required needs an [auth] section",
    ]
    assert [r.auth for r in cfg(tmp_path, "").routes] == ["none"]


def test_full_proxy_route(tmp_path: Path) -> None:
    config = cfg(tmp_path, f"""
        [auth]
        secret = {SECRET}
        [route:users]
        path = /users/{{user}}/**
        host = *.Example.com
        headers = X-Env=prod  X-Tier=gold
        upstream = demo
        upstream_path = /u/{{user}}?tenant={{claims.tenant}}
        roles = admin ops
        forward_auth = yes
        allowed_origins = https://app.example.com
        mirror = shadow
        delivery = at_least_once
        on_upstream_close = reconnect
        slow_consumer = drop_oldest
        subscribe = user:{{claims.sub}} room:{{user}}
        [upstream:shadow]
        nodes = ws://127.0.0.1:9002
    """)
    route = config.routes[0]
    assert (route.path, route.host, route.headers) == ("/users/{user}/**", "*.Example.com",
                                                       (("X-Env", "prod"), ("X-Tier", "gold")))
    assert (route.upstream, route.upstream_path, route.mirror) == ("demo", "/u/{user}?tenant={claims.tenant}",
                                                                   "shadow")
    assert (route.roles, route.forward_auth, route.allowed_origins) == (("admin", "ops"), True,
                                                                        ("https://app.example.com",))
    assert (route.delivery, route.on_upstream_close, route.slow_consumer) == ("at_least_once", "reconnect",
                                                                              "drop_oldest")
    assert route.subscribe == ("user:{claims.sub}", "room:{user}")
    assert [r.name for r in config.routes] == ["users", "echo"]  # file order


def test_broadcast_route(tmp_path: Path) -> None:
    route = cfg(tmp_path, """
        [route:room]
        path = /rooms/{room}
        mode = broadcast
        channel = room:{room}
        client_publish = no
        slow_consumer = drop_oldest
        strip_prefix = no
    """).routes[0]
    assert (route.mode, route.channel, route.client_publish, route.upstream) == ("broadcast", "room:{room}", False,
                                                                                 None)


def test_route_problems(tmp_path: Path) -> None:
    assert problems(tmp_path, """
        [route:a]
        path = /a/{x}
        upstream = demo
        channel = c:{x}
        client_publish = no
        slow_consumer = drop_oldest
        strip_prefix = yes
        mirror = demo
        roles = admin
        [route:b]
        mode = broadcast
        upstream = demo
        channel = c:{nope}
        subscribe = x
        delivery = at_least_once
        [route:c]
        path = /c/**
        upstream = dmeo
        strip_prefix = yes
        upstream_path = /x/{claims.sub}
        headers = X-A=1 x-a=2
        [route:d]
        path = /a/{x}
        upstream =
        [route:e]
        path = /echo
        upstream = demo
        nodes = ws://x
        host = example.com:80
        [route:f]
        path = /echo
        upstream = demo
    """) == [
        "[route:a] channel: only applies to mode = broadcast",
        "[route:a] client_publish: only applies to mode = broadcast",
        "[route:a] slow_consumer: only applies to broadcast routes and routes with subscribe",
        "[route:a] strip_prefix: needs a path ending in /**",
        "[route:a] mirror: is the route's own upstream",
        "[route:a] roles: needs auth = required or optional",
        "[route:b] upstream: only applies to mode = proxy",
        "[route:b] channel: bad template 'c:{nope}': unknown field '{nope}': not a capture of the path "
        "(captures: none) nor claims.NAME, query.NAME or header.NAME",
        "[route:b] subscribe: only applies to mode = proxy",
        "[route:b] delivery: only applies to mode = proxy",
        "[route:b]: missing required key 'path'",
        "[route:c] upstream: no section [upstream:dmeo] (did you mean [upstream:demo]?)",
        "[route:c] strip_prefix: cannot be combined with upstream_path",
        "[route:c] upstream_path: uses {claims.NAME} but the route has auth = none",
        "[route:c] headers: header 'x-a' appears twice",
        "[route:d] path: same path, host and headers as [route:a]: this route would never match",
        "[route:d] upstream: required with mode = proxy: name an [upstream:NAME] section",
        "[route:e] nodes: unknown key 'nodes' (it belongs in [upstream:NAME])",
        "[route:e] host: host 'example.com:80' must not include a port",
        "[route:echo] path: same path, host and headers as [route:f]: this route would never match",
    ]


def test_route_with_host_is_not_a_duplicate(tmp_path: Path) -> None:
    config = cfg(tmp_path, "[route:other]\npath = /echo\nhost = other.example.com\nupstream = demo\n")
    # the base's [route:echo] (any host) and this one share the path: both load, each with its host
    assert sorted((r.name, r.path, r.host or "") for r in config.routes if r.path == "/echo") == [
        ("echo", "/echo", ""), ("other", "/echo", "other.example.com"),
    ]


# --------------------------------------------------------------- upstreams


def test_nodes_and_labels(tmp_path: Path) -> None:
    up = cfg(tmp_path, """
        [upstream:chat]
        nodes =
            ws://127.0.0.1:9001 weight=90 zone=a version=v1
            wss://Backend.example.com/base  weight=10 zone=b rack=r7
            ws://[::1]
        balance = hash:claim:sub
        zone = b
        version_header = X-Api-Version
        health_check = http:/healthz
    """).upstreams["chat"]
    a, b, c = up.nodes
    assert (a.scheme, a.host, a.port, a.path, a.weight, a.zone, a.version) == ("ws", "127.0.0.1", 9001, "", 90,
                                                                                "a", "v1")
    assert a.labels == {"weight": "90", "zone": "a", "version": "v1"}
    assert (b.scheme, b.host, b.port, b.path, b.weight, b.zone, b.version) == ("wss", "backend.example.com", 443,
                                                                                "/base", 10, "b", None)
    assert b.labels["rack"] == "r7" and b.url == "wss://Backend.example.com/base"
    assert (c.host, c.port, c.weight) == ("::1", 80, 1)
    assert (up.balance, up.zone, up.version_header, up.health_check) == ("hash:claim:sub", "b", "X-Api-Version",
                                                                         "http:/healthz")


@pytest.mark.parametrize("balance", ["round_robin", "weighted", "least_conn", "ewma", "hash:ip", "hash:claim:sub",
                                     "hash:header:X-Session"])
def test_balance_strategies(tmp_path: Path, balance: str) -> None:
    text = BASE + f"balance = {balance}\n"
    assert cfg(tmp_path, text, base=False).upstreams["demo"].balance == balance


@pytest.mark.parametrize("check", ["none", "tcp", "http:/health", "ws:/ws/ping"])
def test_health_checks(tmp_path: Path, check: str) -> None:
    assert cfg(tmp_path, BASE + f"health_check = {check}\n", base=False).upstreams["demo"].health_check == check


def test_upstream_problems(tmp_path: Path) -> None:
    assert problems(tmp_path, """
        [upstream:a]
        nodes =
            http://127.0.0.1:1
            ws://127.0.0.1:1?x=1
            ws://127.0.0.1:0
            ws://user:pw@127.0.0.1:1
            ws://127.0.0.1:2 weight=0
            ws://127.0.0.1:3 zone
            ws://127.0.0.1:4 ws://127.0.0.1:5
            ws:///nohost
            ws://127.0.0.1:6
            ws://127.0.0.1:6
        balance = hash:header:
        health_check = http:health
        [upstream:b]
        nodes = ws://127.0.0.1:1 zone=a
        zone = b
        backoff_initial = 3
        backoff_max = 1
        tls_cert = nope.pem
        [upstream:c]
        balance = weighted
        [upstream:d e]
        nodes = ws://x
    """) == [
        "[upstream:a] nodes: node 1 'http://127.0.0.1:1': scheme must be ws:// or wss://",
        "[upstream:a] nodes: node 2 'ws://127.0.0.1:1?x=1': no query or fragment allowed",
        "[upstream:a] nodes: node 3 'ws://127.0.0.1:0': port must be 1-65535",
        "[upstream:a] nodes: node 4: credentials in the URL are not supported",
        "[upstream:a] nodes: node 5 'ws://127.0.0.1:2': weight must be a whole number of at least 1",
        "[upstream:a] nodes: node 6 'ws://127.0.0.1:3': label 'zone' is not key=value (one node per line)",
        "[upstream:a] nodes: node 7 'ws://127.0.0.1:4': label 'ws://127.0.0.1:5' is not key=value "
        "(one node per line)",
        "[upstream:a] nodes: node 8 'ws:///nohost': needs a host name or IP address",
        "[upstream:a] nodes: node 10 'ws://127.0.0.1:6' is listed twice",
        "[upstream:a] balance: 'hash:header:': hash:header:NAME needs a valid NAME",
        "[upstream:a] health_check: 'http:health' is not one of none | tcp | http:/PATH | ws:/PATH",
        "[upstream:b] zone: no node has the label zone=b",
        "[upstream:b] backoff_max: must not be less than backoff_initial (3)",
        f"[upstream:b] tls_cert: cannot read 'nope.pem' ({tmp_path / 'nope.pem'}): No such file or directory",
        "[upstream:c]: missing required key 'nodes'",
        "[upstream:d e]: bad name 'd e': use letters, digits, '_', '.' and '-'",
    ]


def test_upstream_tls_problems(tmp_path: Path, tls: dict[str, Path]) -> None:
    assert problems(tmp_path, f"""
        [upstream:plain]
        nodes = ws://127.0.0.1:1
        tls_ca = {tls['ca.pem']}
        [upstream:half]
        nodes = wss://127.0.0.1:1
        tls_cert = {tls['cert.pem']}
        [upstream:mismatch]
        nodes = wss://127.0.0.1:1
        tls_cert = {tls['cert.pem']}
        tls_key = {tls['other-key.pem']}
        [upstream:notkey]
        nodes = wss://127.0.0.1:1
        tls_cert = {tls['cert.pem']}
        tls_key = {tls['cert.pem']}
    """) == [
        "[upstream:plain] tls_ca: set, but no node uses wss://",
        "[upstream:half] tls_cert: needs tls_key too (client certificate for mTLS)",
        "[upstream:mismatch] tls_key: does not match the certificate in tls_cert",
        f"[upstream:notkey] tls_key: {str(tls['cert.pem'])!r}: not an unencrypted PEM private key",
    ]


# ------------------------------------------------- redis, queue, log, misc


def test_redis_and_queue(tmp_path: Path) -> None:
    config = cfg(tmp_path, "[redis]\nurl = rediss://h.example.com:6380/2\nprefix = gw1\n[queue]\nbackend = redis\n")
    assert config.redis is not None and (config.redis.url, config.redis.prefix) == ("rediss://h.example.com:6380/2",
                                                                                    "gw1")
    assert config.queue.backend == "redis"
    redis = cfg(tmp_path, "[redis]\nurl = unix:///run/redis.sock\n").redis
    assert redis is not None and redis.url == "unix:///run/redis.sock"
    assert problems(tmp_path, "[queue]\nbackend = redis\nmax_attempts = 0\n[redis]\nurl = http://h:1\n") == [
        "[queue] max_attempts: must be at least 1",
        "[redis] url: must be redis://HOST[:PORT][/DB], rediss://HOST[:PORT][/DB] or unix:///PATH",
    ]
    assert problems(tmp_path, "[queue]\nbackend = redis\n") == ["[queue] backend: backend = redis needs a [redis] "
                                                                "section"]


def test_log(tmp_path: Path) -> None:
    assert cfg(tmp_path, "[log]\nlevel = WARNING\nformat = text\n").log == LogConfig("warn", "text", "-")
    assert problems(tmp_path, "[log]\nlevel = verbose\nformat = jsn\n") == [
        "[log] level: 'verbose' is not one of debug | info | warn | error | critical",
        "[log] format: 'jsn' is not one of json | text (did you mean 'json'?)",
    ]


def test_admin_token(tmp_path: Path) -> None:
    assert cfg(tmp_path, "[admin]\ntoken = abc.DEF-123\n").admin == AdminConfig(token="abc.DEF-123")
    line = one_problem(tmp_path, "[admin]\ntoken = two words\n")
    assert line.startswith("[admin] token: must be printable ASCII without spaces") and "two" not in line


def test_section_names(tmp_path: Path) -> None:
    assert problems(tmp_path, "[DEFAULT]\nx = 1\n[route]\n[routes:x]\n[upstream:]\n[limit]\n[Gateway]\n[whatever]\n",
                    base=False) == [
        "[DEFAULT]: unknown section",
        "[route]: needs a name: [route:NAME]",
        "[routes:x]: unknown section (did you mean [route:x]?)",
        "[upstream:]: needs a name: [upstream:NAME]",
        "[limit]: unknown section (did you mean [limits]?)",
        "[Gateway]: unknown section (did you mean [gateway]?)",
        "[whatever]: unknown section",
        "[gateway]: no [route:NAME] section: nothing to serve",
    ]


def test_unknown_keys_suggest(tmp_path: Path) -> None:
    assert problems(tmp_path, "[gateway]\nListn = tcp:1\nnodes = x\nfoo = 1\n") == [
        "[gateway] listn: unknown key 'listn' (did you mean 'listen'?)",
        "[gateway] nodes: unknown key 'nodes' (it belongs in [upstream:NAME])",
        "[gateway] foo: unknown key 'foo'",
    ]


@pytest.mark.parametrize("text, expected", [
    ("x = 1\n[gateway]\n", "line 1: a key before any [section] header"),
    ("[gateway]\n[gateway]\n", "line 2: [gateway]: duplicate section"),
    ("[gateway]\nlisten = tcp:1\nLISTEN = tcp:2\n", "line 3: [gateway] listen: duplicate key"),
])
def test_parse_errors(tmp_path: Path, text: str, expected: str) -> None:
    assert problems(tmp_path, text, base=False) == [expected]


def test_inline_comments_and_case_insensitive_keys(tmp_path: Path) -> None:
    config = cfg(tmp_path, """
        [gateway]   ; the gateway
        WORKERS = 3 ; three
        # a comment
        ; another
    """)
    assert config.gateway.workers == 3


# ------------------------------------------------------------- bad fixtures

BAD_FILES = {
    "unknown_key.ini": ["[gateway] listn: unknown key 'listn' (did you mean 'listen'?)"],
    "unknown_section.ini": ["[gatway]: unknown section (did you mean [gateway]?)"],
    "missing_upstream_section.ini": ["[route:chat] upstream: no section [upstream:chat]"],
    "bad_size_suffix.ini": ["[limits] max_message_size: invalid size '1X': expected bytes with an optional K, M or "
                            "G suffix (1M = 1048576)"],
    "bad_duration.ini": ["[limits] idle_timeout: invalid duration '5m': expected seconds, e.g. 2.5 "
                         "(seconds, without a unit)"],
    "missing_env_var.ini": ["[admin] token: environment variable WSGW_BAD_FIXTURE_UNSET_VARIABLE is not set"],
    "missing_file_value.ini": [f"[auth] secret: cannot read 'no-such-secret.txt' ({BAD / 'no-such-secret.txt'}): "
                               "No such file or directory"],
    "bad_endpoint.ini": ["[gateway] listen: invalid endpoint 'tpc:0:interface=127.0.0.1': "
                         "Unknown endpoint type: 'tpc'"],
    "ssl_missing_files.ini": [
        "[gateway] listen: invalid endpoint "
        "'ssl:0:interface=127.0.0.1:privateKey=no-such-key.pem:certKey=no-such-cert.pem': "
        f"privateKey {BAD / 'no-such-key.pem'}: cannot read: No such file or directory; "
        f"certKey {BAD / 'no-such-cert.pem'}: cannot read: No such file or directory"],
    "bad_path_pattern.ini": ["[route:chat] path: bad path pattern '/chat/{room': '{' without '}' in segment 2"],
    "hs_rs_mix.ini": ["[auth] algorithms: HS256 and RS256 cannot be mixed: an HMAC secret must never verify an "
                      "asymmetric token"],
    "none_algorithm.ini": ["[auth] algorithms: 'none' is never accepted"],
    "bad_node_url.ini": ["[upstream:demo] nodes: node 1 'http://127.0.0.1:9': scheme must be ws:// or wss://"],
    "bad_balance.ini": ["[upstream:demo] balance: 'round_robbin' is not one of round_robin | weighted | least_conn "
                        "| ewma | hash:ip | hash:claim:NAME | hash:header:NAME (did you mean 'round_robin'?)"],
    "bad_boolean.ini": ["[route:chat] strip_prefix: 'maybe' is not a boolean: use yes/no, true/false, on/off or "
                        "1/0"],
    "duplicate_key.ini": ["line 4: [gateway] listen: duplicate key"],
    "no_routes.ini": ["[gateway]: no [route:NAME] section: nothing to serve"],
    "auth_without_section.ini": ["[route:echo] auth: auth = required needs an [auth] section"],
    "broadcast_with_upstream.ini": ["[route:room] upstream: only applies to mode = proxy",
                                    "[route:room] channel: required with mode = broadcast, e.g. channel = room:{room}"],
    "unknown_template_field.ini": ["[route:user] upstream_path: bad template '/u/{id}': unknown field '{id}': not a "
                                   "capture of the path (captures: {user}) nor claims.NAME, query.NAME or "
                                   "header.NAME"],
    "several_errors.ini": [
        "[gateway] workers: 'none' is not a whole number or auto",
        "[limits] ping_interval: must not be negative",
        "[route:chat] upstream: no section [upstream:chat]",
        "[route:chat] mode: 'proxi' is not one of proxy | broadcast (did you mean 'proxy'?)",
        "[upstream:demo] retries: 'two' is not a whole number",
    ],
}


def test_every_bad_fixture_is_listed_and_says_what_is_wrong() -> None:
    names = sorted(p.name for p in BAD.glob("*.ini"))
    assert names == sorted(BAD_FILES) and len(names) >= 12
    for name in names:
        assert (BAD / name).read_text().startswith("# BAD: "), name


@pytest.mark.parametrize("name, substring", [
    ("unknown_key.ini", "(did you mean 'listen'?)"),
    ("unknown_section.ini", "[gatway]: unknown section"),
    ("missing_upstream_section.ini", "no section [upstream:chat]"),
    ("bad_size_suffix.ini", "invalid size '1X'"),
    ("bad_duration.ini", "invalid duration '5m'"),
    ("missing_env_var.ini", "environment variable WSGW_BAD_FIXTURE_UNSET_VARIABLE is not set"),
    ("missing_file_value.ini", "cannot read 'no-such-secret.txt'"),
    ("bad_endpoint.ini", "Unknown endpoint type: 'tpc'"),
    ("bad_path_pattern.ini", "bad path pattern '/chat/{room'"),
    ("hs_rs_mix.ini", "HS256 and RS256 cannot be mixed"),
    ("none_algorithm.ini", "'none' is never accepted"),
    ("bad_node_url.ini", "scheme must be ws:// or wss://"),
    ("bad_balance.ini", "(did you mean 'round_robin'?)"),
    ("bad_boolean.ini", "'maybe' is not a boolean"),
    ("duplicate_key.ini", "duplicate key"),
    ("no_routes.ini", "nothing to serve"),
    ("auth_without_section.ini", "needs an [auth] section"),
    ("broadcast_with_upstream.ini", "only applies to mode = proxy"),
    ("unknown_template_field.ini", "unknown field '{id}'"),
    ("several_errors.ini", "'two' is not a whole number"),
])
def test_bad_fixture_error(name: str, substring: str) -> None:
    path = str(BAD / name)
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert any(line.startswith(f"{path}: ") and substring in line for line in info.value.errors), info.value.errors


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_check_script_reports_bad_fixture(name: str) -> None:
    relative = f"tests/data/bad/{name}"
    result = run_check(relative)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"{relative}: {line}" for line in BAD_FILES[name]]


# ---------------------------------------------------------------- the CLI


def test_check_script_usage_errors() -> None:
    result = run_check()
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "usage: wsgateway-check CONFIG\n"
    result = run_check("no/such.ini")
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", "no/such.ini: cannot read: No such file or directory\n")


def test_main_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[upstream:other]\nnodes = ws://127.0.0.1:1\n")
    assert main([path]) == 0
    assert capsys.readouterr().out == f"{path}: OK, 1 route, 2 upstreams\n"
    assert main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: wsgateway-check CONFIG")
    assert main([str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"{tmp_path}: cannot read: Is a directory\n"
    assert main([path, "extra"]) == 1


# ------------------------------------------------------------------ misc


def test_node_id_and_rate(tmp_path: Path) -> None:
    config = cfg(tmp_path, "[gateway]\nnode_id = gw-7\n[limits]\nmessages_per_second = 12.5\n")
    assert (config.gateway.node_id, config.limits.messages_per_second) == ("gw-7", 12.5)
    assert cfg(tmp_path, "[gateway]\nnode_id =\n").gateway.node_id  # empty: the host name
    assert problems(tmp_path, "[gateway]\nnode_id = gw 7\n[limits]\nmessages_per_second = fast\n") == [
        "[gateway] node_id: must not contain whitespace",
        "[limits] messages_per_second: invalid rate 'fast': expected a number, e.g. 50",
    ]


def test_values_can_be_built_by_hand_with_spec_defaults() -> None:
    config = GatewayConfig(path="x.ini")
    assert config.limits == LimitsConfig() and config.queue.backend == "sqlite" and config.routes == ()
    assert config.upstreams == {} and hash(config)


def test_api_keys_file_is_checked_without_quoting_a_key(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("# raw key pasted by mistake\nsk-live-1234 billing\n")
    (tmp_path / "keys").chmod(0o600)
    assert problems(tmp_path, "[auth]\napi_keys_file = keys\n") == [
        "[auth] api_keys_file: 'keys' line 2: the first field must be the key's SHA-256 as 64 hex digits "
        "(e.g. printf %s KEY | sha256sum), never the key itself"
    ]


@pytest.mark.parametrize(("desc", "expected"), [
    ("tcp:8080", "tcp:8080:backlog=511"),
    (r"tcp6:8080:interface=\:\:1", r"tcp6:8080:interface=\:\:1:backlog=511"),
    ("unix:/run/gw.sock", "unix:/run/gw.sock:backlog=511"),
    ("ssl:8443:privateKey=k.pem", "ssl:8443:privateKey=k.pem:backlog=511"),
    ("tcp:8080:backlog=64", "tcp:8080:backlog=64"),
    ("TCP:8080:interface=127.0.0.1", "TCP:8080:interface=127.0.0.1:backlog=511"),
    ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
])
def test_listeners_get_a_default_backlog_unless_they_name_one(desc: str, expected: str) -> None:
    from wsgateway.endpoints import with_backlog

    assert with_backlog(desc) == expected


def test_compression_key(tmp_path: Path) -> None:
    config = cfg(tmp_path, """
        [queue]
        path = q.sqlite
        [upstream:other]
        nodes = ws://127.0.0.1:9002
        [route:plain]
        path = /plain
        upstream = demo
        [route:off]
        path = /off
        upstream = demo
        compression = off
        [route:durable]
        path = /durable
        upstream = demo
        delivery = at_least_once
        [route:reconnecting]
        path = /reconnecting
        upstream = demo
        on_upstream_close = reconnect
        [route:mirrored]
        path = /mirrored
        upstream = demo
        mirror = other
    """)
    routes = {r.name: r for r in config.routes}
    assert routes["plain"].compression == "passthrough" and routes["plain"].compressed
    assert routes["off"].compression == "off" and not routes["off"].compressed
    # a second upstream connection could not be held to the same parameters: declined
    assert not routes["durable"].compressed
    assert not routes["reconnecting"].compressed
    assert not routes["mirrored"].compressed
    assert problems(tmp_path, """
        [queue]
        path = q.sqlite
        [route:durable]
        path = /durable
        upstream = demo
        delivery = at_least_once
        compression = passthrough
        [route:typo]
        path = /typo
        upstream = demo
        compression = gzip
    """) == [
        "[route:durable] compression: at_least_once routes decline compression: set compression = off or remove it",
        "[route:typo] compression: 'gzip' is not one of passthrough | off",
    ]
