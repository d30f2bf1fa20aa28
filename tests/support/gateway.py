"""
Starting the gateway and its upstreams for the integration tier: a real
``twistd`` process built from this working tree, and ``websockets`` servers
in threads. The fixtures that wrap these (``start_gateway``,
``make_upstream``) live in tests/conftest.py.
"""

from __future__ import annotations

import configparser
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.sync.server import Server, ServerConnection, serve

from support.tiers import require_integration

ROOT = Path(__file__).resolve().parent.parent.parent
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
    # what {port} became in the INI ("0" when the port was read back): a
    # rewritten INI keeps it, so a reload does not see its listen change
    ini_port: str = ""

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



def spawn_gateway(
    tmpdir: Path,
    body: str,
    *,
    env: dict[str, str] | None = None,
    name: str = "gw",
    port: int | None = None,
    scheme_port: int | None = None,
    on_spawn: Callable[[Gateway], object] | None = None,
) -> Gateway:
    """
    Like ``start_gateway``, for module- and session-scoped fixtures; the
    caller stops it. ``{port}`` in the body becomes the gateway's port;
    ``scheme_port`` is the port to wait for when that is another listener.
    """
    require_integration("twistd")
    # Without a port of the caller's, the gateway binds port 0 and says which
    # port it got (its "gateway listening on ADDRESS (tcp:0...)" line): no
    # window in which another process could take a port picked for it.
    read_back = port is None and "{port}" in body
    if not read_back:
        port = port or free_port()
    ini = tmpdir / f"{name}.ini"
    ini.write_text(body.replace("{port}", "0" if read_back else str(port)))
    log_path = tmpdir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "wsgateway", "--config", str(ini)],
            cwd=tmpdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=source_env(**(env or {})),
        )
    gw = Gateway(port=port or 0, proc=proc, log_path=log_path, ini_path=ini, ini_port="0" if read_back else str(port))
    if on_spawn is not None:
        on_spawn(gw)
    try:
        if read_back:
            gw.port = bound_port(gw)
        wait_port(scheme_port or gw.port, proc=proc)
    except Exception:
        gw.stop()
        raise RuntimeError(f"gateway did not start:\n{gw.log()}") from None
    return gw


# "gateway listening on 127.0.0.1:41234 (tcp:0:interface=127.0.0.1)", in text or JSON logs
_LISTENING = re.compile(r"gateway listening on \S*:(\d+) \((?:tcp6?|ssl):0\b")


def _log_file(ini: Path) -> Path | None:
    """The ``[log] file`` of a gateway's INI, when it logs to a file rather than stdout."""
    parser = configparser.ConfigParser(inline_comment_prefixes=(";",), interpolation=None, strict=False)
    parser.read(ini)
    name = parser.get("log", "file", fallback="-").strip()
    return None if name in ("", "-") else ini.parent / name


def bound_port(gw: Gateway, timeout: float = 15.0) -> int:
    """The port the gateway's ``tcp:0`` / ``ssl:0`` listener got, from its log line."""
    deadline = time.monotonic() + timeout
    log_file = _log_file(gw.ini_path)
    while time.monotonic() < deadline:
        text = gw.log()
        if log_file is not None and log_file.exists():
            text += log_file.read_text(errors="replace")
        found = _LISTENING.search(text)
        if found:
            return int(found.group(1))
        if gw.proc.poll() is not None:
            raise RuntimeError(f"process exited with {gw.proc.returncode} before listening")
        time.sleep(0.02)
    raise TimeoutError("the gateway logged no 'gateway listening on' line for its port-0 listener")




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




def echo_handler(up: Upstream, ws: ServerConnection) -> None:
    for msg in ws:
        up.received.append(msg)
        ws.send(msg)


def serve_upstream(handler: Callable[[Upstream, ServerConnection], None] | None = None, **kwargs: Any) -> Upstream:
    """What ``make_upstream`` makes, for wider-scoped fixtures: the caller calls ``up.server.shutdown()``."""
    handler = handler or echo_handler
    holder: dict[str, Upstream] = {}

    def run(ws: ServerConnection) -> None:
        up = holder["up"]
        up.connections.append(ws)
        try:
            handler(up, ws)
        except Exception:
            pass
        finally:
            up.closes.append((ws.close_code, ws.close_reason))

    # Recorded before the upstream answers, in the connection's own thread:
    # the handler runs only after the 101 is out, so a test that has already
    # spoken through the gateway could otherwise look before it ran.
    answer = kwargs.pop("process_request", None)

    def record(connection: ServerConnection, request: Any) -> Any:
        if request.headers.get("Upgrade", "").lower() == "websocket":  # not an http: health probe
            holder["up"].requests.append(request)
        return answer(connection, request) if answer is not None else None

    kwargs.setdefault("max_size", None)
    kwargs.setdefault("compression", None)
    server = serve(run, "127.0.0.1", 0, process_request=record, **kwargs)
    up = Upstream(server=server, port=server.socket.getsockname()[1])
    holder["up"] = up
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return up


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


def default_config(tmp_path: Path) -> tuple[Path, int, int]:
    """
    etc/development.ini as shipped (what `make run` starts), on free ports,
    in the checkout's layout: TMP/etc/development.ini beside TMP/var/tls/
    with the self-signed certificate `make run` creates -> (INI path, ws
    port, wss port).
    """
    text = (ROOT / "etc" / "development.ini").read_text()
    gw, demo, admin, tls = free_port(), free_port(), free_port(), free_port()
    text = text.replace("tcp:8080:", f"tcp:{gw}:").replace("tcp:8081:", f"tcp:{demo}:")
    text = text.replace("127.0.0.1:8081", f"127.0.0.1:{demo}").replace("tcp:9090:", f"tcp:{admin}:")
    assert "ssl:8443:" in text
    text = text.replace("ssl:8443:", f"ssl:{tls}:")
    subprocess.run([sys.executable, "-m", "wsgateway.dev.selfsigned", str(tmp_path / "var" / "tls")], check=True,
                   capture_output=True, env=source_env())
    path = tmp_path / "etc" / "development.ini"
    path.parent.mkdir()
    path.write_text(text)
    return path, gw, tls


def quiet_port() -> int:
    """
    A free port below the ephemeral range: the gateway's own outgoing
    connections cannot take it as their local port while the test keeps it
    free, so an upstream can be started on it later.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(10000, max(10001, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    return free_port()


def source_copy(dest: Path) -> Path:
    """
    This checkout's files copied to ``dest``, for the tests that build or
    install the package: setuptools writes build/ and the egg-info beside
    setup.cfg, and two such builds of one tree at once (xdist runs test
    modules side by side) collide on build/bdist.*.
    """
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "var", "build", "dist", "__pycache__", "*.egg-info", ".mypy_cache", ".ruff_cache",
        ".hypothesis", ".pytest_cache"))
    return dest
