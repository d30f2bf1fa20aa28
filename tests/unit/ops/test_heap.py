"""
ops/heap.py: the C heap's free pages go back to the kernel once a burst
has freed enough of them, and only then.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import task

from wsgateway.ops.heap import INTERVAL, MAX_WAIT, MIN_FREE, HeapTrim, _glibc, heap_trim_service

MiB = 1 << 20


class Heap:
    """What mallinfo2 and /proc would say: the arenas' size, the free bytes in them, RSS; and trims."""

    def __init__(self, size: int, free: int, rss: int, gives_back: int = 0) -> None:
        self.size, self.free, self.resident = size, free, rss
        self.gives_back = gives_back  # what the next trim takes off RSS
        self.trims = 0

    def read(self) -> tuple[int, int]:
        return self.size, self.free

    def rss(self) -> int:
        return self.resident

    def trim(self) -> None:
        self.trims += 1
        self.resident -= self.gives_back


def make(heap: Heap) -> tuple[HeapTrim, task.Clock]:
    clock = task.Clock()
    return HeapTrim(clock, heap.read, heap.rss, heap.trim), clock


def test_no_trim_while_glibc_holds_little_free_memory() -> None:
    heap = Heap(size=8 * MiB, free=MIN_FREE - 1, rss=60 * MiB)
    trim, clock = make(heap)
    for _ in range(100):
        trim.check()
        clock.advance(INTERVAL)
    assert heap.trims == 0


def test_a_burst_is_trimmed_as_soon_as_rss_grew_and_its_memory_is_free() -> None:
    heap = Heap(size=8 * MiB, free=2 * MiB, rss=60 * MiB, gives_back=2 * MiB)
    trim, clock = make(heap)
    trim.check()
    assert heap.trims == 1  # the first look: free memory, no trim yet
    assert heap.rss() == 58 * MiB
    clock.advance(INTERVAL / 2)
    heap.resident += MIN_FREE  # a burst: RSS up, and freed again
    trim.check()
    assert heap.trims == 2


def test_a_large_heap_needs_an_eighth_of_itself_free() -> None:
    heap = Heap(size=400 * MiB, free=49 * MiB, rss=500 * MiB)
    trim, clock = make(heap)
    trim.check()
    assert heap.trims == 0
    heap.free += 1 * MiB
    trim.check()
    assert heap.trims == 1


def test_trims_that_give_nothing_back_back_off_to_five_minutes() -> None:
    heap = Heap(size=8 * MiB, free=4 * MiB, rss=60 * MiB, gives_back=0)
    trim, clock = make(heap)
    times = []
    for _ in range(int(3600 / INTERVAL)):
        before = heap.trims
        trim.check()
        if heap.trims != before:
            times.append(clock.seconds())
        clock.advance(INTERVAL)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[:4] == [20.0, 40.0, 80.0, 160.0]
    assert set(gaps[4:]) == {MAX_WAIT}
    # a trim that gives back again: every INTERVAL while it does
    heap.gives_back = 2 * MiB
    heap.resident += 10 * MiB
    trim.check()
    clock.advance(INTERVAL)
    trim.check()
    clock.advance(INTERVAL)
    trim.check()
    assert heap.trims == len(times) + 3


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_on_glibc_the_service_gives_a_freed_burst_back_to_the_kernel() -> None:
    calls = _glibc()
    assert calls is not None, "glibc's mallinfo2 and malloc_trim (Debian has them): the gateway runs on it"
    clock = task.Clock()
    service = heap_trim_service(clock)
    service.startService()
    try:
        check = service.call[0]  # type: ignore[attr-defined]
        trim = check.__self__
        assert isinstance(trim, HeapTrim)
        # a burst: 30 MiB of C-heap blocks (bytes objects over pymalloc's
        # 512-byte limit), one in sixteen kept, so the top of the heap is not
        # free (glibc returns that by itself) but what lies below it mostly is
        kept, gone = [], []
        for i in range(20_000):
            (kept if i % 16 == 0 else gone).append(bytes(1500))
        before, trims = _rss(), trim.trims  # (the test process may have had free memory to trim at the start)
        del gone
        clock.advance(INTERVAL)
        assert trim.trims == trims + 1
        # most of the 28 MiB freed between the kept blocks left the process
        assert before - _rss() > 14 * MiB
        assert len(kept) == 1_250
    finally:
        service.stopService()
