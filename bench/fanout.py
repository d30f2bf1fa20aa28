"""
Fan-out benchmark (issue 6): one publisher, N subscribers of one broadcast
channel, spread over one or two gateway processes (two share a real
redis-server). Prints deliveries per second and delivery latency.

    make bench-fanout            # both layouts, 1 000 subscribers
    .venv/bin/python bench/fanout.py --subscribers 1000 --nodes 2 --seconds 5
    make bench-fanout COMPRESS=1 # one process, 1 KiB JSON, without then with compression
    .venv/bin/python bench/fanout.py --compress --reps 3

--compress: permessage-deflate (RFC 7692) on the broadcast route. The
publisher sends 1 KiB JSON text messages (--size; 32 distinct ones from a
fixed seed, their send time in a fixed-width field) and each layout runs
twice per repetition, interleaved: subscribers without compression, then
subscribers negotiating it (the websockets client's default offer); the
publisher never compresses, so the gateway's added work is deflating each
published message (once, for every subscriber). Every subscriber must have
negotiated it (Sec-WebSocket-Extensions of its handshake response), or the
run reports no figure and exits 1; every delivery must be byte-identical to
what was published. The table gives deliveries per gateway core-second of
both, and their ratio (goal: compressed >= 0.8x uncompressed).

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
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

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


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A throwaway redis-server on cpu0 (no persistence), once it listens: (process, url)."""
    port = free_port()
    proc = subprocess.Popen(pinned(0, ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no"]), stdout=subprocess.DEVNULL, cwd=folder)
    wait_port(port)
    return proc, f"redis://127.0.0.1:{port}/0"


GOAL_COMPRESSED = 0.8  # deliveries per gateway core-second, compressed / uncompressed: at least

# --compress messages: '{"sent":' + send time (17 characters, space-padded) + ',"n":' + index (2 characters, space-padded) + ',' + the body's rest
SENT_AT = slice(8, 25)
INDEX_AT = slice(30, 32)
BODY_AT = 33


def json_bodies(size: int, seed: int = 1, count: int = 32) -> list[str]:
    """JSON objects of size - 32 characters, so that each message is size bytes: batches of
    events with repeated keys and varied values (like bench/loadgen's -payload json)."""
    rng = random.Random(seed)
    events = ["page_view", "click", "add_to_cart", "purchase", "login", "logout", "search", "scroll"]
    cities = [("Paris", "FR", 48.85, 2.35), ("Berlin", "DE", 52.52, 13.40), ("New York", "US", 40.71, -74.00),
              ("London", "GB", 51.50, -0.12), ("Madrid", "ES", 40.41, -3.70), ("Tokyo", "JP", 35.68, 139.69)]
    words = ["alpha", "bravo", "delta", "echo", "gamma", "kilo", "nova", "omega", "river", "tango", "vector", "zulu"]
    want = size - 32
    bodies = []
    for i in range(count):
        ident, ms = rng.randrange(1_000_000, 9_000_000), rng.randrange(3_600_000)
        items: list[str] = []
        head, tail = f'{{"type":"events","seq":{i},"items":[', '],"pad":""}'
        while True:
            ident += rng.randrange(1, 20)
            ms += rng.randrange(2000)
            city, country, lat, lon = rng.choice(cities)
            item = (f'{{"id":{ident},"user":"u{rng.randrange(1000, 1200)}","event":"{rng.choice(events)}",'
                    f'"ts":"2026-12-07T15:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}Z",'
                    f'"price":{rng.choice([4.99, 9.99, 12.99, 19.99, 49.99, 99.99])},"qty":{rng.randrange(1, 10)},'
                    f'"country":"{country}","title":"{" ".join(rng.choices(words, k=rng.randrange(2, 4)))}",'
                    f'"geo":{{"city":"{city}","lat":{lat + rng.randrange(100) / 1000:.3f},'
                    f'"lon":{lon + rng.randrange(100) / 1000:.3f}}},"ok":{"true" if rng.randrange(10) else "false"}}}')
            if len(head) + len(",".join(items + [item])) + len(tail) > want:
                break
            items.append(item)
        body = head + ",".join(items) + '],"pad":"'
        body += "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=want - len(body) - 2)) + '"}'
        if len(body) != want or not items:
            raise SystemExit(f"--size {size}: too small for a JSON message")
        json.loads(body)
        bodies.append(body)
    return bodies


def json_message(bodies: list[str], n: int, sent: float | None = None) -> str:
    k = n % len(bodies)
    return f'{{"sent":{time.monotonic() if sent is None else sent:17.6f},"n":{k:2d},{bodies[k][1:]}'


def deflate_ratio(bodies: list[str], level: int) -> float:
    """Raw bytes over permessage-deflate bytes, each message compressed on its own."""
    raw = packed = 0
    for n in range(len(bodies)):
        data = json_message(bodies, n, sent=12345.678901).encode()
        c = zlib.compressobj(level, zlib.DEFLATED, -15)
        raw += len(data)
        packed += len(c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)) - 4
    return raw / packed


