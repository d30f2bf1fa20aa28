"""
Shared fixtures: real sockets on loopback only.

The gateway runs as a real ``twistd`` process built from this working tree;
upstreams and clients are the ``websockets`` library (an independent
implementation), run in threads.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.server import Server, ServerConnection, serve

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; its last truth."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def source_env(**extra: str) -> dict[str, str]:
    """Environment that makes a subprocess run this working tree's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


@dataclass
class Gateway:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    ini_path: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """
    start_gateway(ini_body, port=None) -> Gateway: writes the INI (``{port}``
    in it is replaced by the gateway's port), runs ``twistd -n wsgateway``
    and waits until it listens.
    """
    started: list[Gateway] = []

    def start(body: str, *, port: int | None = None, scheme_port: int | None = None, env: dict[str, str] | None = None) -> Gateway:
        port = port or free_port()
        ini = tmp_path / f"gw-{len(started)}.ini"
        ini.write_text(textwrap.dedent(body).replace("{port}", str(port)))
        log_path = tmp_path / f"gw-{len(started)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "wsgateway", "--config", str(ini)],
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=source_env(**(env or {})),
            )
        gw = Gateway(port=port, proc=proc, log_path=log_path, ini_path=ini)
        started.append(gw)
        try:
            wait_port(scheme_port or port, proc=proc)
        except Exception:
            gw.stop()
            raise RuntimeError(f"gateway did not start:\n{gw.log()}") from None
        return gw

    yield start
    for gw in started:
        gw.stop()


@dataclass
class Upstream:
    """A websockets server in a thread, recording what it saw."""

    server: Server
    port: int
    requests: list[Any] = field(default_factory=list)
    closes: list[tuple[int | None, str | None]] = field(default_factory=list)
    received: list[Any] = field(default_factory=list)
    connections: list[ServerConnection] = field(default_factory=list)

    @property
    def node(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


@pytest.fixture
def make_upstream() -> Iterator[Callable[..., Upstream]]:
    """
    make_upstream(handler=echo, **serve_kwargs) -> Upstream. The handler gets
    (upstream, connection).
    """
    servers: list[Upstream] = []

    def echo(up: Upstream, ws: ServerConnection) -> None:
        for msg in ws:
            up.received.append(msg)
            ws.send(msg)

    def make(handler: Callable[[Upstream, ServerConnection], None] | None = None, **kwargs: Any) -> Upstream:
        handler = handler or echo
        holder: dict[str, Upstream] = {}

        def run(ws: ServerConnection) -> None:
            up = holder["up"]
            up.requests.append(ws.request)
            up.connections.append(ws)
            try:
                handler(up, ws)
            except Exception:
                pass
            finally:
                up.closes.append((ws.close_code, ws.close_reason))

        kwargs.setdefault("max_size", None)
        kwargs.setdefault("compression", None)
        server = serve(run, "127.0.0.1", 0, **kwargs)
        up = Upstream(server=server, port=server.socket.getsockname()[1])
        holder["up"] = up
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(up)
        return up

    yield make
    for up in servers:
        up.server.shutdown()


def proxy_ini(node: str, *, extra_route: str = "", limits: str = "", upstream: str = "", routes: str = "") -> str:
    """A one-route gateway config in front of ``node``."""
    return f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1

        [limits]
        max_message_size = 32M
        {limits}

        [log]
        level = info
        format = text

        [upstream:backend]
        nodes = {node}
        connect_timeout = 2
        retries = 0
        {upstream}

        [route:main]
        path = /**
        upstream = backend
        {extra_route}
        {routes}
        """
