"""
The one way the tests wait: poll an observable until it holds, never a
bare sleep. ``wait_for`` is for threads and plain test functions (it blocks);
``wait_for_async`` is for ``pytest_twisted`` tests (it yields to the reactor
between polls, and its predicate may return an awaitable).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable

from twisted.internet import reactor
from twisted.internet.task import deferLater


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; its last truth."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


async def sleep(seconds: float) -> None:
    """Let the real reactor run for ``seconds`` (for tests that check something does NOT happen)."""
    await deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


async def wait_for_async(predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``predicate`` (its result may be awaitable) while the reactor runs; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"{what} not met in {timeout}s"
        await sleep(0.01)
