"""
sigterm: SIGTERM to a gateway holding 1,000 open proxied clients. What it
measures: how many clients saw anything but a close frame with code 1001
(1006 = the TCP connection ended without a close frame: the drain did not
reach them), and the time from SIGTERM to the process's exit, against
``shutdown_timeout`` (docs/operations.md: the 1001s are spread over the
first half of ``shutdown_timeout`` after ``drain_grace``; the process exits
once every connection is closed, and cuts off what is left at
``drain_grace + shutdown_timeout``).

Why this way: the clients are Python asyncio clients of the ``websockets``
library, in this process, because the Go load generator's idle mode does not
report close codes. Each opens a connection through the gateway to the Go
echo upstream, does one echo round trip (so both legs are open), then waits
for the connection to end and records the close frame it received (none =
1006) and when. ``drain_grace`` = 1 and ``shutdown_timeout`` = 10 are set
explicitly, so the target is 10 s. The clients' own pings are off: nothing
but the gateway's drain ends a connection.

Quick mode: 200 clients.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from harness import Result, Soak

NAME = "sigterm"
TARGET = "0; <= shutdown_timeout"

DRAIN_GRACE = 1.0
SHUTDOWN_TIMEOUT = 10.0

GATEWAY_INI = f"""\
    [gateway]
    listen = tcp:{{port}}:interface=127.0.0.1:backlog=2048
    drain_grace = {DRAIN_GRACE:g}
    shutdown_timeout = {SHUTDOWN_TIMEOUT:g}

    [limits]
    ; one address opens them all
    max_connections = 0
    max_connections_per_ip = 0
    ; nothing but the drain closes a connection during the scenario
    idle_timeout = 0
    ping_interval = 0

    [log]
    level = warn
    format = text

    [upstream:echo]
    nodes = ws://127.0.0.1:{{echo}}
    connect_timeout = 5

    [route:sigterm]
    path = /ws
    upstream = echo
    auth = none
"""

CONNECT_CONCURRENCY = 50  # dials at a time: the gateway's pending-handshake cap is 1024


async def _open(url: str, n: int) -> tuple[list[ClientConnection], list[str]]:
    """``n`` clients, each with one echo round trip done; the errors of those that failed."""
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    errors: list[str] = []

    async def one(i: int) -> ClientConnection | None:
        async with gate:
            try:
                ws = await connect(url, open_timeout=10, ping_interval=None, close_timeout=5, compression=None,
                                   proxy=None)
                msg = f"hello {i}"
                await ws.send(msg)
                reply = await asyncio.wait_for(ws.recv(), 10)
                if reply != msg:
                    raise RuntimeError(f"echo differs: {reply!r}")
                return ws
            except Exception as e:  # noqa: BLE001: counted and reported, one line each
                errors.append(f"{type(e).__name__}: {e}")
                return None

    opened = await asyncio.gather(*(one(i) for i in range(n)))
    return [ws for ws in opened if ws is not None], errors


async def _await_close(ws: ClientConnection, t_term: list[float]) -> tuple[int, float]:
    """The close code this client received (1006 when none) and when, seconds after SIGTERM."""
    code = 1006
    try:
        # nothing is sent to it: the first thing it can see is the gateway's close
        async for _ in ws:
            pass
    except ConnectionClosed:
        pass
    received = ws.protocol.close_rcvd  # the close frame the gateway sent; None if the TCP connection just ended
    if received is not None:
        code = int(received.code)
    return code, time.monotonic() - t_term[0]


async def _scenario(gw: subprocess.Popen[bytes], url: str, n: int) -> dict[str, Any]:
    t0 = time.monotonic()
    clients, errors = await _open(url, n)
    open_s = time.monotonic() - t0
    t_term = [0.0]
    waiters = [asyncio.create_task(_await_close(ws, t_term)) for ws in clients]
    await asyncio.sleep(0.5)  # every client is now waiting in recv
    early = sum(w.done() for w in waiters)  # closed before SIGTERM: should be none

    t_term[0] = time.monotonic()
    os.kill(gw.pid, signal.SIGTERM)
    bound = DRAIN_GRACE + SHUTDOWN_TIMEOUT + 10.0  # well past the gateway's own cut-off
    try:
        status: int | None = await asyncio.to_thread(gw.wait, bound)
        exit_s: float | None = time.monotonic() - t_term[0]
    except subprocess.TimeoutExpired:
        status, exit_s = None, None
    # the clients have their answers by the time the process is gone (or very soon after)
    done, pending = await asyncio.wait(waiters, timeout=10)
    for w in pending:
        w.cancel()
    results = [w.result() for w in done]
    for ws in clients:  # anything left open (none expected) is dropped here, not left behind
        if ws.transport is not None:
            ws.transport.abort()
    return {"requested": n, "opened": len(clients), "connect_errors": errors[:5], "connect_failed": len(errors),
            "open_s": open_s, "closed_before_sigterm": early, "exit_status": status, "exit_s": exit_s,
            "codes": dict(Counter(code for code, _ in results)), "unclosed": len(pending),
            "close_at_s": sorted(t for _, t in results)}


def run(soak: Soak, quick: bool) -> Result:
    n = 200 if quick else 1_000
    _, echo_port = soak.echo()
    gw, port = soak.gateway(GATEWAY_INI.replace("{echo}", str(echo_port)))
    raw = asyncio.run(_scenario(gw, f"ws://127.0.0.1:{port}/ws", n))

    codes: dict[int, int] = raw["codes"]
    not_1001 = sum(c for code, c in codes.items() if code != 1001) + raw["unclosed"]
    exit_s = raw["exit_s"]
    times = raw["close_at_s"]
    passed = (raw["opened"] == n and not_1001 == 0 and raw["closed_before_sigterm"] == 0
              and exit_s is not None and exit_s <= SHUTDOWN_TIMEOUT)
    others = ", ".join(f"{c} x {code}" for code, c in sorted(codes.items()) if code != 1001)
    figures = {
        "clients": f"{raw['opened']:,} of {n:,} open",
        "not 1001": f"{not_1001}" + (f" ({others}{', ' if others and raw['unclosed'] else ''}"
                                     f"{str(raw['unclosed']) + ' never closed' if raw['unclosed'] else ''})"
                                     if not_1001 else ""),
        "exit": (f"{exit_s:.1f} s after SIGTERM (shutdown_timeout {SHUTDOWN_TIMEOUT:g}, "
                 f"drain_grace {DRAIN_GRACE:g}), status {raw['exit_status']}" if exit_s is not None
                 else f"still running {DRAIN_GRACE + SHUTDOWN_TIMEOUT + 10:g} s after SIGTERM"),
        "1001s seen": (f"{times[0]:.1f}-{times[-1]:.1f} s after SIGTERM" if times else "none"),
    }
    notes = []
    if raw["connect_failed"]:
        notes.append(f"{raw['connect_failed']} failed to open, e.g. {raw['connect_errors'][0]}")
    if raw["closed_before_sigterm"]:
        notes.append(f"{raw['closed_before_sigterm']} closed before SIGTERM")
    return Result(figures=figures, passed=passed, notes="; ".join(notes),
                  raw=dict(raw, drain_grace=DRAIN_GRACE, shutdown_timeout=SHUTDOWN_TIMEOUT, not_1001=not_1001))
