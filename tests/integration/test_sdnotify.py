"""
``Type=notify`` (wsgateway/sdnotify.py): a real twistd gateway with
``$NOTIFY_SOCKET`` naming a datagram socket the test bound, as systemd
does; READY=1 once it listens, RELOADING=1 / READY=1 around a SIGHUP
(with STATUS= when the reload is rejected), STOPPING=1 on SIGTERM. The
same with two workers, where only the parent may notify.
"""

from __future__ import annotations

import shutil
import signal
import socket
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.gateway import free_port, proxy_ini
from support.metrics_text import parse

# the workers tests' own config and admin client: the same two-worker gateway
from .test_workers import get, workers_ini

TOKEN = "sdnotify-test-admin-token-0123456789"


class Systemd:
    """The receiving end of $NOTIFY_SOCKET."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)

    def next(self, timeout: float = 20.0) -> dict[str, str]:
        """The next notification, as its KEY=value fields (bounded wait: the socket's timeout)."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    def pending(self) -> list[bytes]:
        self.sock.setblocking(False)
        out = []
        try:
            while True:
                out.append(self.sock.recv(4096))
        except BlockingIOError:
            return out


@pytest.fixture
def systemd() -> Iterator[Systemd]:
    # a short folder: AF_UNIX paths are limited to 107 bytes
    folder = tempfile.mkdtemp(prefix="sdn-")
    receiver = Systemd(str(Path(folder) / "notify"))
    yield receiver
    receiver.sock.close()
    shutil.rmtree(folder, ignore_errors=True)


def single_ini(node: str, admin: int) -> str:
    return proxy_ini(node).replace(
        "[limits]", f"[admin]\n        listen = tcp:{admin}:interface=127.0.0.1\n        token = {TOKEN}\n\n"
                    f"        [limits]")


def listens(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return True


def reload_and_expect(gw: Any, systemd: Systemd, *, status_prefix: str | None = None) -> None:
    gw.proc.send_signal(signal.SIGHUP)
    reloading = systemd.next()
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0, reloading
    assert set(reloading) == {"RELOADING", "MONOTONIC_USEC"}
    done = systemd.next()
    assert done["READY"] == "1", done
    if status_prefix is None:
        assert "STATUS" not in done or done["STATUS"] == "", done
    else:
        assert done["STATUS"].startswith(status_prefix), done


def test_ready_reload_and_stopping_of_a_single_process(make_upstream: Any, start_gateway: Any,
                                                       systemd: Systemd) -> None:
    up = make_upstream()
    admin = free_port()
    gw = start_gateway(single_ini(up.node, admin), env={"NOTIFY_SOCKET": systemd.path})
    assert systemd.next() == {"READY": "1"}
    # once READY=1 has come, every listener is bound: the gateway's and the admin port
    assert listens(gw.port) and listens(admin)

    reload_and_expect(gw, systemd)
    assert "reloaded " in gw.log()

    good = gw.ini_path.read_text()
    gw.ini_path.write_text(good + "\n[route:broken]\nupstream = nowhere\n")
    reload_and_expect(gw, systemd, status_prefix="reload rejected")
    assert "rejected" in gw.log()
    gw.ini_path.write_text(good)
    reload_and_expect(gw, systemd)  # clears the STATUS= (empty)

    gw.proc.send_signal(signal.SIGTERM)
    assert systemd.next() == {"STOPPING": "1"}
    assert gw.proc.wait(20) == 0
    assert systemd.pending() == []  # nothing after STOPPING=1


def test_ready_reload_and_stopping_with_two_workers_from_the_parent_only(make_upstream: Any, start_gateway: Any,
                                                                         systemd: Systemd) -> None:
    up = make_upstream()
    admin = free_port()
    gw = start_gateway(workers_ini(up.node, admin), env={"NOTIFY_SOCKET": systemd.path})
    assert systemd.next() == {"READY": "1"}
    # READY=1 came once every worker answers its control socket: none is starting or down
    status, body = get(admin, "/readyz")
    assert [w["status"] for w in body["workers"]] in (["ready", "ready"], ["unready", "ready"], ["ready", "unready"],
                                                      ["unready", "unready"]), body
    assert listens(gw.port)
    # the workers never see $NOTIFY_SOCKET: only the parent notifies (NotifyAccess=main)
    for worker in body["workers"]:
        environ = Path(f"/proc/{worker['pid']}/environ").read_bytes().split(b"\0")
        assert not [v for v in environ if v.startswith(b"NOTIFY_SOCKET=")], worker
    assert systemd.pending() == []

    reload_and_expect(gw, systemd)
    good = gw.ini_path.read_text()
    gw.ini_path.write_text(good + "\n[route:broken]\nupstream = nowhere\n")
    reload_and_expect(gw, systemd, status_prefix="reload rejected")
    gw.ini_path.write_text(good)

    # one build_info series at 1 after the parent merged its workers' pages with its own
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as r:
        samples = parse(r.read().decode())
    build = {k: v for k, v in samples.items() if k[0] == "wsgateway_build_info"}
    assert list(build.values()) == [1.0], build

    gw.proc.send_signal(signal.SIGTERM)
    assert systemd.next() == {"STOPPING": "1"}
    assert gw.proc.wait(30) == 0
    assert systemd.pending() == []
