"""
slow_readers: 100 clients at steady load, 10 of them slow readers. What it
measures: whether clients that send but do not read (or read a trickle)
hurt the others (p99 round trip of 90 normal clients with the slow readers
beside them, over the same run without them), and whether the gateway's
per-connection ``write_buffer`` really bounds what it holds for them (its
RSS peak with slow readers against the peak of the run without them plus 10
x ``write_buffer``).

Why this way: the 90 normal clients are the Go load generator in pingpong
mode (64-byte messages, one in flight per connection, through the gateway to
the Go echo upstream), which reports percentiles. The slow readers are
written here with raw sockets (the handshake and masked frames by hand, so
nothing buffers on the client's side but a 16 KiB receive buffer): each
sends 16 KiB binary messages to the same echo route as fast as the gateway
takes them; 5 never read, 5 read 4 KiB every 100 ms. Their echoes pile up
towards them, the gateway's buffer to them passes ``write_buffer`` (set to
256K here) and the gateway stops reading the upstream, whose echo then stops
reading, and so on back to the slow reader, whose sends stall: backpressure
end to end, which the figures show as the slow readers' bytes sent.

The two runs are sequential on one gateway: without slow readers first (its
RSS peak is the baseline: the same 90 clients' load, the same process),
then with them (they are started and given a few seconds to fill the
buffers before the measured window opens, and stay until it closes). Not
interleaved: Python's RSS hardly ever shrinks, so a "without" run after a
"with" run would not give a baseline. ``ping_interval`` = 0: a client that
never reads never answers a ping, and being dropped for it is not what this
scenario is about.

Full mode: each run 2 s warm-up + 20 s measured. Quick mode: 1 s + 5 s.
"""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from harness import Result, Soak, rss_kib, sampled, wait_for

NAME = "slow_readers"
TARGET = "<= 2x; RSS <= write_buffer x slow readers + baseline"

WRITE_BUFFER = 256 * 1024
NORMAL = 90
SLOW = 10
NEVER_READ = 5  # of the SLOW: the others read a trickle
MSG = 16 * 1024  # the slow readers' message size
TRICKLE = 4096  # bytes a reading slow reader reads each TRICKLE_EVERY seconds
TRICKLE_EVERY = 0.1
P99_RATIO_MAX = 2.0

GATEWAY_INI = f"""\
    [gateway]
    listen = tcp:{{port}}:interface=127.0.0.1

    [limits]
    max_connections = 0
    max_connections_per_ip = 0
    ; the bound under test, explicit
    write_buffer = {WRITE_BUFFER // 1024}K
    ; a client that never reads never answers a ping: keep that out of this scenario
    ping_interval = 0
    idle_timeout = 0

    [log]
    level = warn
    format = text

    [upstream:echo]
    nodes = ws://127.0.0.1:{{echo}}
    connect_timeout = 5

    [route:echo]
    path = /ws
    upstream = echo
    auth = none
"""


@dataclass
class SlowStats:
    sent: int = 0  # bytes written to the socket
    read: int = 0  # bytes read back (echoes)
    error: str = ""


def _masked_frame(size: int) -> bytes:
    """One masked binary frame of ``size`` bytes (< 64 KiB), built once and sent again and again."""
    key = os.urandom(4)
    payload = bytes((0x61 + i % 26) ^ key[i % 4] for i in range(size))
    return bytes([0x82, 0x80 | 126]) + size.to_bytes(2, "big") + key + payload


def _slow_reader(port: int, reads: bool, stop: threading.Event, deadline: float, stats: SlowStats) -> None:
    """
    A client that sends MSG-byte messages as fast as the gateway takes them and
    reads nothing (``reads`` False) or TRICKLE bytes every TRICKLE_EVERY s,
    until ``stop`` or ``deadline``.
    """
    sock = socket.socket()
    try:
        # a small receive buffer: the echoes pile up in the gateway, not in this kernel socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 8192:
            chunk = sock.recv(1024)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"handshake refused: {head.splitlines()[0]!r}")
        stats.read += len(head.partition(b"\r\n\r\n")[2])
        sock.setblocking(False)
        frame = _masked_frame(MSG)
        pending = memoryview(frame)
        next_read = time.monotonic()
        while not stop.is_set() and time.monotonic() < deadline:
            want_read = reads and time.monotonic() >= next_read
            readable, writable, _ = select.select([sock] if want_read else [], [sock], [], TRICKLE_EVERY / 2)
            if writable:
                try:
                    n = sock.send(pending)
                except BlockingIOError:
                    n = 0
                stats.sent += n
                pending = pending[n:] if n < len(pending) else memoryview(frame)
            if readable:
                data = sock.recv(TRICKLE)
                if not data:
                    raise ConnectionError("closed by the gateway")
                stats.read += len(data)
                next_read = time.monotonic() + TRICKLE_EVERY
    except Exception as e:  # noqa: BLE001: reported in the figures
        stats.error = f"{type(e).__name__}: {e}"
    finally:
        sock.close()


