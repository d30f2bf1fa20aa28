"""
Section 14, "Version and process": ``twistd wsgateway --version``,
``wsgateway-check --version``, the first log line and
``wsgateway_build_info``, all saying setup.cfg's version.
"""

from __future__ import annotations

import configparser
import platform
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import autobahn
import twisted

from support.gateway import ROOT, TWISTD, free_port, proxy_ini, source_env
from support.metrics_text import get, parse


def setup_cfg_version() -> str:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "setup.cfg")
    return parser["metadata"]["version"]


def expected_line() -> str:
    return (f"wsgateway {setup_cfg_version()} (Python {platform.python_version()}, Twisted {twisted.__version__}, "
            f"Autobahn {autobahn.__version__})")


def with_admin(node: str, admin: int) -> str:
    return proxy_ini(node).replace(
        "[limits]", f"[admin]\n        listen = tcp:{admin}:interface=127.0.0.1\n        token = version-test-token-0123\n\n"
                    f"        [limits]")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, env=source_env(), cwd=ROOT)


def test_twistd_wsgateway_version_prints_the_wsgateway_version_and_exits_0() -> None:
    out = run(TWISTD, "wsgateway", "--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected_line()


def test_wsgateway_check_version_prints_the_same_and_exits_0() -> None:
    check = str(Path(sys.executable).with_name("wsgateway-check"))
    for command in ([check, "--version"], [sys.executable, "-m", "wsgateway.config", "--version"]):
        out = run(*command)
        assert out.returncode == 0, (command, out.stderr)
        assert out.stdout.strip() == expected_line(), command


def test_the_first_line_and_build_info_give_the_version(make_upstream: Any, start_gateway: Any) -> None:
    up = make_upstream()
    admin = free_port()
    gw = start_gateway(with_admin(up.node, admin))
    ours = [line for line in gw.log().splitlines() if "wsgateway node" in line]
    assert ours and f"starting: wsgateway {setup_cfg_version()}, Autobahn {autobahn.__version__}" in ours[0], ours
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert "# TYPE wsgateway_build_info gauge" in text
    samples = parse(text)
    assert get(samples, "wsgateway_build_info", version=setup_cfg_version(), python=platform.python_version(),
               twisted=twisted.__version__, autobahn=autobahn.__version__) == 1
    assert len([k for k in samples if k[0] == "wsgateway_build_info"]) == 1
