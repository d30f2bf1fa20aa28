"""
Redis killed (SIGKILL) for 20 s and restarted on the same port, under load on
two gateway nodes that share it: what keeps working and how fast broadcast
comes back (issue 21; docs/protocol.md, "Broadcast channels").

The load, all of it on loopback from threads of this process:

- broadcast: subscribers on both nodes to one channel, and numbered messages
  published at 25 msg/s through ``POST /admin/publish``, alternately on node A
  and node B (``a:17``, ``b:18``), so both directions through Redis are
  watched (a node delivers its own publishes locally; only the other node's
  go through Redis);
- proxied: persistent clients echoing a message every 100 ms and a loop of
  fresh connections (open, one echo, close) on a proxy route to the Go echo
  upstream, on both nodes, for the whole run.

Figures:

- proxying errors during the outage: failed handshakes and failed or wrong
  echo round trips on the proxy route from the kill until broadcast flows
  again (target 0: proxying never depends on Redis); errors outside that
  window are reported too;
- broadcast back after: from the moment Redis's port answers again to the
  moment broadcast flows again, i.e. for each publishing node the first
  numbered message published after the restart that reaches every
  subscriber on both nodes, the later of the two (target <= 12 s). Measured
  at the subscribers, not from the gateways' logs or /readyz: "ready" only
  says a node has a Redis connection, not that its subscriptions are back.

Full mode: 15 s of load, 20 s outage, then up to 25 s for broadcast to come
back and 10 s more of load (~60 s). Quick: 4 s, 5 s outage, up to 15 s, 2 s.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field

from harness import Publisher, Result, Soak, Subscriber, admin, free_port, wait_for

NAME = "redis_outage"
TARGET = "proxying errors during the outage 0; broadcast flowing <= 12 s after Redis is back"
TOKEN = "soak-redis-outage-admin-token"
CHANNEL = "feed:soak"
PUBLISH_RATE = 25.0  # messages per second, both nodes together
MAX_BACK = 12.0  # the target, seconds


def ini(node: str, admin_port: int, redis_port: int, echo_port: int) -> str:
    """One node: a broadcast route, a proxy route to the Go echo, the shared Redis; defaults otherwise."""
    return f"""
        [gateway]
        node_id = {node}
        listen = tcp:{{port}}:interface=127.0.0.1

        [admin]
        listen = tcp:{admin_port}:interface=127.0.0.1
        token = {TOKEN}

        [log]
        format = text
        level = info

        [redis]
        url = redis://127.0.0.1:{redis_port}/0
        prefix = soak

        [upstream:echo]
        nodes = ws://127.0.0.1:{echo_port}

        [route:feed]
        path = /feed/{{name}}
        mode = broadcast
        channel = feed:{{name}}

        [route:proxy]
        path = /proxy/**
        upstream = echo
        """


@dataclass
class ProxyLoad:
    """Proxied clients on the given gateway ports, every failure with its time, until ``stop``."""

    urls: list[str]
    deadline: float
    errors: list[tuple[float, str]] = field(default_factory=list)
    round_trips: int = 0
    handshakes: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, persistent_per_url: int) -> None:
        for url in self.urls:
            for i in range(persistent_per_url):
                self.threads.append(threading.Thread(target=self._persistent, args=(url, i), daemon=True))
            self.threads.append(threading.Thread(target=self._fresh, args=(url,), daemon=True))
        for t in self.threads:
            t.start()

    def _error(self, what: str) -> None:
        with self.lock:
            self.errors.append((time.monotonic(), what))

    def _persistent(self, url: str, i: int) -> None:
        """One connection echoing every 100 ms; on any failure, counted, then a new connection."""
        from websockets.sync.client import connect

        k = 0
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            try:
                ws = connect(url, open_timeout=5, close_timeout=2, compression=None, proxy=None)
            except Exception as exc:
                self._error(f"handshake: {exc!r}")
                self.stop.wait(0.2)
                continue
            with self.lock:
                self.handshakes += 1
            try:
                with ws:
                    while not self.stop.is_set() and time.monotonic() < self.deadline:
                        k += 1
                        message = f"{i}:{k}"
                        ws.send(message)
                        if ws.recv(timeout=5) != message:
                            raise ValueError("wrong echo")
                        with self.lock:
                            self.round_trips += 1
                        self.stop.wait(0.1)
            except Exception as exc:
                self._error(f"echo: {exc!r}")
                self.stop.wait(0.2)

    def _fresh(self, url: str) -> None:
        """Open, one echo, close, five times a second: the handshakes a Redis outage must not refuse."""
        from websockets.sync.client import connect

        while not self.stop.is_set() and time.monotonic() < self.deadline:
            try:
                with connect(url, open_timeout=5, close_timeout=2, compression=None, proxy=None) as ws:
                    with self.lock:
                        self.handshakes += 1
                    ws.send("fresh")
                    if ws.recv(timeout=5) != "fresh":
                        raise ValueError("wrong echo")
                    with self.lock:
                        self.round_trips += 1
            except Exception as exc:
                self._error(f"fresh: {exc!r}")
            self.stop.wait(0.2)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def flowing_since(pub: Publisher, subs: list[Subscriber], after: float) -> dict[str, tuple[str, float]]:
    """
    Per publishing node, the first message published at or after ``after``
    that every subscriber received: node -> (key, when the last subscriber got it).
    """
    found: dict[str, tuple[str, float]] = {}
    for key, (t, node, status) in sorted(pub.sent.items(), key=lambda kv: kv[1][0]):
        if node in found or t < after or status != 200:
            continue
        times = [s.got.get(key) for s in subs]
        if all(x is not None for x in times):
            found[node] = (key, max(x for x in times if x is not None))
    return found


def ready(admin_port: int) -> bool:
    status, body = admin(admin_port, TOKEN, "GET", "/readyz", timeout=2)
    return status == 200 and isinstance(body, dict) and body.get("status") == "ready"


def run(soak: Soak, quick: bool) -> Result:
    lead, outage, back_bound, tail = (4.0, 5.0, 15.0, 2.0) if quick else (15.0, 20.0, 25.0, 10.0)
    redis, redis_port = soak.redis()
    _, echo_port = soak.echo()
    admin_ports = {"a": free_port(), "b": free_port()}
    gw_ports: dict[str, int] = {}
    for node, port in admin_ports.items():
        _, gw_ports[node] = soak.gateway(ini(f"soak-{node}", port, redis_port, echo_port), f"gw-{node}")
    if not wait_for(lambda: all(ready(p) for p in admin_ports.values()), 20, 0.2):
        raise RuntimeError("the gateways did not become ready (readyz) within 20 s")
    # every thread of the load stops by this time at the latest, whatever happens below
    deadline = time.monotonic() + lead + outage + back_bound + tail + 60
    per_node = 2 if quick else 4
    subs = [Subscriber(f"ws://127.0.0.1:{gw_ports[node]}/feed/soak", deadline)
            for node in admin_ports for _ in range(per_node)]
    load = ProxyLoad([f"ws://127.0.0.1:{gw_ports[node]}/proxy/soak" for node in admin_ports], deadline)
    pub = Publisher(admin_ports, TOKEN, CHANNEL, PUBLISH_RATE, deadline)
    try:
        # broadcast is flowing both ways before the fault: a warm-up message from each node reaches everyone
        if not wait_for(lambda: all(s.connected.is_set() for s in subs), 15, 0.1):
            raise RuntimeError("the subscribers did not connect within 15 s")
        pub.start()
        if not wait_for(lambda: len(flowing_since(pub, subs, 0.0)) == 2, 15, 0.2):
            raise RuntimeError("broadcast did not flow between the nodes before the fault")
        load.start(persistent_per_url=2 if quick else 4)
        time.sleep(lead)

        killed_at = time.monotonic()
        at_kill = (load.round_trips, load.handshakes)
        redis.send_signal(signal.SIGKILL)
        redis.wait(10)
        time.sleep(outage)
        soak.redis(redis_port)  # the same port; returns once the port answers
        back_at = time.monotonic()
        wait_for(lambda: len(flowing_since(pub, subs, back_at)) == 2, back_bound, 0.1)
        flow = flowing_since(pub, subs, back_at)
        in_window = (load.round_trips - at_kill[0], load.handshakes - at_kill[1])
        time.sleep(tail)  # proxying and broadcast after the recovery, so errors then would show
    finally:
        pub.close()
        load.close()
        for s in subs:
            s.close()

    flowing_at = max(t for _, t in flow.values()) if len(flow) == 2 else None
    recovery = None if flowing_at is None else flowing_at - back_at
    window_end = flowing_at if flowing_at is not None else back_at + back_bound
    during = [e for e in load.errors if killed_at <= e[0] <= window_end]
    outside = [e for e in load.errors if not killed_at <= e[0] <= window_end]
    refused = sum(1 for t, _, status in pub.sent.values() if killed_at <= t < back_at and status != 200)
    published_down = sum(1 for t, _, _ in pub.sent.values() if killed_at <= t < back_at)
    logs = {node: soak.log(f"gw-{node}") for node in admin_ports}
    passed = not during and recovery is not None and recovery <= MAX_BACK
    figures = {
        "proxying errors during the outage": f"{len(during)} ({in_window[0]} round trips, "
                                             f"{in_window[1]} handshakes meanwhile)",
        "broadcast back after": "not within %.0f s" % back_bound if recovery is None else f"{recovery:.1f} s",
    }
    notes = (f"Redis down {back_at - killed_at:.1f} s; publishes refused while down {refused}/{published_down}; "
             f"subscriber reconnects {sum(s.drops for s in subs)}")
    if outside:
        notes += f"; proxying errors outside the outage {len(outside)}"
    return Result(figures, passed, notes, raw={
        "outage_s": back_at - killed_at,
        "recovery_s": recovery,
        "first_flowing": {node: {"message": key, "at_s": t - back_at} for node, (key, t) in flow.items()},
        "proxy_errors_during": len(during),
        "proxy_errors_outside": len(outside),
        "proxy_error_samples": [f"{t - killed_at:+.2f}s {what}" for t, what in load.errors[:10]],
        "round_trips": load.round_trips,
        "round_trips_during": in_window[0],
        "handshakes_during": in_window[1],
        "handshakes": load.handshakes,
        "published": len(pub.sent),
        "publishes_refused_while_down": refused,
        "publishes_while_down": published_down,
        "subscribers": len(subs),
        "subscriber_reconnects": [s.drops for s in subs],
        "log_redis_down": {node: "redis down" in text for node, text in logs.items()},
        "log_redis_back": {node: "redis back" in text for node, text in logs.items()},
    })
