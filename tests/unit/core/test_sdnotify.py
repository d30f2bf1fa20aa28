"""
wsgateway/sdnotify.py: systemd's notify protocol, received on real AF_UNIX
datagram sockets (a path in a temporary folder, and the abstract namespace).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs

from wsgateway.sdnotify import ENV, Notifier, address, message, ready_when


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer
    path = Path(tempfile.mkdtemp(prefix="sdn-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def receiver(short_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd's, and the $NOTIFY_SOCKET naming it."""
    path = str(short_dir / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def received(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on ``sock`` now."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(5)


def test_address_of_a_path_the_abstract_namespace_and_what_af_unix_cannot_reach() -> None:
    assert address("/run/systemd/notify") == "/run/systemd/notify"
    assert address("@/org/freedesktop/systemd1/notify/42") == b"\0/org/freedesktop/systemd1/notify/42"
    for unusable in ("", "@", "relative/path", "vsock:2:1234"):
        assert address(unusable) is None, unusable


def test_message_is_newline_separated_assignments_each_value_on_one_line() -> None:
    assert message(("READY", "1")) == b"READY=1"
    assert message(("READY", "1"), ("STATUS", "bad file\nline two")) == b"READY=1\nSTATUS=bad file line two"
    assert message(("STATUS", "")) == b"STATUS="


def test_the_lifecycle_in_the_order_systemd_expects(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier({ENV: path})
    n.reloading()  # before READY=1: nothing (a SIGHUP while still starting)
    n.reloaded()
    assert received(sock) == []
    n.ready()
    n.ready()  # once
    assert received(sock) == [b"READY=1"]

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = sock.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after

    n.reloaded(config_ok=False)
    status = sock.recv(4096).decode().split("\n")
    assert status[0] == "READY=1" and status[1].startswith("STATUS=reload rejected") and len(status) == 2
    n.reloading()
    sock.recv(4096)
    n.reloaded()  # a good reload clears the rejected one's STATUS
    assert sock.recv(4096) == b"READY=1\nSTATUS="
    n.reloading()
    sock.recv(4096)
    n.reloaded()
    assert sock.recv(4096) == b"READY=1"
    n.reloaded(certificates_ok=False)
    assert sock.recv(4096).startswith(b"READY=1\nSTATUS=reload: a TLS certificate")

    n.stopping()
    n.stopping()
    n.ready()
    n.reloading()
    n.reloaded()
    assert received(sock) == [b"STOPPING=1"]


def test_an_abstract_socket_is_reached_through_a_leading_at() -> None:
    name = f"wsgateway-test-{os.getpid()}-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        n = Notifier({ENV: "@" + name})
        n.ready()
        assert sock.recv(4096) == b"READY=1"


def test_without_notify_socket_nothing_is_sent_and_nothing_logged() -> None:
    with capturedLogs() as events:
        n = Notifier({})
        n.ready()
        n.reloading()
        n.reloaded(config_ok=False)
        n.stopping()
        assert n.send(("READY", "1")) is False
    assert events == []


def test_a_failure_never_raises_and_is_logged_once(short_dir: Path) -> None:
    with capturedLogs() as events:
        n = Notifier({ENV: str(short_dir / "nobody-listens")})
        n.ready()
        n.stopping()
        assert n.send(("READY", "1")) is False
    warnings = [e for e in events if e["log_level"].name == "warn"]
    assert len(warnings) == 1 and "NOTIFY_SOCKET" in warnings[0]["log_format"].replace("{env}", ENV)


def test_an_unusable_address_is_logged_once_and_ignored() -> None:
    with capturedLogs() as events:
        n = Notifier({ENV: "vsock:2:1234"})
        n.ready()
        n.stopping()
    assert n.target is None
    assert len([e for e in events if e["log_level"].name == "warn"]) == 1


def test_a_full_socket_never_blocks_the_caller(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver  # never read until the end: its queue fills up
    n = Notifier({ENV: path})
    start = time.monotonic()
    results = [n.send(("STATUS", "x" * 1000)) for _ in range(5000)]
    assert time.monotonic() - start < 10
    assert results[0] is True and results[-1] is False  # the queue filled: dropped, not waited for


class _Reactor:
    def __init__(self) -> None:
        self.running: list[Any] = []

    def callWhenRunning(self, f: Any) -> None:
        self.running.append(f)


def test_ready_waits_for_every_listener_and_the_running_reactor(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier({ENV: path})
    reactor = _Reactor()
    first: Deferred[None] = Deferred()
    second: Deferred[None] = Deferred()
    ready_when(n, [first, second], reactor)
    first.callback(None)
    assert reactor.running == []
    second.callback(None)
    assert len(reactor.running) == 1 and received(sock) == []  # not before the reactor runs
    reactor.running[0]()
    assert received(sock) == [b"READY=1"]
