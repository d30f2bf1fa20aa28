"""
The test tiers (tests/README.md). A test is in the ``integration`` tier when
it lives under tests/integration/ or tests/browser/, or when it uses a
fixture that starts a process (``PROCESS_FIXTURES``); tests/conftest.py
adds the marker, so a new test cannot forget it.

``require_integration`` is called by every helper that starts a server
process (twistd, redis-server); it fails loudly when the running test is not
in the integration tier, so ``pytest -m "not integration"`` provably starts
none of them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
INTEGRATION_FOLDERS = (TESTS / "integration", TESTS / "browser")
SECURITY = TESTS / "security"
SOAK = TESTS / "integration" / "test_soak.py"
# fixtures that start twistd, redis-server or Chromium (directly or through another fixture)
PROCESS_FIXTURES = frozenset({
    "start_gateway",
    "redis_server",
    "sentinel_cluster",
    # tests/security: the long-lived gateway, its module-scoped siblings, and the
    # secrets every one of them logged (judged after they ran)
    "main",
    "sent",
    "limited",
    "rs_pem",
    "rs_jwks",
    "playwright",  # tests/browser
})

_current: pytest.Item | None = None


def is_integration(item: pytest.Item) -> bool:
    path = Path(str(item.path))
    if any(folder in path.parents for folder in INTEGRATION_FOLDERS):
        return True
    return bool(PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())))


def group_of(item: pytest.Item) -> str:
    """
    The pytest-xdist group of a test: its module (whose module-scoped
    gateway its tests share), or ``security`` for all of tests/security
    (one session-scoped gateway, judged by test_survival.py after the rest),
    or the test itself for the soak scenarios, which share nothing.
    """
    path = Path(str(item.path))
    if SECURITY in path.parents:
        return "security"
    if path == SOAK:
        # each make soak scenario (a minute or two of its own processes) on whichever worker is free
        return item.nodeid
    return path.relative_to(TESTS).as_posix()


def entering(item: pytest.Item | None) -> None:
    global _current
    _current = item


def require_integration(what: str) -> None:
    if _current is not None and _current.get_closest_marker("integration") is None:
        raise RuntimeError(
            f"{_current.nodeid} starts {what} but is not in the integration tier: move it under "
            "tests/integration/ or give it a fixture listed in tests/support/tiers.py PROCESS_FIXTURES"
        )
