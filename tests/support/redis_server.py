"""
A real ``redis-server`` (Debian's package; ``make test`` installs it) on a
free loopback port, in a temporary folder, with persistence off.

``running_redis(folder)`` starts one and kills it on the way out; the
``redis_server`` fixture of tests/conftest.py is one per test. ``RedisServer.kill()`` / ``start()`` stop and restart it on the same port,
for failure tests; ``pause()`` / ``resume()`` freeze it (SIGSTOP/SIGCONT)
so it keeps its connections but answers nothing. ``command()`` speaks RESP
over a plain socket: binary-safe, no client library between the test and
the server. ``config_file``, ``args`` and ``password`` let
support/redis_sentinel.py run replicas and sentinels through the same class.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from support.gateway import free_port
from support.tiers import require_integration

REDIS_SERVER = os.environ.get("WSGW_REDIS_SERVER", "redis-server")


class RedisServer:
    def __init__(
        self,
        folder: Path,
        port: int | None = None,
        *,
        config_file: Path | None = None,
        args: Sequence[str] = (),
        password: str | None = None,
        label: str = "redis",
    ) -> None:
        """
        ``config_file`` goes first on the command line (Sentinel needs one it
        can rewrite; a replica needs one for CONFIG REWRITE to keep the role
        Sentinel gave it across a restart); ``args`` come last, so they win;
        ``password`` is set as ``requirepass`` and used by ``command()``.
        """
        self.folder = folder
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_file = config_file
        self.args = list(args)
        self.password = password
        self.log_path = folder / f"{label}-{self.port}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start (again, on the same port) and wait until it answers PING."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        require_integration("redis-server")
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, *([str(self.config_file)] if self.config_file else []),
                 "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.folder), "--daemonize", "no", "--loglevel", "warning",
                 *(["--requirepass", self.password] if self.password else []), *self.args],
                cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if self.command(b"PING", timeout=0.5) == b"PONG":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"redis-server did not answer on port {self.port}; {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved (nothing would be: persistence is off)."""
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def command(self, *args: bytes | str | int, timeout: float = 5.0) -> object:
        """One command, one reply (bytes, int, str for +status, list; an error raises RuntimeError)."""
        return redis_command(self.port, *args, password=self.password, timeout=timeout)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, for error messages that say why it did not get there."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"


def redis_command(port: int, *args: bytes | str | int, password: str | None = None, timeout: float = 5.0) -> object:
    """
    One command to 127.0.0.1:``port``, one reply; with ``password``, AUTH goes
    first on the same connection (a refused AUTH raises RuntimeError). Without
    it, a server with requirepass answers NOAUTH: how the tests show it is on.
    """
    def encode(*cmd: bytes | str | int) -> bytes:
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in cmd]
        return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall((encode("AUTH", password) if password is not None else b"") + encode(*args))
        reader = sock.makefile("rb")
        if password is not None:
            _read_reply(reader)
        return _read_reply(reader)


def _read_reply(reader: object) -> object:
    line = reader.readline()  # type: ignore[attr-defined]
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = reader.read(n + 2)  # type: ignore[attr-defined]
        return data[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(reader) for _ in range(n)]
    raise ValueError(f"bad reply line {line!r}")


def require_redis_server() -> None:
    """Fail (not skip) without redis-server: a missing package must not pass as green."""
    if shutil.which(REDIS_SERVER) is None:
        pytest.fail(
            f"no {REDIS_SERVER} on PATH: the broker tests need Debian's redis-server package; "
            "`make test` installs it (or: apt-get install redis-server)",
            pytrace=False,
        )


@contextmanager
def running_redis(folder: Path) -> Iterator[RedisServer]:
    require_redis_server()
    server = RedisServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.kill()
