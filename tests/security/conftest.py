"""
Fixtures of the hostile-input suite: real ``twistd`` gateways on loopback.

Most cases run against ONE gateway process for the whole session (``main``),
so the survival checks (``test_survival.py``, always run last) can verify
that the very process that took all the abuse still serves a normal client,
with its memory and file descriptors back near where they started. Cases
that need other gateway-wide settings (``[limits]``, another ``[auth]`` key
source) get a module-scoped process of their own: four processes in all.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterator

import pytest
import trustme

from support.gateway import spawn_gateway

from .helpers import (
    Backend,
    Main,
    RawRecorder,
    Secrets,
    echo_ok,
    fd_count,
    handshake,
    main_ini,
    say_goodbye,
    tls_upstream,
    uid,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "security_last: runs after every other test of the session")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """The survival checks judge the main gateway after all the abuse: they go last."""
    last = [item for item in items if item.get_closest_marker("security_last")]
    if last:
        items[:] = [item for item in items if item not in last] + last


@pytest.fixture(scope="session")
def sent() -> Secrets:
    return Secrets()


@pytest.fixture(scope="session")
def main(tmp_path_factory: pytest.TempPathFactory, sent: Secrets) -> Iterator[Main]:
    """
    The long-lived gateway: routes /open (no auth), /auth (JWT), /admin
    (role admin), /origin (route-level wildcard origins), /raw (to the raw
    recorder), and three wss upstreams (/tls-good, /tls-wronghost,
    /tls-untrusted). HS256 with issuer, audience and leeway 0; per-IP limit
    50; max_message_size 64K; handshake_timeout 2 s; log level debug in JSON.
    """
    tmp = tmp_path_factory.mktemp("main")
    secret = sent.add(secrets.token_urlsafe(48))
    api_key = sent.add("sk_" + secrets.token_urlsafe(24))
    keys_file = tmp / "api_keys.txt"
    keys_file.write_text(f"# sha256 identity roles\n{hashlib.sha256(api_key.encode()).hexdigest()} svc-robot admin\n")
    keys_file.chmod(0o600)  # API keys are secrets: private to the gateway's user (docs/configuration.md)
    ca = trustme.CA()
    ca_pem = tmp / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    backend = Backend()
    recorder = RawRecorder()
    tls_backends = {
        "tls-good": tls_upstream(ca.issue_cert("localhost")),
        "tls-wronghost": tls_upstream(ca.issue_cert("other.example")),
        "tls-untrusted": tls_upstream(trustme.CA().issue_cert("localhost")),
    }
    tls_nodes = {name: b.node("wss", "localhost") for name, b in tls_backends.items()}
    gw = sent.watch(
        spawn_gateway(
            tmp,
            main_ini(backend, recorder, tls_nodes, ca_pem, keys_file),
            env={"WSGW_SECURITY_SECRET": secret},
            name="main",
        )
    )
    # Warm up (first handshake, first relay, lazy imports), then the baseline.
    for _ in range(3):
        path = "/open/" + uid("warmup")
        line, _, sock, reader = handshake(gw.port, path)
        assert " 101 " in line, line
        echo_ok(sock, reader)
        say_goodbye(sock, reader)
    time.sleep(0.3)
    m = Main(
        gw=gw,
        backend=backend,
        recorder=recorder,
        secret=secret,
        api_key=api_key,
        ca=ca,
        tls_nodes=tls_nodes,
        baseline_rss_kib=gw.rss_kib(),
        baseline_fds=0,
    )
    m.baseline_fds = fd_count(gw)
    yield m
    gw.stop()
    backend.stop()
    recorder.stop()
    for b in tls_backends.values():
        b.stop()