def _pingpong(soak: Soak, port: int, warm: float, dur: float, name: str) -> dict[str, Any]:
    lg = soak.loadgen("-url", f"ws://127.0.0.1:{port}/ws", "-mode", "pingpong", "-c", str(NORMAL), "-s", "64",
                      "-p", "1", "-w", f"{warm:g}s", "-d", f"{dur:g}s", "-label", name, name=name)
    if not wait_for(lambda: lg.poll() is not None, warm + dur + 40, 0.2):
        raise RuntimeError(f"{name}: loadgen still running {warm + dur + 40:g} s later")
    lines = [line for line in soak.log(name).splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{name}: no result from loadgen: {soak.log(name)[-500:]}")
    return dict(json.loads(lines[-1]))


def run(soak: Soak, quick: bool) -> Result:
    warm, dur = (1.0, 5.0) if quick else (2.0, 20.0)
    ramp = 2.0 if quick else 4.0  # slow readers fill the buffers before the window opens

    _, echo_port = soak.echo()
    gw, port = soak.gateway(GATEWAY_INI.replace("{echo}", str(echo_port)))
    time.sleep(0.5)
    start_rss = rss_kib(gw.pid)

    with sampled(gw.pid, every=0.2) as samples:
        t_a = time.monotonic()
        without = _pingpong(soak, port, warm, dur, "without")
        a_end = time.monotonic() - t_a  # the sampler's clock started just before t_a

        stop = threading.Event()
        stats = [SlowStats() for _ in range(SLOW)]
        deadline = time.monotonic() + ramp + warm + dur + 45  # bounded even if loadgen hangs
        threads = [threading.Thread(target=_slow_reader, args=(port, i >= NEVER_READ, stop, deadline, stats[i]),
                                    daemon=True) for i in range(SLOW)]
        b_start = time.monotonic() - t_a
        for t in threads:
            t.start()
        time.sleep(ramp)
        sent_before = [s.sent for s in stats]
        try:
            with_slow = _pingpong(soak, port, warm, dur, "with")
        finally:
            sent_after = [s.sent for s in stats]
            stop.set()
            for t in threads:
                t.join(5)
        b_end = time.monotonic() - t_a

    peak_a = max((r for t, r, _ in samples if t <= a_end), default=start_rss)
    peak_b = max((r for t, r, _ in samples if b_start <= t <= b_end), default=0)
    bound = peak_a + SLOW * WRITE_BUFFER // 1024
    p99_a, p99_b = float(without.get("p99_us", 0)), float(with_slow.get("p99_us", 0))
    ratio = p99_b / p99_a if p99_a else float("inf")
    errors = int(without.get("errors", 0)) + int(with_slow.get("errors", 0))
    slow_errors = [s.error for s in stats if s.error]
    gw_alive = gw.poll() is None
    passed = ratio <= P99_RATIO_MAX and peak_b <= bound and errors == 0 and gw_alive

    mib = 1024 * 1024
    never = stats[:NEVER_READ]
    trickle = stats[NEVER_READ:]
    # sends during the measured window of the readers that never read: 0 = fully backpressured
    never_window = sum(sent_after[i] - sent_before[i] for i in range(NEVER_READ))
    figures = {
        "p99 ratio": f"{ratio:.2f}x ({p99_b / 1000:.2f} ms with {SLOW} slow readers / {p99_a / 1000:.2f} ms without; "
                     f"p50 {float(with_slow.get('p50_us', 0)) / 1000:.2f} / {float(without.get('p50_us', 0)) / 1000:.2f}"
                     f" ms; {with_slow.get('msgs_per_s', 0):.0f} / {without.get('msgs_per_s', 0):.0f} msg/s)",
        "RSS peak": f"{peak_b / 1024:.1f} MiB with slow readers vs bound {bound / 1024:.1f} MiB "
                    f"({peak_a / 1024:.1f} MiB peak without + {SLOW} x {WRITE_BUFFER // 1024} KiB write_buffer); "
                    f"{(peak_b - peak_a) / SLOW / (WRITE_BUFFER / 1024):.1f} x write_buffer per slow reader",
        "slow readers": f"never-reading sent {sum(s.sent for s in never) / NEVER_READ / mib:.1f} MiB each "
                        f"({never_window / 1024:.0f} KiB in all during the window), trickle-reading sent "
                        f"{sum(s.sent for s in trickle) / len(trickle) / mib:.1f} MiB and read "
                        f"{sum(s.read for s in trickle) / len(trickle) / mib:.1f} MiB each",
    }
    notes = []
    if errors:
        notes.append(f"{errors} normal-client errors")
    if slow_errors:
        notes.append(f"{len(slow_errors)} slow readers failed, e.g. {slow_errors[0]}")
    if not gw_alive:
        notes.append(f"the gateway exited (status {gw.returncode})")
    notes.append("runs sequential: without, then with")
    return Result(
        figures=figures,
        passed=passed,
        notes="; ".join(notes),
        raw={
            "write_buffer": WRITE_BUFFER, "normal": NORMAL, "slow": SLOW, "never_read": NEVER_READ,
            "warm_s": warm, "dur_s": dur, "ramp_s": ramp, "without": without, "with": with_slow,
            "p99_ratio": ratio, "rss_kib": {"start": start_rss, "peak_without": peak_a, "peak_with": peak_b,
                                            "bound": bound},
            "slow_stats": [vars(s) for s in stats], "sent_during_window": [a - b for a, b in
                                                                           zip(sent_after, sent_before)],
            "samples": [(round(t, 2), r) for t, r, _ in samples],
        },
    )
