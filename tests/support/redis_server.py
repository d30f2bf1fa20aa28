"""
A real ``redis-server`` (Debian's package; ``make test`` installs it) on a
free loopback port, in a temporary folder, with persistence off.

``running_redis(folder)`` starts one and kills it on the way out; the
``redis_server`` fixture of tests/conftest.py is one per test. ``RedisServer.kill()`` / ``start()`` stop and restart it on the same port,
for failure tests; ``pause()`` / ``resume()`` freeze it (SIGSTOP/SIGCONT)
so it keeps its connections but answers nothing. ``command()`` speaks RESP
over a plain socket: binary-safe, no client library between the test and
the server.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from support.gateway import free_port
from support.tiers import require_integration

REDIS_SERVER = os.environ.get("WSGW_REDIS_SERVER", "redis-server")


class RedisServer:
    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = folder / f"redis-{self.port}.log"

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
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.folder), "--daemonize", "no", "--loglevel", "warning"],
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
                raise TimeoutError(f"redis-server did not answer on port {self.port}")
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
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        request = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(request)
            reader = sock.makefile("rb")
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


@contextmanager
def running_redis(folder: Path) -> Iterator[RedisServer]:
    if shutil.which(REDIS_SERVER) is None:
        pytest.fail(
            f"no {REDIS_SERVER} on PATH: the broker tests need Debian's redis-server package; "
            "`make test` installs it (or: apt-get install redis-server)",
            pytrace=False,
        )
    server = RedisServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.kill()