def start_gateway(folder: Path, name: str, redis_url: str | None,
                  compression: bool = False, extra: str = "", limits: str = "") -> tuple[subprocess.Popen[bytes], int]:
    """A gateway on a free port with the broadcast route /room/{room}; C{extra} sections, C{limits} keys."""
    port = free_port()
    redis = f"[redis]\nurl = {redis_url}\nprefix = bench\n" if redis_url else ""
    # the same gateway configuration for both runs of --compress: only the subscribers' offers differ
    route_compression = "compression = passthrough\n" if compression else ""
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
{limits}

[log]
level = warn
format = text

{redis}
[route:room]
path = /room/{{room}}
mode = broadcast
channel = room:{{room}}
slow_consumer = drop_oldest
{route_compression}
{extra}""")
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


def own_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def run(ports: list[int], pids: list[int], subscribers: int, seconds: float, rate: int,
              bodies: list[str] | None = None, compress: bool = False, path: str = "/room/bench") -> dict[str, Any]:
    latencies: list[float] = []
    delivered = 0
    mismatches = 0
    compressed = 0
    ext_header = ""
    ready = asyncio.Event()
    opened = 0

    async def subscriber(port: int) -> None:
        nonlocal delivered, opened, mismatches, compressed, ext_header
        async with connect(f"ws://127.0.0.1:{port}{path}", max_queue=None,
                           compression="deflate" if compress else None, open_timeout=60) as ws:
            if compress:
                ext_header = ws.response.headers.get("Sec-WebSocket-Extensions", "") if ws.response else ""
                if "permessage-deflate" in ext_header.lower():
                    compressed += 1
            opened += 1
            if opened == subscribers:
                ready.set()
            async for msg in ws:
                if bodies is None:
                    sent = float(msg)
                else:
                    sent = float(msg[SENT_AT])
                    if msg[BODY_AT:] != bodies[int(msg[INDEX_AT])][1:]:
                        mismatches += 1  # not what was published: counted, not timed
                        continue
                latencies.append(time.monotonic() - sent)
                delivered += 1

    tasks = [asyncio.create_task(subscriber(ports[i % len(ports)])) for i in range(subscribers)]
    for i in range(0, subscribers, 100):
        await asyncio.sleep(0.05)  # let the dials spread
    await asyncio.wait_for(ready.wait(), 120)
    await asyncio.sleep(1.0)  # every node has subscribed to the channel on Redis
    if compress and compressed < subscribers:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {"compression_not_negotiated": subscribers - compressed, "extensions_header": ext_header}
    async with connect(f"ws://127.0.0.1:{ports[0]}{path}", compression=None) as pub:
        interval = 1.0 / rate
        cpu_start = cpu_seconds(pids)
        own_start = own_cpu_seconds()
        start = time.monotonic()
        sent = 0
        while time.monotonic() - start < seconds:
            await pub.send(repr(time.monotonic()) if bodies is None else json_message(bodies, sent))
            sent += 1
            next_at = start + sent * interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.sleep(2.0)  # stragglers
        elapsed = time.monotonic() - start
        cpu = cpu_seconds(pids) - cpu_start
        own = own_cpu_seconds() - own_start
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    expected = sent * subscribers
    lat = sorted(latencies)
    extra: dict[str, Any] = {} if bodies is None else {
        "compression": compress, "mismatches": mismatches,
        # this load generator's own CPU (one core = 100): near 100, it is the bottleneck, not the gateway
        "loadgen_cpu_pct": 100 * own / elapsed,
    }
    return extra | {
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
    ap.add_argument("--nodes", type=int, choices=(1, 2), default=None,
                    help="default: both layouts (with --compress: one process)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=int, default=50, help="messages per second from the publisher")
    ap.add_argument("--compress", action="store_true",
                    help="1 KiB JSON messages, without then with permessage-deflate on the subscribers")
    ap.add_argument("--size", type=int, default=1024, help="--compress: message bytes")
    ap.add_argument("--reps", type=int, default=1, help="--compress: repetitions (without and with, interleaved)")
    args = ap.parse_args()
    if not (1 <= args.subscribers <= 10_000 and 0 < args.seconds <= 120 and 1 <= args.rate <= 1000
            and 1 <= args.reps <= 10 and 256 <= args.size <= 1 << 20):
        ap.error("out of range: --subscribers 1..10000, --seconds 0..120, --rate 1..1000, --reps 1..10, "
                 "--size 256..1M")
    if args.compress:
        compress_main(args)
        return
    layouts = [args.nodes] if args.nodes else [1, 2]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for nodes in layouts:
            procs: list[subprocess.Popen[bytes]] = []
            redis_url = None
            if nodes > 1:
                redis, redis_url = start_redis(folder)
                procs.append(redis)
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



def compress_main(args: argparse.Namespace) -> None:
    """--compress: each layout without then with compression, per repetition; the ratio of medians."""
    bodies = json_bodies(args.size)
    ratios = (deflate_ratio(bodies, 1), deflate_ratio(bodies, 6))
    print(f"# {len(bodies)} distinct {args.size}-byte JSON messages (seed 1): deflate ratio {ratios[0]:.2f}x at "
          f"level 1, {ratios[1]:.2f}x at level 6, each on its own", file=sys.stderr, flush=True)
    layouts = [args.nodes] if args.nodes else [1]
    rows = []
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for rep in range(1, args.reps + 1):
            for nodes in layouts:
                for compress in (False, True):
                    procs: list[subprocess.Popen[bytes]] = []
                    redis_url = None
                    if nodes > 1:
                        redis, redis_url = start_redis(folder)
                        procs.append(redis)
                    try:
                        print(f"# rep {rep}/{args.reps}: {nodes} gateway process(es), {args.subscribers} subscribers "
                              f"{'WITH' if compress else 'without'} permessage-deflate, {args.size}-byte JSON, "
                              f"{args.rate} msg/s for {args.seconds} s ...", file=sys.stderr, flush=True)
                        ports, pids = [], []
                        for n in range(nodes):
                            proc, port = start_gateway(folder, f"gw{n}", redis_url, compression=True)
                            procs.append(proc)
                            ports.append(port)
                            pids.append(proc.pid)
                        if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
                            os.sched_setaffinity(0, {0})
                        result = asyncio.run(run(ports, pids, args.subscribers, args.seconds, args.rate,
                                                 bodies=bodies, compress=compress))
                        row = {"rep": rep, "nodes": nodes, "compression": compress, "size": args.size,
                               "deflate_ratio_l1": ratios[0], "deflate_ratio_l6": ratios[1], **result}
                        if row.get("compression_not_negotiated"):
                            failed = True
                            print(f"ERROR: permessage-deflate NOT negotiated by {row['compression_not_negotiated']} "
                                  f"of {args.subscribers} subscribers (Sec-WebSocket-Extensions: "
                                  f"'{row.get('extensions_header', '')}'): no figure", file=sys.stderr, flush=True)
                        elif row.get("mismatches"):
                            failed = True
                            print(f"ERROR: {row['mismatches']} deliveries differ from what was published",
                                  file=sys.stderr, flush=True)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                    finally:
                        for p in procs:
                            p.terminate()
                        for p in procs:
                            p.wait(30)

    def median(nodes: int, compress: bool, key: str) -> float | None:
        v = [r[key] for r in rows if r["nodes"] == nodes and r["compression"] == compress
             and not r.get("compression_not_negotiated") and r.get(key) == r.get(key) and key in r]
        return statistics.median(v) if v else None

    def fmt(x: float | None, spec: str = ",.0f") -> str:
        return "-" if x is None else format(x, spec)

    print(f"\n{args.subscribers} subscribers, 1 publisher at {args.rate} msg/s of {args.size}-byte JSON "
          f"(deflate ratio {ratios[0]:.2f}x at level 1, {ratios[1]:.2f}x at level 6); medians of {args.reps}\n")
    print("| gateway processes | subscribers' compression | published | delivered | lost/dropped | mismatches "
          "| deliveries/s | gateway CPU s | deliveries per gateway core-second | p50 ms | p99 ms | loadgen CPU % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for nodes in layouts:
        for compress in (False, True):
            if any(r["nodes"] == nodes and r["compression"] == compress and r.get("compression_not_negotiated")
                   for r in rows):
                print(f"| {nodes} | {'permessage-deflate' if compress else 'none'} | **not negotiated: no figure** "
                      "| - | - | - | - | - | - | - | - | - |")
                continue
            m = lambda k, spec=",.0f": fmt(median(nodes, compress, k), spec)  # noqa: E731
            print(f"| {nodes} | {'permessage-deflate' if compress else 'none'} | {m('published')} | {m('delivered')} "
                  f"| {m('lost_or_dropped')} | {m('mismatches')} | {m('deliveries_per_s')} | {m('gateway_cpu_s', '.2f')} "
                  f"| {m('deliveries_per_core_s')} | {m('p50_ms', '.1f')} | {m('p99_ms', '.1f')} "
                  f"| {m('loadgen_cpu_pct', '.0f')} |")
    print("\n| gateway processes | deliveries per gateway core-second, compressed / uncompressed | goal | verdict |")
    print("|---|---|---|---|")
    for nodes in layouts:
        x, y = median(nodes, True, "deliveries_per_core_s"), median(nodes, False, "deliveries_per_core_s")
        r = x / y if x is not None and y else None
        verdict = "**no figure**" if r is None else ("met" if r >= GOAL_COMPRESSED else "**not met**")
        print(f"| {nodes} | {fmt(r, '.2f')} | >= {GOAL_COMPRESSED} | {verdict} |")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
