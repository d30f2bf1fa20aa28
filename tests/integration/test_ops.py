"""
What operators install beside the package: the systemd unit and the
logrotate file, checked for the keys the reload, drain and log rotation
described in the README depend on.
"""

from __future__ import annotations

import configparser
import os
import signal
import shutil
import subprocess
from pathlib import Path
from typing import Any


from websockets.sync.client import connect

from support.gateway import ROOT, TWISTD, proxy_ini
from support.waiting import wait_for

UNIT = ROOT / "etc" / "systemd" / "wsgateway.service"
LOGROTATE = ROOT / "etc" / "logrotate.d" / "wsgateway"
# the production sample: what the unit runs as /etc/wsgateway/wsgateway.ini (docs/deploy.md)
INI = ROOT / "etc" / "wsgateway.ini"


class _Repeated(dict):  # type: ignore[type-arg]
    """configparser section storage that keeps every value of a repeated key (systemd allows them)."""

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, list) and key in self:
            self[key].extend(value)  # while parsing, configparser keeps each value as a list of lines
        else:
            super().__setitem__(key, value)


def unit() -> dict[str, dict[str, list[str]]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None, dict_type=_Repeated,
                                       comment_prefixes=("#", ";"), empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment, method-assign]  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return {name: {k: v.split("\n") for k, v in parser[name].items()} for name in parser.sections()}


def seconds(ini_key: str) -> float:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    parser.read_string(INI.read_text())
    return float(parser["gateway"][ini_key])


def test_the_unit_runs_twistd_in_the_foreground_reloads_with_sighup_and_drains_on_sigterm():
    service = unit()["Service"]
    # the file the production sample is installed as, and checked before every start and reload
    assert all(cmd.endswith(" /etc/wsgateway/wsgateway.ini") for cmd in
               service["ExecStartPre"] + service["ExecStart"] + service["ExecReload"][:1])
    # READY=1 / RELOADING=1 / STOPPING=1 from the main process only (wsgateway/sdnotify.py)
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    (start,) = service["ExecStart"]
    assert " -n " in start and start.split()[0].endswith("/twistd") and " wsgateway --config " in start
    assert service["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert service["ExecReload"][0].split()[0].endswith("/wsgateway-check")  # checked first
    assert service["ExecStartPre"][0].split()[0].endswith("/wsgateway-check")
    assert service["KillSignal"] == ["SIGTERM"]
    assert service["Restart"] == ["on-failure"]
    # systemd must not SIGKILL a drain in progress
    (timeout,) = service["TimeoutStopSec"]
    assert float(timeout) > seconds("drain_grace") + seconds("shutdown_timeout")
    assert unit()["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_unit_is_hardened_without_breaking_tls():
    service = unit()["Service"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "LockPersonality": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
    }.items():
        assert service.get(key) == [value], key
    assert set(service["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    # writable under ProtectSystem=strict: the queue's and the log file's folders
    assert service["StateDirectory"] == ["wsgateway"] and service["LogsDirectory"] == ["wsgateway"]
    assert service["User"] == ["wsgateway"]
    # env:NAME secrets (docs/deploy.md); "-": a missing file is not an error
    assert service["EnvironmentFile"] == ["-/etc/wsgateway/env"]
    # off on purpose: pyOpenSSL's verify and ALPN callbacks need write+execute
    # memory (a MemoryError under the kernel's PR_SET_MDWE); the unit says so
    assert "MemoryDenyWriteExecute" not in service


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing: `make test` installs it (Debian package systemd)"
    # verify checks that each command exists: point them at this venv's
    bindir = str(Path(TWISTD).parent) + "/"
    copy = tmp_path / "wsgateway.service"
    copy.write_text(UNIT.read_text().replace("/opt/wsgateway/venv/bin/", bindir))
    out = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # unknown keys and bad values are only warnings: none allowed
    assert out.stderr.strip() == "", out.stderr


def test_logrotate_renames_then_sends_sigusr1_to_the_main_process():
    text = LOGROTATE.read_text()
    rules = [line.split("#")[0].strip() for line in text.splitlines()]
    assert "copytruncate" not in rules  # the gateway's file is not opened for appending
    assert "/var/log/wsgateway/*.log {" in rules
    assert any(r.startswith("create ") for r in rules)
    post = text[text.index("postrotate"):text.index("endscript")]
    assert "MainPID" in post and "kill -USR1" in post


def test_sigusr1_reopens_the_log_file_for_logrotate(tmp_path, make_upstream, start_gateway):
    up = make_upstream()
    log_file = tmp_path / "wsgateway.log"
    gw = start_gateway(proxy_ini(up.node).replace("format = text", f"format = text\n        file = {log_file}"))
    assert wait_for(lambda: log_file.exists() and "starting" in log_file.read_text(), 5)
    rotated = Path(f"{log_file}.1")
    os.rename(log_file, rotated)  # what logrotate does (create mode)
    gw.proc.send_signal(signal.SIGUSR1)
    assert wait_for(lambda: log_file.exists() and "SIGUSR1: reopened 1 log file(s)" in log_file.read_text(), 5)
    assert gw.proc.poll() is None, "SIGUSR1 ended the gateway"
    with connect(f"{gw.url}/a") as ws:
        ws.send("after rotation")
        assert ws.recv(timeout=5) == "after rotation"
    assert wait_for(lambda: "closed " in log_file.read_text(), 5)
    assert "closed " not in rotated.read_text() and "starting" in rotated.read_text()
    assert gw.stop() == 0
