"""
Unix signals for the daemon's own work (SIGHUP reload, SIGUSR1 log reopen),
run in the reactor thread; shared by the single process and the worker parent.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


def on_signal(name: str, reactor: Any, work: Any) -> Any:
    """
    Call C{work()} in the reactor thread each time signal C{name} arrives;
    returns the handler it replaced (None when it installed nothing).

    The way twistd rotates its log on SIGUSR1: the Python-level handler runs
    between two bytecodes of whatever the reactor thread was doing, so it
    only queues the work with C{callFromThread}, which is safe there and
    wakes the reactor up.
    """
    signum = getattr(signal, name, None)
    if signum is None or threading.current_thread() is not threading.main_thread():
        return None  # no such signal here (Windows), or not the main thread (signal.signal would fail)

    def handler(number: int, frame: Any) -> None:
        reactor.callFromThread(work)

    previous = signal.signal(signum, handler)
    return signal.SIG_DFL if previous is None else previous  # None: a handler not set from Python


def restore_signal(name: str, previous: Any) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(getattr(signal, name), previous)
