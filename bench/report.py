"""Markdown tables of bench/run.sh results: medians over repetitions, with ratios.

    python3 bench/report.py /tmp/bench/results-*.jsonl

One JSON line per (target, scenario, repetition), as run.sh records them:
loadgen's own fields plus target, scenario, rep, pin and what run.sh measured
of the system under test (sut_cpu_pct, echo_cpu_pct, sut_rss_kb; for d the RSS
before and with the idle connections). Throughput "per SUT core" divides by the
CPU fraction the system under test used, which is the fair comparison when
loadgen and echo share the other core (PIN=split).

The tables keep the layout of the entries in bench/RESULTS.md. The compression
scenarios (j, dj, dz) add their own tables and a table of their goals; a target
that did not negotiate permessage-deflate gets no figure, and a line saying so.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict

# x / y pairs of the ratio tables, in this order, when both were measured
GATEWAY_PAIRS = [("gateway", "nginx1"), ("gateway", "haproxy"), ("gateway", "gin"),
                 ("gateway", "twisted-relay"), ("gateway", "direct"), ("gateway", "gateway-base"),
                 ("gateway-base", "twisted-relay")]
PEER_PAIRS = [("gin", "direct"), ("nginx1", "direct"), ("haproxy", "direct"),
              ("nginxauto", "nginx1"), ("twisted-relay", "nginx1")]
RATIO_METRICS = [("a", "msgs_per_s", "a msgs/s"), ("b", "msgs_per_s", "b msgs/s"), ("c", "msgs_per_s", "c msgs/s"),
                 ("a", "p50_us", "a p50"), ("e", "handshakes_per_s", "e hs/s"), ("d", "kib_per_conn_delta", "d KiB/conn")]
PER_CORE_METRICS = [("a", "msgs_per_s", "a msgs/s/core"), ("b", "msgs_per_s", "b msgs/s/core"),
                    ("c", "msgs_per_s", "c msgs/s/core"), ("e", "handshakes_per_s", "e hs/s/core")]
PINGPONG_TITLES = {
    "a": "(a) 50 conns, 64 B, 1 in flight",
    "b": "(b) 50 conns, 64 B, 16 in flight",
    "c": "(c) 10 conns, 64 KiB, 1 in flight",
    "l": "(l) 1 conn, 64 B, 1 in flight (unloaded latency)",
    "j": "(j) 10 conns, 16 KiB JSON text, 1 in flight, permessage-deflate",
}
IDLE_TITLES = {
    "d": "(d) idle connections: SUT RSS",
    "dj": "(dj) idle connections after 3 echoes of 1 KiB JSON each: SUT RSS",
    "dz": "(dz) idle connections after 3 echoes of 1 KiB JSON each, permessage-deflate: SUT RSS",
}
# goals of the compression figures (bench/README.md)
GOAL_J_PER_CORE = 0.85  # gateway / twisted-relay, j msgs/s per SUT core: at least
GOAL_DZ_MEMORY = 2.0  # dz / dj KiB per connection (delta), same target: at most


class Results:
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows
        self.targets = list(dict.fromkeys(r["target"] for r in rows))
        self.cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for r in rows:
            self.cells[r["target"], r["scenario"]].append(r)

    def has(self, target: str, scenario: str) -> bool:
        return (target, scenario) in self.cells

    def measured(self, scenario: str) -> list[str]:
        return [t for t in self.targets if self.has(t, scenario)]

    def values(self, target: str, scenario: str, key: str) -> list[float]:
        return [r[key] for r in self.cells.get((target, scenario), []) if r.get(key) is not None]

    def median(self, target: str, scenario: str, key: str) -> float | None:
        v = self.values(target, scenario, key)
        return statistics.median(v) if v else None

    def per_core(self, target: str, scenario: str, key: str) -> float | None:
        """Median over repetitions of the metric divided by the SUT's CPU fraction."""
        v = [r[key] * 100 / r["sut_cpu_pct"] for r in self.cells.get((target, scenario), [])
             if r.get(key) is not None and r.get("sut_cpu_pct")]
        return statistics.median(v) if v else None

    def total(self, target: str, scenario: str, *keys: str) -> int:
        return int(sum(sum(self.values(target, scenario, k)) for k in keys))


