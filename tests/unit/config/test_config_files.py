"""
Hostile configs (issue 16 item 13, docs/configuration.md): the files a config
names are regular files of at most 1 MiB, the secret ones private to the
gateway's user, whether read at start, by wsgateway-check or at a SIGHUP
(the same functions); ``trusted_proxies`` cannot trust everyone and
``write_buffer`` has an upper bound. Each error names the file, the
section and the key.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import trustme

from wsgateway.auth.keys import load_api_keys, load_jwks_file, load_public_key
from wsgateway.config.files import MAX_FILE, FileRefused, read_bounded
from wsgateway.config.loader import ConfigError, load

ROOT = Path(__file__).resolve().parents[3]
SECRET = "s3cret-value-that-must-never-show-up-anywhere-0123456789"
BASE = """
[route:echo]
path = /echo
upstream = demo

[upstream:demo]
nodes = ws://127.0.0.1:9001
"""
API_KEY_LINE = "a" * 64 + " alice admin\n"


def write(folder: Path, text: str) -> str:
    path = folder / "gw.ini"
    path.write_text(textwrap.dedent(text) + BASE)
    return str(path)


def problems(folder: Path, text: str) -> list[str]:
    path = write(folder, text)
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert all(line.startswith(f"{path}: ") for line in info.value.errors), info.value.errors
    return [line[len(path) + 2:] for line in info.value.errors]


def one_problem(folder: Path, text: str) -> str:
    found = problems(folder, text)
    assert len(found) == 1, found
    return found[0]


def fifo(folder: Path, name: str = "pipe") -> Path:
    """
    A named pipe. A reader that waits for a writer (as before the fix) is
    let go after 3 s by a writer that opens and closes it, so such a test
    fails instead of hanging.
    """
    path = folder / name
    os.mkfifo(path)

    def let_go() -> None:
        deadline = time.monotonic() + 30
        time.sleep(3)
        while time.monotonic() < deadline:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader waiting (ENXIO), or the test is over
                return
            time.sleep(0.5)

    threading.Thread(target=let_go, daemon=True).start()
    return path


def run_bounded(args: list[str]) -> subprocess.CompletedProcess[str]:
    """
    A Python process with 1 GiB of address space and a minute: what reads
    /dev/zero to the end (as before the fix) fails there, not this machine.
    """
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1024 ** 3, 1024 ** 3))

    environ = {k: v for k, v in os.environ.items() if not k.startswith("WSGW_")}
    environ["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=60, preexec_fn=limit)


def private(path: Path, data: str | bytes) -> Path:
    """A file readable by its owner only, as the README tells operators to keep secrets."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert = trustme.CA().issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    private(folder / "key.pem", cert.private_key_pem.bytes())
    return {p.name: p for p in folder.iterdir()}


# ---------------------------------------------------------------- not a regular file


def test_a_named_pipe_as_a_key_file_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    pipe = fifo(tmp_path)
    started = time.monotonic()
    assert one_problem(tmp_path, f"[auth]\nalgorithms = RS256\npublic_key_file = {pipe}\n") == (
        f"[auth] public_key_file: {pipe} is not a regular file")
    assert time.monotonic() - started < 5


def test_wsgateway_check_does_not_hang_on_a_named_pipe(tmp_path: Path) -> None:
    pipe = fifo(tmp_path, "secret")
    path = write(tmp_path, "[auth]\nsecret = file:secret\n")
    started = time.monotonic()
    result = run_bounded(["-m", "wsgateway.config", path])
    assert result.returncode != 0
    assert f"{path}: [auth] secret: {pipe} is not a regular file" in result.stderr
    assert time.monotonic() - started < 3 + 10  # not let go by the writer: it never waited for one


