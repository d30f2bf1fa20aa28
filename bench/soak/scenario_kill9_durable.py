"""
kill9_durable: ``kill -9`` of the gateway at random moments under
``delivery = at_least_once`` traffic, and what the upstream ends up with.
What it measures:

- **confirmed then lost**: messages a client had been told were safe (a pong
  to a ping sent after them) that never reached the upstream, even after the
  queue drained. Target 0.
- **duplicates the upstream could not tell apart**: an upstream dedupes by
  ``(X-Wsgateway-Conn-Id, seq)``, seq being ``X-Wsgateway-Seq`` of the leg
  plus the message's index on it (docs/durable-delivery.md, "Dedupe
  headers"). Two failures defeat that: one pair delivered twice with
  different contents, or one message delivered under two different pairs.
  Target 0. Ordinary duplicates (same pair, same content, which the upstream
  drops) are counted and shown, not judged: at-least-once allows them.

Why this way:

- A pong means "confirmed" for the same reason on both paths of the route:
  while the upstream leg is live, client pings pass through and the
  upstream's WebSocket stack answers them only after reading every message
  before them; while the gateway holds (upstream gone), it answers them
  itself once the messages before them are committed to SQLite. So a
  confirmed message must survive ``kill -9``: it is either at the upstream or
  in the queue file.
- The upstream (the recorder) is this module run as a subprocess
  (``python scenario_kill9_durable.py recorder PORT OUT``): an asyncio
  ``websockets`` server that records every leg (its conn id, seq, replay
  flag, request path) and every message in arrival order, answers pings (the
  library does), echoes nothing. A subprocess, so that its reading is not
  slowed by the clients' GIL and its records are per connection exactly as
  an upstream sees them. It also goes down on command (stops listening and
  resets every connection: no close frame) so that the kills also land while
  the gateway is holding (queueing), flushing the queue on a client's own
  leg, or replaying for a client that is gone; without outages the queue
  would hardly be used and the kills would only test the live window.
- Clients (asyncio ``websockets``, in this process) send numbered messages
  ``c<client>:<n>`` in batches every 100 ms, each batch followed by a ping;
  a pong confirms every message before its ping. When the gateway dies they
  reconnect (a new request path ``/k/c<client>/a<attempt>`` per connection,
  so the recorder's legs map back to the client's connections, replay legs
  included, since a replay carries the original path) and go on with the
  next number. They never resend: a message that was not confirmed may be
  lost (it is counted, "unconfirmed, not delivered", not judged), and a
  resend under a new connection would be a duplicate the client made, not
  the gateway.
- The schedule (kill moments, upstream outages) comes from ``random.Random``
  with a fixed seed (``SEED_FULL``, ``SEED_QUICK``), so runs are repeatable
  in their intent (timings on a shared machine still vary). The traffic phase
  is cut in equal slots, each with one outage and one kill, so kills never
  bunch up; the seeds were picked so that the kills cover holding, flushing
  and live moments (see ``schedule`` and ``phase``). Each kill is followed at
  once by a restart with the same INI, port and queue file.
- At the end clients close normally, the upstream is up, and the queue must
  drain (no rows in ``entries`` for 3 s in a row, read read-only from the
  file) before the recorder's records are judged.

Quick mode: 15 s of traffic, 2 kills, 2 outages (about 20 s in all). Full:
60 s, 5 kills, 5 outages (about 65-70 s in all).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import Result, Soak, free_port, wait_for, wait_port

NAME = "kill9_durable"
TARGET = "0; 0"

# The schedule's seed: fixed, so runs are repeatable. Picked (by trying seeds with schedule()) so that
# the kills cover the three things the gateway may be doing: with 5 kills, SEED_FULL hits 2 outages
# (holding: acks come from the queue), 1 moment just after one (flushing the queue, replaying for gone
# clients) and 2 live moments; in quick mode SEED_QUICK's 2 kills hit an outage and a live moment.
SEED_FULL = 28
SEED_QUICK = 3
CLIENTS = 10
BATCH = 5  # messages per batch; one ping follows each batch
TICK = 0.1  # seconds between batches: 10 clients x 5 / 0.1 s = 500 messages/s offered

GATEWAY_INI = """\
    [gateway]
    listen = tcp:{port}:interface=127.0.0.1
    drain_grace = 0
    shutdown_timeout = 1

    [queue]
    path = {queue}

    [log]
    level = info
    format = text

    [upstream:recorder]
    nodes = ws://127.0.0.1:{recorder}
    connect_timeout = 1
    retries = 0
    ; the queue's reconnect loop starts at backoff_initial: back soon after an outage
    backoff_initial = 0.05
    backoff_max = 0.5

    [route:k]
    path = /k/**
    upstream = recorder
    auth = none
    delivery = at_least_once
"""


# -- the recorder (the upstream), run as a subprocess of this module ---------------------------


def recorder_main(port: int, out: str) -> None:
    """
    Record every leg and message; stdin commands: ``down`` (stop listening,
    reset every connection), ``up`` (listen again), ``stop`` (write OUT as
    JSON and exit).
    """
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    legs: list[dict[str, Any]] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        h = ws.request.headers
        messages: list[str] = []
        legs.append({"conn": h.get("X-Wsgateway-Conn-Id"), "seq": h.get("X-Wsgateway-Seq"),
                     "replay": h.get("X-Wsgateway-Replay") == "1", "path": ws.request.path, "messages": messages})
        try:
            async for msg in ws:  # messages the stack read before a close are still yielded
                messages.append(msg if isinstance(msg, str) else msg.decode("utf-8", "replace"))
        except ConnectionClosed:
            pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        commands: asyncio.Queue[str] = asyncio.Queue()

        def read_stdin() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(commands.put_nowait, line.strip())
            loop.call_soon_threadsafe(commands.put_nowait, "stop")

        threading.Thread(target=read_stdin, daemon=True).start()

        async def start() -> Any:
            return await serve(handler, "127.0.0.1", port, compression=None, max_size=None, ping_interval=None,
                               max_queue=None)

        server: Any = await start()
        print("recorder: up", flush=True)
        while True:
            cmd = await commands.get()
            if cmd == "down" and server is not None:
                server.server.close()  # the listening socket only (asyncio.Server)
                for conn in list(server.connections):
                    sock = conn.transport.get_extra_info("socket")
                    if sock is not None:  # RST, no close frame: an upstream that vanished
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    conn.transport.abort()
                server = None
                print("recorder: down", flush=True)
            elif cmd == "up" and server is None:
                for _ in range(50):  # the port may linger a moment after close; bounded
                    try:
                        server = await start()
                        break
                    except OSError:
                        await asyncio.sleep(0.1)
                print("recorder: up" if server else "recorder: could not listen again", flush=True)
            elif cmd == "stop":
                await asyncio.sleep(0.5)  # the last messages in flight reach the handlers
                Path(out).write_text(json.dumps(legs))
                print(f"recorder: wrote {len(legs)} legs", flush=True)
                return

    asyncio.run(main())


# -- the clients ------------------------------------------------------------------------------------


class Client:
    """One sender of numbered messages; reconnects after a gateway death and goes on numbering."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.next = 0
        self.sent: list[int] = []
        self.confirmed: set[int] = set()
        self.first_of_attempt: dict[int, int] = {}  # attempt -> first number sent on it
        self.attempts = 0
        self.connect_failures = 0
        self.unexpected: list[str] = []

    def text(self, n: int) -> str:
        return f"c{self.index}:{n}"

    async def run(self, port: Callable[[], int], stop_at: float) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake

        while time.monotonic() < stop_at:
            attempt = self.attempts
            url = f"ws://127.0.0.1:{port()}/k/c{self.index}/a{attempt}"
            try:
                ws = await connect(url, open_timeout=5, close_timeout=2, ping_interval=None, compression=None)
            except (OSError, InvalidHandshake, TimeoutError, asyncio.TimeoutError):
                self.connect_failures += 1
                await asyncio.sleep(0.1)  # the gateway is restarting: try again soon, until stop_at
                continue
            self.attempts += 1
            self.first_of_attempt[attempt] = self.next
            pending: list[tuple[Any, list[int]]] = []  # (pong waiter, an asyncio.Future; the batch before it)
            try:
                while time.monotonic() < stop_at:
                    batch = list(range(self.next, self.next + BATCH))
                    self.next += BATCH
                    self.sent.extend(batch)
                    for n in batch:
                        await ws.send(self.text(n))
                    pending.append((await ws.ping(), batch))
                    self._settle(pending)
                    await asyncio.sleep(TICK)
                # done: the last pongs (bounded), then a normal close
                deadline = time.monotonic() + 10
                while pending and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                    self._settle(pending)
                await ws.close()
                return
            except ConnectionClosed:
                self._settle(pending)  # what was confirmed before the death counts; the rest does not
                await asyncio.sleep(0.05)
            except Exception as e:  # noqa: BLE001 - recorded, judged by the caller
                self.unexpected.append(repr(e))
                await asyncio.sleep(0.1)
            finally:
                await ws.close()

    def _settle(self, pending: list[tuple[Any, list[int]]]) -> None:
        keep = []
        for fut, batch in pending:
            if not fut.done():
                keep.append((fut, batch))
            elif not fut.cancelled() and fut.exception() is None:
                self.confirmed.update(batch)
        pending[:] = keep


# -- the scenario -------------------------------------------------------------------------------------


def _rows(queue: Path) -> tuple[int, int]:
    """(entries, dead letters) in the queue file, read-only; (-1, -1) while it cannot be read."""
    if not queue.exists():
        return 0, 0
    try:
        db = sqlite3.connect(f"{queue.as_uri()}?mode=ro", uri=True, timeout=2)
        try:
            return (int(db.execute("SELECT count(*) FROM entries").fetchone()[0]),
                    int(db.execute("SELECT count(*) FROM dead_letters").fetchone()[0]))
        finally:
            db.close()
    except sqlite3.Error:
        return -1, -1


def schedule(seed: int, kills: int, traffic: float) -> tuple[list[float], list[tuple[float, float]]]:
    """
    Kill moments and upstream outages (seconds from the start of traffic):
    the traffic phase cut in ``kills`` equal slots, each with one outage of
    2.5-4 s and one kill at a random moment of its own, so kills never bunch
    up and each may land before, during or after that slot's outage.
    """
    rng = random.Random(seed)
    width = traffic / kills
    moments, outages = [], []
    for i in range(kills):
        start = i * width
        down = rng.uniform(start + 1.0, start + width - 5.0)
        outages.append((down, down + rng.uniform(2.5, 4.0)))
        moments.append(rng.uniform(start + 1.0, start + width - 1.0))
    return moments, outages


def phase(at: float, outages: list[tuple[float, float]]) -> str:
    """What the gateway was doing at a kill, by the schedule: holding (queueing), flushing/replaying, or live."""
    if any(a <= at < b for a, b in outages):
        return "during an outage"
    if any(b <= at < b + 2.0 for _, b in outages):
        return "within 2 s after an outage"
    return "live"


def run(soak: Soak, quick: bool) -> Result:
    traffic = 15.0 if quick else 60.0
    seed = SEED_QUICK if quick else SEED_FULL
    kills, outages = schedule(seed, 2 if quick else 5, traffic)

    rec_port = free_port()
    out = soak.folder / "recorder.json"
    recorder = soak.spawn([sys.executable, str(Path(__file__).resolve()), "recorder", str(rec_port), str(out)],
                          "recorder", stdin=subprocess.PIPE)
    wait_port(rec_port)

    def tell(cmd: str) -> None:
        assert recorder.stdin is not None
        recorder.stdin.write(cmd.encode() + b"\n")
        recorder.stdin.flush()

    queue = soak.folder / "queue.sqlite"
    ini = GATEWAY_INI.replace("{queue}", str(queue)).replace("{recorder}", str(rec_port))
    gw, port = soak.gateway(ini, "gw")
    state: dict[str, Any] = {"gw": gw}
    clients = [Client(i) for i in range(CLIENTS)]
    kill_log: list[dict[str, Any]] = []
    t_start = time.monotonic()

    async def controller(stop_at: float) -> None:
        events = sorted([(t, "kill") for t in kills] + [(a, "down") for a, _ in outages] +
                        [(b, "up") for _, b in outages])
        upstream_up = True
        for at, what in events:
            await asyncio.sleep(max(0.0, t_start + at - time.monotonic()))
            if what == "down":
                tell("down")
                upstream_up = False
            elif what == "up":
                tell("up")
                upstream_up = True
            else:
                rows = _rows(queue)[0]
                k0 = time.monotonic()
                state["gw"].send_signal(signal.SIGKILL)
                await asyncio.to_thread(state["gw"].wait, 10)
                # the same INI, port and queue file; bounded by the harness's wait for the port (30 s)
                state["gw"], _ = await asyncio.to_thread(soak.gateway, ini, "gw", None, port)
                kill_log.append({"at_s": round(k0 - t_start, 2), "upstream_up": upstream_up,
                                 "phase": phase(k0 - t_start, outages),
                                 "queue_rows_before": rows, "restart_s": round(time.monotonic() - k0, 2)})
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))

    async def main() -> None:
        stop_at = t_start + traffic
        await asyncio.gather(controller(stop_at), *(c.run(lambda: port, stop_at) for c in clients))

    asyncio.run(main())
    tell("up")  # whatever the schedule did, the upstream is up for the drain
    # the drain: no entries for 3 s in a row (a closing client's window may be queued late), bounded
    drained_for: list[float] = []

    def drained() -> bool:
        if _rows(queue)[0] == 0:
            drained_for.append(time.monotonic())
            return drained_for[-1] - drained_for[0] >= 3.0
        drained_for.clear()
        return False

    drain_t0 = time.monotonic()
    did_drain = wait_for(drained, 30 if quick else 60, 0.2)
    # until the queue was empty for good (the start of the last empty streak), not the 3 s of checking it stays so
    drain_s = (drained_for[0] if did_drain else time.monotonic()) - drain_t0
    entries_left, dead = _rows(queue)
    tell("stop")
    recorder.wait(15)
    legs: list[dict[str, Any]] = json.loads(out.read_text())
    return _judge(clients, legs, kill_log, outages, did_drain, drain_s, entries_left, dead, seed, quick)


def _judge(clients: list[Client], legs: list[dict[str, Any]], kill_log: list[dict[str, Any]],
           outages: list[tuple[float, float]], did_drain: bool, drain_s: float, entries_left: int, dead: int,
           seed: int, quick: bool) -> Result:
    by_pair: dict[tuple[str, int], list[str]] = defaultdict(list)
    by_text: dict[str, set[tuple[str, int]]] = defaultdict(set)
    deliveries: dict[str, int] = defaultdict(int)
    misnumbered = 0
    no_headers = 0
    first = {(c.index, a): n for c in clients for a, n in c.first_of_attempt.items()}
    for leg in legs:
        if not leg["conn"] or not leg["seq"]:
            no_headers += 1
            continue
        seq0 = int(leg["seq"])
        parts = leg["path"].split("/")  # /k/c<i>/a<attempt>
        origin = (int(parts[2][1:]), int(parts[3][1:])) if len(parts) >= 4 else None
        for i, text in enumerate(leg["messages"]):
            pair = (leg["conn"], seq0 + i)
            by_pair[pair].append(text)
            by_text[text].add(pair)
            deliveries[text] += 1
            # the seq the gateway should have given it: its place among its connection's messages, from 1
            if origin in first and text.startswith(f"c{origin[0]}:"):
                if pair[1] != int(text.split(":")[1]) - first[origin] + 1:
                    misnumbered += 1
    same_pair_diff_content = sum(len(set(texts)) - 1 for texts in by_pair.values())
    one_message_two_pairs = sum(len(pairs) - 1 for pairs in by_text.values())
    untellable = same_pair_diff_content + one_message_two_pairs
    tellable = sum(n - 1 for text, n in deliveries.items() if len(by_text[text]) == 1)
    delivered = set(deliveries)
    sent = {c.text(n) for c in clients for n in c.sent}
    confirmed = {c.text(n) for c in clients for n in c.confirmed}
    lost_confirmed = sorted(confirmed - delivered)
    unconfirmed_missing = len(sent - confirmed - delivered)
    strangers = len(delivered - sent)
    passed = not lost_confirmed and untellable == 0 and did_drain and no_headers == 0
    kinds = [k["phase"] for k in kill_log]
    phases = ", ".join(f"{kinds.count(p)} {p}" for p in dict.fromkeys(kinds))
    figures = {
        "confirmed then lost": f"{len(lost_confirmed)} of {len(confirmed)} confirmed ({len(sent)} sent)",
        "duplicates not tellable by conn id/seq": str(untellable),
        "tellable duplicates": str(tellable),
        "kills": f"{len(kill_log)} (seed {seed}: {phases}), restart <= "
                 f"{max((k['restart_s'] for k in kill_log), default=0):.1f} s",
        "queue empty": f"{drain_s:.1f} s after the clients left" + ("" if did_drain else " (NOT drained)"),
    }
    notes = []
    if unconfirmed_missing:
        notes.append(f"{unconfirmed_missing} unconfirmed messages never delivered (allowed)")
    if misnumbered:
        notes.append(f"{misnumbered} deliveries with a seq not matching their place on their connection")
    if dead or entries_left:
        notes.append(f"queue left: {entries_left} entries, {dead} dead letters")
    if no_headers:
        notes.append(f"{no_headers} upstream legs without conn id/seq headers")
    if strangers:
        notes.append(f"{strangers} delivered messages nobody sent")
    errors = [e for c in clients for e in c.unexpected]
    if errors:
        notes.append(f"{len(errors)} unexpected client errors, e.g. {errors[0][:80]}")
    return Result(
        figures=figures,
        passed=passed,
        notes="; ".join(notes),
        raw={
            "seed": seed, "quick": quick, "kills": kill_log, "outages_s": [[round(a, 2), round(b, 2)] for a, b in outages],
            "sent": len(sent), "confirmed": len(confirmed), "delivered_distinct": len(delivered),
            "deliveries": sum(deliveries.values()), "lost_confirmed": len(lost_confirmed),
            "lost_confirmed_examples": lost_confirmed[:20], "same_pair_different_content": same_pair_diff_content,
            "one_message_two_pairs": one_message_two_pairs, "tellable_duplicates": tellable,
            "unconfirmed_not_delivered": unconfirmed_missing, "misnumbered": misnumbered, "strangers": strangers,
            "legs": len(legs), "replay_legs": sum(1 for leg in legs if leg["replay"]), "legs_without_headers": no_headers,
            "drained": did_drain, "drain_s": round(drain_s, 2), "entries_left": entries_left, "dead_letters": dead,
            "client_connects": sum(c.attempts for c in clients),
            "client_connect_failures": sum(c.connect_failures for c in clients), "client_errors": errors[:10],
        },
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "recorder":
        recorder_main(int(sys.argv[2]), sys.argv[3])
    else:
        sys.exit(f"usage: {sys.argv[0]} recorder PORT OUT (the scenario itself runs under bench/soak/run.py)")
