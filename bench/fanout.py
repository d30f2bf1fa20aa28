"""
Fan-out benchmark (issue 6): one publisher, N subscribers of one broadcast
channel, spread over one or two gateway processes (two share a real
redis-server). Prints deliveries per second and delivery latency.

    make bench-fanout            # both layouts, 1 000 subscribers
    .venv/bin/python bench/fanout.py --subscribers 1000 --nodes 2 --seconds 5

The gateways run on cpu1 and this load generator and redis on cpu0 when
taskset is there (like bench/run.sh's PIN=split). The load generator
is Python (asyncio + websockets): compare the two layouts with each other,
measured in one run, rather than against the Go harness's numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing on port {port}")


def pinned(cpu: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else argv


def start_gateway(folder: Path, name: str, redis_url: str | None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    redis = f"[redis]\nurl = {redis_url}\nprefix = bench\n" if redis_url else ""
    ini = folder / f"{name}.ini"
    ini.write_text(f"""
[gateway]
node_id = {name}
listen = tcp:{port}:interface=127.0.0.1

[limits]
max_connections = 0
max_connections_per_ip = 0
ping_interval = 0
idle_timeout = 0

[log]
level = warn
format = text

{redis}
[route:room]
path = /room/{{room}}
mode = broadcast
channel = room:{{room}}
slow_consumer = drop_oldest
""")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(pinned(1, [TWISTD, "-n", "--pidfile=", "wsgateway", "--config", str(ini)]),
                            cwd=folder, stdout=open(folder / f"{name}.log", "wb"), stderr=subprocess.STDOUT, env=env)
    wait_port(port)
    return proc, port


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the gateway processes have used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


async def run(ports: list[int], pids: list[int], subscribers: int, seconds: float, rate: int) -> dict[str, float]:
    latencies: list[float] = []
    delivered = 0
    ready = asyncio.Event()
    opened = 0

    async def subscriber(port: int) -> None:
        nonlocal delivered, opened
        async with connect(f"ws://127.0.0.1:{port}/room/bench", max_queue=None, compression=None,
                           open_timeout=60) as ws:
            opened += 1
            if opened == subscribers:
                ready.set()
            async for msg in ws:
                sent = float(msg)
                latencies.append(time.monotonic() - sent)
                delivered += 1

    tasks = [asyncio.create_task(subscriber(ports[i % len(ports)])) for i in range(subscribers)]
    for i in range(0, subscribers, 100):
        await asyncio.sleep(0.05)  # let the dials spread
    await asyncio.wait_for(ready.wait(), 120)
    await asyncio.sleep(1.0)  # every node has subscribed to the channel on Redis
    async with connect(f"ws://127.0.0.1:{ports[0]}/room/bench", compression=None) as pub:
        interval = 1.0 / rate
        cpu_start = cpu_seconds(pids)
        start = time.monotonic()
        sent = 0
        while time.monotonic() - start < seconds:
            await pub.send(repr(time.monotonic()))
            sent += 1
            next_at = start + sent * interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.sleep(2.0)  # stragglers
        elapsed = time.monotonic() - start
        cpu = cpu_seconds(pids) - cpu_start
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    expected = sent * subscribers
    lat = sorted(latencies)
    return {
        "published": sent,
        "delivered": delivered,
        "lost_or_dropped": expected - delivered,
        "deliveries_per_s": delivered / (elapsed - 2.0 if elapsed > 2.0 else elapsed),
        # what the gateway processes spent, publishing window and stragglers included
        "gateway_cpu_s": cpu,
        "deliveries_per_core_s": delivered / cpu if cpu else float("nan"),
        "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
        "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))] if lat else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--nodes", type=int, choices=(1, 2), default=None, help="default: both layouts")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=int, default=50, help="messages per second from the publisher")
    args = ap.parse_args()
    layouts = [args.nodes] if args.nodes else [1, 2]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for nodes in layouts:
            procs: list[subprocess.Popen[bytes]] = []
            redis_url = None
            if nodes > 1:
                rport = free_port()
                procs.append(subprocess.Popen(pinned(0, ["redis-server", "--port", str(rport), "--bind", "127.0.0.1",
                                                         "--save", "", "--appendonly", "no"]),
                                              stdout=subprocess.DEVNULL, cwd=folder))
                wait_port(rport)
                redis_url = f"redis://127.0.0.1:{rport}/0"
            try:
                print(f"# {nodes} gateway process(es), {args.subscribers} subscribers, "
                      f"{args.rate} msg/s for {args.seconds} s ...", file=sys.stderr, flush=True)
                ports, pids = [], []
                for n in range(nodes):
                    proc, port = start_gateway(folder, f"gw{n}", redis_url)
                    procs.append(proc)
                    ports.append(port)
                    pids.append(proc.pid)
                os.sched_setaffinity(0, {0}) if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1 else None
                result = asyncio.run(run(ports, pids, args.subscribers, args.seconds, args.rate))
                rows.append({"nodes": nodes, **result})
                print(json.dumps(rows[-1]), flush=True)
            finally:
                for p in procs:
                    p.terminate()
                for p in procs:
                    p.wait(30)
    print("\n| gateway processes | published | delivered | lost/dropped | deliveries/s | gateway CPU s "
          "| deliveries per gateway core-second | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['nodes']} | {r['published']} | {r['delivered']} | {r['lost_or_dropped']} | "
              f"{r['deliveries_per_s']:,.0f} | {r['gateway_cpu_s']:.2f} | {r['deliveries_per_core_s']:,.0f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")


if __name__ == "__main__":
    main()