def test_dev_zero_is_refused_without_reading_it(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [auth]
        algorithms = RS256
        public_key_file = /dev/zero
        api_keys_file = /dev/zero
        [admin]
        token = file:/dev/zero
        [upstream:tls]
        nodes = wss://127.0.0.1:9443
        tls_ca = /dev/zero
    """)
    result = run_bounded(["-m", "wsgateway.config", path])
    assert result.returncode != 0
    for where in ("[auth] public_key_file", "[auth] api_keys_file", "[admin] token", "[upstream:tls] tls_ca"):
        assert f"{path}: {where}: /dev/zero is not a regular file" in result.stderr, result.stderr
    jwks = write(tmp_path, "[auth]\nalgorithms = RS256\njwks_file = /dev/zero\n")
    assert f"{jwks}: [auth] jwks_file: /dev/zero is not a regular file" in run_bounded(
        ["-m", "wsgateway.config", jwks]).stderr


# ---------------------------------------------------------------- at most 1 MiB


def test_a_file_over_one_mib_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "jwks.json"
    big.write_bytes(b'{"keys": [' + b" " * (2 * 1024 * 1024) + b"]}")
    assert one_problem(tmp_path, f"[auth]\nalgorithms = RS256\njwks_file = {big}\n") == (
        f"[auth] jwks_file: {big} is larger than 1 MiB ({big.stat().st_size} bytes)")
    secret = private(tmp_path / "secret", "x" * (MAX_FILE + 1))
    assert one_problem(tmp_path, f"[auth]\nsecret = file:{secret}\n") == (
        f"[auth] secret: {secret} is larger than 1 MiB ({MAX_FILE + 1} bytes)")


def test_read_bounded_reads_exactly_up_to_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"y" * MAX_FILE)
    assert read_bounded(str(path)) == b"y" * MAX_FILE
    with pytest.raises(FileRefused, match="larger than 10 bytes"):
        read_bounded(str(path), limit=10)


# ---------------------------------------------------------------- secrets private


def test_a_world_readable_api_keys_file_is_refused_with_the_chmod_that_fixes_it(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(API_KEY_LINE)
    keys.chmod(0o644)
    assert one_problem(tmp_path, f"[auth]\napi_keys_file = {keys}\n") == (
        f"[auth] api_keys_file: {keys} is readable by other users (mode 0644); it holds a secret: "
        f"chmod 600 {keys}")
    keys.chmod(0o600)
    config = load(write(tmp_path, f"[auth]\napi_keys_file = {keys}\n"), {})
    assert config.auth is not None and config.auth.api_keys_file == str(keys)


@pytest.mark.parametrize("section, key", [("auth", "secret"), ("admin", "token")])
def test_a_group_readable_secret_file_value_is_refused(tmp_path: Path, section: str, key: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o640)
    found = one_problem(tmp_path, f"[{section}]\n{key} = file:secret\n")
    assert found == (f"[{section}] {key}: {secret} is readable by other users (mode 0640); it holds a secret: "
                     f"chmod 600 {secret}")
    assert SECRET not in found


def test_a_file_value_that_is_no_secret_may_be_world_readable(tmp_path: Path) -> None:
    (tmp_path / "nodes.txt").write_text("ws://10.0.0.1:9001\n")
    (tmp_path / "nodes.txt").chmod(0o644)
    path = tmp_path / "gw.ini"
    path.write_text("[route:echo]\npath = /echo\nupstream = demo\n[upstream:demo]\nnodes = file:nodes.txt\n")
    assert [n.host for n in load(str(path), {}).upstreams["demo"].nodes] == ["10.0.0.1"]


def test_a_world_readable_tls_private_key_is_refused(tmp_path: Path, tls: dict[str, Path]) -> None:
    loose = tmp_path / "loose-key.pem"
    loose.write_bytes(tls["key.pem"].read_bytes())
    loose.chmod(0o644)
    found = one_problem(tmp_path, f"[gateway]\nlisten = ssl:0:interface=127.0.0.1:privateKey={loose}:"
                                  f"certKey={tls['cert.pem']}\n")
    assert found.startswith("[gateway] listen: invalid endpoint 'ssl:0:")
    assert found.endswith(f"privateKey {loose} is readable by other users (mode 0644); it holds a secret: "
                          f"chmod 600 {loose}")
    ok = load(write(tmp_path, f"[gateway]\nlisten = ssl:0:interface=127.0.0.1:privateKey={tls['key.pem']}:"
                              f"certKey={tls['cert.pem']}\n"), {})
    assert len(ok.gateway.listen) == 1


def test_a_world_readable_upstream_client_key_is_refused(tmp_path: Path, tls: dict[str, Path]) -> None:
    loose = tmp_path / "client-key.pem"
    loose.write_bytes(tls["key.pem"].read_bytes())
    loose.chmod(0o604)
    found = one_problem(tmp_path, f"[upstream:tls]\nnodes = wss://127.0.0.1:9443\ntls_cert = {tls['cert.pem']}\n"
                                  f"tls_key = {loose}\n")
    assert found == (f"[upstream:tls] tls_key: {loose} is readable by other users (mode 0604); it holds a secret: "
                     f"chmod 600 {loose}")


def test_the_runtime_loaders_apply_the_same_rules(tmp_path: Path) -> None:
    # what a SIGHUP reload runs (wsgateway.runtime), after the config was read again
    keys = tmp_path / "keys.txt"
    keys.write_text(API_KEY_LINE)
    keys.chmod(0o644)
    with pytest.raises(FileRefused, match="chmod 600"):
        load_api_keys(str(keys))
    keys.chmod(0o600)
    assert set(load_api_keys(str(keys))) == {"a" * 64}
    for loader in (load_api_keys, load_jwks_file, load_public_key):
        with pytest.raises(FileRefused, match="not a regular file"):
            loader(str(fifo(tmp_path, f"pipe-{loader.__name__}")))
    result = run_bounded(["-c", textwrap.dedent("""
        from wsgateway.auth.keys import load_api_keys, load_jwks_file, load_public_key
        from wsgateway.config.files import FileRefused
        for loader in (load_api_keys, load_jwks_file, load_public_key):
            try:
                loader("/dev/zero")
            except FileRefused as e:
                print(e)
    """)])
    assert result.stdout.splitlines() == ["/dev/zero is not a regular file"] * 3, result.stderr


# ---------------------------------------------------------------- trusted_proxies, write_buffer


@pytest.mark.parametrize("everyone", ["0.0.0.0/0", "::/0", "10.1.2.3/0"])
def test_trusted_proxies_cannot_trust_every_address(tmp_path: Path, everyone: str) -> None:
    found = one_problem(tmp_path, f"[gateway]\ntrusted_proxies = 10.0.0.0/8 {everyone}\n")
    assert found == f"[gateway] trusted_proxies: '{everyone}' trusts every address: list the proxies' own " \
                    "addresses or networks"


def test_write_buffer_has_an_upper_bound(tmp_path: Path) -> None:
    found = one_problem(tmp_path, "[limits]\nwrite_buffer = 100G\n")
    assert found.startswith("[limits] write_buffer: at most 64M: it is held for each connection and direction")
    config = load(write(tmp_path, "[limits]\nwrite_buffer = 64M\n"), {})
    assert config.limits.write_buffer == 64 * 1024 * 1024


# ---------------------------------------------------------------- [queue] bounds


def test_queue_bounds_defaults_and_values(tmp_path: Path) -> None:
    config = load(write(tmp_path, "[gateway]\n"), {})
    assert (config.queue.max_bytes, config.queue.max_bytes_per_connection) == (1024 ** 3, 16 * 1024 ** 2)
    config = load(write(tmp_path, "[queue]\nmax_bytes = 2G\nmax_bytes_per_connection = 64K\n"), {})
    assert (config.queue.max_bytes, config.queue.max_bytes_per_connection) == (2 * 1024 ** 3, 64 * 1024)
    assert problems(tmp_path, "[queue]\nmax_bytes = 0\nmax_bytes_per_connection = lots\n") == [
        "[queue] max_bytes: must be greater than 0",
        "[queue] max_bytes_per_connection: invalid size 'lots': expected bytes with an optional K, M or G suffix "
        "(1M = 1048576)",
    ]
