# -*- test-case-name: tests.unit.ops.test_heap -*-
"""
Giving the C heap's free memory back to the kernel once a burst of
connections is over (docs/operations.md, "Memory after a burst").

glibc keeps what is freed in its arenas and returns only the top of the
main heap by itself. After a few hundred short connections at once (a
hostile burst, a reconnect storm), the memory they used is free again, but
the process's RSS stays where the burst left it: make soak's hostile
scenario measured Python's own objects back to their count before the
burst, and RSS still 2 MiB higher in the C heap. ``malloc_trim(0)`` hands
the free pages anywhere in the arenas back (``MADV_DONTNEED``). Envoy's
overload action ``shrink_heap`` does the same with tcmalloc, and Ruby calls
malloc_trim after each major collection.

A trim takes time in proportion to the heap, with the reactor waiting
(measured: 40 ms for a fragmented 500 MiB heap, about 1 ms for the gateway's
usual 15), so it is done only when it may give something back. Every
``INTERVAL`` seconds, if glibc holds at least ``max(MIN_FREE, heap / 8)``
free bytes (``mallinfo2``, under a millisecond), a trim is due when RSS has
grown by ``MIN_FREE`` since the last one (a burst came) or when its wait is
over; a trim that gave back less than ``MIN_FREE`` doubles the wait (up to
``MAX_WAIT``), one that gave more sets it back to ``INTERVAL``. Steady
traffic, with flat RSS, costs one trim every five minutes at most.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

INTERVAL = 10.0  # seconds between looks at the heap
MIN_FREE = 1 << 20  # free bytes, and RSS growth since the last trim, that make a trim worth its time
MAX_WAIT = 300.0  # seconds: the longest wait between trims while glibc holds free memory


class _MallInfo2(ctypes.Structure):
    # glibc >= 2.33, malloc.h: struct mallinfo2 (every field a size_t)
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class HeapTrim:
    """
    The decision, apart from libc: ``heap()`` gives (bytes the arenas take,
    bytes free in them), ``rss()`` the process's resident bytes, ``trim()``
    gives the free pages back.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, heap: Callable[[], tuple[int, int]], rss: Callable[[], int],
                 trim: Callable[[], object]) -> None:
        self._clock = clock
        self._heap = heap
        self._rss = rss
        self._trim = trim
        self._after: int | None = None  # RSS right after the last trim
        self._wait = INTERVAL
        self._next = 0.0  # when a trim is due even without RSS growth
        self.trims = 0

    def check(self) -> None:
        size, free = self._heap()
        if free < max(MIN_FREE, size // 8):
            return
        before = self._rss()
        now = self._clock.seconds()
        if self._after is not None and before < self._after + MIN_FREE and now < self._next:
            return
        self._trim()
        self.trims += 1
        self._after = after = self._rss()
        self._wait = INTERVAL if before - after >= MIN_FREE else min(self._wait * 2, MAX_WAIT)
        self._next = now + self._wait
        self.log.debug("heap trimmed: RSS {before} -> {after} bytes ({free} free of {size} in the arenas)",
                       before=before, after=after, free=free, size=size)


def _rss() -> int:
    """Resident bytes of this process (/proc/self/statm: pages)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _glibc() -> tuple[Callable[[], tuple[int, int]], Callable[[], int], Callable[[], object]] | None:
    """glibc's mallinfo2 and malloc_trim, and RSS from /proc; None elsewhere (musl, macOS, an older glibc)."""
    try:
        libc: Any = ctypes.CDLL(None)
        mallinfo2, malloc_trim = libc.mallinfo2, libc.malloc_trim
        _rss()
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    mallinfo2.argtypes = []
    malloc_trim.argtypes = [ctypes.c_size_t]

    def heap() -> tuple[int, int]:
        info = mallinfo2()
        return int(info.arena), int(info.fordblks)

    return heap, _rss, lambda: malloc_trim(0)


def heap_trim_service(clock: Any) -> Service:
    """A service that trims the heap after bursts, on ``clock``; one that does nothing without glibc."""
    calls = _glibc()
    if calls is None:
        return Service()
    service = TimerService(INTERVAL, HeapTrim(clock, *calls).check)
    service.clock = clock
    return service
