"""
A flapping upstream node (issue 21): an upstream of two Go echo processes on
fixed ports, one of them SIGKILLed and restarted every 10 s (down 5 s, up
5 s), under a steady stream of new connections through the gateway, each
of which opens, does one echo round trip and closes.

The other node is never killed, so a healthy node exists at every moment and
every failed handshake counts (target 0): covering a dead or just restarted
node is the job of the gateway's retries (a refused connect is retried on
the next node at once), its active health checks (the dead node leaves the
rotation) and its passive ejection. The upstream is configured as an
operator would for a two-node pool on a LAN:

- ``retries = 2``: with two nodes, one retry reaches the other node; the
  second covers a retry that lands on the flapping node again;
- ``connect_timeout = 1``: a node on the same network answers a connect in
  milliseconds; one that does not within 1 s is as good as down;
- ``health_check = ws:/ws`` every 2 s (timeout 1 s, 2 failures to take a
  node out, 2 passes to bring it back): a real WebSocket handshake, so a
  node whose port is open but whose server is not ready does not count as
  healthy; two passes keep a restarting node out until it has answered
  twice;
- backoff 0.05 s doubling to 0.5 s between retries: short, since the retry
  goes to another node.

Figures: handshakes failed (every refused or failed opening, whatever its
status; target 0) and handshakes done. Echo round trips cut after the
handshake are counted apart: a connection whose node is killed under it is
lost with 1014 by design on an ``at_most_once`` proxy route (nothing can
re-send a message the dead node may have read), which no retry can cover.

Full mode: 5 flaps (~52 s of load). Quick: 1 flap (~15 s).
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field

from harness import Result, Soak, free_port

NAME = "flapping"
TARGET = "handshakes failed while a healthy node existed: 0"
DIALERS = 4  # concurrent connect loops
PACE = 0.04  # seconds between one dialer's connections: at most ~25/s each, ~100/s in all
PERIOD, DOWN = 10.0, 5.0  # a flap every PERIOD s: killed, down DOWN s, restarted


def ini(admin_port: int, stable: int, flapping: int) -> str:
    return f"""
        [gateway]
        listen = tcp:{{port}}:interface=127.0.0.1

        [admin]
        listen = tcp:{admin_port}:interface=127.0.0.1

        [log]
        format = text
        level = info

        [upstream:echo]
        nodes =
            ws://127.0.0.1:{stable}
            ws://127.0.0.1:{flapping}
        connect_timeout = 1
        retries = 2
        backoff_initial = 0.05
        backoff_max = 0.5
        health_check = ws:/ws
        health_interval = 2
        health_timeout = 1
        unhealthy_threshold = 2
        healthy_threshold = 2

        [route:echo]
        path = /echo/**
        upstream = echo
        """


@dataclass
class Dialers:
    """``DIALERS`` threads, each: open, one echo, close, again; every outcome with its time."""

    url: str
    deadline: float
    done: list[float] = field(default_factory=list)
    failed_handshakes: list[tuple[float, str]] = field(default_factory=list)
    cut: list[tuple[float, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(DIALERS)]
        for t in self.threads:
            t.start()

    def _loop(self, i: int) -> None:
        from websockets.sync.client import connect

        n = 0
        while not self.stop.is_set() and time.monotonic() < self.deadline and n < 100_000:
            n += 1
            t = time.monotonic()
            try:
                ws = connect(self.url, open_timeout=10, close_timeout=2, compression=None, proxy=None)
            except Exception as exc:  # 502/503/504, a timeout, a reset: the handshake failed
                with self.lock:
                    self.failed_handshakes.append((t, repr(exc)))
                self.stop.wait(PACE)
                continue
            with self.lock:
                self.done.append(t)
            try:
                with ws:
                    message = f"{i}:{n}"
                    ws.send(message)
                    if ws.recv(timeout=5) != message:
                        raise ValueError("wrong echo")
            except Exception as exc:
                with self.lock:
                    self.cut.append((t, repr(exc)))
            self.stop.wait(PACE)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)


def retries_total(admin_port: int) -> float | None:
    """wsgateway_upstream_retries_total{upstream="echo"} from /metrics, or None."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith('wsgateway_upstream_retries_total{upstream="echo"}'):
                    return float(line.split()[-1])
    except OSError:
        pass
    return None


def run(soak: Soak, quick: bool) -> Result:
    flaps, tail = (1, 5.0) if quick else (5, 2.0)
    lead = 2.0  # steady connects before the first kill
    stable, flapping = free_port(), free_port()
    soak.echo(stable)
    node, _ = soak.echo(flapping)
    admin_port = free_port()
    _, gw_port = soak.gateway(ini(admin_port, stable, flapping), "gw")
    deadline = time.monotonic() + lead + flaps * PERIOD + tail + 60
    dialers = Dialers(f"ws://127.0.0.1:{gw_port}/echo/soak", deadline)
    kills: list[float] = []
    started = time.monotonic()
    try:
        dialers.start()
        time.sleep(lead)
        for _ in range(flaps):
            kills.append(time.monotonic())
            node.send_signal(signal.SIGKILL)
            node.wait(10)
            time.sleep(DOWN)
            node, _ = soak.echo(flapping)  # the same port: returns once it listens
            time.sleep(max(0.0, kills[-1] + PERIOD - time.monotonic()))
        time.sleep(tail)
    finally:
        dialers.close()
    took = time.monotonic() - started
    retries = retries_total(admin_port)
    failed, done, cut = len(dialers.failed_handshakes), len(dialers.done), len(dialers.cut)
    figures = {
        "handshakes failed": str(failed),
        "handshakes done": f"{done} ({done / took:.0f}/s over {took:.0f} s, {flaps} flap{'s' * (flaps > 1)})",
    }
    notes = f"round trips cut by a kill after the handshake: {cut}; upstream retries: " \
            f"{'?' if retries is None else int(retries)}"
    return Result(figures, failed == 0, notes, raw={
        "flaps": flaps,
        "period_s": PERIOD,
        "down_s": DOWN,
        "duration_s": took,
        "handshakes_done": done,
        "handshakes_failed": failed,
        "failed_samples": [f"{t - started:.2f}s {what}" for t, what in dialers.failed_handshakes[:10]],
        "round_trips_cut": cut,
        "cut_samples": [f"{t - started:.2f}s {what}" for t, what in dialers.cut[:10]],
        "kills_at_s": [k - started for k in kills],
        "upstream_retries_total": retries,
        "config": "retries=2 connect_timeout=1 health_check=ws:/ws health_interval=2 health_timeout=1 "
                  "unhealthy_threshold=2 healthy_threshold=2 backoff_initial=0.05 backoff_max=0.5",
    })
