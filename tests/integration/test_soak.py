"""
make soak's scenarios (bench/soak), each run shortened (``run.py NAME
--quick``) so that none of them can rot between two full runs: each must
start its processes, drive them, inject its faults and report its figures.

Their targets are timing and memory figures, judged by ``make soak`` on a
quiet machine; here another test worker shares the two cores, so only what
no load can excuse is asserted: the scenario ran to the end, and its
correctness counts (no confirmed message lost, no untellable duplicate, a
clean exit on SIGTERM, a gateway alive after the hostile mix) are zero or
true. ``make test`` builds the Go load generator and echo upstream the
scenarios use (``bash bench/run.sh --soak-tools``).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support.gateway import ROOT

SOAK = ROOT / "bench" / "soak"
SCENARIOS = sorted(p.stem.removeprefix("scenario_") for p in SOAK.glob("scenario_*.py"))

# What each scenario's raw figures must say, whatever the load: name -> (what, check)
CORRECT: dict[str, list[tuple[str, Any]]] = {
    "idle": [("every connection opened", lambda r: r["opened"] == r["connections"] and r["failed"] == 0),
             ("descriptors back after the clients left", lambda r: r["fds_back"])],
    "sigterm": [("exit status 0", lambda r: r["exit_status"] == 0)],
    "kill9_durable": [("no confirmed message lost", lambda r: r["lost_confirmed"] == 0),
                      ("no duplicate the upstream cannot tell",
                       lambda r: r["same_pair_different_content"] == 0 and r["one_message_two_pairs"] == 0),
                      ("at least one kill", lambda r: len(r["kills"]) >= 1)],
    "hostile": [("the gateway alive after the mix", lambda r: r["gateway_alive"]),
                ("descriptors back", lambda r: r["fds"]["after"] <= r["fds"]["before"] * 1.05)],
    "sentinel": [("no confirmed message lost", lambda r: r["durable_lost"] == 0),
                 ("a failover happened", lambda r: r["old_master"] != r["new_master"])],
}


def _descriptors_as_make_soak() -> None:
    """make soak runs under ``ulimit -n 20000``: the clients of a scenario are its own sockets."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 20000 if hard == resource.RLIM_INFINITY else min(hard, 20000)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def test_every_scenario_is_run_here_and_in_make_soak() -> None:
    text = (SOAK / "run.py").read_text()
    order = text.split("ORDER = [", 1)[1].split("]", 1)[0]
    assert sorted(name.strip().strip('"') for name in order.split(",")) == SCENARIOS
    assert set(CORRECT) <= set(SCENARIOS)


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_scenario_runs_shortened_and_reports_its_figures(name: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(SOAK / "run.py"), name, "--quick"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240, preexec_fn=_descriptors_as_make_soak)
    raw = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(raw) == 1, f"{name} reported no figures (it failed to run):\n{done.stderr[-4000:]}"
    result = raw[0]
    assert result["scenario"] == name
    # the table row, as make soak appends it (but QUICK: never appended)
    assert f"| {name} |" in done.stdout and "QUICK: not comparable" in done.stdout
    for what, check in CORRECT.get(name, []):
        assert check(result), f"{name}: {what}\n{json.dumps(result)[:4000]}"
