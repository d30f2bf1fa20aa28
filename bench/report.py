"""Markdown tables of bench/run.sh results: medians over repetitions, with ratios.

    python3 bench/report.py /tmp/bench/results-*.jsonl

One JSON line per (target, scenario, repetition), as run.sh records them:
loadgen's own fields plus target, scenario, rep, pin and what run.sh measured
of the system under test (sut_cpu_pct, echo_cpu_pct, sut_rss_kb; for d the RSS
before and with the idle connections). Throughput "per SUT core" divides by the
CPU fraction the system under test used, which is the fair comparison when
loadgen and echo share the other core (PIN=split).

The tables keep the layout of the entries in bench/RESULTS.md.
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
}


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


def idle_table(res: Results) -> None:
    targets = res.measured("d")
    if not targets:
        return
    print("### (d) idle connections: SUT RSS\n")
    rows = []
    for t in targets:
        before, idle = res.median(t, "d", "sut_rss_before_kb"), res.median(t, "d", "sut_rss_idle_kb")
        rows.append([t, cell(res, t, "d", "connections"),
                     num(before / 1024 if before else None, 1), num(idle / 1024 if idle else None, 1),
                     cell(res, t, "d", "kib_per_conn_total", 1, True), cell(res, t, "d", "kib_per_conn_delta", 1, True),
                     str(res.total(t, "d", "errors", "echo_errors"))])
    table(["target", "conns open", "RSS before MiB", "RSS idle MiB", "KiB/conn (RSS/conns)", "KiB/conn (delta)",
           "errors"], rows)


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
    handshake_table(res)
    latency_added_table(res)
    ratio_tables(res)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
