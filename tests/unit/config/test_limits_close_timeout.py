"""[limits] close_timeout (docs/configuration.md): a duration > 0, default 5; the relay's close timer and lingering close."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from wsgateway.config.loader import ConfigError, GatewayConfig, load

ROUTE = """
[route:echo]
path = /echo
upstream = demo

[upstream:demo]
nodes = ws://127.0.0.1:9001
"""


def _load(tmp_path: Path, limits: str) -> GatewayConfig:
    path = tmp_path / "gw.ini"
    path.write_text(textwrap.dedent(limits) + ROUTE)
    return load(str(path), {})


def test_default_and_set(tmp_path: Path) -> None:
    assert _load(tmp_path, "").limits.close_timeout == 5.0
    assert _load(tmp_path, "[limits]\nclose_timeout = 1.5\n").limits.close_timeout == 1.5


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_bad_values(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, f"[limits]\nclose_timeout = {value}\n")
    assert [line for line in info.value.errors if "[limits] close_timeout:" in line], info.value.errors

