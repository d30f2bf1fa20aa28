"""
What every soak scenario (bench/soak/scenario_*.py) stands on: real
processes on loopback (the gateway under twistd, the Go echo upstream and
load generator of bench/, redis-server), their RSS and descriptors, and
bounded waits. One L{Soak} per scenario: it owns a temporary folder and
stops every process it started, whatever happens.

A scenario module has ``NAME`` (its row in bench/RELIABILITY.md), ``TARGET``
(the issue's target, in words) and ``run(soak: Soak, quick: bool) ->
Result``; ``quick`` (``make soak QUICK=1``) shortens every phase so the
scenario can be tried in a minute, its figures then not comparable.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

from fanout import free_port, wait_port  # noqa: E402  (bench/fanout.py: one copy of each)
TWISTD = str(Path(sys.executable).with_name("twistd"))
GO_BIN = Path(os.environ.get("SOAK_BIN", "/tmp/wsgw-bench/bin"))  # where bench/run.sh builds the Go tools


@dataclass
class Result:
    """One scenario's row: its figures (name -> text), whether it met its target, and anything to say."""

    figures: dict[str, str]
    passed: bool
    notes: str = ""
    raw: dict[str, Any] = field(default_factory=dict)  # printed as one JSON line per scenario by run.py


def wait_for(check: Callable[[], Any], timeout: float, interval: float = 0.05) -> bool:
    """True once ``check()`` is truthy, False after ``timeout`` seconds: every wait here is bounded."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def rss_kib(pid: int) -> int:
    """Resident memory of one process (VmRSS), KiB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def build_go_tools() -> Path:
    """The Go load generator and echo upstream of bench/ (built offline as bench/run.sh does), once."""
    env = dict(os.environ, GO111MODULE="off", GOPATH="/tmp/gopath:/usr/share/gocode", GOCACHE="/tmp/gocache",
               GOFLAGS="")
    GO_BIN.mkdir(parents=True, exist_ok=True)
    for tool in ("loadgen", "echo"):
        target = GO_BIN / tool
        sources = list((BENCH / tool).glob("*.go"))
        if not target.exists() or any(s.stat().st_mtime > target.stat().st_mtime for s in sources):
            print(f"# building {target}", file=sys.stderr, flush=True)
            subprocess.run(["go", "build", "-o", str(target), "."], cwd=BENCH / tool, env=env, check=True)
    return GO_BIN


class Soak:
    """One scenario's processes and folder (a context manager: everything it started is stopped on exit)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.folder = Path(tempfile.mkdtemp(prefix=f"wsgw-soak-{name}-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.bin = build_go_tools()

    def __enter__(self) -> Soak:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
        shutil.rmtree(self.folder, ignore_errors=True)

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def spawn(self, argv: list[str], name: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        """A process of this scenario, its output in FOLDER/NAME.log."""
        log = open(self.folder / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder, **kwargs)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- the parts ------------------------------------------------------------

    def echo(self, port: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
        """The Go echo upstream (bench/echo) on a free port: ws://127.0.0.1:PORT/ws."""
        port = port or free_port()
        proc = self.spawn([str(self.bin / "echo"), "-addr", f"127.0.0.1:{port}"], f"echo-{port}")
        wait_port(port)
        return proc, port

    def gateway(self, ini: str, name: str = "gw", env: dict[str, str] | None = None,
                port: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
        """
        twistd wsgateway with ``ini`` (dedented; ``{port}`` replaced by a free
        port, or by ``port`` to restart a gateway where it was; returned),
        waited for until it listens.
        """
        port = port or free_port()
        path = self.folder / f"{name}.ini"
        path.write_text(textwrap.dedent(ini).replace("{port}", str(port)))
        environ = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
        proc = self.spawn([TWISTD, "-n", "--pidfile=", "wsgateway", "--config", str(path)], name, env=environ)
        wait_port(port, 30)
        return proc, port

    def redis(self, port: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
        port = port or free_port()
        proc = self.spawn(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no"], f"redis-{port}")
        wait_port(port)
        return proc, port

    def loadgen(self, *args: str, name: str = "loadgen") -> subprocess.Popen[bytes]:
        """bench/loadgen with ``args`` (see its -h); its JSON result lines go to FOLDER/NAME.log."""
        return self.spawn([str(self.bin / "loadgen"), *args], name)


@contextmanager
def sampled(pid: int, every: float = 1.0) -> Iterator[list[tuple[float, int, int]]]:
    """(seconds since start, RSS KiB, descriptors) of ``pid`` every ``every`` seconds, in a thread, while inside."""
    import threading

    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()
    start = time.monotonic()

    def loop() -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - start, rss_kib(pid), open_fds(pid)))
            stop.wait(every)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield samples
    finally:
        stop.set()
        t.join(5)


# -- channels: the admin API and broadcast subscribers (redis_outage, sentinel) ------------------------


def admin(port: int, token: str, method: str, path: str, body: Any = None, timeout: float = 5.0) -> tuple[int, Any]:
    """One admin API call (docs/admin-api.md): (status, JSON answer); (0, error text) when nothing answered."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        return 0, str(e)


class Subscriber:
    """
    A broadcast client in a thread: the first arrival time (monotonic) of each
    message it receives, in ``got``; it reconnects (every 0.2 s, the 503s of a
    Redis outage included) until ``close()`` or ``deadline``, counting ``drops``.
    """

    def __init__(self, url: str, deadline: float) -> None:
        import threading

        self.url, self.deadline = url, deadline
        self.got: dict[str, float] = {}
        self.drops = 0
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from websockets.sync.client import connect

        while not self._stop.is_set() and time.monotonic() < self.deadline:
            try:
                # proxy=None: never a proxy from the environment, loopback only
                with connect(self.url, open_timeout=5, close_timeout=2, compression=None, proxy=None) as ws:
                    self.connected.set()
                    while not self._stop.is_set() and time.monotonic() < self.deadline:
                        try:
                            message = ws.recv(timeout=0.5)
                        except TimeoutError:
                            continue
                        self.got.setdefault(str(message), time.monotonic())
            except Exception:  # refused (503), closed, reset: all count as a drop, then reconnect
                pass
            if not self._stop.is_set():
                self.drops += 1
                self.connected.clear()
                self._stop.wait(0.2)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass
class Publisher:
    """Numbered messages at ``rate`` through the admin ports in turn (redis_outage, sentinel): key -> (time sent, node, HTTP status)."""

    admin_ports: dict[str, int]
    token: str
    channel: str
    rate: float
    deadline: float
    sent: dict[str, tuple[float, str, int]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        nodes = list(self.admin_ports)
        n = 0
        next_at = time.monotonic()
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            node = nodes[n % len(nodes)]
            key = f"{node}:{n}"
            t = time.monotonic()
            # 2 s bound: a publish that hangs must not stop the clock of the next ones for long
            status, _ = admin(self.admin_ports[node], self.token, "POST", "/admin/publish",
                              {"channel": self.channel, "message": key}, timeout=2)
            self.sent[key] = (t, node, status)
            n += 1
            next_at += 1 / self.rate
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def close(self) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join(10)
