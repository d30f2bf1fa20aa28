"""
Redis sharding benchmark (docs/configuration.md#redis-shards): broadcast
fan-out across 2 gateway processes with 1 Redis, then with 2 Redis shards
(`[redis] shards`), interleaved per repetition. Subscribers are spread over
C channels (20 by default) and both processes; one publisher per channel,
each at R msg/s (20), alternating between the processes. Reports deliveries per
second and per gateway core-second, and each Redis's CPU. Goal: the sharded
run is not slower (deliveries per gateway core-second >= 1.0x).

    make bench-shards
    .venv/bin/python bench/shards.py --subscribers 1000 --channels 20 --reps 5 --seconds 15 --rate 20

The gateways run on cpu1 and the load generator and the Redis servers on
cpu0 when taskset is there (bench/fanout.py's helpers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from fanout import cpu_seconds, start_gateway, start_redis

GOAL = 1.0  # deliveries per gateway core-second, 2 shards / 1 Redis: at least


async def run(ports: list[int], pids: list[int], redis_pids: list[int], subscribers: int, channels: int,
              seconds: float, rate: int) -> dict[str, Any]:
    delivered = 0
    opened = 0
    ready = asyncio.Event()
    latencies: list[float] = []

    async def subscriber(i: int) -> None:
        nonlocal delivered, opened
        port = ports[i % len(ports)]
        async with connect(f"ws://127.0.0.1:{port}/room/c{i % channels}", max_queue=None, open_timeout=60) as ws:
            opened += 1
            if opened == subscribers:
                ready.set()
            async for msg in ws:
                latencies.append(time.monotonic() - float(msg))
                delivered += 1

    tasks = [asyncio.create_task(subscriber(i)) for i in range(subscribers)]
    for _ in range(0, subscribers, 100):
        await asyncio.sleep(0.05)
    await asyncio.wait_for(ready.wait(), 120)
    await asyncio.sleep(1.0)
    sent = 0

    async def publisher(c: int) -> None:
        nonlocal sent
        async with connect(f"ws://127.0.0.1:{ports[c % len(ports)]}/room/c{c}") as pub:
            start = time.monotonic()
            n = 0
            while time.monotonic() - start < seconds:
                await pub.send(repr(time.monotonic()))
                n += 1
                sent += 1
                delay = start + n / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)

    cpu_start, redis_start = cpu_seconds(pids), cpu_seconds(redis_pids)
    start = time.monotonic()
    await asyncio.gather(*(publisher(c) for c in range(channels)))
    await asyncio.sleep(2.0)  # stragglers
    elapsed = time.monotonic() - start
    cpu, redis_cpu = cpu_seconds(pids) - cpu_start, cpu_seconds(redis_pids) - redis_start
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    expected = sent * subscribers // channels
    lat = sorted(latencies)
    return {
        "published": sent, "delivered": delivered, "lost_or_dropped": expected - delivered,
        "deliveries_per_s": delivered / (elapsed - 2.0), "gateway_cpu_s": cpu, "redis_cpu_s": redis_cpu,
        "deliveries_per_core_s": delivered / cpu if cpu else float("nan"),
        "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))] if lat else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--channels", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rate", type=int, default=20, help="messages per second per channel")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if not (1 <= args.subscribers <= 5000 and 1 <= args.channels <= 200 and 0 < args.seconds <= 60
            and 1 <= args.rate <= 200 and 1 <= args.reps <= 10):
        ap.error("out of range: --subscribers 1..5000, --channels 1..200, --seconds 0..60, --rate 1..200, --reps 1..10")
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for rep in range(1, args.reps + 1):
            for shards in (1, 2):
                procs: list[subprocess.Popen[bytes]] = []
                try:
                    redis = [start_redis(folder) for _ in range(shards)]
                    procs += [p for p, _ in redis]
                    urls = [u for _, u in redis]
                    # start_gateway's [redis] is url = ...: shards replace it, the rest of its config stays
                    ports, pids = [], []
                    for n in range(2):
                        proc, port = start_gateway(folder, f"r{rep}s{shards}gw{n}", urls[0] if shards == 1 else None,
                                                   extra=("[redis]\nprefix = bench\nshards = " + " ".join(urls) + "\n")
                                                   if shards > 1 else "")
                        procs.append(proc)
                        ports.append(port)
                        pids.append(proc.pid)
                    print(f"# rep {rep}/{args.reps}: 2 gateway processes, {shards} Redis, {args.subscribers} "
                          f"subscribers on {args.channels} channels, {args.rate} msg/s each for {args.seconds} s ...",
                          file=sys.stderr, flush=True)
                    result = asyncio.run(run(ports, pids, [p.pid for p, _ in redis], args.subscribers, args.channels,
                                             args.seconds, args.rate))
                    rows.append({"rep": rep, "shards": shards, **result})
                    print(json.dumps(rows[-1]), flush=True)
                finally:
                    for p in procs:
                        p.terminate()
                    for p in procs:
                        p.wait(30)

    def median(shards: int, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["shards"] == shards)

    print(f"\n2 gateway processes, {args.subscribers} subscribers on {args.channels} channels, {args.rate} msg/s "
          f"per channel; medians of {args.reps}\n")
    print("| Redis | published | delivered | lost/dropped | deliveries/s | gateway CPU s | Redis CPU s "
          "| deliveries per gateway core-second | p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shards in (1, 2):
        m = lambda k, spec=",.0f": format(median(shards, k), spec)  # noqa: E731
        print(f"| {'1' if shards == 1 else f'{shards} shards'} | {m('published')} | {m('delivered')} "
              f"| {m('lost_or_dropped')} | {m('deliveries_per_s')} | {m('gateway_cpu_s', '.2f')} "
              f"| {m('redis_cpu_s', '.2f')} | {m('deliveries_per_core_s')} | {m('p99_ms', '.1f')} |")
    ratio = median(2, "deliveries_per_core_s") / median(1, "deliveries_per_core_s")
    rate_ratio = median(2, "deliveries_per_s") / median(1, "deliveries_per_s")
    ok = ratio >= GOAL * 0.97 and rate_ratio >= 0.97  # within the runs' noise: not slower
    print(f"\n| 2 shards / 1 Redis | deliveries/s | deliveries per gateway core-second | goal | verdict |")
    print("|---|---|---|---|---|")
    print(f"| ratio | {rate_ratio:.2f} | {ratio:.2f} | not slower (>= {GOAL}, 3 % noise) "
          f"| {'met' if ok else '**not met**'} |")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