def num(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def cell(res: Results, target: str, scenario: str, key: str, digits: int = 0, spread: bool = False) -> str:
    v = res.values(target, scenario, key)
    if not v:
        return "-"
    text = num(statistics.median(v), digits)
    if spread and len(v) > 1:
        text += f" ({num(min(v), digits)}–{num(max(v), digits)})"
    return text


def ratio(x: float | None, y: float | None) -> str:
    return f"{x / y:.2f}" if x is not None and y else "-"


def table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()


def pingpong_tables(res: Results) -> None:
    for sc, title in PINGPONG_TITLES.items():
        targets = res.measured(sc)
        if not targets:
            continue
        print(f"### {title}\n")
        table(["target", "msgs/s", "p50 µs", "p90 µs", "p99 µs", "SUT CPU %", "msgs/s per SUT core",
               "echo CPU %", "loadgen CPU %", "errors"],
              [[t, cell(res, t, sc, "msgs_per_s", spread=True), cell(res, t, sc, "p50_us"), cell(res, t, sc, "p90_us"),
                cell(res, t, sc, "p99_us"), cell(res, t, sc, "sut_cpu_pct"), num(res.per_core(t, sc, "msgs_per_s")),
                cell(res, t, sc, "echo_cpu_pct"), cell(res, t, sc, "loadgen_cpu_pct"), str(res.total(t, sc, "errors"))]
               for t in targets])


def idle_table(res: Results, sc: str = "d") -> None:
    targets = res.measured(sc)
    if not targets:
        return
    print(f"### {IDLE_TITLES[sc]}\n")
    rows = []
    for t in targets:
        before, idle = res.median(t, sc, "sut_rss_before_kb"), res.median(t, sc, "sut_rss_idle_kb")
        rows.append([t, cell(res, t, sc, "connections"),
                     num(before / 1024 if before else None, 1), num(idle / 1024 if idle else None, 1),
                     cell(res, t, sc, "kib_per_conn_total", 1, True), cell(res, t, sc, "kib_per_conn_delta", 1, True),
                     str(res.total(t, sc, "errors", "echo_errors"))])
    table(["target", "conns open", "RSS before MiB", "RSS idle MiB", "KiB/conn (RSS/conns)", "KiB/conn (delta)",
           "errors"], rows)


def verdict(x: float | None, y: float | None, goal: float, at_least: bool) -> str:
    if x is None or not y:
        return "**no figure**"
    r = x / y
    return "met" if (r >= goal if at_least else r <= goal) else "**not met**"


def compression_tables(res: Results) -> None:
    """Scenarios j, dj, dz: negotiation failures, payload, and the goals' ratios."""
    scenarios = [sc for sc in ("j", "dj", "dz") if res.measured(sc)]
    if not scenarios:
        return
    print("### Compression (permessage-deflate)\n")
    for sc in scenarios:
        for t in res.measured(sc):
            failed = [r for r in res.cells[t, sc] if r.get("compression_not_negotiated")]
            if failed:
                r = failed[0]
                print(f"**{t}, scenario {sc}: permessage-deflate NOT negotiated** in {len(failed)} of "
                      f"{len(res.cells[t, sc])} repetitions ({r['compression_not_negotiated']} of {r.get('connections')} "
                      f"connections; Sec-WebSocket-Extensions: '{r.get('extensions_header', '')}'): no figure.\n")
    for sc, what in (("j", "16 KiB"), ("dz", "1 KiB")):
        sample = [r for r in res.rows if r["scenario"] == sc and r.get("deflate_ratio_l1")]
        if sample:
            r = sample[0]
            print(f"{sc} payload: {r.get('payload_messages')} distinct {what} JSON messages (seed {r.get('seed')}), "
                  f"deflate ratio {r['deflate_ratio_l1']:.2f}x at level 1 (gorilla's, the loadgen's and the echo's), "
                  f"{r['deflate_ratio_l6']:.2f}x at level 6 (zlib's default), each message on its own.\n")
    wire = [t for t in res.measured("j") if res.values(t, "j", "wire_ratio_in")]
    if wire:
        print("j on the wire, client side: echoes' payload bytes / bytes read (handshakes included; near the "
              "deflate ratio when the echoes arrive compressed, near 1 when they do not): "
              + ", ".join(f"{t} {res.median(t, 'j', 'wire_ratio_in'):.2f}x" for t in wire) + "\n")
        for t in wire:
            w = res.median(t, "j", "wire_ratio_in")
            if w is not None and w < 1.5:
                print(f"**{t}, scenario j: the echoes did NOT arrive compressed** (permessage-deflate negotiated, "
                      "frames sent plain): its j figure is not a compressed one.\n")
    rows: list[list[str]] = []
    if res.measured("j"):
        base = "twisted-relay"
        for t in res.measured("j"):
            if t == base:
                continue
            x, y = res.per_core(t, "j", "msgs_per_s"), res.per_core(base, "j", "msgs_per_s")
            goal = f">= {GOAL_J_PER_CORE}" if t == "gateway" else ""
            rows.append([f"j msgs/s per SUT core", f"{t} / {base}", ratio(x, y), goal,
                         verdict(x, y, GOAL_J_PER_CORE, True) if goal else ""])
        for t in res.measured("j"):
            if t != "direct" and res.has("direct", "j"):
                rows.append(["j msgs/s", f"{t} / direct", ratio(res.median(t, "j", "msgs_per_s"),
                                                               res.median("direct", "j", "msgs_per_s")), "", ""])
    for t in res.measured("dz"):
        if res.has(t, "dj"):
            x, y = res.median(t, "dz", "kib_per_conn_delta"), res.median(t, "dj", "kib_per_conn_delta")
            goal = f"<= {GOAL_DZ_MEMORY}" if t == "gateway" else ""
            rows.append(["KiB/conn (delta), compressed / not", f"{t} dz / {t} dj", ratio(x, y), goal,
                         verdict(x, y, GOAL_DZ_MEMORY, False) if goal else ""])
    if rows:
        print("Goals: the gateway at >= 0.85x twisted-relay's j msgs/s per SUT core; an idle compressed connection "
              "(dz) at most 2x the memory of an uncompressed one (dj).\n")
        table(["figure", "x / y", "ratio", "goal", "verdict"], rows)


def handshake_table(res: Results) -> None:
    targets = res.measured("e")
    if not targets:
        return
    print("### (e) handshake rate, 20 concurrent dialers (connect + close handshake)\n")
    table(["target", "handshakes/s", "p50 µs", "p99 µs", "SUT CPU %", "hs/s per SUT core", "echo CPU %", "errors"],
          [[t, cell(res, t, "e", "handshakes_per_s", spread=True), cell(res, t, "e", "p50_us"), cell(res, t, "e", "p99_us"),
            cell(res, t, "e", "sut_cpu_pct"), num(res.per_core(t, "e", "handshakes_per_s")),
            cell(res, t, "e", "echo_cpu_pct"), str(res.total(t, "e", "errors"))]
           for t in targets])
    for t in targets:
        errors = [r.get("first_error") for r in res.cells[t, "e"] if r.get("first_error")]
        if errors:
            print(f"{t}: first handshake error: {errors[0]}\n")


def latency_added_table(res: Results) -> None:
    """Scenario l: what each hop adds to the unloaded round trip of direct (only when both ran)."""
    if not res.has("direct", "l"):
        return
    targets = [t for t in res.measured("l") if t != "direct"]
    if not targets:
        return
    print("### (l) latency added to direct's round trip (µs, medians)\n")
    rows = []
    for t in targets:
        row = [t]
        for key in ("p50_us", "p99_us"):
            x, d = res.median(t, "l", key), res.median("direct", "l", key)
            row.append(num(x - d) if x is not None and d is not None else "-")
        rows.append(row)
    table(["target", "p50 added", "p99 added"], rows)


def ratio_tables(res: Results) -> None:
    if not any(res.measured(sc) for sc in ("a", "b", "c", "d", "e", "l")):
        return  # only compression scenarios: their ratios are in compression_tables
    pairs = (GATEWAY_PAIRS if "gateway" in res.targets else []) + PEER_PAIRS
    pairs = [(x, y) for x, y in pairs if x in res.targets and y in res.targets]
    if not pairs:
        names = ", ".join(f"{x} / {y}" for x, y in GATEWAY_PAIRS + PEER_PAIRS)
        print(f"(no ratios: none of these pairs of targets was measured: {names})")
        return
    print("### Ratios of medians (x/y)\n")
    table(["x / y"] + [m[2] for m in RATIO_METRICS],
          [[f"{x} / {y}"] + [ratio(res.median(x, sc, k), res.median(y, sc, k)) for sc, k, _ in RATIO_METRICS]
           for x, y in pairs])
    print("### Ratios of per-SUT-core efficiency (x/y; throughput divided by SUT CPU fraction)\n")
    table(["x / y"] + [m[2] for m in PER_CORE_METRICS],
          [[f"{x} / {y}"] + [ratio(res.per_core(x, sc, k), res.per_core(y, sc, k)) for sc, k, _ in PER_CORE_METRICS]
           for x, y in pairs])
    if res.measured("l") and pairs:
        print("### Ratios of medians, scenario l (x/y; unloaded round trip)\n")
        table(["x / y", "l p50", "l p99"],
              [[f"{x} / {y}", ratio(res.median(x, "l", "p50_us"), res.median(y, "l", "p50_us")),
                ratio(res.median(x, "l", "p99_us"), res.median(y, "l", "p99_us"))] for x, y in pairs])


def main(paths: list[str]) -> int:
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    if not rows:
        print("no results", file=sys.stderr)
        return 1
    res = Results(rows)
    pins = sorted({str(r.get("pin", "?")) for r in rows})
    reps = {r.get("rep") for r in rows}
    print(f"pin={','.join(pins)}; reps={len(reps)}; medians, (min–max) over reps\n")
    pingpong_tables(res)
    idle_table(res)
    idle_table(res, "dj")
    idle_table(res, "dz")
    handshake_table(res)
    latency_added_table(res)
    ratio_tables(res)
    compression_tables(res)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
