"""
Channel history benchmark (docs/protocol.md#channel-history-and-recovery):

1. Fan-out with history on and off: 1 publisher, N subscribers (1 000 by
   default), 1 KiB JSON messages, on one gateway process (in-process broker)
   and on two sharing a real redis-server; the same gateways serve both
   routes (/room/: no history, /feed/: history_size = 100), the runs
   interleaved per repetition. Goal: deliveries per gateway core-second with
   history >= 0.8x without.
2. A recovery storm: the channel holds 100 kept messages of 1 KiB; N
   clients reconnect at once with ?since= the offset before them, each must
   get the recovered frame and exactly those 100 messages in order. Reports
   the time until the last client has all of them and the gateway's RSS
   before, at its peak (sampled every 20 ms) and after; the bound is what the
   slow-consumer policy lets the gateway hold: N x write_buffer (here 256K)
   over the baseline.

    make bench-history
    .venv/bin/python bench/history.py --subscribers 1000 --reps 3

The gateways run on cpu1 and this load generator and redis on cpu0 when
taskset is there (as in bench/fanout.py, whose helpers this uses).
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from fanout import free_port, json_bodies, json_message, run, start_gateway, start_redis, wait_port

GOAL = 0.8  # deliveries per gateway core-second, history on / off: at least
HISTORY_SIZE = 100
WRITE_BUFFER = 256 * 1024

FEED = f"""
[route:feed]
path = /feed/{{name}}
mode = broadcast
channel = feed:{{name}}
slow_consumer = close
history_size = {HISTORY_SIZE}
history_ttl = 600
"""


def gateway_extra(admin: int) -> str:
    return FEED + f"\n[admin]\nlisten = tcp:{admin}:interface=127.0.0.1\ntoken = bench-history-token\n"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def publish(admin: int, channel: str, message: str) -> dict[str, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{admin}/admin/publish", method="POST",
                                 data=json.dumps({"channel": channel, "message": message}).encode(),
                                 headers={"Authorization": "Bearer bench-history-token"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return dict(json.loads(r.read()))


async def storm(port: int, pid: int, admin: int, clients: int, bodies: list[str]) -> dict[str, Any]:
    """N clients recover the same 100 messages at once."""
    first = publish(admin, "feed:storm", json_message(bodies, 0))
    for n in range(1, HISTORY_SIZE):
        publish(admin, "feed:storm", json_message(bodies, n))
    since, epoch = first["offset"] - 1, first["epoch"]
    expected = [json_message(bodies, n, sent=0.0)[25:] for n in range(HISTORY_SIZE)]  # all but the send time
    peak = before = rss_kib(pid)
    done = asyncio.Event()
    complete = 0
    wrong = 0

    async def client() -> None:
        nonlocal complete, wrong
        async with connect(f"ws://127.0.0.1:{port}/feed/storm?since={since}&epoch={epoch}", max_queue=None,
                           open_timeout=60, close_timeout=5) as ws:
            head = json.loads(await ws.recv())
            got = [await ws.recv() for _ in range(HISTORY_SIZE)]
            if not head.get("recovered") or [str(m)[25:] for m in got] != expected:
                wrong += 1
            complete += 1
            if complete == clients:
                done.set()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kib(pid))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    start = time.monotonic()
    results = await asyncio.gather(*(client() for _ in range(clients)), return_exceptions=True)
    elapsed = time.monotonic() - start
    done.set()
    await sampler
    await asyncio.sleep(1.0)
    return {
        "clients": clients, "recovered_complete": complete, "wrong": wrong,
        "errors": sum(1 for r in results if isinstance(r, BaseException)),
        "error_kinds": dict(Counter(f"{type(r).__name__}: {str(r)[:80]}" for r in results
                                    if isinstance(r, BaseException)).most_common(5)),
        "seconds": elapsed, "rss_before_mib": before / 1024, "rss_peak_mib": peak / 1024,
        "rss_after_mib": rss_kib(pid) / 1024,
        "bound_mib": before / 1024 + clients * WRITE_BUFFER / (1 << 20),
    }


def start_layout(folder: Path, nodes: int, tag: str) -> tuple[list[subprocess.Popen[bytes]], list[int], list[int],
                                                               list[int]]:
    procs: list[subprocess.Popen[bytes]] = []
    redis_url = None
    if nodes > 1:
        redis, redis_url = start_redis(folder)
        procs.append(redis)
    ports, pids, admins = [], [], []
    for n in range(nodes):
        admin = free_port()
        proc, port = start_gateway(folder, f"{tag}{n}", redis_url, extra=gateway_extra(admin),
                                   limits=f"write_buffer = {WRITE_BUFFER}")
        procs.append(proc)
        ports.append(port)
        pids.append(proc.pid)
        admins.append(admin)
        wait_port(admin)
    return procs, ports, pids, admins


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=int, default=20, help="messages per second from the publisher")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if not (1 <= args.subscribers <= 5000 and 0 < args.seconds <= 60 and 1 <= args.rate <= 500
            and 1 <= args.reps <= 10):
        ap.error("out of range: --subscribers 1..5000, --seconds 0..60, --rate 1..500, --reps 1..10")
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    bodies = json_bodies(1024)
    rows: list[dict[str, Any]] = []
    storms: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for rep in range(1, args.reps + 1):
            for nodes in (1, 2):
                procs, ports, pids, admins = start_layout(folder, nodes, f"r{rep}n{nodes}gw")
                try:
                    for history in (False, True):
                        print(f"# rep {rep}/{args.reps}: {nodes} gateway process(es), {args.subscribers} subscribers, "
                              f"history {'ON' if history else 'off'}, 1 KiB JSON at {args.rate} msg/s for "
                              f"{args.seconds} s ...", file=sys.stderr, flush=True)
                        result = asyncio.run(run(ports, pids, args.subscribers, args.seconds, args.rate,
                                                 bodies=bodies, path="/feed/bench" if history else "/room/bench"))
                        rows.append({"rep": rep, "nodes": nodes, "history": history, **result})
                        print(json.dumps(rows[-1]), flush=True)
                    if rep == 1:
                        print(f"# recovery storm: {args.subscribers} clients x {HISTORY_SIZE} kept messages, "
                              f"{nodes} process(es) ...", file=sys.stderr, flush=True)
                        s = asyncio.run(storm(ports[-1], pids[-1], admins[0], args.subscribers, bodies))
                        storms.append({"nodes": nodes, **s})
                        print(json.dumps(storms[-1]), flush=True)
                finally:
                    stop(procs)

    def median(nodes: int, history: bool, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["nodes"] == nodes and r["history"] == history)

    print(f"\n{args.subscribers} subscribers, 1 publisher at {args.rate} msg/s of 1 KiB JSON, "
          f"history_size = {HISTORY_SIZE}; medians of {args.reps}\n")
    print("| gateway processes | history | delivered | lost/dropped | deliveries/s | gateway CPU s "
          "| deliveries per gateway core-second | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    failed = False
    for nodes in (1, 2):
        for history in (False, True):
            m = lambda k, spec=",.0f": format(median(nodes, history, k), spec)  # noqa: E731
            print(f"| {nodes} | {'on' if history else 'off'} | {m('delivered')} | {m('lost_or_dropped')} "
                  f"| {m('deliveries_per_s')} | {m('gateway_cpu_s', '.2f')} | {m('deliveries_per_core_s')} "
                  f"| {m('p50_ms', '.1f')} | {m('p99_ms', '.1f')} |")
    print("\n| gateway processes | deliveries per gateway core-second, history on / off | goal | verdict |")
    print("|---|---|---|---|")
    for nodes in (1, 2):
        ratio = median(nodes, True, "deliveries_per_core_s") / median(nodes, False, "deliveries_per_core_s")
        failed |= ratio < GOAL
        print(f"| {nodes} | {ratio:.2f} | >= {GOAL} | {'met' if ratio >= GOAL else '**not met**'} |")
    print(f"\n| gateway processes | clients | complete and in order | errors | seconds | RSS before MiB "
          f"| RSS peak MiB | RSS after MiB | bound MiB (N x write_buffer {WRITE_BUFFER // 1024}K over before) "
          "| verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in storms:
        ok = s["recovered_complete"] == s["clients"] and not s["wrong"] and not s["errors"] \
            and s["rss_peak_mib"] <= s["bound_mib"]
        failed |= not ok
        print(f"| {s['nodes']} | {s['clients']} | {s['recovered_complete'] - s['wrong']} | {s['errors']} "
              f"| {s['seconds']:.2f} | {s['rss_before_mib']:.0f} | {s['rss_peak_mib']:.0f} | {s['rss_after_mib']:.0f} "
              f"| {s['bound_mib']:.0f} | {'met' if ok else '**not met**'} |")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
