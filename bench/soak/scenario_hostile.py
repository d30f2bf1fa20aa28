"""
hostile: the hostile-peer catalogue on a loop for 2 minutes beside 100
normal clients. What it measures:

- **the normal clients' errors**: 100 clients doing steady echo round trips
  through a proxy route to the Go echo upstream (5 a second each) for the
  whole run; an error is a failed connect, a connection the gateway or the
  upstream closed, an echo later than 10 s, or one that differs from what was
  sent. Target 0.
- **the gateway's RSS and descriptors** before the loop (with the normal
  clients connected), at their peak during it, and 10-20 s after it stopped
  (the median of the samples in that window). Target: back to the baseline
  +-5 %. A leak per attack (a buffer, a timer, a socket kept) shows as a
  difference that grows with the rounds; the same 100 normal connections are
  open in both measurements, so they cancel out.

Why this way:

- The attackers (hostile_peers.py) are raw sockets, each kind in its own
  thread per round, all kinds at once, each bounded in count per round and
  in time; a round is over when its slowest kind is (about 9-10 s), then the
  next starts, until 2 minutes have passed. They come from loopback addresses
  of their own (127.0.K.x), the normal clients from 127.0.0.1: attackers
  meet the per-address limit, the normal clients are judged on what the
  gateway does to them beside the attack, not on sharing an address.
- The normal clients are this module run as a subprocess (``python
  scenario_hostile.py normal PORT COUNT OUT``, asyncio ``websockets``) at a
  steady rate rather than the Go load generator, whose pingpong sends as fast
  as it can: a saturated gateway would measure CPU starvation, not what
  hostile peers do to a production-like load. A subprocess, so that the
  attackers' threads in this process do not delay their round trips.
- The gateway has production limits (the defaults of docs/configuration.md
  [limits] and [admin], so max_message_size 1M, handshake_timeout 5 s,
  max_connections_per_ip 256, admin max_connections 64) and an admin port
  with a token; routes: /echo (proxy to the Go echo upstream), /z (proxy to
  a second Go echo with ``-compress``: permessage-deflate passes through
  and the gateway counts inflated sizes), /room/{room} (broadcast, compressed
  by the gateway itself) and /h (host-restricted, for Host header tricks).
- Before the baseline one warm-up round of every attack (one connection
  each): lazily imported or allocated things (deflate, the broadcast
  hub, the admin resource tree) are in the baseline, not counted as growth.
- Each attack's answers are compared with what the edge is documented to
  answer (hostile_peers.EXPECTED); unexpected ones are shown in the notes,
  not judged: the target is about the normal clients and the resources.

Quick mode: one round of the loop (about 10 s), the "after" window 5-8 s
after it; about 30 s in all.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hostile_peers as hp
from harness import Result, Soak, free_port, rss_kib, sampled, wait_for, wait_port

NAME = "hostile"
TARGET = "0; back to baseline +-5 %"

NORMAL_CLIENTS = 100
RATE = 5.0  # echo round trips per second per normal client
ECHO_TIMEOUT = 10.0
TOLERANCE_PCT = 5.0

GATEWAY_INI = """\
    [gateway]
    listen = tcp:{port}:interface=127.0.0.1
    drain_grace = 0
    shutdown_timeout = 1

    [admin]
    listen = tcp:{admin}:interface=127.0.0.1
    token = env:WSGW_SOAK_ADMIN_TOKEN

    [log]
    level = info
    format = text

    [upstream:echo]
    nodes = ws://127.0.0.1:{echo}

    [upstream:zecho]
    nodes = ws://127.0.0.1:{zecho}

    [route:echo]
    path = /echo/**
    upstream = echo
    auth = none

    [route:z]
    path = /z/**
    upstream = zecho
    auth = none

    [route:h]
    path = /h/**
    host = *.internal.example
    upstream = echo
    auth = none

    [route:room]
    path = /room/{room}
    mode = broadcast
    channel = room:{room}
    auth = none
"""


# -- the normal clients, run as a subprocess of this module ---------------------------------------


def normal_main(port: int, count: int, out: str) -> None:
    """
    ``count`` clients doing echo round trips at RATE each until ``stop`` on
    stdin (or 10 minutes, a bound); writes OUT (JSON) and ``OUT.ready`` once
    all are connected.
    """
    import threading

    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake

    errors: Counter[str] = Counter()
    latencies: list[float] = []
    examples: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        threading.Thread(target=lambda: (sys.stdin.readline(), loop.call_soon_threadsafe(stop.set)),
                         daemon=True).start()
        connected = 0

        def error(kind: str, detail: str) -> None:
            errors[kind] += 1
            if len(examples) < 10:
                examples.append(f"{kind}: {detail[:120]}")

        async def client(i: int) -> None:
            nonlocal connected
            n = 0
            first = True
            while not stop.is_set():
                try:
                    ws = await connect(f"ws://127.0.0.1:{port}/echo/normal{i}", open_timeout=10, compression=None,
                                       close_timeout=2, max_size=None)
                except (OSError, InvalidHandshake, TimeoutError) as e:
                    error("connect failed", repr(e))
                    await asyncio.sleep(1.0)  # bounded by the stop event and the process's own bound
                    continue
                if first:
                    connected += 1
                    first = False
                    if connected == count:
                        Path(out + ".ready").write_text(str(connected))
                try:
                    await asyncio.sleep(i / count / RATE)  # spread the clients over the period
                    while not stop.is_set():
                        n += 1
                        msg = f"normal{i}:{n}:" + "x" * 48
                        t0 = time.monotonic()
                        await ws.send(msg)
                        try:
                            got = await asyncio.wait_for(ws.recv(), ECHO_TIMEOUT)
                        except (TimeoutError, asyncio.TimeoutError):
                            error("echo later than 10 s", msg)
                            break
                        latencies.append(time.monotonic() - t0)
                        if got != msg:
                            error("echo differs", f"{msg!r} -> {got!r}")
                        await asyncio.sleep(max(0.0, 1.0 / RATE - (time.monotonic() - t0)))
                except ConnectionClosed as e:
                    error("connection closed", repr(e))
                finally:
                    await ws.close()

        tasks = [asyncio.create_task(client(i)) for i in range(count)]
        try:
            await asyncio.wait_for(stop.wait(), 600)
        except (TimeoutError, asyncio.TimeoutError):
            pass
        stop.set()
        await asyncio.wait(tasks, timeout=15)

    asyncio.run(main())
    lat = sorted(latencies)

    def q(p: float) -> float:
        return round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else 0.0

    Path(out).write_text(json.dumps({"errors": sum(errors.values()), "by_kind": dict(errors), "examples": examples,
                                     "round_trips": len(lat), "p50_ms": q(0.5), "p99_ms": q(0.99),
                                     "max_ms": q(1.0)}))


# -- the scenario ----------------------------------------------------------------------------------------


def _timed(attack: hp.Attack, t: hp.Target, count: int) -> tuple[list[str], float]:
    t0 = time.monotonic()
    return attack(t, count), time.monotonic() - t0


def _round(t: hp.Target, kinds: dict[str, tuple[hp.Attack, int]], pool: ThreadPoolExecutor
           ) -> dict[str, tuple[list[str], float]]:
    """Every attack kind at once, each in its own thread: its outcomes and seconds, once the slowest is over."""
    futures = {name: pool.submit(_timed, attack, t, count) for name, (attack, count) in kinds.items()}
    out = {}
    for name, fut in futures.items():
        try:
            out[name] = fut.result(timeout=60)  # each attack bounds itself far below this
        except Exception as e:  # noqa: BLE001 - an attacker's own failure is an outcome, not a crash
            out[name] = ([f"attacker failed: {e!r}"[:100]], 0.0)
    return out


def _median(values: list[int]) -> int:
    return int(statistics.median(values)) if values else 0


def run(soak: Soak, quick: bool) -> Result:
    hostile_s = 8.0 if quick else 120.0
    after_window = (5.0, 8.0) if quick else (10.0, 20.0)
    _, echo_port = soak.echo()
    zecho_port = free_port()
    soak.spawn([str(soak.bin / "echo"), "-addr", f"127.0.0.1:{zecho_port}", "-compress"], f"zecho-{zecho_port}")
    wait_port(zecho_port)
    admin_port = free_port()
    ini = (GATEWAY_INI.replace("{echo}", str(echo_port)).replace("{zecho}", str(zecho_port))
           .replace("{admin}", str(admin_port)))
    gw, port = soak.gateway(ini, "gw", env={"WSGW_SOAK_ADMIN_TOKEN": secrets.token_hex(24)})
    wait_port(admin_port)
    target = hp.Target(port=port, admin_port=admin_port)
    negotiated = hp.compression_negotiated(target)

    out = soak.folder / "normal.json"
    normal = soak.spawn([sys.executable, str(Path(__file__).resolve()), "normal", str(port), str(NORMAL_CLIENTS),
                         str(out)], "normal", stdin=subprocess.PIPE)
    if not wait_for(lambda: Path(str(out) + ".ready").exists() or normal.poll() is not None, 60, 0.2) \
            or normal.poll() is not None:
        raise RuntimeError(f"the normal clients did not all connect within 60 s:\n{soak.log('normal')[-2000:]}")

    kinds = {name: (attack, quick_n if quick else full_n) for name, (attack, full_n, quick_n) in hp.CATALOGUE.items()}
    tally: dict[str, Counter[str]] = {name: Counter() for name in kinds}
    rounds = 0
    marks: dict[str, float] = {}
    slowest: dict[str, float] = {}
    rss_by_round: list[int] = []
    with ThreadPoolExecutor(max_workers=len(kinds)) as pool, sampled(gw.pid, 0.5) as samples:
        t0 = time.monotonic()
        # warm-up: one connection of each kind (half-open: 10, idle admin: 1), then settle
        _round(target, {name: (attack, 1) for name, (attack, _) in kinds.items()}, pool)
        time.sleep(3.0 if quick else 5.0)
        marks["baseline_from"] = time.monotonic() - t0
        time.sleep(2.0 if quick else 5.0)
        marks["loop_from"] = time.monotonic() - t0
        while time.monotonic() - t0 - marks["loop_from"] < hostile_s and rounds < 100:
            for name, (outcomes, took) in _round(target, kinds, pool).items():
                tally[name].update(outcomes)
                slowest[name] = max(slowest.get(name, 0.0), took)
            rounds += 1
            rss_by_round.append(rss_kib(gw.pid))  # a leak per attack grows round after round
        marks["loop_to"] = time.monotonic() - t0
        time.sleep(after_window[1] + 0.5)
    alive = gw.poll() is None
    assert normal.stdin is not None
    normal.stdin.write(b"stop\n")
    normal.stdin.flush()
    normal.wait(30)
    clients = json.loads(out.read_text())

    def window(a: float, b: float) -> list[tuple[float, int, int]]:
        return [s for s in samples if a <= s[0] < b]

    base = window(marks["baseline_from"], marks["loop_from"])
    loop = window(marks["loop_from"], marks["loop_to"])
    after = window(marks["loop_to"] + after_window[0], marks["loop_to"] + after_window[1])
    rss = (_median([s[1] for s in base]), max((s[1] for s in loop), default=0), _median([s[1] for s in after]))
    fds = (_median([s[2] for s in base]), max((s[2] for s in loop), default=0), _median([s[2] for s in after]))
    rss_pct = 100.0 * (rss[2] - rss[0]) / rss[0] if rss[0] else float("inf")
    fds_pct = 100.0 * (fds[2] - fds[0]) / fds[0] if fds[0] else float("inf")

    unexpected = {name: Counter({o: n for o, n in c.items() if not hp.EXPECTED[name](o)}) for name, c in tally.items()}
    unexpected = {name: c for name, c in unexpected.items() if c}
    peers = sum(sum(c.values()) for c in tally.values())
    passed = alive and clients["errors"] == 0 and abs(rss_pct) <= TOLERANCE_PCT and abs(fds_pct) <= TOLERANCE_PCT
    figures = {
        "normal clients' errors": f"{clients['errors']} in {clients['round_trips']} round trips "
                                  f"(p99 {clients['p99_ms']} ms, max {clients['max_ms']} ms)",
        "RSS MiB": f"{rss[0] / 1024:.1f} before, {rss[1] / 1024:.1f} peak, {rss[2] / 1024:.1f} after "
                   f"({rss_pct:+.1f} %)",
        "descriptors": f"{fds[0]} before, {fds[1]} peak, {fds[2]} after ({fds_pct:+.1f} %)",
        "hostile peers": f"{peers} connections in {rounds} rounds of {len(kinds)} kinds",
    }
    notes = []
    if not alive:
        notes.append(f"the gateway exited ({gw.returncode})")
    if unexpected:
        notes.append("unexpected answers: " + ", ".join(
            f"{name}: " + ", ".join(f"{o} x{n}" for o, n in c.most_common(2)) for name, c in unexpected.items()))
    if not all(negotiated.values()):
        notes.append(f"compression not negotiated on {[p for p, ok in negotiated.items() if not ok]}")
    if clients["errors"]:
        notes.append(f"client errors: {clients['by_kind']}")
    if len(rss_by_round) >= 4 and rss[2] > rss[0] * (1 + TOLERANCE_PCT / 100):
        # growth that stops is a high-water mark (the allocator keeping what a burst took); growth to the
        # last round is what a leak per attack would look like: say which, the figures alone do not
        last = rss_by_round[-1]
        flat_from = next(i for i in range(len(rss_by_round)) if all(abs(r - last) <= last / 100
                                                                    for r in rss_by_round[i:]))
        notes.append(f"RSS after each round: flat (within 1 %) from round {flat_from + 1} of {rounds}")
    return Result(
        figures=figures,
        passed=passed,
        notes="; ".join(notes),
        raw={
            "quick": quick, "rounds": rounds, "marks_s": {k: round(v, 2) for k, v in marks.items()},
            "rss_kib": {"before": rss[0], "peak": rss[1], "after": rss[2], "after_pct": round(rss_pct, 2)},
            "fds": {"before": fds[0], "peak": fds[1], "after": fds[2], "after_pct": round(fds_pct, 2)},
            "normal_clients": clients, "outcomes": {name: dict(c) for name, c in tally.items()},
            "unexpected": {name: dict(c) for name, c in unexpected.items()}, "compression": negotiated,
            "rss_kib_after_each_round": rss_by_round, "slowest_attack_s": {k: round(v, 1) for k, v in slowest.items()},
            "samples": [(round(t, 1), r, f) for t, r, f in samples], "gateway_alive": alive,
        },
    )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "normal":
        normal_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(f"usage: {sys.argv[0]} normal PORT COUNT OUT (the scenario itself runs under bench/soak/run.py)")
