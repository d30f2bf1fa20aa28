"""[limits] max_pending_handshakes (docs/configuration.md): a whole number >= 1, default 1024."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from wsgateway.config.loader import ConfigError, load

ROUTE = """
[route:echo]
path = /echo
upstream = demo

[upstream:demo]
nodes = ws://127.0.0.1:9001
"""


def _load(tmp_path: Path, limits: str) -> object:
    path = tmp_path / "gw.ini"
    path.write_text(textwrap.dedent(limits) + ROUTE)
    return load(str(path), {})


def test_default_and_set(tmp_path: Path) -> None:
    assert _load(tmp_path, "").limits.max_pending_handshakes == 1024  # type: ignore[attr-defined]
    config = _load(tmp_path, "[limits]\nmax_pending_handshakes = 16\n")
    assert config.limits.max_pending_handshakes == 16  # type: ignore[attr-defined]


@pytest.mark.parametrize("value, why", [("0", "must be at least 1"), ("-1", "must be at least 1"),
                                        ("x", "is not a whole number"), ("1.5", "is not a whole number")])
def test_bad_values(tmp_path: Path, value: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, f"[limits]\nmax_pending_handshakes = {value}\n")
    assert [line for line in info.value.errors if "max_pending_handshakes" in line and why in line], info.value.errors
