"""
A Redis Sentinel failover under load (issue 21; docs/configuration.md,
"Redis Sentinel" and "min_replicas_ack"): the master of a Sentinel-managed
pair (tests/support/redis_sentinel.py: one master, one replica, three
sentinels, tight timings) is SIGKILLed while two gateway nodes carry

- broadcast: subscribers on both nodes to one channel and numbered messages
  published through ``POST /admin/publish`` alternately on each node;
- durable load: on each node a client of an ``at_least_once`` route
  (``[queue] backend = redis``, ``min_replicas_ack = 1``) sending numbered
  messages in batches, each batch followed by a WebSocket ping. The route's
  upstream is down during the load, so every message goes through the Redis
  queue and the gateway answers the ping itself once the messages before it
  are stored (and, with ``min_replicas_ack = 1``, on a replica): a pong
  makes the batch *confirmed*. A client closed (1011 "queue unavailable"
  while there is no master, or no replica to ``WAIT`` for) opens a new
  connection and goes on with new numbers; what it sent unconfirmed does not
  count.

After the failover the old master is restarted; Sentinel makes it a replica
of the new one, so confirmations can resume (without a replica, ``WAIT 1``
cannot succeed: by design nothing is confirmed then). The load goes on for
a while, then stops; the upstream (a recording WebSocket server of this
module) is started and every confirmed message must reach it (duplicates
allowed) within a bound.

Figures:

- broadcast gap: the longest time any subscriber went without a message
  from the kill to the end of the load: the failover's gap (from the last
  message before it to the first after), or a later one if longer (the old
  master's return, say), against the failover time (kill to the moment
  ``wait_for_failover`` sees every sentinel name the promoted replica and it
  answers ROLE master; it includes Sentinel's 1.5 s down-after); target gap
  <= failover + 5 s;
- confirmed durable messages lost: confirmed and never received by the
  upstream (target 0).

About 45 s in either mode; quick runs lighter load (fewer subscribers,
slower publishing, smaller durable batches).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from harness import ROOT, Publisher, Result, Soak, Subscriber, admin, free_port, wait_for

sys.path.insert(0, str(ROOT / "tests"))  # tests/support: the Sentinel cluster of the integration tests

from support.redis_sentinel import SentinelCluster  # noqa: E402

NAME = "sentinel"
TARGET = "broadcast gap <= failover + 5 s; confirmed messages lost with min_replicas_ack = 1: 0"
TOKEN = "soak-sentinel-admin-token"
CHANNEL = "feed:soak"
SLACK = 5.0  # the target: gap <= failover + SLACK


def ini(node: str, admin_port: int, cluster: SentinelCluster, recorder_port: int) -> str:
    return f"""
        [gateway]
        node_id = soak-{node}
        listen = tcp:{{port}}:interface=127.0.0.1

        [admin]
        listen = tcp:{admin_port}:interface=127.0.0.1
        token = {TOKEN}

        [log]
        format = text
        level = info

        [redis]
        prefix = soak
        sentinels = {' '.join(cluster.sentinels)}
        sentinel_master = {cluster.master_name}
        min_replicas_ack = 1

        [queue]
        backend = redis

        [upstream:recorder]
        nodes = ws://127.0.0.1:{recorder_port}
        connect_timeout = 1
        retries = 1
        backoff_initial = 0.05
        backoff_max = 0.2

        [route:feed]
        path = /feed/{{name}}
        mode = broadcast
        channel = feed:{{name}}

        [route:durable]
        path = /durable/**
        upstream = recorder
        delivery = at_least_once
        """


class Counted(logging.Handler):
    """
    A websockets logger's errors counted instead of printed: the server logs
    each connection that ends before its handshake, the sync client a race
    of its own (data read after it fed EOF, when the peer's close and ours
    cross), each with a traceback that would clutter the driver's output.
    """

    def __init__(self, name: str) -> None:
        super().__init__(logging.ERROR)
        self.count = 0
        self.logger = logging.getLogger(name)
        self.logger.propagate = False
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


class Recorder:
    """The durable route's upstream: records every message of every leg (live or replay), echoes nothing."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[str] = []
        self.lock = threading.Lock()
        self.server: Any = None
        self.errors = Counted(f"soak.sentinel.recorder.{port}")

    def start(self) -> None:
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.server import ServerConnection, serve

        def handler(ws: ServerConnection) -> None:
            try:
                for message in ws:
                    with self.lock:
                        self.received.append(str(message))
            except ConnectionClosed:
                pass

        self.server = serve(handler, "127.0.0.1", self.port, compression=None, max_size=None, logger=self.errors.logger)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def unique(self) -> set[str]:
        with self.lock:
            return set(self.received)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@dataclass
class DurableClient:
    """Numbered messages in batches on one node's at_least_once route, each batch then a ping; pongs confirm."""

    url: str
    node: str
    batch: int
    every: float
    deadline: float
    sent: int = 0
    confirmed: set[str] = field(default_factory=set)
    confirmed_at: list[float] = field(default_factory=list)
    closes: list[tuple[float, str]] = field(default_factory=list)
    errors: Counted = field(init=False)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.errors = Counted(f"soak.sentinel.client.{self.node}.{id(self)}")  # one logger each: counted once

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from websockets.sync.client import connect

        n = 0
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            try:
                # ping_interval=None: the only pings are the confirming ones below
                ws = connect(self.url, open_timeout=5, close_timeout=2, compression=None, proxy=None,
                             ping_interval=None, logger=self.errors.logger)
            except Exception as exc:
                self.closes.append((time.monotonic(), f"handshake: {exc!r}"))
                self.stop.wait(0.2)
                continue
            try:
                with ws:
                    while not self.stop.is_set() and time.monotonic() < self.deadline:
                        messages = [f"{self.node}-{n + i}" for i in range(self.batch)]
                        n += self.batch
                        for m in messages:
                            ws.send(m)
                        self.sent += len(messages)
                        # the queue's append waits up to 2.5 s for WAIT 1 and is then refused with a
                        # close (1011); 10 s covers that, a failover's reconnection and a slow machine.
                        # A pong never comes on a closed connection: watch for the close meanwhile
                        pong, until = ws.ping(), time.monotonic() + 10
                        while not pong.wait(0.05):
                            if ws.close_code is not None:
                                raise ConnectionError(f"closed {ws.close_code} {ws.close_reason!r}")
                            if time.monotonic() > until:
                                raise TimeoutError("no pong within 10 s")
                        self.confirmed.update(messages)
                        self.confirmed_at.append(time.monotonic())
                        self.stop.wait(self.every)
            except Exception as exc:
                rcvd = getattr(exc, "rcvd", None)  # ConnectionClosed: the gateway's close frame, if any
                what = f"closed {rcvd.code} {rcvd.reason!r}" if rcvd is not None else repr(exc)
                self.closes.append((time.monotonic(), what))
                self.stop.wait(0.2)

    def close(self) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join(20)


def gap_across(sub: Subscriber, since: float, until: float) -> float:
    """The longest stretch without a message at ``sub`` that ends after ``since`` (up to ``until`` if none)."""
    times = sorted(t for t in sub.got.values())
    before = [t for t in times if t <= since]
    last = before[-1] if before else since
    longest = 0.0
    for t in [t for t in times if t > since] + [until]:
        longest = max(longest, t - last)
        last = t
        if t >= until:
            break
    return longest


def ready(admin_port: int) -> bool:
    status, body = admin(admin_port, TOKEN, "GET", "/readyz", timeout=2)
    return status == 200 and isinstance(body, dict) and body.get("status") == "ready"


def run(soak: Soak, quick: bool) -> Result:
    lead, tail, deliver_bound = 10.0, 10.0, 45.0
    per_node, rate, batch, every = (1, 10.0, 5, 0.25) if quick else (3, 25.0, 10, 0.1)
    cluster = SentinelCluster(soak.folder / "sentinel")
    recorder = Recorder(free_port())
    subs: list[Subscriber] = []
    clients: list[DurableClient] = []
    pub: Publisher | None = None
    try:
        cluster.start()
        admin_ports = {"a": free_port(), "b": free_port()}
        gw_ports: dict[str, int] = {}
        for node, port in admin_ports.items():
            _, gw_ports[node] = soak.gateway(ini(node, port, cluster, recorder.port), f"gw-{node}")
        if not wait_for(lambda: all(ready(p) and "queue: redis up" in soak.log(f"gw-{n}")
                                    for n, p in admin_ports.items()), 20, 0.2):
            raise RuntimeError("the gateways did not become ready with their Redis queue within 20 s")
        deadline = time.monotonic() + lead + tail + 60  # every client thread stops by then, whatever happens
        subs = [Subscriber(f"ws://127.0.0.1:{gw_ports[node]}/feed/soak", deadline)
                for node in admin_ports for _ in range(per_node)]
        if not wait_for(lambda: all(s.connected.is_set() for s in subs), 15, 0.1):
            raise RuntimeError("the subscribers did not connect within 15 s")
        pub = Publisher(admin_ports, TOKEN, CHANNEL, rate, deadline)
        pub.start()
        clients = [DurableClient(f"ws://127.0.0.1:{gw_ports[node]}/durable/{node}", node, batch, every, deadline)
                   for node in admin_ports]
        for c in clients:
            c.start()
        # both directions flow before the fault: each subscriber has had messages from both nodes
        if not wait_for(lambda: all({k[0] for k in s.got} >= set(admin_ports) for s in subs), 15, 0.2):
            raise RuntimeError("broadcast did not flow between the nodes before the fault")
        time.sleep(lead)

        killed_at = time.monotonic()
        old = cluster.kill_master()
        new = cluster.wait_for_failover(old, timeout=30)
        promoted_at = time.monotonic()
        followed = wait_for(lambda: all(ready(p) for p in admin_ports.values()), 20, 0.1)
        followed_at = time.monotonic()
        # the old master back, demoted to a replica of the new one: WAIT 1 can succeed again
        cluster.restart(old)
        cluster.wait_for_replica(old, timeout=30)
        replica_at = time.monotonic()
        time.sleep(tail)
        pub.close()
        for c in clients:
            c.close()
        load_end = time.monotonic()
        time.sleep(1.0)  # messages still on their way to subscribers
        for s in subs:
            s.close()

        confirmed = set().union(*(c.confirmed for c in clients))
        recorder.start()  # now every queued message can be delivered, by the nodes' replay
        wait_for(lambda: confirmed <= recorder.unique(), deliver_bound, 0.5)
        delivered_in = time.monotonic() - load_end
    finally:
        if pub is not None:
            pub.close()
        for c in clients:
            c.close()
        for s in subs:
            s.close()
        recorder.stop()
        cluster.stop()  # not one of soak's processes: stopped here, whatever happened

    failover = promoted_at - killed_at
    gaps = [gap_across(s, killed_at, load_end) for s in subs]
    gap = max(gaps)
    received = recorder.unique()
    lost = confirmed - received
    confirmed_after = sum(1 for c in clients for t in c.confirmed_at if t > replica_at)
    passed = gap <= failover + SLACK and not lost
    refused = sum(1 for c in clients for _, what in c.closes if what.startswith("handshake"))
    closed = sum(len(c.closes) for c in clients) - refused
    logs = {node: soak.log(f"gw-{node}") for node in ("a", "b")}
    figures = {
        "broadcast gap": f"{gap:.1f} s (failover {failover:.1f} s)",
        "confirmed messages lost": f"{len(lost)} of {len(confirmed)}",
    }
    notes = (f"nodes ready {followed_at - promoted_at:.1f} s after the promotion"
             f"{'' if followed else ' (not within 20 s)'}; durable sent {sum(c.sent for c in clients)}, "
             f"durable connections closed {closed} (1011 while no master or replica), handshakes refused {refused}, "
             f"batches confirmed after the old master rejoined {confirmed_after}; "
             f"upstream got {len(recorder.received)} ({len(recorder.received) - len(received)} duplicates)")
    return Result(figures, passed, notes, raw={
        "failover_s": failover,
        "gap_s": gap,
        "gaps_s": gaps,
        "nodes_ready_after_promotion_s": followed_at - promoted_at if followed else None,
        "old_master": old,
        "new_master": new,
        "replica_back_after_kill_s": replica_at - killed_at,
        "published": len(pub.sent) if pub else 0,
        "publishes_refused": sum(1 for _, _, st in pub.sent.values() if st != 200) if pub else 0,
        "subscriber_reconnects": [s.drops for s in subs],
        "durable_sent": sum(c.sent for c in clients),
        "durable_confirmed": len(confirmed),
        "durable_lost": len(lost),
        "durable_lost_samples": sorted(lost)[:10],
        "durable_received": len(recorder.received),
        "durable_received_unique": len(received),
        "delivered_within_s": delivered_in,
        "batches_confirmed_after_replica_back": confirmed_after,
        # relative to the kill; refused handshakes (502 while the queue is down) only counted, by status
        "durable_closes": [f"{t - killed_at:+.2f}s {what}" for c in clients for t, what in c.closes
                           if not what.startswith("handshake")][:20],
        "durable_handshakes_refused": dict(Counter(what.split("(status_code=")[-1].split(",")[0]
                                                   for c in clients for _, what in c.closes
                                                   if what.startswith("handshake"))),
        "recorder_logged_errors": recorder.errors.count,
        "client_logged_errors": sum(c.errors.count for c in clients),
        "log_failover_followed": {node: "redis failover followed" in text for node, text in logs.items()},
    })
